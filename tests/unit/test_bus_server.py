"""The controller's BusServer with real ZeroMQ sockets: what it delivers, drops and sends."""

from __future__ import annotations

import asyncio
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
from zmq.utils.monitor import parse_monitor_message

from botrunner.bus import BusClient
from botspec import protocol
from controller.bus import BusServer
from controller.buskeys import BusKeys, IssuedKey
from controller.home import Home

ENV = {"pid": 1, "generation": 2, "ts": 1_700_000_000.0}


@pytest.fixture
def short_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="bus-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def keys(short_dir: Path) -> BusKeys:
    return BusKeys.open(Home(short_dir))


@pytest.fixture
def shop_key(keys: BusKeys) -> IssuedKey:
    return keys.issue("shop")


@pytest.fixture
def stock_key(keys: BusKeys) -> IssuedKey:
    return keys.issue("stock")


@pytest.fixture
async def server(short_dir: Path, keys: BusKeys) -> AsyncIterator[BusServer]:
    bus = BusServer(f"ipc://{short_dir}/bus.sock", keys)
    yield bus
    bus.close()


def client(server: BusServer, name: str, key: IssuedKey) -> BusClient:
    return BusClient(server.endpoint, name, key.secret_key, key.server_key)


class RawPeer:
    """A DEALER that sends whatever bytes a test wants, under any routing id, proving
    ``key`` (a bot's secret key, or a made-up one) or no key at all."""

    def __init__(
        self, endpoint: str, routing_id: bytes, key: IssuedKey | None, server_key: str = ""
    ) -> None:
        self.context = zmq.asyncio.Context()
        self.socket = self.context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.ROUTING_ID, routing_id)
        if key is not None:
            secret = key.secret_key.encode()
            self.socket.setsockopt(zmq.CURVE_SECRETKEY, secret)
            self.socket.setsockopt(zmq.CURVE_PUBLICKEY, zmq.curve_public(secret))
            self.socket.setsockopt(zmq.CURVE_SERVERKEY, (server_key or key.server_key).encode())
        self.monitor = self.socket.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_SUCCEEDED
            | zmq.EVENT_HANDSHAKE_FAILED_AUTH
            | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
            | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
        )
        self.socket.connect(endpoint)

    async def handshake(self) -> int:
        """The first handshake event: succeeded, or failed (auth, protocol, other)."""
        frames = await asyncio.wait_for(self.monitor.recv_multipart(), 5)
        return int(parse_monitor_message(frames)["event"])

    async def send(self, *frames: bytes) -> None:
        await asyncio.wait_for(self.socket.send_multipart(list(frames)), 2)

    def close(self) -> None:
        self.socket.disable_monitor()
        self.monitor.close()
        self.socket.close()
        self.context.term()


def made_up_key(server: IssuedKey) -> IssuedKey:
    return IssuedKey(zmq.curve_keypair()[1].decode(), server.server_key)


def stopping(bot: str, reason: str = "x") -> bytes:
    return protocol.encode(protocol.Stopping(bot=bot, reason=reason, **ENV))


async def test_socket_file_is_private(server: BusServer, short_dir: Path) -> None:
    assert stat.S_IMODE(os.stat(short_dir / "bus.sock").st_mode) == 0o600


async def test_bad_input_is_dropped_and_the_next_good_message_arrives(
    server: BusServer, shop_key: IssuedKey
) -> None:
    peer = RawPeer(server.endpoint, b"shop", shop_key)
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


async def test_the_routing_id_is_no_identity(server: BusServer, shop_key: IssuedKey) -> None:
    # Any routing id, even one that is not UTF-8: the proven key names the sender.
    peer = RawPeer(server.endpoint, b"\xff\xfe", shop_key)
    try:
        await peer.send(stopping("shop", "good"))
        message = await asyncio.wait_for(server.receive(), 5)
        assert isinstance(message, protocol.Stopping) and message.bot == "shop"
    finally:
        peer.close()


async def test_round_trip_with_the_bot_client(
    server: BusServer, shop_key: IssuedKey, stock_key: IssuedKey
) -> None:
    shop = client(server, "shop", shop_key)
    try:
        assert await shop.wait_connected(5)
        assert shop.send(protocol.Event(bot="shop", topic="orders", data={"n": 1}, **ENV))
        received = await asyncio.wait_for(server.receive(), 5)
        assert isinstance(received, protocol.Event) and received.data == {"n": 1}
        # passed on as it is: re-addressed to the recipient, source = the publisher
        stock = client(server, "stock", stock_key)
        try:
            assert await stock.wait_connected(5)
            # the controller sends to a bot where it heard the bot's key: not yet
            assert server.send("stock", received) is False
            assert stock.send(protocol.Event(bot="stock", topic="hello", data=None, **ENV))
            await asyncio.wait_for(server.receive(), 5)
            assert server.send("stock", received)
            event = await asyncio.wait_for(stock.receive(), 5)
            assert (event.bot, event.source, event.topic) == ("stock", "shop", "orders")
        finally:
            stock.close()
    finally:
        shop.close()


async def test_send_to_a_bot_that_is_not_connected_is_dropped(server: BusServer) -> None:
    event = protocol.Event(bot="controller", topic="t", data=None, **ENV)
    assert server.send("nobody", event) is False
    assert server.dropped_out == 1
    with pytest.raises(ValueError, match="JSON"):
        server.send("nobody", protocol.Event(bot="controller", topic="t", data={1}, **ENV))


