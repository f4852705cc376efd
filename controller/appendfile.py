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
import io
from types import ModuleType
from typing import Any


class AppendFile(io.FileIO):
    """What circus' ``FileStream`` uses of its file (``write`` of text, ``flush``,
    ``seek``/``tell`` for rotation, ``close``), over a raw file opened for appending
    (``O_APPEND``, created 0666 less circusd's umask, as ``open(path, "a+")`` did): no
    buffer, so nothing is held back and nothing is lost at a crash. A ``FileIO`` closes
    its descriptor when dropped: circus drops a changed or removed watcher's streams
    (``reloadconfig``, ``rm``) without closing them, as it did its text files."""

    def __init__(self, path: str) -> None:
        super().__init__(path, "a")

    def write(self, text: str) -> int:  # type: ignore[override]  # text, as a text file
        # Strict, as the text file was: FileStream catches the error and writes the
        # chunk again as latin-1 with replacements.
        data = memoryview(text.encode("utf-8"))
        while data:
            written = super().write(data)
            data = data[written or 0 :]
        return len(text)


def unbuffered_streams(file_stream: ModuleType, process: ModuleType) -> None:
    """Circus' file streams write through ``AppendFile``; its processes' pipes get no
    buffered reader (``circus.stream.file_stream`` and ``circus.process``, patched)."""

    def _open(self: Any) -> AppendFile:
        return AppendFile(self._filename)

    setattr(file_stream._FileStreamBase, "_open", _open)  # noqa: B010  (circus looks it up)
    setattr(process, "Popen", functools.partial(process.Popen, bufsize=0))  # noqa: B010
