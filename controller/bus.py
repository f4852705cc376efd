"""The controller's end of the bus: a ZeroMQ ROUTER that every bot's DEALER connects to.

The bus is authenticated: the ROUTER is a CURVE server, and a ZAP handler lets
in only peers that prove a key of the keyring (``controller.buskeys``), each
key belonging to one bot. A message is from the bot whose key its connection
proved (ZeroMQ's ``User-Id`` on each frame), never from whatever routing id or
``bot`` field a peer chose: one whose ``bot`` differs is dropped. Routing ids
are the bots' own random ones; the controller sends to a bot on the connection
it last heard that bot's key on, so no peer can take over another's mail.

Input from bots is untrusted: malformed frames, unknown message types,
messages that lie about their sender are dropped with one log line each, and
nothing a peer sends can make the receive loop raise. The message types live in
``botspec.protocol`` (stdlib only), shared with the bot process.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from collections.abc import AsyncIterator
from typing import Any, Protocol, cast

import zmq
import zmq.asyncio
from zmq.auth.asyncio import AsyncioAuthenticator
from zmq.utils import z85

from botspec import protocol

log = logging.getLogger(__name__)

#: Messages queued per bot before ``send`` starts dropping.
SEND_HWM = 100
RECEIVE_HWM = 10_000
#: The ZAP domain of the bus; with ZAP_ENFORCE_DOMAIN, no handler means no entry.
ZAP_DOMAIN = "tgfleet-bus"
#: Distinct refused keys remembered to log each once (a refused peer retries forever).
REFUSED_KEYS_LOGGED = 1000


class Keyring(Protocol):
    """Who may open the bus: the controller's secret key, and the bot of each public key."""

    @property
    def server_secret_key(self) -> bytes: ...

    def bot_of(self, public_key: bytes) -> str | None:
        """The bot whose Z85 public key this is, None for a key of no bot."""
        ...


class BusClosed(Exception):
    """The bus was closed (while receiving or before sending)."""


def ipc_path(endpoint: str) -> str | None:
    """The socket file of an ``ipc://`` endpoint, None for other transports."""
    return endpoint.removeprefix("ipc://") if endpoint.startswith("ipc://") else None


class _Authenticator(AsyncioAuthenticator):
    """pyzmq's ZAP handler, answering from the keyring: the User-Id of a peer is its bot's name."""

    def __init__(self, context: zmq.asyncio.Context, keys: Keyring) -> None:
        super().__init__(context)
        self.keys = keys
        self.refused = 0
        self._logged: set[bytes] = set()

    def callback(self, domain: str, public_key: bytes) -> bool:
        """pyzmq's credentials provider: a Z85 key is let in when it is a bot's."""
        if self.keys.bot_of(public_key) is not None:
            return True
        self.refused += 1
        if public_key not in self._logged and len(self._logged) < REFUSED_KEYS_LOGGED:
            self._logged.add(public_key)
            log.warning("bus: refused a peer whose key %s is no bot's", public_key[:8].decode())
        return False

    def curve_user_id(self, client_public_key: bytes) -> str:
        # Called right after callback() said yes, with no await between: the key is known.
        return self.keys.bot_of(z85.encode(client_public_key)) or ""


class BusServer:
    """Bind the bus, receive bots' messages as protocol values, send events to bots.

    ``async for message in server`` (or ``await server.receive()``) yields
    valid messages only; ``send(bot, event)`` never waits.
    """

    def __init__(self, endpoint: str, keys: Keyring) -> None:
        self.endpoint = endpoint
        self.dropped_in = 0  # invalid messages from bots
        self.dropped_out = 0  # events that could not be queued to a bot
        self._closed = False
        self._routes: dict[str, bytes] = {}  # bot name -> routing id it last spoke from
        self._context = zmq.asyncio.Context()
        # The ZAP handler is bound before the ROUTER: no moment without authentication.
        self._auth = _Authenticator(self._context, keys)
        self._auth.start()
        self._auth.configure_curve_callback(ZAP_DOMAIN, credentials_provider=self._auth)
        self._socket: zmq.asyncio.Socket = self._context.socket(zmq.ROUTER)
        try:
            self._socket.setsockopt(zmq.LINGER, 0)
            self._socket.setsockopt(zmq.ROUTER_MANDATORY, 1)  # unknown bot: error, not silence
            # Off: routing ids are chosen by peers; a newcomer must not take over one.
            self._socket.setsockopt(zmq.ROUTER_HANDOVER, 0)
            self._socket.setsockopt(zmq.SNDHWM, SEND_HWM)
            self._socket.setsockopt(zmq.RCVHWM, RECEIVE_HWM)
            self._socket.setsockopt(zmq.CURVE_SERVER, 1)
            self._socket.setsockopt(zmq.CURVE_SECRETKEY, keys.server_secret_key)
            self._socket.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN.encode())
            # No ZAP handler answering must mean refused, not let in (libzmq's default).
            self._socket.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
            self._bind(endpoint)
        except zmq.ZMQError:
            self._socket.close()
            self._auth.stop()
            self._context.term()
            raise

    @property
    def refused(self) -> int:
        """Peers refused at the door: their key is no bot's."""
        return self._auth.refused

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

    def _accept(self, frames: list[zmq.Frame]) -> protocol.Message | None:
        """The valid message in ``frames`` (routing id, payload), else None (logged)."""
        if len(frames) != 2:
            self._drop("%d frames, want a routing id and one payload", len(frames))
            return None
        routing_id, payload = frames
        try:
            # Set by the ZAP handler from the key the connection proved: the sender.
            sender = payload.get("User-Id")
        except zmq.ZMQError:
            sender = None
        if not isinstance(sender, str) or not sender:
            self._drop("from a connection that proved no bot's key")
            return None
        try:
            message = protocol.decode(payload.bytes)
        except protocol.ProtocolError as exc:
            self._drop("from %r: %s", sender, exc)
            return None
        if message.bot != sender:
            self._drop("from %r: it says it is from %r", sender, message.bot)
            return None
        if isinstance(message, protocol.Event) and message.source is not None:
            self._drop("from %r: an event from a bot must not set source", sender)
            return None
        self._route(sender, routing_id.bytes, message)
        return message

    def _route(self, bot: str, routing_id: bytes, message: protocol.Message) -> None:
        """Send to ``bot`` where it last spoke from; a process saying goodbye is not it."""
        if isinstance(message, protocol.Stopping):
            if self._routes.get(bot) == routing_id:
                del self._routes[bot]
        else:
            self._routes[bot] = routing_id

    async def receive(self) -> protocol.Message:
        """The next valid message from a bot. BusClosed once the server is closed."""
        while True:
            if self._closed:
                raise BusClosed(self.endpoint)
            try:
                frames = await self._socket.recv_multipart(copy=False)
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
        False (and dropped) when that bot is not connected (it has not spoken on its
        current connection yet) or its queue is full;
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
        routing_id = self._routes.get(bot_name)
        if routing_id is not None:
            outcome = cast(
                "asyncio.Future[Any]",
                self._socket.send_multipart([routing_id, frame], flags=zmq.DONTWAIT),
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
        self._auth.stop()
        self._context.term()  # libzmq removes the ipc socket file it created

    async def __aenter__(self) -> BusServer:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()
