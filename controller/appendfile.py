"""circusd's log files and pipes without Python's buffers: what each watcher costs it.

Circus' ``FileStream`` opens its file as ``open(name, "a+")``: a text wrapper over a
buffered reader-writer, ~4 KB of buffer and codec state a stream, two streams a
watcher; and circus starts each process with ``stdout``/``stderr`` pipes that
``subprocess`` wraps in a buffered reader each (4 KB of buffer apiece), which circus'
redirector never reads through (it ``os.read``s the descriptor). ~17 KB a watcher in
all, 1.7 MB of circusd at 100 bots (bench/memory.py). Here the stream writes each
chunk straight to its descriptor (one ``write`` each, as its ``flush`` after every
chunk did) and the pipes stay unbuffered: what lands in the files is the same.

Used by ``controller.circusd`` (``unbuffered_streams``, once before circusd's
``main``); nothing is imported here at import time beyond the standard library.
"""

from __future__ import annotations

import functools
import os
from types import ModuleType
from typing import Any


class AppendFile:
    """What circus' ``FileStream`` uses of its file (``write`` of text, ``flush``,
    ``seek``/``tell`` for rotation, ``close``), over a bare descriptor opened for
    appending: no buffer, so nothing is held back and nothing is lost at a crash."""

    __slots__ = ("_fd", "closed")

    def __init__(self, path: str) -> None:
        # As open(path, "a+"): created 0666 less circusd's umask (077: 0600).
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o666)
        self.closed = False

    def write(self, text: str) -> int:
        # Strict, as the text file was: FileStream catches the error and writes the
        # chunk again as latin-1 with replacements.
        data = memoryview(text.encode("utf-8"))
        while data:
            data = data[os.write(self._fd, data) :]
        return len(text)

    def flush(self) -> None:
        """Nothing is buffered."""

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return os.lseek(self._fd, offset, whence)

    def tell(self) -> int:
        return os.lseek(self._fd, 0, os.SEEK_CUR)

    def fileno(self) -> int:
        return self._fd

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            os.close(self._fd)


def unbuffered_streams(file_stream: ModuleType, process: ModuleType) -> None:
    """Circus' file streams write through ``AppendFile``; its processes' pipes get no
    buffered reader (``circus.stream.file_stream`` and ``circus.process``, patched)."""

    def _open(self: Any) -> AppendFile:
        return AppendFile(self._filename)

    setattr(file_stream._FileStreamBase, "_open", _open)  # noqa: B010  (circus looks it up)
    setattr(process, "Popen", functools.partial(process.Popen, bufsize=0))  # noqa: B010
