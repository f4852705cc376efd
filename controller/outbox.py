"""Writes that must not wait for PostgreSQL: a bounded queue, drained in order.

Health and everything that talks to circusd act from memory; what they want
written (events, transitions) is put here and written when the database
answers. The queue is bounded: when full, the oldest write is dropped and
counted, so a long outage costs the oldest history, never the controller's
memory or its ability to act.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

log = logging.getLogger("tgfleet.outbox")

T = TypeVar("T")

DEFAULT_LIMIT = 10_000


def _worth_a_warning(dropped: int) -> bool:
    """1, 10, 100, …: a long outage warns a handful of times, not once per write."""
    while dropped % 10 == 0:
        dropped //= 10
    return dropped == 1


class Outbox(Generic[T]):
    """A bounded FIFO of pending writes; ``drain`` writes them in order, each once."""

    def __init__(self, limit: int = DEFAULT_LIMIT) -> None:
        if limit < 1:
            raise ValueError(f"an outbox holds at least one write, not {limit}")
        self.limit = limit
        self.dropped = 0
        self._items: deque[T] = deque()
        self._draining = asyncio.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def put(self, item: T) -> None:
        """Queue ``item``; when full, drop the oldest write (counted, warned at 1, 10, 100…)."""
        if len(self._items) >= self.limit:
            self._items.popleft()
            self.dropped += 1
            if _worth_a_warning(self.dropped):
                log.warning(
                    "outbox full (%d writes waiting for PostgreSQL): dropped the oldest; "
                    "%d dropped so far",
                    self.limit,
                    self.dropped,
                )
        self._items.append(item)

    def pending(self) -> list[T]:
        """What waits, oldest first (a copy)."""
        return list(self._items)

    async def drain(self, write: Callable[[T], Awaitable[object]]) -> int:
        """Write every queued item in order; how many were written.

        An item leaves the queue only once ``write`` returned; the first failure
        stops the drain and is raised, leaving that item first in line. Drains
        never overlap, so no item is written twice.
        """
        written = 0
        async with self._draining:
            while self._items:
                item = self._items[0]
                await write(item)
                # Dropped meanwhile (the queue overflowed while we wrote)? Then it is gone.
                if self._items and self._items[0] is item:
                    self._items.popleft()
                written += 1
        return written
