"""CircusClient against a scripted stand-in for circusd's ROUTER socket (no circusd)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import zmq
import zmq.asyncio

from controller.circus import CircusClient, CircusError, CircusUnavailable, WatcherNotFound

Answer = Callable[[dict[str, Any]], dict[str, Any] | None]


class ScriptedCircusd:
    """Binds a ROUTER like circusd; answers each request with the next scripted reply."""

    def __init__(self, endpoint: str, answers: list[Answer]) -> None:
        self.endpoint = endpoint
        self.answers = answers
        self.requests: list[dict[str, Any]] = []
        self.context = zmq.asyncio.Context()
        self.socket = self.context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(endpoint)

    async def serve(self) -> None:
        while True:
            identity, raw = await self.socket.recv_multipart()
            request = json.loads(raw)
            self.requests.append(request)
            answer = self.answers.pop(0)(request) if self.answers else ok()(request)
            if answer is not None:  # None: stay silent
                answer["id"] = request["id"]
                await self.socket.send_multipart([identity, json.dumps(answer).encode()])


def ok(**extra: Any) -> Answer:
    return lambda request: {"status": "ok", "time": 0, **extra}


def error(reason: str, errno: int) -> Answer:
    return lambda request: {"status": "error", "reason": reason, "errno": errno, "tb": None}


BUSY = error("arbiter is already running watcher_stop command", 5)


@pytest.fixture
async def scripted(tmp_path: Path) -> AsyncIterator[Callable[..., ScriptedCircusd]]:
    servers: list[tuple[ScriptedCircusd, asyncio.Task[None]]] = []

    def start(*answers: Answer) -> ScriptedCircusd:
        server = ScriptedCircusd(f"ipc://{tmp_path}/c.sock", list(answers))
        servers.append((server, asyncio.create_task(server.serve())))
        return server

    yield start
    for server, task in servers:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        server.socket.close(linger=0)
        server.context.term()


async def test_request_shape_and_answers(scripted: Callable[..., ScriptedCircusd]) -> None:
    server = scripted(
        ok(statuses={"bot-a": "active", "controller": "active"}),
        ok(pids=[42, 7]),
        ok(watchers=["bot-a", "controller"]),
        ok(),
        ok(),
    )
    client = CircusClient(server.endpoint)
    assert await client.status() == {"bot-a": "active", "controller": "active"}
    assert await client.pids("bot-a") == [7, 42]
    assert await client.list_watchers() == ["bot-a", "controller"]
    await client.stop("bot-a")
    await client.reloadconfig()
    commands = [(r["command"], r["properties"]) for r in server.requests]
    assert commands == [
        ("status", {}),
        ("list", {"name": "bot-a"}),
        ("list", {}),
        ("stop", {"name": "bot-a", "match": "simple"}),
        ("reloadconfig", {"waiting": True}),
    ]
    ids = [r["id"] for r in server.requests]
    assert len(set(ids)) == len(ids) and all(len(i) == 32 for i in ids)


async def test_busy_errno_5_is_retried(scripted: Callable[..., ScriptedCircusd]) -> None:
    server = scripted(BUSY, BUSY, BUSY, ok())
    await CircusClient(server.endpoint).restart("bot-a")
    assert [r["command"] for r in server.requests] == ["restart"] * 4


async def test_busy_retry_is_bounded(scripted: Callable[..., ScriptedCircusd]) -> None:
    server = scripted(*[BUSY] * 100)
    started = time.monotonic()
    with pytest.raises(CircusError) as raised:
        await CircusClient(server.endpoint, busy_retry_s=0.3).start("bot-a")
    assert raised.value.errno == 5 and raised.value.busy
    assert 0.1 < time.monotonic() - started < 1.0
    assert 2 <= len(server.requests) < 10


async def test_other_errno_5_is_not_retried(scripted: Callable[..., ScriptedCircusd]) -> None:
    server = scripted(error("command 'x': boom", 5))
    with pytest.raises(CircusError) as raised:
        await CircusClient(server.endpoint).start("bot-a")
    assert not raised.value.busy
    assert len(server.requests) == 1


async def test_unknown_watcher(scripted: Callable[..., ScriptedCircusd]) -> None:
    server = scripted(error("program bot-x not found", 3))
    with pytest.raises(WatcherNotFound) as raised:
        await CircusClient(server.endpoint).pids("bot-x")
    assert (raised.value.name, raised.value.command, raised.value.errno) == ("bot-x", "list", 3)


async def test_silent_circusd_times_out(scripted: Callable[..., ScriptedCircusd]) -> None:
    server = scripted(lambda request: None)
    started = time.monotonic()
    with pytest.raises(CircusUnavailable):
        await CircusClient(server.endpoint, timeout_s=0.2).status()
    assert time.monotonic() - started < 1


async def test_no_circusd_times_out(tmp_path: Path) -> None:
    with pytest.raises(CircusUnavailable) as raised:
        await CircusClient(f"ipc://{tmp_path}/none.sock", timeout_s=0.2).status()
    assert raised.value.command == "status"
