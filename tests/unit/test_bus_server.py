"""The controller's BusServer with real ZeroMQ sockets: what it delivers, drops and sends."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import stat
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import zmq
import zmq.asyncio
from harness import wait_for_async

from botrunner.bus import BusClient
from botspec import protocol
from controller.bus import BusServer

ENV = {"pid": 1, "generation": 2, "ts": 1_700_000_000.0}


@pytest.fixture
def short_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="bus-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def server(short_dir: Path) -> AsyncIterator[BusServer]:
    bus = BusServer(f"ipc://{short_dir}/bus.sock")
    yield bus
    bus.close()


class RawPeer:
    """A DEALER that sends whatever bytes a test wants, under any routing id."""

    def __init__(self, endpoint: str, routing_id: bytes) -> None:
        self.context = zmq.asyncio.Context()
        self.socket = self.context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.ROUTING_ID, routing_id)
        self.socket.connect(endpoint)

    async def send(self, *frames: bytes) -> None:
        await asyncio.wait_for(self.socket.send_multipart(list(frames)), 2)

    def close(self) -> None:
        self.socket.close()
        self.context.term()


def stopping(bot: str, reason: str = "x") -> bytes:
    return protocol.encode(protocol.Stopping(bot=bot, reason=reason, **ENV))


async def test_socket_file_is_private(server: BusServer, short_dir: Path) -> None:
    assert stat.S_IMODE(os.stat(short_dir / "bus.sock").st_mode) == 0o600


async def test_bad_input_is_dropped_and_the_next_good_message_arrives(server: BusServer) -> None:
    peer = RawPeer(server.endpoint, b"shop")
    try:
        await peer.send(b"not json")
        await peer.send(b'{"v": 1, "type": "reboot"}')
        await peer.send(stopping("other-bot"))  # lies about who it is
        await peer.send(stopping("shop"), b"extra frame")
        await peer.send(b"\xff\xfe")
        event_with_source = protocol.Event(bot="shop", topic="t", data=1, source="x", **ENV)
        await peer.send(protocol.encode(event_with_source))
        await peer.send(stopping("shop", "the good one"))
        message = await asyncio.wait_for(server.receive(), 5)
        assert message == protocol.Stopping(bot="shop", reason="the good one", **ENV)
        assert server.dropped_in == 6
    finally:
        peer.close()


async def test_a_routing_id_that_is_not_utf8_is_dropped(server: BusServer) -> None:
    peer = RawPeer(server.endpoint, b"\xff\xfe")
    good = RawPeer(server.endpoint, b"shop")
    try:
        await peer.send(stopping("shop"))
        await good.send(stopping("shop", "good"))
        message = await asyncio.wait_for(server.receive(), 5)
        assert isinstance(message, protocol.Stopping) and message.reason == "good"
        # two connections: the bad frame may be read before or after the good one
        waiting = asyncio.create_task(server.receive())
        await wait_for_async("the bad frame dropped", lambda: server.dropped_in, 5, 0.02)
        waiting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiting
        assert server.dropped_in == 1
    finally:
        peer.close()
        good.close()


async def test_round_trip_with_the_bot_client(server: BusServer) -> None:
    client = BusClient(server.endpoint, "shop")
    try:
        assert await client.wait_connected(5)
        assert client.send(protocol.Event(bot="shop", topic="orders", data={"n": 1}, **ENV))
        received = await asyncio.wait_for(server.receive(), 5)
        assert isinstance(received, protocol.Event) and received.data == {"n": 1}
        # passed on as it is: re-addressed to the recipient, source = the publisher
        another = BusClient(server.endpoint, "stock")
        try:
            assert await another.wait_connected(5)

            def delivered() -> bool:
                return server.send("stock", received)

            # the ROUTER learns the new peer's id asynchronously
            await wait_for_async("the event sent to stock", delivered, 5, 0.02)
            event = await asyncio.wait_for(another.receive(), 5)
            assert (event.bot, event.source, event.topic) == ("stock", "shop", "orders")
        finally:
            another.close()
    finally:
        client.close()


async def test_send_to_a_bot_that_is_not_connected_is_dropped(server: BusServer) -> None:
    event = protocol.Event(bot="controller", topic="t", data=None, **ENV)
    assert server.send("nobody", event) is False
    assert server.dropped_out == 1
    with pytest.raises(ValueError, match="JSON"):
        server.send("nobody", protocol.Event(bot="controller", topic="t", data={1}, **ENV))


async def test_async_iteration_ends_when_closed(server: BusServer) -> None:
    received: list[protocol.Message] = []

    async def consume() -> None:
        async for message in server:
            received.append(message)

    consumer = asyncio.create_task(consume())
    peer = RawPeer(server.endpoint, b"shop")
    try:
        await peer.send(stopping("shop"))
        await wait_for_async("the message iterated", lambda: received, 5, 0.02)
        assert len(received) == 1
        server.close()
        await asyncio.wait_for(consumer, 5)
    finally:
        peer.close()


async def test_bot_client_drops_instead_of_blocking_when_no_controller(short_dir: Path) -> None:
    client = BusClient(f"ipc://{short_dir}/nobody.sock", "shop")
    try:
        assert client.send(protocol.Stopping(bot="shop", reason="x", **ENV)) is False
        assert await client.wait_connected(0.05) is False
        assert client.dropped == 1
    finally:
        client.close()


async def test_bot_client_skips_events_for_someone_else(server: BusServer) -> None:
    client = BusClient(server.endpoint, "shop")
    try:
        assert await client.wait_connected(5)
        client.send(protocol.Stopping(bot="shop", reason="hello", **ENV))
        await asyncio.wait_for(server.receive(), 5)  # the ROUTER now knows "shop"
        # a raw frame addressed (inside) to another bot, then a good one
        wrong = protocol.Event(bot="stock", topic="t", data=1, source="c", **ENV)
        raw = server._socket  # the test speaks below BusServer.send, which re-addresses
        await raw.send_multipart([b"shop", protocol.encode(wrong)])
        await raw.send_multipart([b"shop", b"garbage"])
        assert server.send("shop", protocol.Event(bot="controller", topic="t", data=2, **ENV))
        event = await asyncio.wait_for(client.receive(), 5)
        assert (event.data, event.source) == (2, "controller")
    finally:
        client.close()


def test_encode_is_compact_json() -> None:
    frame = stopping("shop")
    assert json.loads(frame)["reason"] == "x"
    assert b" " not in frame