async def test_async_iteration_ends_when_closed(server: BusServer, shop_key: IssuedKey) -> None:
    received: list[protocol.Message] = []

    async def consume() -> None:
        async for message in server:
            received.append(message)

    consumer = asyncio.create_task(consume())
    peer = RawPeer(server.endpoint, b"shop", shop_key)
    try:
        await peer.send(stopping("shop"))
        await wait_for_async("the message iterated", lambda: received, 5, 0.02)
        assert len(received) == 1
        server.close()
        await asyncio.wait_for(consumer, 5)
    finally:
        peer.close()


async def test_bot_client_drops_instead_of_blocking_when_no_controller(
    short_dir: Path, shop_key: IssuedKey
) -> None:
    bot = BusClient(f"ipc://{short_dir}/nobody.sock", "shop", shop_key.secret_key, "0" * 40)
    try:
        assert bot.send(protocol.Stopping(bot="shop", reason="x", **ENV)) is False
        assert await bot.wait_connected(0.05) is False
        assert bot.dropped == 1
    finally:
        bot.close()


async def test_bot_client_skips_events_for_someone_else(
    server: BusServer, shop_key: IssuedKey
) -> None:
    shop = client(server, "shop", shop_key)
    try:
        assert await shop.wait_connected(5)
        shop.send(protocol.Event(bot="shop", topic="hello", data=None, **ENV))
        await asyncio.wait_for(server.receive(), 5)  # the server now knows where "shop" is
        # a raw frame addressed (inside) to another bot, then a good one
        wrong = protocol.Event(bot="stock", topic="t", data=1, source="c", **ENV)
        raw = server._socket  # the test speaks below BusServer.send, which re-addresses
        routing_id = server._routes["shop"]
        await raw.send_multipart([routing_id, protocol.encode(wrong)])
        await raw.send_multipart([routing_id, b"garbage"])
        assert server.send("shop", protocol.Event(bot="controller", topic="t", data=2, **ENV))
        event = await asyncio.wait_for(shop.receive(), 5)
        assert (event.data, event.source) == (2, "controller")
    finally:
        shop.close()


def test_encode_is_compact_json() -> None:
    frame = stopping("shop")
    assert json.loads(frame)["reason"] == "x"
    assert b" " not in frame


# ---------------------------------------------------------------- rogue peers


async def test_a_peer_without_a_key_is_refused(server: BusServer, shop_key: IssuedKey) -> None:
    rogue = RawPeer(server.endpoint, b"shop", None)
    shop = RawPeer(server.endpoint, b"honest", shop_key)
    try:
        await rogue.send(stopping("shop", "forged"))
        # a mechanism mismatch: libzmq reports it as either
        refusals = (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
        assert await rogue.handshake() in refusals
        assert await shop.handshake() == zmq.EVENT_HANDSHAKE_SUCCEEDED
        await shop.send(stopping("shop", "honest"))
        message = await asyncio.wait_for(server.receive(), 5)
        assert isinstance(message, protocol.Stopping) and message.reason == "honest"
        assert await server._socket.poll(0) == 0  # nothing else came in
    finally:
        rogue.close()
        shop.close()


async def test_a_peer_with_a_made_up_key_is_refused(server: BusServer, shop_key: IssuedKey) -> None:
    rogue = RawPeer(server.endpoint, b"shop", made_up_key(shop_key))
    try:
        await rogue.send(stopping("shop", "forged"))
        assert await rogue.handshake() == zmq.EVENT_HANDSHAKE_FAILED_AUTH
        assert server.refused >= 1
        assert await server._socket.poll(0) == 0
    finally:
        rogue.close()


async def test_a_key_of_another_bot_speaks_only_as_that_bot(
    server: BusServer, shop_key: IssuedKey, stock_key: IssuedKey
) -> None:
    shop = client(server, "shop", shop_key)
    try:
        assert await shop.wait_connected(5)
        assert shop.send(protocol.Event(bot="shop", topic="hi", data=1, **ENV))
        assert (await asyncio.wait_for(server.receive(), 5)).bot == "shop"
        # stock's key, shop's name, shop's old routing id: every message in shop's name dropped
        rogue = RawPeer(server.endpoint, b"shop", stock_key)
        try:
            fatal = protocol.Fatal(bot="shop", kind="auth", error="X", detail="", **ENV)
            await rogue.send(protocol.encode(fatal))
            await rogue.send(stopping("stock", "as itself"))
            message = await asyncio.wait_for(server.receive(), 5)
            assert (message.bot, server.dropped_in) == ("stock", 1)
            # and shop's mail still goes to shop, never to the rogue
            assert server.send("shop", protocol.Event(bot="controller", topic="t", data=2, **ENV))
            event = await asyncio.wait_for(shop.receive(), 5)
            assert (event.bot, event.data) == ("shop", 2)
            assert await rogue.socket.poll(0) == 0
        finally:
            rogue.close()
    finally:
        shop.close()


async def test_a_rewritten_bot_keeps_its_previous_key_a_destroyed_one_none(
    server: BusServer, keys: BusKeys, shop_key: IssuedKey
) -> None:
    keys.issue("shop")  # the config is rewritten: the running process still gets in
    previous = RawPeer(server.endpoint, b"a", shop_key)
    try:
        assert await previous.handshake() == zmq.EVENT_HANDSHAKE_SUCCEEDED
    finally:
        previous.close()
    keys.issue("shop")  # twice: that process is long gone
    older = RawPeer(server.endpoint, b"b", shop_key)
    try:
        assert await older.handshake() == zmq.EVENT_HANDSHAKE_FAILED_AUTH
    finally:
        older.close()
    current = keys.issue("shop")
    keys.forget("shop")  # destroyed
    gone = RawPeer(server.endpoint, b"c", current)
    try:
        assert await gone.handshake() == zmq.EVENT_HANDSHAKE_FAILED_AUTH
    finally:
        gone.close()
