"""The bus messages between a bot and the controller: frozen values, encode, decode.

One message is one ZeroMQ frame of UTF-8 JSON (docs/internals.md, "The bus").
Every message has the common keys ``v``, ``type``, ``bot``, ``pid``,
``generation`` and ``ts``; the rest depends on ``type``. ``decode`` checks every
key it knows and ignores keys it does not (a newer peer may add some), so what
it returns can be trusted.

Both sides import this module, so it uses the standard library only (the bot
process pays for every import, once per bot).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, TypeAlias

PROTOCOL_VERSION = 1
#: A frame larger than this is refused, whoever sent it.
MAX_FRAME_BYTES = 1024 * 1024

FatalKind = Literal["auth", "plugin"]
FATAL_KINDS: tuple[FatalKind, ...] = ("auth", "plugin")


class ProtocolError(ValueError):
    """A frame that is not a valid bus message; the text says which key and why."""


@dataclass(frozen=True)
class TelegramHealth:
    """How the bot's Telegram connection looks, as its probe last saw it."""

    connected: bool
    disconnected_since: float | None = None  # unix seconds; None while connected
    last_error: str | None = None
    last_update_age_s: float | None = None  # None until the first update arrives
    flood_wait_until: float | None = None  # unix seconds; None when no FloodWait is pending


@dataclass(frozen=True)
class ReadyTelegram:
    """Who the bot is logged in as, sent once with ``ready``."""

    connected: bool
    me_id: int
    me_username: str | None


@dataclass(frozen=True)
class FatalInfo:
    """Why a bot cannot run; repeated in its heartbeats while it waits to be stopped."""

    kind: FatalKind
    error: str
    detail: str


@dataclass(frozen=True, kw_only=True)
class Envelope:
    """The keys every message carries."""

    TYPE: ClassVar[str] = ""

    bot: str
    pid: int
    generation: int
    ts: float


@dataclass(frozen=True, kw_only=True)
class Ready(Envelope):
    """Bot → controller: logged in, plugins set up, serving."""

    TYPE: ClassVar[str] = "ready"

    telegram: ReadyTelegram
    startup_s: float


@dataclass(frozen=True, kw_only=True)
class Heartbeat(Envelope):
    """Bot → controller, every ``health.heartbeat_interval_s``."""

    TYPE: ClassVar[str] = "heartbeat"

    seq: int
    uptime_s: float
    rss_mb: float
    telegram: TelegramHealth
    handled: int
    handler_errors: int
    fatal: FatalInfo | None = None
    # Telegram messages that reached the bot (new, not its own) and that it sent, since
    # its process started. None from a bot older than these keys (still running while
    # the controller was upgraded): absent keys are no error.
    messages_in: int | None = None
    messages_out: int | None = None


@dataclass(frozen=True, kw_only=True)
class Event(Envelope):
    """A bus event. Bot → controller: published by a plugin (``source`` is None).
    Controller → bot: delivered to a subscriber, ``bot`` is the recipient and
    ``source`` the publisher's name."""

    TYPE: ClassVar[str] = "event"

    topic: str
    data: Any
    source: str | None = None


@dataclass(frozen=True, kw_only=True)
class Fatal(Envelope):
    """Bot → controller: the bot cannot run (rejected credentials, broken plugin).
    It then idles until SIGTERM, so that Circus does not respawn it in a loop."""

    TYPE: ClassVar[str] = "fatal"

    kind: FatalKind
    error: str
    detail: str


@dataclass(frozen=True, kw_only=True)
class Stopping(Envelope):
    """Bot → controller: the bot is shutting down on purpose."""

    TYPE: ClassVar[str] = "stopping"

    reason: str


Message: TypeAlias = Ready | Heartbeat | Event | Fatal | Stopping

# ---------------------------------------------------------------- encoding


def _telegram_health_dict(health: TelegramHealth) -> dict[str, Any]:
    return {
        "connected": health.connected,
        "disconnected_since": health.disconnected_since,
        "last_error": health.last_error,
        "last_update_age_s": health.last_update_age_s,
        "flood_wait_until": health.flood_wait_until,
    }


