"""A test plugin: what may this bot's user read, list, connect to and leave behind?

Settings: ``read``, ``list``, ``connect`` (paths: files, dirs, unix sockets) and
``leave`` (a file to write). It writes what it found, each path's outcome an
errno name or "ok", to ``peek.json`` in its own data dir, before the bot connects.
"""

from __future__ import annotations

import errno
import json
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _outcome(attempt: Callable[[], object]) -> str:
    try:
        attempt()
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc.errno))
    return "ok"


def _connect(path: str) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(path)


def setup(client: Any, ctx: Any) -> None:
    seen: dict[str, Any] = {"uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups()}
    for path in ctx.settings.get("read", []):
        seen[f"read {path}"] = _outcome(lambda path=path: Path(path).read_bytes())
    for path in ctx.settings.get("list", []):
        seen[f"list {path}"] = _outcome(lambda path=path: os.listdir(path))
    for path in ctx.settings.get("connect", []):
        seen[f"connect {path}"] = _outcome(lambda path=path: _connect(path))
    leave = ctx.settings.get("leave")
    if leave:
        Path(leave).write_text("left behind by a bot\n")
    (Path(ctx.data_dir) / "peek.json").write_text(json.dumps(seen))
