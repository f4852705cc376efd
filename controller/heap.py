"""The controller gives the C heap's free memory back to the system, once a minute.

What the controller's RSS grows by with the fleet is mostly not what it keeps: after
100 bots were created (bench/memory.py --bots 100), glibc's heap held 20 MB in use
and 18 MB free, freed by then but left mapped (the peak of the burst: request and
answer bodies, rendered files, /proc reads). glibc gives back only the top of its
heap by itself; ``malloc_trim(0)`` returns every free page (73 → 59 MB RSS there).
The memory is taken again when needed: trimming costs a few milliseconds a minute,
a bigger burst costs its pages again until the next trim.

Only on glibc (Linux's usual C library); elsewhere ``release_free_heap`` does nothing.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
from collections.abc import Callable

log = logging.getLogger("tgfleet.heap")

#: Seconds between two trims.
TRIM_EVERY_S = 60.0


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # no C library to reach, or not glibc's
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_TRIM = _malloc_trim()


def release_free_heap() -> bool:
    """Give the C heap's free pages back to the system; whether any were (False also
    where the C library has no ``malloc_trim``)."""
    return bool(_TRIM(0)) if _TRIM is not None else False


async def keep_heap_trimmed(stopping: asyncio.Event, every_s: float = TRIM_EVERY_S) -> None:
    """``release_free_heap`` every ``every_s`` until ``stopping`` is set."""
    if _TRIM is None:
        log.info("no malloc_trim in this C library: the heap is not trimmed")
        return
    while True:
        try:
            await asyncio.wait_for(stopping.wait(), every_s)
            return
        except TimeoutError:  # a minute more without stopping: time for a trim
            # In a thread: a trim walks the whole heap (ms here, more for a big heap),
            # and ctypes lets go of the GIL for it.
            await asyncio.to_thread(release_free_heap)