def _body(message: Message) -> dict[str, Any]:
    if isinstance(message, Ready):
        return {
            "telegram": {
                "connected": message.telegram.connected,
                "me_id": message.telegram.me_id,
                "me_username": message.telegram.me_username,
            },
            "startup_s": message.startup_s,
        }
    if isinstance(message, Heartbeat):
        fatal = message.fatal
        return {
            "seq": message.seq,
            "uptime_s": message.uptime_s,
            "rss_mb": message.rss_mb,
            "telegram": _telegram_health_dict(message.telegram),
            "handled": message.handled,
            "handler_errors": message.handler_errors,
            "messages_in": message.messages_in,
            "messages_out": message.messages_out,
            "fatal": None
            if fatal is None
            else {"kind": fatal.kind, "error": fatal.error, "detail": fatal.detail},
        }
    if isinstance(message, Event):
        body: dict[str, Any] = {"topic": message.topic, "data": message.data}
        if message.source is not None:
            body["source"] = message.source
        return body
    if isinstance(message, Fatal):
        return {"kind": message.kind, "error": message.error, "detail": message.detail}
    return {"reason": message.reason}


def to_dict(message: Message) -> dict[str, Any]:
    """The message as the JSON object that goes on the wire."""
    return {
        "v": PROTOCOL_VERSION,
        "type": message.TYPE,
        "bot": message.bot,
        "pid": message.pid,
        "generation": message.generation,
        "ts": message.ts,
        **_body(message),
    }


def encode(message: Message) -> bytes:
    """One frame: compact UTF-8 JSON. Raises ProtocolError if ``data`` is not JSON."""
    try:
        frame = json.dumps(to_dict(message), separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"{message.TYPE} cannot be encoded as JSON: {exc}") from exc
    if len(frame) > MAX_FRAME_BYTES:
        raise ProtocolError(f"{message.TYPE} is {len(frame)} bytes, over {MAX_FRAME_BYTES}")
    return frame


# ---------------------------------------------------------------- decoding


class _Fields:
    """Typed reads of one JSON object, each failure naming its key."""

    def __init__(self, obj: Mapping[str, Any], prefix: str = "") -> None:
        self.obj = obj
        self.prefix = prefix

    def _fail(self, key: str, why: str) -> ProtocolError:
        return ProtocolError(f"{self.prefix}{key}: {why}")

    def _get(self, key: str, optional: bool) -> Any:
        if key not in self.obj:
            if optional:
                return None
            raise self._fail(key, "is missing")
        return self.obj[key]

    def str_(self, key: str, *, optional: bool = False, nonempty: bool = True) -> Any:
        value = self._get(key, optional)
        if value is None and optional:
            return None
        if not isinstance(value, str) or (nonempty and not value):
            raise self._fail(key, "must be a non-empty string" if nonempty else "must be a string")
        return value

    def int_(self, key: str, *, minimum: int = 0) -> int:
        value = self._get(key, False)
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise self._fail(key, f"must be an integer >= {minimum}")
        return value

    def optional_int(self, key: str, *, minimum: int = 0) -> int | None:
        """An integer, or None when the key is absent or null."""
        if self.obj.get(key) is None:
            return None
        return self.int_(key, minimum=minimum)

    def num(self, key: str, *, optional: bool = False) -> Any:
        value = self._get(key, optional)
        if value is None and optional:
            return None
        if (
            not isinstance(value, int | float)
            or isinstance(value, bool)
            or not math.isfinite(value)
            or value < 0
        ):
            raise self._fail(key, "must be a non-negative number")
        return float(value)

    def bool_(self, key: str) -> bool:
        value = self._get(key, False)
        if not isinstance(value, bool):
            raise self._fail(key, "must be true or false")
        return value

    def obj_(self, key: str, *, optional: bool = False) -> _Fields | None:
        value = self._get(key, optional)
        if value is None and optional:
            return None
        if not isinstance(value, dict):
            raise self._fail(key, "must be an object")
        return _Fields(value, f"{self.prefix}{key}.")

    def required_obj(self, key: str) -> _Fields:
        found = self.obj_(key)
        assert found is not None  # obj_ without optional never returns None
        return found


