"""The outbox: bounded, drops the oldest (counted), drains in order, each write once."""

from __future__ import annotations

import asyncio
import logging

import pytest

from controller.outbox import Outbox


class Unavailable(Exception):
    pass


def test_holds_writes_oldest_first() -> None:
    box: Outbox[int] = Outbox(limit=3)
    for n in (1, 2, 3):
        box.put(n)
    assert box.pending() == [1, 2, 3] and len(box) == 3 and box.dropped == 0


def test_when_full_the_oldest_goes_and_is_counted(caplog: pytest.LogCaptureFixture) -> None:
    box: Outbox[int] = Outbox(limit=3)
    with caplog.at_level(logging.WARNING, "tgfleet.outbox"):
        for n in range(1, 16):
            box.put(n)
    assert box.pending() == [13, 14, 15]
    assert box.dropped == 12
    # Warned at the 1st and the 10th drop, not at every one.
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2
    assert "1 dropped so far" in warnings[0] and "10 dropped so far" in warnings[1]


def test_a_limit_below_one_is_refused() -> None:
    with pytest.raises(ValueError):
        Outbox(limit=0)


async def test_drains_in_order() -> None:
    box: Outbox[int] = Outbox(limit=10)
    for n in range(5):
        box.put(n)
    written: list[int] = []

    async def write(n: int) -> None:
        written.append(n)

    assert await box.drain(write) == 5
    assert written == [0, 1, 2, 3, 4] and len(box) == 0


async def test_a_failed_write_stays_first_in_line() -> None:
    box: Outbox[str] = Outbox(limit=10)
    for item in "abc":
        box.put(item)
    written: list[str] = []
    down = True

    async def write(item: str) -> None:
        if down and item == "b":
            raise Unavailable
        written.append(item)

    with pytest.raises(Unavailable):
        await box.drain(write)
    assert written == ["a"] and box.pending() == ["b", "c"]
    box.put("d")
    down = False
    assert await box.drain(write) == 3
    assert written == ["a", "b", "c", "d"]


async def test_overlapping_drains_write_each_item_once() -> None:
    box: Outbox[int] = Outbox(limit=100)
    for n in range(20):
        box.put(n)
    written: list[int] = []

    async def slow_write(n: int) -> None:
        await asyncio.sleep(0)
        written.append(n)

    await asyncio.gather(box.drain(slow_write), box.drain(slow_write), box.drain(slow_write))
    assert written == list(range(20))


async def test_a_write_dropped_while_it_was_being_written_is_not_dropped_twice() -> None:
    box: Outbox[int] = Outbox(limit=2)
    box.put(1)
    box.put(2)
    written: list[int] = []

    async def write(n: int) -> None:
        if n == 1:
            box.put(3)  # full: 1 (being written) is dropped, 2 and 3 stay
        written.append(n)

    await box.drain(write)
    assert written == [1, 2, 3] and box.dropped == 1 and len(box) == 0
