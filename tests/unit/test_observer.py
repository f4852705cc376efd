"""The observer: what bus messages and circusd events make of a bot's live process."""

from __future__ import annotations

import pytest

from botspec import protocol
from controller.circus import WatcherEvent
from controller.clock import FakeClock
from controller.observer import Observer, is_crash, missed_beats


@pytest.mark.parametrize(
    ("gap_s", "interval_s", "missed"),
    [
        (2.0, 2.0, 0),  # on time
        (4.0, 2.0, 0),  # late, within the tolerance (2 intervals)
        (4.1, 2.0, 1),  # just past it: at least one
        (10.0, 2.0, 4),  # four beats fit in the gap
        (0.0, 2.0, 0),
    ],
)
def test_missed_beats(gap_s: float, interval_s: float, missed: int) -> None:
    assert missed_beats(gap_s, interval_s) == missed


@pytest.mark.parametrize(
    ("code", "expected", "crash"),
    [(0, False, False), (1, False, True), (-9, False, True), (1, True, False), (0, True, False)],
)
def test_is_crash(code: int, expected: bool, crash: bool) -> None:
    assert is_crash(code, expected) is crash


class Harness:
    def __init__(self) -> None:
        self.clock = FakeClock()
        self.nudges = 0
        self.events: list[protocol.Event] = []
        self.observer = Observer(self.clock, self.nudge, self.events.append, lambda pid: True)

    def nudge(self) -> None:
        self.nudges += 1

    def beat(self, bot: str, pid: int, connected: bool = True) -> None:
        self.observer.on_message(
            protocol.Heartbeat(
                bot=bot,
                pid=pid,
                generation=1,
                ts=self.clock.wall(),
                seq=0,
                uptime_s=1.0,
                rss_mb=50.0,
                telegram=protocol.TelegramHealth(connected=connected),
                handled=0,
                handler_errors=0,
                fatal=None,
            )
        )

    def reap(self, bot: str, pid: int, code: int) -> None:
        body = {"process_pid": pid, "time": self.clock.wall(), "exit_code": code}
        self.observer.on_circus_event(WatcherEvent(f"bot-{bot}", "reap", body))


def test_heartbeats_make_a_live_process_and_count_late_ones() -> None:
    h = Harness()
    h.observer.intervals["shop"] = 2.0
    h.beat("shop", 100)
    live = h.observer.live["shop"]
    assert (live.pid, live.ready, live.telegram["connected"]) == (100, True, True)
    h.clock.advance(2.0)
    h.beat("shop", 100)
    h.clock.advance(9.0)
    h.beat("shop", 100)
    assert live.heartbeats_missed == 3
    assert live.max_gap_s == 9.0
    assert live.last_beat_at == h.clock.wall()


def test_a_new_pid_replaces_the_process_and_asks_for_a_pass() -> None:
    h = Harness()
    h.beat("shop", 100)
    before = h.nudges
    h.beat("shop", 101)
    assert h.observer.live["shop"].pid == 101
    assert h.observer.live["shop"].replaced_pid == 100
    assert h.nudges > before


def test_messages_from_no_bot_of_the_fleet_are_dropped() -> None:
    h = Harness()
    h.observer.known = {"shop"}
    h.beat("intruder", 5)
    assert "intruder" not in h.observer.live


def test_an_exit_the_controller_asked_for_is_no_crash_until_the_grace_runs_out() -> None:
    h = Harness()
    h.observer.expect_exit("shop", within_s=5.0)
    h.reap("shop", 100, -15)
    assert h.observer.take_exits("shop") == ()
    h.clock.advance(5.0 + 5.0 + 0.1)  # within_s + the margin
    h.reap("shop", 101, -9)
    exits = h.observer.take_exits("shop")
    assert [(e.pid, e.code) for e in exits] == [(101, -9)]
    assert h.observer.take_exits("shop") == ()  # each crash is assessed once


def test_a_reap_marks_telegram_disconnected() -> None:
    h = Harness()
    h.beat("shop", 100)
    h.reap("shop", 100, 1)
    assert h.observer.live["shop"].telegram["connected"] is False


def test_published_events_are_handed_on() -> None:
    h = Harness()
    event = protocol.Event(bot="shop", pid=1, generation=1, ts=0.0, topic="orders", data={"n": 1})
    h.observer.on_message(event)
    assert h.events == [event]


@pytest.mark.parametrize(
    ("spoke", "reaped", "living", "forget", "named"),
    [
        (100, 100, set(), False, 100),  # exec: the watcher's process is the bot
        (201, 200, set(), False, 201),  # fork: the launcher 200 ends after its bot 201
        (201, 200, set(), True, 201),  # ... also once a pass forgot the bot's process
        (201, 200, {201}, False, 200),  # a launcher whose bot lives on: not the bot's exit
    ],
)
def test_a_launcher_s_exit_is_named_after_its_bot(
    spoke: int, reaped: int, living: set[int], forget: bool, named: int
) -> None:
    h = Harness()
    h.observer = Observer(h.clock, h.nudge, h.events.append, lambda pid: pid in living)
    h.beat("shop", spoke)
    if forget:
        h.observer.live.pop("shop")
    h.reap("shop", reaped, -9)
    assert [(e.pid, e.code) for e in h.observer.take_exits("shop")] == [(named, -9)]
