"""The controller's end of the bus: a ZeroMQ ROUTER that every bot's DEALER connects to.

Bots are identified by their routing id (the bot's name). Input from bots is
untrusted: malformed frames, unknown message types, messages whose ``bot``
differs from the routing id are dropped with one log line each, and nothing a
peer sends can make the receive loop raise. The message types live in
``botspec.protocol`` (stdlib only), shared with the bot process.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from collections.abc import AsyncIterator
from typing import Any, cast

import zmq
import zmq.asyncio

from botspec import protocol

log = logging.getLogger(__name__)

#: Messages queued per bot before ``send`` starts dropping.
SEND_HWM = 100
RECEIVE_HWM = 10_000


class BusClosed(Exception):
    """The bus was closed (while receiving or before sending)."""


def ipc_path(endpoint: str) -> str | None:
    """The socket file of an ``ipc://`` endpoint, None for other transports."""
    return endpoint.removeprefix("ipc://") if endpoint.startswith("ipc://") else None


class BusServer:
    """Bind the bus, receive bots' messages as protocol values, send events to bots.

    ``async for message in server`` (or ``await server.receive()``) yields
    valid messages only; ``send(bot, event)`` never waits.
    """

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.dropped_in = 0  # invalid messages from bots
        self.dropped_out = 0  # events that could not be queued to a bot
        self._closed = False
        self._context = zmq.asyncio.Context()
        self._socket: zmq.asyncio.Socket = self._context.socket(zmq.ROUTER)
        try:
            self._socket.setsockopt(zmq.LINGER, 0)
            self._socket.setsockopt(zmq.ROUTER_MANDATORY, 1)  # unknown bot: error, not silence
            self._socket.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a restarted bot takes over its id
            self._socket.setsockopt(zmq.SNDHWM, SEND_HWM)
            self._socket.setsockopt(zmq.RCVHWM, RECEIVE_HWM)
            self._bind(endpoint)
        except zmq.ZMQError:
            self._socket.close()
            self._context.term()
            raise

    def _bind(self, endpoint: str) -> None:
        path = ipc_path(endpoint)
        if path is None:
            self._socket.bind(endpoint)
            return
        # The socket file must be 0600 from its first moment, not chmod-ed after.
        previous = os.umask(0o077)
        try:
            self._socket.bind(endpoint)
        finally:
            os.umask(previous)
        os.chmod(path, 0o600)

    # ---------------------------------------------------------------- receiving

    def _drop(self, why: str, *args: object) -> None:
        self.dropped_in += 1
        log.warning("bus: dropped a message: " + why, *args)

    def _accept(self, frames: list[bytes]) -> protocol.Message | None:
        """The valid message in ``frames`` (routing id, payload), else None (logged)."""
        if len(frames) != 2:
            self._drop("%d frames, want a routing id and one payload", len(frames))
            return None
        routing_id, payload = frames
        try:
            sender = routing_id.decode("utf-8")
        except UnicodeDecodeError:
            self._drop("routing id %r is not UTF-8", routing_id[:64])
            return None
        try:
            message = protocol.decode(payload)
        except protocol.ProtocolError as exc:
            self._drop("from %r: %s", sender, exc)
            return None
        if message.bot != sender:
            self._drop("from %r: it says it is from %r", sender, message.bot)
            return None
        if isinstance(message, protocol.Event) and message.source is not None:
            self._drop("from %r: an event from a bot must not set source", sender)
            return None
        return message

    async def receive(self) -> protocol.Message:
        """The next valid message from a bot. BusClosed once the server is closed."""
        while True:
            if self._closed:
                raise BusClosed(self.endpoint)
            try:
                frames = await self._socket.recv_multipart()
            except asyncio.CancelledError:
                if self._closed:  # close() cancels a pending receive
                    raise BusClosed(self.endpoint) from None
                raise
            except zmq.ZMQError as exc:
                if self._closed:
                    raise BusClosed(self.endpoint) from exc
                raise
            message = self._accept(frames)
            if message is not None:
                return message

    def __aiter__(self) -> AsyncIterator[protocol.Message]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[protocol.Message]:
        while True:
            try:
                yield await self.receive()
            except BusClosed:
                return

    # ---------------------------------------------------------------- sending

    def send(self, bot_name: str, message: protocol.Event) -> bool:
        """Queue ``message`` for ``bot_name`` without waiting.

        The event is re-addressed on the way: ``bot`` becomes the recipient and
        ``source`` the publisher (the message's ``source``, else its ``bot``), so
        an event received from one bot can be passed on as it is.
        False (and dropped) when that bot is not connected or its queue is full;
        ValueError when ``data`` is not JSON.
        """
        if self._closed:
            raise BusClosed(self.endpoint)
        message = dataclasses.replace(
            message, bot=bot_name, source=message.source if message.source else message.bot
        )
        try:
            frame = protocol.encode(message)
        except protocol.ProtocolError as exc:
            raise ValueError(str(exc)) from exc
        outcome = cast(
            "asyncio.Future[Any]",
            self._socket.send_multipart([bot_name.encode(), frame], flags=zmq.DONTWAIT),
        )
        if outcome.done() and outcome.exception() is None:
            return True
        if not outcome.done():  # not expected with DONTWAIT; do not leave it pending
            outcome.cancel()
        self.dropped_out += 1
        log.info("bus: event %r for %r dropped: bot not connected or busy", message.topic, bot_name)
        return False

    def close(self) -> None:
        """Close the socket; a pending ``receive`` ends with BusClosed."""
        if self._closed:
            return
        self._closed = True
        self._socket.close(linger=0)
        self._context.term()  # libzmq removes the ipc socket file it created

    async def __aenter__(self) -> BusServer:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()
