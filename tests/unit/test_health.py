from dataclasses import replace

import pytest

from controller.health import (
    Exit,
    Fail,
    FailureKind,
    HealthPolicy,
    HealthRecord,
    Note,
    Restart,
    Vitals,
    assess,
    backoff_s,
)

NOW = 1000.0
POLICY = HealthPolicy(
    heartbeat_timeout_s=10,
    startup_timeout_s=30,
    disconnect_grace_s=6,
    backoff_base_s=2,
    backoff_cap_s=30,
    backoff_reset_s=60,
    max_restarts=3,
    restart_window_s=60,
    memory_soft_limit_mb=200,
)
HEALTHY = Vitals(
    name="a",
    process_up=True,
    since=NOW - 100,
    last_heartbeat_at=NOW - 1,
    connected=True,
    disconnected_since=None,
    rss_mb=60,
    flood_wait_until=None,
)


def kinds(actions: list[object]) -> list[str]:
    out = []
    for a in actions:
        if isinstance(a, Restart):
            out.append(f"restart:{a.kind}{':kill' if a.kill else ''}")
        elif isinstance(a, Fail):
            out.append(f"fail:{a.kind}")
        elif isinstance(a, Note):
            out.append(f"note:{a.kind}")
    return out


def test_healthy_bot_needs_nothing() -> None:
    record, actions = assess(HEALTHY, HealthRecord(), POLICY, NOW)
    assert actions == []
    assert record.healthy_since == NOW


@pytest.mark.parametrize(
    ("vitals", "expected"),
    [
        (replace(HEALTHY, last_heartbeat_at=NOW - 11), ["note:hung", "restart:hung:kill"]),
        (replace(HEALTHY, last_heartbeat_at=NOW - 9), []),
        (
            replace(HEALTHY, last_heartbeat_at=None, since=NOW - 31),
            ["note:hung", "restart:hung:kill"],
        ),
        (replace(HEALTHY, last_heartbeat_at=None, since=NOW - 20, connected=False), []),
        (replace(HEALTHY, rss_mb=250), ["note:memory", "restart:memory"]),
        (
            replace(HEALTHY, connected=False, disconnected_since=NOW - 7),
            ["note:telegram_unreachable", "restart:telegram_unreachable"],
        ),
        (replace(HEALTHY, connected=False, disconnected_since=NOW - 5), []),
        (replace(HEALTHY, flood_wait_until=NOW + 42), ["note:flood_wait"]),
        (replace(HEALTHY, process_up=False, last_heartbeat_at=None), []),
    ],
)
def test_each_observation_gets_its_action(vitals: Vitals, expected: list[str]) -> None:
    _, actions = assess(vitals, HealthRecord(), POLICY, NOW)
    assert kinds(actions) == expected


def test_flood_wait_is_reported_once_and_never_restarts() -> None:
    vitals = replace(HEALTHY, flood_wait_until=NOW + 42)
    record, first = assess(vitals, HealthRecord(), POLICY, NOW)
    assert "42 s" in first[0].reason  # type: ignore[union-attr]
    _, second = assess(vitals, record, POLICY, NOW + 1)
    assert second == []


def test_unreachable_telegram_backs_off_exponentially_and_resets_when_stable() -> None:
    def down(at: float) -> Vitals:
        return replace(HEALTHY, connected=False, disconnected_since=at - 10, last_heartbeat_at=at)

    record, actions = assess(down(NOW), HealthRecord(), POLICY, NOW)
    assert kinds(actions)[-1] == "restart:telegram_unreachable"
    assert record.attempt == 1 and record.failure_at == NOW

    delays = []
    now = NOW
    for _ in range(5):
        now += 1
        record, actions = assess(down(now), record, POLICY, now)
        assert "restart:telegram_unreachable" not in kinds(actions)  # waits for its backoff
        delays.append(record.next_restart_at - now)  # type: ignore[operator]
        now = record.next_restart_at  # type: ignore[assignment]
        record, actions = assess(down(now), record, POLICY, now)
        assert kinds(actions)[-1] == "restart:telegram_unreachable"
    assert delays == [2, 4, 8, 16, 30]  # capped at backoff_cap_s

    up = replace(HEALTHY, last_heartbeat_at=now + 1)
    record, actions = assess(up, record, POLICY, now + 1)
    assert kinds(actions) == ["note:recovered"]
    assert actions[0].data["recovery_s"] == pytest.approx(now + 1 - NOW)  # type: ignore[union-attr]
    assert record.attempt == 6 and record.failure_at is None
    record, _ = assess(replace(up, last_heartbeat_at=now + 61), record, POLICY, now + 62)
    assert record.attempt == 0
    assert record.last_kind == "telegram_unreachable"


def test_jitter_spreads_the_delay() -> None:
    assert backoff_s(POLICY, 3, 0.2) == pytest.approx(8 * 1.2)
    assert backoff_s(POLICY, 3, -0.2) == pytest.approx(8 * 0.8)
    assert backoff_s(POLICY, 0, 0.2) == 0


def test_a_bot_that_reconnects_during_its_backoff_is_not_restarted() -> None:
    down = replace(HEALTHY, connected=False, disconnected_since=NOW - 10)
    record = HealthRecord(attempt=2, failure_kind="telegram_unreachable", failure_at=NOW - 30)
    record, actions = assess(down, record, POLICY, NOW)
    assert kinds(actions) == ["note:backoff"]
    record, actions = assess(HEALTHY, record, POLICY, NOW + 1)
    assert kinds(actions) == ["note:recovered"]
    assert record.next_restart_at is None


def test_exits_are_noted_and_too_many_in_the_window_fail_the_bot() -> None:
    record = HealthRecord()
    for index in range(3):
        at = NOW + index
        vitals = replace(HEALTHY, exits=(Exit(at, 100 + index, -9),), last_heartbeat_at=at)
        record, actions = assess(vitals, record, POLICY, at)
        # each exit is noted; the heartbeat at the same moment says it is back
        assert kinds(actions) == ["note:crash", "note:recovered"]
        assert len(record.exits) == index + 1
    record, actions = assess(
        replace(HEALTHY, exits=(Exit(NOW + 3, 104, 1),)), record, POLICY, NOW + 3
    )
    assert kinds(actions) == ["fail:crash_loop"]
    assert "4 exits within 60 s" in actions[0].reason  # type: ignore[union-attr]
    assert record.last_kind == FailureKind.CRASH_LOOP


def test_old_exits_leave_the_window() -> None:
    record = HealthRecord(exits=(NOW - 200, NOW - 150, NOW - 100))
    vitals = replace(HEALTHY, exits=(Exit(NOW, 7, -9),))
    record, actions = assess(vitals, record, POLICY, NOW)
    assert "fail:crash_loop" not in kinds(actions)
    assert record.exits == (NOW,)


def test_record_survives_json() -> None:
    record = HealthRecord(attempt=3, next_restart_at=5.0, exits=(1.0, 2.0), last_kind="hung")
    assert HealthRecord.from_json(record.to_json()) == record
