"""The text /metrics writes (parsed by Prometheus' own parser), JSON log lines, log
rotation settings, and what a bot counts as messages in and out."""

from __future__ import annotations

import io
import json
import logging
import math
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from telethon import functions, types

from botrunner.plugin_host import is_incoming_message
from botrunner.telegram import messages_sent_by
from botspec import jsonlog
from controller.metrics import Family, Histogram, render
from controller.render import LogRotation
from controller.views import bot_families


def _parsed(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_families_parse_as_prometheus_parses_them() -> None:
    gauge = Family("tgfleet_x", "gauge", "A gauge.")
    gauge.add(1.5, bot="a")
    gauge.add(None, bot="unknown")  # not known: left out
    gauge.add(7, bot='we"ird\\name\n')
    counter = Family("tgfleet_y_total", "counter", "A counter.")
    counter.add(3)
    histogram = Histogram("tgfleet_z_seconds", "A histogram.", buckets=(0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 3.0):
        histogram.observe(value, route="GET /x")
    series = _parsed(render([gauge, counter, histogram.family()]))
    assert series[("tgfleet_x", frozenset({("bot", "a")}))] == 1.5
    assert series[("tgfleet_x", frozenset({("bot", 'we"ird\\name\n')}))] == 7
    assert ("tgfleet_x", frozenset({("bot", "unknown")})) not in series
    assert series[("tgfleet_y_total", frozenset())] == 3
    route = ("route", "GET /x")
    buckets = {
        le: series[("tgfleet_z_seconds_bucket", frozenset({route, ("le", le)}))]
        for le in ("0.1", "1.0", "+Inf")
    }
    assert buckets == {"0.1": 2, "1.0": 3, "+Inf": 4}  # cumulative; 0.1 is in le="0.1"
    assert series[("tgfleet_z_seconds_count", frozenset({route}))] == 4
    assert series[("tgfleet_z_seconds_sum", frozenset({route}))] == pytest.approx(3.65)


def _bot(name: str, state: str, **changes: Any) -> dict[str, Any]:
    bot: dict[str, Any] = {
        "name": name,
        "state": state,
        "restarts": 2,
        "telegram": {"connected": state == "running"},
        "health": {"heartbeat_age_s": 0.5 if state == "running" else None},
        "resources": None,
        "messages": None,
    }
    return {**bot, **changes}


def test_per_bot_families_follow_the_api_view() -> None:
    usage = {
        "cpu_seconds": 1.25,
        "rss_bytes": 60 * 2**20,
        "pss_bytes": None,
        "data_bytes": 90 * 2**20,
        "data_limit_bytes": 512 * 2**20,
        "open_files": 21,
        "open_files_limit": 1024,
        "threads": 4,
    }
    counts = {"received": 5, "sent": 4, "handled": 5, "handler_errors": 1}
    bots = [
        _bot("shop", "running", resources=usage, messages=counts),
        _bot("idle", "stopped"),
    ]
    series = _parsed(render(bot_families(bots, {"shop": {"crash": 2, "hung": 1}})))
    shop, idle = frozenset({("bot", "shop")}), frozenset({("bot", "idle")})
    assert series[("tgfleet_bot_up", shop)] == 1 and series[("tgfleet_bot_up", idle)] == 0
    assert series[("tgfleet_bot_open_fds", shop)] == 21
    assert series[("tgfleet_bot_cpu_seconds_total", shop)] == 1.25
    assert ("tgfleet_bot_pss_bytes", shop) not in series  # not read yet
    assert ("tgfleet_bot_rss_bytes", idle) not in series  # no process
    assert series[("tgfleet_bot_messages_received_total", shop)] == 5
    assert series[("tgfleet_bot_handler_errors_total", shop)] == 1
    assert series[("tgfleet_bot_failures_total", frozenset({*shop, ("kind", "crash")}))] == 2
    assert series[("tgfleet_bot_state", frozenset({*idle, ("state", "stopped")}))] == 1
    assert series[("tgfleet_bot_state", frozenset({*idle, ("state", "running")}))] == 0
    assert series[("tgfleet_bots", frozenset({("state", "running")}))] == 1


def test_a_log_record_is_one_json_line_with_its_bot_and_kinds() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(jsonlog.JsonFormatter(bot="shop"))
    logger = logging.getLogger("tgfleet.test.jsonlog")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    try:
        logger.warning("near %s", "limit", extra={"event": "limit"})
        logger.info("other", extra={"bot": "other", "failure": "crash"})
        try:
            raise ValueError("boom\nsecond line")
        except ValueError:
            logger.exception("it failed")
    finally:
        logger.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3  # the traceback's newlines stay inside its line
    first, second, third = map(json.loads, lines)
    assert first["message"] == "near limit" and first["level"] == "WARNING"
    assert first["bot"] == "shop" and first["event"] == "limit" and "failure" not in first
    assert first["logger"] == "tgfleet.test.jsonlog" and first["ts"].endswith("+00:00")
    assert second["bot"] == "other" and second["failure"] == "crash"
    assert "ValueError: boom" in third["exc"]


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, LogRotation()),
        ({"TGFLEET_LOG_MAX_BYTES": "65536"}, LogRotation(65536, 3)),
        ({"TGFLEET_LOG_BACKUP_COUNT": " 7 "}, LogRotation(backup_count=7)),
        ({"TGFLEET_LOG_MAX_BYTES": "1000"}, "TGFLEET_LOG_MAX_BYTES must be an integer from 65536"),
        ({"TGFLEET_LOG_MAX_BYTES": "1e6"}, "TGFLEET_LOG_MAX_BYTES must be an integer"),
        ({"TGFLEET_LOG_BACKUP_COUNT": "0"}, "TGFLEET_LOG_BACKUP_COUNT must be an integer from 1"),
    ],
)
def test_log_rotation_from_the_environment(env: dict[str, str], expected: object) -> None:
    if isinstance(expected, str):
        with pytest.raises(ValueError, match=expected):
            LogRotation.from_env(env)
    else:
        assert LogRotation.from_env(env) == expected


