"""Dashboard sessions (expiry, bounds, revocation), the same-origin rule, and the
chart's samples: pure, time passed in."""

from __future__ import annotations

import pytest

from controller.samples import Sample, Samples, figure, per_minute, series
from controller.sessions import Sessions, csrf_matches, same_origin


def test_a_session_lives_while_used_and_ends_when_idle_or_too_old() -> None:
    sessions = Sessions(idle_s=100, lifetime_s=1000)
    sid, opened = sessions.open("h" * 64, "ops", now=0)
    assert opened.token_sha256 == "h" * 64 and opened.csrf and opened.csrf != sid
    for now in range(50, 950, 50):  # used every 50 s: alive until its lifetime ends
        found = sessions.get(sid, now)
        assert found is not None and found.csrf == opened.csrf
    assert sessions.get(sid, 1001) is None
    sid, _ = sessions.open("h" * 64, "ops", now=0)
    assert sessions.get(sid, 101) is None  # idle too long
    assert len(sessions) == 0


def test_sessions_are_bounded_and_end_with_their_token() -> None:
    sessions = Sessions(max_sessions=3)
    ids = [sessions.open(f"{n}" * 64, f"t{n}", now=0)[0] for n in range(4)]
    assert sessions.get(ids[0], 1) is None and len(sessions) == 3
    assert sessions.end_token(token_sha256="1" * 64) == 1
    assert sessions.end_token(token_name="t2") == 1
    assert sessions.get(ids[3], 1) is not None
    sessions.close(ids[3])
    assert sessions.get(ids[3], 1) is None and len(sessions) == 0


def test_the_csrf_token_must_match_exactly() -> None:
    _, session = Sessions().open("h" * 64, "ops", now=0)
    assert csrf_matches(session, session.csrf)
    assert not csrf_matches(session, None)
    assert not csrf_matches(session, session.csrf[:-1])
    assert not csrf_matches(session, "")


@pytest.mark.parametrize(
    ("origin", "referer", "expected"),
    [
        ("http://127.0.0.1:8710", None, True),
        ("HTTP://127.0.0.1:8710", None, True),
        ("http://127.0.0.1:8711", None, False),  # another port is another origin
        ("https://127.0.0.1:8710", None, False),
        ("null", None, False),  # sandboxed frames, file: pages
        ("http://evil.example", "http://127.0.0.1:8710/", False),  # Origin wins
        (None, "http://127.0.0.1:8710/bots/echo", True),
        (None, "http://127.0.0.1:8710.evil.example/", False),
        (None, None, False),
        (None, "", False),
        ("http://127.0.0.1:8710/", None, False),  # an Origin has no path
        ("http://127.0.0.1:8710:80", None, False),
        ("http://user@127.0.0.1:8710", None, False),
    ],
)
def test_writes_come_from_this_origin(
    origin: str | None, referer: str | None, expected: bool
) -> None:
    assert same_origin(origin, referer, "http", "127.0.0.1:8710") is expected


@pytest.mark.parametrize(
    ("origin", "scheme", "host", "expected"),
    [
        # A scheme's default port is no part of its origin (a proxy may still name it).
        ("https://fleet.example", "https", "fleet.example:443", True),
        ("https://fleet.example:443", "https", "fleet.example", True),
        ("http://fleet.example", "http", "fleet.example:80", True),
        ("https://fleet.example", "https", "fleet.example:80", False),
        ("http://fleet.example", "http", "fleet.example:8080", False),
        ("https://[2001:db8::1]", "https", "[2001:DB8::1]:443", True),
        ("https://fleet.example", "https", "fleet.example/evil", False),
    ],
)
def test_default_ports_are_the_same_origin(
    origin: str, scheme: str, host: str, expected: bool
) -> None:
    assert same_origin(origin, None, scheme, host) is expected


@pytest.mark.parametrize(
    ("earlier", "later", "seconds", "expected"),
    [
        (10, 70, 60, 60.0),
        (10, 10, 30, 0.0),
        (100, 5, 10, 30.0),  # a new process counts from 0: at least 5 in 10 s
        (None, 5, 10, None),
        (5, None, 10, None),
        (1, 2, 0, None),
    ],
)
def test_message_rates_per_minute(
    earlier: float | None, later: float | None, seconds: float, expected: float | None
) -> None:
    assert per_minute(earlier, later, seconds) == expected


def test_figures_are_read_where_the_api_puts_them_or_are_none() -> None:
    assert figure({"rss_mb": 40.5}, "rss_mb") == 40.5
    assert figure({"rss_mb": None, "resources": {"rss_bytes": 3 * 2**20}}, "rss_mb") == 3.0
    assert figure({"messages": {"received": 7, "sent": 2}}, "messages_in") == 7.0
    assert figure({"messages": {"received": 7, "sent": 2}}, "messages_out") == 2.0
    assert figure({"messages": {"received": True}}, "messages_in") is None
    assert figure({"messages": None, "resources": None}, "messages_in") is None
    assert figure({"rss_mb": None}, "rss_mb") is None
    assert figure({}, "messages_out") is None


def test_the_ring_keeps_the_last_hour_and_only_known_bots() -> None:
    samples = Samples(every_s=10, keep_s=60)
    for n in range(20):
        samples.add("echo", Sample(n * 10.0, 40.0 + n, 10.0 * n, None))
    samples.add("gone", Sample(0, 1, None, None))
    kept = samples.of("echo", now=190)
    assert len(kept) == 7 and kept[0].at == 130 and kept[-1].at == 190
    samples.keep_only(["echo"])
    assert samples.of("gone", now=0) == []
    points = series(kept)
    assert points[0]["in_per_min"] is None and points[1]["in_per_min"] == 60.0
    assert points[1]["out_per_min"] is None and points[-1]["rss_mb"] == 59.0
