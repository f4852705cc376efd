"""What the bot knows about its own health, as heartbeats report it.

Pure bookkeeping with an injected clock: the login loop and the probe write
into ``TelegramStatus``; the heartbeat reads ``snapshot()``. Telethon's own
``is_connected()`` is not consulted: it stays True during its reconnects and
while the peer is silent.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from botspec.protocol import TelegramHealth


@dataclass(frozen=True)
class Clock:
    """Wall time for timestamps that leave the process, monotonic time for ages."""

    wall: Callable[[], float] = time.time
    monotonic: Callable[[], float] = time.monotonic


class TelegramStatus:
    """Connection state as last observed by the runner's own calls to Telegram."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self.connected = False
        self.disconnected_since: float | None = clock.wall()
        self.last_error: str | None = None
        self._last_update_at: float | None = None  # monotonic
        self._flood_wait_until: float | None = None  # wall

    def mark_connected(self) -> None:
        self.connected = True
        self.disconnected_since = None

    def mark_disconnected(self, error: str) -> None:
        """Record a failed call; ``disconnected_since`` keeps the first failure's time."""
        if self.connected or self.disconnected_since is None:
            self.disconnected_since = self._clock.wall()
        self.connected = False
        self.last_error = error

    def note_update(self) -> None:
        self._last_update_at = self._clock.monotonic()

    def note_flood_wait(self, seconds: float) -> float:
        """Record a FloodWait of ``seconds``; returns the wall time it ends."""
        until = self._clock.wall() + seconds
        self._flood_wait_until = until
        self.last_error = f"FloodWaitError: wait {seconds:g} s"
        return until

    def snapshot(self) -> TelegramHealth:
        now_wall = self._clock.wall()
        flood_until = self._flood_wait_until
        if flood_until is not None and flood_until <= now_wall:
            flood_until = None
        age = None
        if self._last_update_at is not None:
            age = round(max(0.0, self._clock.monotonic() - self._last_update_at), 3)
        return TelegramHealth(
            connected=self.connected,
            disconnected_since=None if self.connected else self.disconnected_since,
            last_error=self.last_error,
            last_update_age_s=age,
            flood_wait_until=flood_until,
        )


class Counters:
    """Plugin handler outcomes, how many handlers are running right now, and the
    Telegram messages received (new ones, not the bot's own; those sent are counted by
    ``botrunner.telegram.CountingClient``)."""

    def __init__(self) -> None:
        self.handled = 0
        self.handler_errors = 0
        self.running = 0
        self.messages_in = 0
