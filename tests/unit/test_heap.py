"""The controller's heap trim (controller.heap), in this very process."""

from __future__ import annotations

import asyncio

from controller.heap import keep_heap_trimmed, release_free_heap


def test_free_heap_pages_are_given_back() -> None:
    # Chunks over 512 bytes come from the C heap (not Python's own arenas); freeing
    # nine in ten leaves whole free pages between the survivors.
    chunks = [bytes(600) for _ in range(50_000)]
    survivors = chunks[::10]
    del chunks
    assert release_free_heap() is True  # glibc: some memory was released
    assert len(survivors) == 5_000


def test_the_trim_task_ends_when_the_controller_stops() -> None:
    async def run() -> None:
        stopping = asyncio.Event()
        task = asyncio.create_task(keep_heap_trimmed(stopping, every_s=0.01))
        await asyncio.sleep(0.05)  # a few trims
        assert not task.done()
        stopping.set()
        await asyncio.wait_for(task, 5)

    asyncio.run(run())