def _decode_ready(f: _Fields, env: dict[str, Any]) -> Ready:
    tg = f.required_obj("telegram")
    return Ready(
        **env,
        telegram=ReadyTelegram(
            connected=tg.bool_("connected"),
            me_id=tg.int_("me_id", minimum=1),
            me_username=tg.str_("me_username", optional=True),
        ),
        startup_s=f.num("startup_s"),
    )


def _decode_heartbeat(f: _Fields, env: dict[str, Any]) -> Heartbeat:
    tg = f.required_obj("telegram")
    fatal_fields = f.obj_("fatal", optional=True)
    return Heartbeat(
        **env,
        seq=f.int_("seq", minimum=1),
        uptime_s=f.num("uptime_s"),
        rss_mb=f.num("rss_mb"),
        telegram=TelegramHealth(
            connected=tg.bool_("connected"),
            disconnected_since=tg.num("disconnected_since", optional=True),
            last_error=tg.str_("last_error", optional=True, nonempty=False),
            last_update_age_s=tg.num("last_update_age_s", optional=True),
            flood_wait_until=tg.num("flood_wait_until", optional=True),
        ),
        handled=f.int_("handled"),
        handler_errors=f.int_("handler_errors"),
        fatal=None if fatal_fields is None else _fatal_info(fatal_fields),
        messages_in=f.optional_int("messages_in"),
        messages_out=f.optional_int("messages_out"),
    )


def _fatal_info(f: _Fields) -> FatalInfo:
    kind = f.str_("kind")
    if kind not in FATAL_KINDS:
        raise ProtocolError(f"{f.prefix}kind: must be one of {', '.join(FATAL_KINDS)}")
    return FatalInfo(kind=kind, error=f.str_("error"), detail=f.str_("detail", nonempty=False))


def _decode_event(f: _Fields, env: dict[str, Any]) -> Event:
    if "data" not in f.obj:
        raise ProtocolError("data: is missing")
    return Event(
        **env, topic=f.str_("topic"), data=f.obj["data"], source=f.str_("source", optional=True)
    )


def _decode_fatal(f: _Fields, env: dict[str, Any]) -> Fatal:
    info = _fatal_info(f)
    return Fatal(**env, kind=info.kind, error=info.error, detail=info.detail)


def _decode_stopping(f: _Fields, env: dict[str, Any]) -> Stopping:
    return Stopping(**env, reason=f.str_("reason", nonempty=False))


_DECODERS: dict[str, Callable[[_Fields, dict[str, Any]], Message]] = {
    Ready.TYPE: _decode_ready,
    Heartbeat.TYPE: _decode_heartbeat,
    Event.TYPE: _decode_event,
    Fatal.TYPE: _decode_fatal,
    Stopping.TYPE: _decode_stopping,
}
MESSAGE_TYPES = tuple(_DECODERS)


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def decode(frame: bytes) -> Message:
    """The message in ``frame``, or ProtocolError saying what is wrong with it."""
    if len(frame) > MAX_FRAME_BYTES:
        raise ProtocolError(f"frame is {len(frame)} bytes, over {MAX_FRAME_BYTES}")
    try:
        obj = json.loads(frame.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError is a ValueError
        raise ProtocolError(f"not UTF-8 JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise ProtocolError("not a JSON object")
    f = _Fields(obj)
    version = obj.get("v")
    if version != PROTOCOL_VERSION or isinstance(version, bool):
        raise ProtocolError(f"v: must be {PROTOCOL_VERSION}, got {version!r}")
    kind = f.str_("type")
    decoder = _DECODERS.get(kind)
    if decoder is None:
        raise ProtocolError(f"type: unknown message type {kind!r}")
    envelope = {
        "bot": f.str_("bot"),
        "pid": f.int_("pid"),
        "generation": f.int_("generation"),
        "ts": f.num("ts"),
    }
    return decoder(f, envelope)


@dataclass(frozen=True)
class Sender:
    """Stamps the common keys on the messages one process sends."""

    bot: str
    pid: int
    generation: int
    clock: Callable[[], float] = field(repr=False, compare=False)

    def envelope(self) -> dict[str, Any]:
        return {"bot": self.bot, "pid": self.pid, "generation": self.generation, "ts": self.clock()}
