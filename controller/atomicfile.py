"""Files that readers must see whole: written to a temp file, then renamed into place."""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path


def write_atomic(
    path: Path, text: str, mode: int = 0o600, owner: tuple[int, int] | None = None
) -> bool:
    """Write ``text`` to ``path`` via a temp file and rename; False when unchanged.

    Readers (circusd's reloadconfig) see the old file or the new one, never a
    half-written one. The temp file gets ``mode`` (and ``owner``, uid and gid)
    before any byte is written.
    """
    if _holds(path, text, mode, owner):
        return False
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        os.fchmod(fd, mode)
        if owner is not None:
            os.fchown(fd, *owner)
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return True


def _holds(path: Path, text: str, mode: int, owner: tuple[int, int] | None) -> bool:
    """Whether ``path`` is already a regular file with this text, mode and owner.

    Read without following a symlink and without blocking: in a bot's own dir the
    bot may have put a symlink to /dev/zero, or a FIFO, where its config goes; that
    is no file to compare with, just something to replace."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:  # missing, or a symlink (ELOOP): nothing to compare with
        return False
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size != len(text.encode()):
            return False
        same = handle.read(info.st_size + 1) == text.encode()
    return (
        same
        and (info.st_mode & 0o777) == mode
        and (owner is None or (info.st_uid, info.st_gid) == owner)
    )
