"""The gate: the controller's way to circusd's control channel, with an allow-list.

circus 0.19 authorises no command: whoever can send ``set <watcher> uid 0`` (or
``set <watcher> cmd …``) then ``restart`` to circusd runs anything as root. So, as
root, the controller (the fleet's service user) never holds circusd's own socket
(``run/circus.sock``, root's, 0600, for operators' ``circusctl``): it speaks to the
gate, ``run/circus-gate.sock`` (the service user's, 0600), served from a thread of
circusd's own process, which forwards to circusd only what the controller needs:

- ``start``, ``stop``, ``restart``, ``signal``: of one bot's watcher (``bot-NAME``,
  named exactly, ``match`` at most ``simple``);
- ``status``, ``list``: of every watcher, or of one bot's;
- ``reloadconfig``: circus.ini (root's) and ``bots.d/`` (written only by the keeper,
  after its allow-list: controller.watchercheck).

Anything else (``set``, ``add``, ``rm``, ``quit``, ``options`` …, a command on
another watcher, a property it does not know) is answered in circus' own error
shape (``{"status": "error", "reason", "errno", "id"}``, errno 3: a message error)
and never reaches circusd. Requests are forwarded concurrently (a ``reloadconfig``
that waits for bots to stop holds no ``status`` back), each on a DEALER of its own,
and an answer goes back to the peer that asked; at most ``MAX_PENDING`` wait for
circusd at once (more are answered with an error). A ``stop``'s ``graceful_timeout``
is a finite number of seconds up to an hour: circus holds its arbiter lock meanwhile.

Standard library and pyzmq only (circusd's process).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time

import zmq

from botspec.names import NAME_PATTERN
from controller.home import Home

log = logging.getLogger("circus.tgfleet.gate")

#: A bot's watcher, named exactly.
BOT_WATCHER = re.compile("^bot-" + NAME_PATTERN.removeprefix("^"))
ERRNO_MESSAGE_ERROR = 3  # circus.commands.errors.MESSAGE_ERROR
MAX_MESSAGE = 64 * 1024
#: A forwarded command with no answer is forgotten after this (reloadconfig waits for
#: every changed bot to stop; the controller gives it 60 s).
FORWARD_TIMEOUT_S = 120.0
POLL_MS = 1000
#: Commands forwarded and not yet answered, at most; more are refused until circusd
#: answers (the controller sends a handful at once: one per bot being acted on).
MAX_PENDING = 64
#: circus' arbiter lock is held while a stop waits: a stop that never ends holds it.
MAX_GRACEFUL_TIMEOUT_S = 3600.0

# command -> (properties it may carry, whether "name" is required)
ALLOWED: dict[str, tuple[frozenset[str], bool]] = {
    "start": (frozenset({"name", "match", "waiting"}), True),
    "stop": (frozenset({"name", "match", "waiting", "graceful_timeout"}), True),
    "restart": (frozenset({"name", "match", "waiting"}), True),
    "signal": (frozenset({"name", "signum", "match"}), True),
    "status": (frozenset({"name"}), False),
    "list": (frozenset({"name"}), False),
    "reloadconfig": (frozenset({"waiting"}), False),
}


def refusal(message: object) -> str | None:
    """Why the gate refuses ``message`` (a decoded circus command); None: forward it."""
    if not isinstance(message, dict):
        return "a command is a JSON object"
    unknown = sorted(set(message) - {"id", "command", "properties", "msg_type"})
    if unknown:
        return f"unknown fields {unknown}"
    if message.get("msg_type", "call") != "call":
        return "only calls (an answer is always sent)"
    command = message.get("command")
    if not isinstance(command, str) or command not in ALLOWED:
        return f"command {command!r} is not one the controller may send ({', '.join(ALLOWED)})"
    properties = message.get("properties", {})
    if not isinstance(properties, dict):
        return "properties must be an object"
    allowed, needs_name = ALLOWED[command]
    extra = sorted(set(properties) - allowed)
    if extra:
        return f"{command} takes no {', '.join(map(repr, extra))} through the gate"
    name = properties.get("name")
    if name is None and needs_name:
        return f"{command} needs the name of a bot's watcher"
    if name is not None and (not isinstance(name, str) or not BOT_WATCHER.fullmatch(name)):
        return f"{command} may only name a bot's watcher (bot-NAME), not {name!r}"
    if properties.get("match", "simple") != "simple":
        return "match must be 'simple' (one watcher, named exactly)"
    for flag in ("waiting",):
        if not isinstance(properties.get(flag, False), bool):
            return f"{flag} must be true or false"
    if "signum" in properties and not (
        isinstance(properties["signum"], int) and 1 <= properties["signum"] <= 64
    ):
        return "signum must be a signal number"
    if "graceful_timeout" in properties:
        timeout = properties["graceful_timeout"]  # json.loads takes NaN and Infinity
        if (
            isinstance(timeout, bool)
            or not isinstance(timeout, int | float)
            or not math.isfinite(timeout)
            or not 0 <= timeout <= MAX_GRACEFUL_TIMEOUT_S
        ):
            return (
                f"graceful_timeout must be a number of seconds from 0 to {MAX_GRACEFUL_TIMEOUT_S:g}"
            )
    return None


def error_answer(message_id: object, reason: str) -> bytes:
    """circus' own error shape (circus.commands.base.error), with the request's id."""
    return json.dumps(
        {
            "status": "error",
            "reason": f"refused by tgfleet's gate: {reason}",
            "tb": None,
            "time": time.time(),
            "errno": ERRNO_MESSAGE_ERROR,
            "id": message_id if isinstance(message_id, str | int) else None,
        }
    ).encode()


class Gate:
    """A ROUTER for the controller, one DEALER per forwarded command to circusd."""

    def __init__(self, home: Home, service_uid: int) -> None:
        self.home = home
        self.service_uid = service_uid
        # circusd's own context (its I/O thread): each socket stays in this thread
        self.context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self.front = self.context.socket(zmq.ROUTER)
        self.front.setsockopt(zmq.LINGER, 0)
        self.front.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE)
        self.poller = zmq.Poller()
        # each forwarded command: its DEALER -> (the asking peer's identity, deadline)
        self.pending: dict[zmq.Socket[bytes], tuple[bytes, float]] = {}

    def listen(self) -> None:
        path = self.home.circus_gate_socket
        path.unlink(missing_ok=True)
        old = os.umask(0o177)
        try:
            self.front.bind(f"ipc://{path}")
        finally:
            os.umask(old)
        os.chown(path, self.service_uid, -1)
        self.poller.register(self.front, zmq.POLLIN)

    def serve_forever(self) -> None:
        while True:
            try:
                ready = dict(self.poller.poll(POLL_MS))
            except zmq.ZMQError as exc:  # the context was closed: circusd goes away
                log.info("the gate stops: %s", exc)
                return
            try:
                if self.front in ready:
                    self.take()
                for back in [s for s in self.pending if s in ready]:
                    self.answer(back)
            except zmq.ZMQError as exc:  # one exchange failed: the gate serves on
                log.warning("gate: %s", exc)
            self.forget_late()

    def take(self) -> None:
        frames = self.front.recv_multipart()
        if len(frames) != 2:  # a DEALER's request: [identity, message]
            log.warning("gate: dropped a request of %d frames", len(frames))
            return
        peer, raw = frames
        try:
            message = json.loads(raw)
        except ValueError:
            self.front.send_multipart([peer, error_answer(None, "the command is no JSON")])
            return
        reason = refusal(message)
        if reason is not None:
            log.warning("gate: refused %s", reason)
            message_id = message.get("id") if isinstance(message, dict) else None
            self.front.send_multipart([peer, error_answer(message_id, reason)])
            return
        if len(self.pending) >= MAX_PENDING:
            log.warning("gate: %d commands unanswered, refused one more", len(self.pending))
            busy = f"{MAX_PENDING} commands wait for circusd's answer; try again later"
            self.front.send_multipart([peer, error_answer(message.get("id"), busy)])
            return
        back = self.context.socket(zmq.DEALER)
        back.setsockopt(zmq.LINGER, 0)
        back.connect(self.home.circus_endpoint)
        back.send(raw)
        self.poller.register(back, zmq.POLLIN)
        self.pending[back] = (peer, time.monotonic() + FORWARD_TIMEOUT_S)

    def answer(self, back: zmq.Socket[bytes]) -> None:
        peer, _ = self.pending.pop(back)
        raw = back.recv()
        self.poller.unregister(back)
        back.close(linger=0)
        self.front.send_multipart([peer, raw])

    def forget_late(self) -> None:
        now = time.monotonic()
        for back, (_, deadline) in list(self.pending.items()):
            if now > deadline:
                del self.pending[back]
                self.poller.unregister(back)
                back.close(linger=0)
