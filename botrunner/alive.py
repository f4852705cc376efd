"""The bot's health as a file, for supervisors that cannot hear the bus (Kubernetes).

When ``TGFLEET_ALIVE_FILE`` names a file, the bot rewrites it at every heartbeat
with what the heartbeat says of Telegram. ``python -m botrunner.alive FILE``
reads it and exits 0 (alive) or 1 (one line on stderr says why): the heartbeat
is older than ``--max-age`` (the event loop is hung, or the process stopped),
or Telegram has been unreachable longer than ``--disconnect-grace``; with
``--connected``, only a bot logged in to Telegram passes (a startup probe).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from botspec import protocol

ENV_VAR = "TGFLEET_ALIVE_FILE"


def alive_record(telegram: protocol.TelegramHealth, fatal: bool, now: float) -> bytes:
    """The file's bytes for one heartbeat."""
    record = {
        "at": now,
        "connected": telegram.connected,
        "disconnected_since": telegram.disconnected_since,
        "fatal": fatal,
    }
    return json.dumps(record).encode() + b"\n"


def write_alive(path: Path, data: bytes) -> None:
    """Replace the file at once: a reader sees the old record or the new, never half."""
    scratch = path.with_name(f".{path.name}.tmp")
    scratch.write_bytes(data)
    os.replace(scratch, path)


def problem(
    data: bytes | None,
    now: float,
    *,
    max_age_s: float,
    disconnect_grace_s: float | None = None,
    require_connected: bool = False,
) -> str | None:
    """Why the bot that wrote ``data`` is not alive at ``now``; None when it is."""
    if data is None:
        return "no heartbeat written yet"
    try:
        record = json.loads(data)
        at = float(record["at"])
        connected = record["connected"] is True
        since = record.get("disconnected_since")
        since = None if since is None else float(since)
    except (ValueError, TypeError, KeyError) as exc:  # JSON, a field's type, a missing field
        return f"unreadable heartbeat file: {exc!r}"
    age = now - at
    if age > max_age_s:
        return f"last heartbeat {age:.1f} s ago (more than {max_age_s:g} s)"
    if require_connected and not connected:
        return "not logged in to Telegram yet"
    if (
        disconnect_grace_s is not None
        and not connected
        and since is not None
        and now - since > disconnect_grace_s
    ):
        return f"Telegram unreachable for {now - since:.1f} s (more than {disconnect_grace_s:g} s)"
    return None


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m botrunner.alive", description=__doc__)
    parser.add_argument("file", type=Path)
    parser.add_argument("--max-age", type=float, required=True, help="seconds")
    parser.add_argument("--disconnect-grace", type=float, default=None, help="seconds")
    parser.add_argument("--connected", action="store_true", help="pass only when logged in")
    args = parser.parse_args(argv)
    try:
        data: bytes | None = args.file.read_bytes()
    except FileNotFoundError:
        data = None
    found = problem(
        data,
        time.time(),
        max_age_s=args.max_age,
        disconnect_grace_s=args.disconnect_grace,
        require_connected=args.connected,
    )
    if found is not None:
        print(f"not alive: {found}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
