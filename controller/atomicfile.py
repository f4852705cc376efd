"""Files that readers must see whole: written to a temp file, then renamed into place."""

from __future__ import annotations

import os
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
    try:
        info = path.stat()
        if (
            path.read_text() == text
            and (info.st_mode & 0o777) == mode
            and (owner is None or (info.st_uid, info.st_gid) == owner)
        ):
            return False
    except FileNotFoundError:
        pass
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
