"""The controller's clock, as a seam: wall time for timestamps, monotonic time for ages.

Code that reads the time takes a ``Clock``; production passes ``SystemClock()``,
tests a ``FakeClock`` they move by hand, so a history of minutes runs in
milliseconds. (The bot has its own, ``botrunner.health.Clock``, of the same shape.)
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def wall(self) -> float:
        """Seconds since the epoch (timestamps that leave the process)."""
        ...

    def monotonic(self) -> float:
        """Seconds from an arbitrary origin that never go back (ages, deadlines)."""
        ...


class SystemClock:
    """The real time."""

    def wall(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()


class FakeClock:
    """A clock that moves only when told: ``advance`` moves both times, ``set_wall``
    steps the wall time alone (as NTP may), monotonic time never goes back."""

    def __init__(self, wall: float = 1_700_000_000.0, monotonic: float = 1_000.0) -> None:
        self._wall = wall
        self._monotonic = monotonic

    def wall(self) -> float:
        return self._wall

    def monotonic(self) -> float:
        return self._monotonic

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError(f"time does not go back (asked to advance {seconds} s)")
        self._wall += seconds
        self._monotonic += seconds

    def set_wall(self, wall: float) -> None:
        self._wall = wall