def test_what_counts_as_a_message_sent() -> None:
    peer = types.InputPeerUser(1, 2)
    send = functions.messages.SendMessageRequest(peer, "hi")
    forward = functions.messages.ForwardMessagesRequest(peer, [1, 2, 3], peer)
    assert messages_sent_by(send) == 1
    assert messages_sent_by(forward) == 3
    assert messages_sent_by([send, send]) == 2
    assert messages_sent_by(functions.updates.GetStateRequest()) == 0


def test_what_counts_as_a_message_received() -> None:
    peer = types.PeerUser(1)
    incoming = types.Message(id=1, peer_id=peer, date=None, message="hi")
    own = types.Message(id=2, peer_id=peer, date=None, message="hi", out=True)
    assert is_incoming_message(types.UpdateNewMessage(incoming, 1, 1))
    assert not is_incoming_message(types.UpdateNewMessage(own, 2, 1))
    assert is_incoming_message(types.UpdateNewChannelMessage(incoming, 1, 1))
    assert not is_incoming_message(types.UpdateUserTyping(1, types.SendMessageTypingAction()))


def test_number_formats() -> None:
    from controller.metrics import number

    assert number(3) == "3" and number(True) == "1" and number(0.5) == "0.5"
    assert number(math.inf) == "+Inf" and number(math.nan) == "NaN"


def test_a_log_tail_holds_whole_lines_only(tmp_path: Any) -> None:
    from controller.api import tail

    path = tmp_path / "bot-x.err.log"
    lines = [json.dumps({"message": f"line {n}", "pad": "x" * 90}) for n in range(4000)]
    path.write_text("\n".join(lines) + "\n")  # ~400 KB: more than a tail reads
    got = tail(path, 5000)
    assert got == lines[-len(got) :]
    assert all(json.loads(line) for line in got)
    assert tail(path, 3) == lines[-3:]
    assert tail(tmp_path / "none.log", 3) == []
