"""Bus messages: every type survives encode/decode; every bad frame is refused precisely."""

from __future__ import annotations

import json
from typing import Any

import pytest

from botspec import protocol
from botspec.protocol import (
    Event,
    Fatal,
    FatalInfo,
    Heartbeat,
    ProtocolError,
    Ready,
    ReadyTelegram,
    Stopping,
    TelegramHealth,
    decode,
    encode,
)

ENV: dict[str, Any] = {"bot": "shop", "pid": 4242, "generation": 3, "ts": 1_700_000_000.5}

MESSAGES: list[protocol.Message] = [
    Ready(**ENV, telegram=ReadyTelegram(True, 1000001, "shop_bot"), startup_s=1.25),
    Ready(**ENV, telegram=ReadyTelegram(True, 7, None), startup_s=0.0),
    Heartbeat(
        **ENV,
        seq=1,
        uptime_s=2.0,
        rss_mb=64.5,
        telegram=TelegramHealth(connected=True, last_update_age_s=0.4),
        handled=10,
        handler_errors=1,
        messages_in=12,
        messages_out=11,
    ),
    Heartbeat(
        **ENV,
        seq=99,
        uptime_s=200.0,
        rss_mb=70.0,
        telegram=TelegramHealth(
            connected=False,
            disconnected_since=1_700_000_000.0,
            last_error="probe: no answer",
            flood_wait_until=1_700_000_100.0,
        ),
        handled=0,
        handler_errors=0,
        fatal=FatalInfo("auth", "ACCESS_TOKEN_INVALID", "The provided token is not valid"),
    ),
    Event(**ENV, topic="orders.new", data={"id": 1, "items": [1, 2], "note": None}),
    Event(**ENV, topic="t", data=None, source="other-bot"),
    Event(**ENV, topic="t", data="text"),
    Fatal(**ENV, kind="plugin", error="ModuleNotFoundError", detail="no module named x"),
    Stopping(**ENV, reason="SIGTERM"),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip(message: protocol.Message) -> None:
    frame = encode(message)
    assert isinstance(frame, bytes)
    assert decode(frame) == message


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_the_wire_has_the_documented_common_keys(message: protocol.Message) -> None:
    wire = json.loads(encode(message))
    assert wire["v"] == 1
    assert wire["type"] == message.TYPE
    assert {k: wire[k] for k in ENV} == ENV


def test_heartbeat_wire_shape() -> None:
    wire = json.loads(encode(MESSAGES[2]))
    assert set(wire["telegram"]) == {
        "connected",
        "disconnected_since",
        "last_error",
        "last_update_age_s",
        "flood_wait_until",
    }
    assert {"seq", "uptime_s", "rss_mb", "handled", "handler_errors", "fatal"} <= set(wire)


def test_unknown_keys_are_ignored_for_forward_compatibility() -> None:
    wire = json.loads(encode(MESSAGES[-1]))
    wire["added_later"] = {"x": 1}
    assert decode(json.dumps(wire).encode()) == MESSAGES[-1]


def test_data_that_is_not_json_cannot_be_encoded() -> None:
    with pytest.raises(ProtocolError, match="cannot be encoded as JSON"):
        encode(Event(**ENV, topic="t", data={1, 2}))
    with pytest.raises(ProtocolError, match="cannot be encoded as JSON"):
        encode(Event(**ENV, topic="t", data=float("nan")))


def _stopping(**changes: Any) -> bytes:
    wire: dict[str, Any] = {"v": 1, "type": "stopping", **ENV, "reason": "x"}
    for key, value in changes.items():
        if value is _DELETE:
            del wire[key]
        else:
            wire[key] = value
    return json.dumps(wire).encode()


def _heartbeat(**telegram_changes: Any) -> bytes:
    wire = json.loads(encode(MESSAGES[2]))
    wire["telegram"].update(telegram_changes)
    return json.dumps(wire).encode()


_DELETE = object()


def _top(**changes: Any) -> bytes:
    """The first heartbeat with top-level keys changed (or removed)."""
    wire = json.loads(encode(MESSAGES[2]))
    for key, value in changes.items():
        if value is _DELETE:
            del wire[key]
        else:
            wire[key] = value
    return json.dumps(wire).encode()


def test_a_heartbeat_without_message_counts_is_from_an_older_bot_not_an_error() -> None:
    """A bot started before the controller learnt these keys keeps being heard."""
    beat = decode(_top(messages_in=_DELETE, messages_out=_DELETE))
    assert isinstance(beat, Heartbeat)
    assert (beat.messages_in, beat.messages_out) == (None, None)
    assert decode(_top(messages_in=None)).messages_in is None  # type: ignore[union-attr]


BAD_FRAMES: list[tuple[str, bytes, str]] = [
    ("empty", b"", "not UTF-8 JSON"),
    ("binary", b"\xff\xfe", "not UTF-8 JSON"),
    ("truncated", b'{"v": 1', "not UTF-8 JSON"),
    ("NaN", b'{"v": 1, "ts": NaN}', "not UTF-8 JSON"),
    ("a list", b"[1, 2]", "not a JSON object"),
    ("no version", _stopping(v=_DELETE), "v: must be 1"),
    ("version 2", _stopping(v=2), "v: must be 1"),
    ("version true", _stopping(v=True), "v: must be 1"),
    ("no type", _stopping(type=_DELETE), "type: is missing"),
    ("unknown type", _stopping(type="reboot"), "type: unknown message type 'reboot'"),
    ("no bot", _stopping(bot=_DELETE), "bot: is missing"),
    ("empty bot", _stopping(bot=""), "bot: must be a non-empty string"),
    ("pid a string", _stopping(pid="1"), "pid: must be an integer"),
    ("negative generation", _stopping(generation=-1), "generation: must be an integer >= 0"),
    ("ts a bool", _stopping(ts=True), "ts: must be a non-negative number"),
    ("reason a number", _stopping(reason=5), "reason: must be a string"),
    ("connected a number", _heartbeat(connected=1), "telegram.connected: must be true or false"),
    ("last_error a list", _heartbeat(last_error=[]), "telegram.last_error: must be a string"),
    (
        "negative age",
        _heartbeat(last_update_age_s=-1),
        "telegram.last_update_age_s: must be a non-negative number",
    ),
    (
        "fatal of an unknown kind",
        json.dumps(
            {"v": 1, "type": "fatal", **ENV, "kind": "x", "error": "E", "detail": ""}
        ).encode(),
        "kind: must be one of auth, plugin",
    ),
    (
        "event without data",
        json.dumps({"v": 1, "type": "event", **ENV, "topic": "t"}).encode(),
        "data: is missing",
    ),
    (
        "ready without telegram",
        json.dumps({"v": 1, "type": "ready", **ENV, "startup_s": 1}).encode(),
        "telegram: is missing",
    ),
    ("too big", b" " * (protocol.MAX_FRAME_BYTES + 1), "over"),
    ("messages_in negative", _top(messages_in=-1), "messages_in: must be an integer >= 0"),
    ("messages_out a float", _top(messages_out=1.5), "messages_out: must be an integer >= 0"),
    ("messages_in a bool", _top(messages_in=True), "messages_in: must be an integer >= 0"),
]


@pytest.mark.parametrize(
    ("frame", "message"), [b[1:] for b in BAD_FRAMES], ids=[b[0] for b in BAD_FRAMES]
)
def test_bad_frames_are_refused_with_the_reason(frame: bytes, message: str) -> None:
    with pytest.raises(ProtocolError) as refused:
        decode(frame)
    assert message in str(refused.value)
