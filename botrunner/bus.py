"""The bot's end of the bus: a ZeroMQ DEALER, a CURVE client proving the bot's key.

The controller knows the bot by the key it proves, not by its routing id: that
is random per process, so that no other peer can guess it and take it over.
The controller can send to the bot once the bot has said something (its first
heartbeat, right after connecting).

Sending never blocks the bot: the queue is short, sends are non-blocking, and
``ZMQ_IMMEDIATE`` keeps messages from queueing while the controller is away,
so they are dropped (and counted) instead. Reconnecting after a controller
restart is ZeroMQ's job.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from typing import Any, cast

import zmq
import zmq.asyncio

from botspec import protocol

log = logging.getLogger(__name__)

SEND_HWM = 32
RECEIVE_HWM = 256


class BusClosed(Exception):
    """The bus was closed while receiving."""


class BusClient:
    """Send messages to the controller; receive the events addressed to this bot."""

    def __init__(self, endpoint: str, bot_name: str, secret_key: str, server_key: str) -> None:
        """``secret_key``: this bot's CURVE secret key; ``server_key``: the controller's
        public key (both Z85, from the bot's config)."""
        self.endpoint = endpoint
        self.bot_name = bot_name
        self.dropped = 0
        self._context = zmq.asyncio.Context()
        self._socket: zmq.asyncio.Socket = self._context.socket(zmq.DEALER)
        self._socket.setsockopt(zmq.ROUTING_ID, f"{bot_name}/{secrets.token_hex(16)}".encode())
        self._socket.setsockopt(zmq.CURVE_SECRETKEY, secret_key.encode())
        self._socket.setsockopt(zmq.CURVE_PUBLICKEY, zmq.curve_public(secret_key.encode()))
        self._socket.setsockopt(zmq.CURVE_SERVERKEY, server_key.encode())
        self._socket.setsockopt(zmq.SNDHWM, SEND_HWM)
        self._socket.setsockopt(zmq.RCVHWM, RECEIVE_HWM)
        self._socket.setsockopt(zmq.IMMEDIATE, 1)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.RECONNECT_IVL, 100)
        self._socket.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        self._closed = False
        self._socket.connect(endpoint)

    def send(self, message: protocol.Message) -> bool:
        """Queue ``message`` without waiting; False (and dropped) when it cannot be."""
        if self._closed:
            return False
        frame = protocol.encode(message)
        # zmq.asyncio resolves a DONTWAIT send at once; its Future holds the outcome.
        outcome = cast("asyncio.Future[Any]", self._socket.send(frame, flags=zmq.DONTWAIT))
        if outcome.done() and outcome.exception() is None:
            return True
        if not outcome.done():  # not expected with DONTWAIT; do not leave it pending
            outcome.cancel()
        self.dropped += 1
        if self.dropped == 1 or self.dropped % 100 == 0:
            log.warning(
                "bus: controller unreachable at %s, %s message(s) dropped so far",
                self.endpoint,
                self.dropped,
            )
        return False

    async def wait_connected(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` until the controller is connected (sends can go out)."""
        if self._closed:
            return False
        poller = zmq.asyncio.Poller()
        poller.register(self._socket, zmq.POLLOUT)
        ready = await poller.poll(int(timeout_s * 1000))
        return any(events & zmq.POLLOUT for _, events in ready)

    async def deliver(self, message: protocol.Message, timeout_s: float) -> bool:
        """``send`` for the few messages that matter (ready, fatal, stopping): when the
        controller is not connected yet, first wait up to ``timeout_s`` for it."""
        if not await self.wait_connected(timeout_s):
            self.dropped += 1
            return False
        return self.send(message)

    async def receive(self) -> protocol.Event:
        """The next event for this bot; bad frames are logged and skipped."""
        while True:
            try:
                frames = await self._socket.recv_multipart()
            except zmq.ZMQError as exc:
                if self._closed or exc.errno == zmq.ENOTSOCK:
                    raise BusClosed from exc
                raise
            if len(frames) != 1:
                log.warning("bus: dropped a message of %d frames (want 1)", len(frames))
                continue
            try:
                message = protocol.decode(frames[0])
            except protocol.ProtocolError as exc:
                log.warning("bus: dropped a malformed message: %s", exc)
                continue
            if not isinstance(message, protocol.Event):
                log.warning("bus: dropped a %r message: only events go to bots", message.TYPE)
                continue
            if message.bot != self.bot_name:
                log.warning("bus: dropped an event addressed to %r", message.bot)
                continue
            return message

    def close(self, linger_s: float = 0.0) -> None:
        """Close the socket, giving queued messages up to ``linger_s`` to leave."""
        if self._closed:
            return
        self._closed = True
        self._socket.close(linger=int(linger_s * 1000))
        self._context.term()
