"""Health and recovery, failure kind by failure kind, on one bot of a fleet of bystanders.

Each test injects one failure into a fresh victim (real process, real Telethon, the
sandbox's faults on the real connection), checks the action, the state and the events,
times the recovery as a user sees it (a message sent right after the fault gets its
answer), and checks that no bystander lost its process or missed a heartbeat.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from datetime import datetime

import drills
import pytest
from harness import Fleet, Sandbox, WebhookSink, echo_spec, holds_for, wait_for

from controller.client import ApiError
from controller.eventlog import DELAYED_AFTER_S

pytestmark = pytest.mark.integration

BYSTANDERS = 5


@pytest.fixture(scope="module")
def crew(fleet: Fleet, sandbox: Sandbox) -> list[str]:
    return [drills.add_bot(fleet, sandbox, "crew") for _ in range(BYSTANDERS)]


@pytest.fixture
def watched(fleet: Fleet, crew: list[str]) -> Iterator[drills.Snapshot]:
    """The bystanders before the test; after it, none may have been touched."""
    before = drills.snapshot(fleet, crew)
    yield before
    assert drills.untouched(fleet, before) == []


def victim(fleet: Fleet, sandbox: Sandbox, **health: object) -> str:
    return drills.add_bot(fleet, sandbox, "victim", health=dict(health) if health else None)


def destroy(fleet: Fleet, name: str) -> None:
    fleet.api("DELETE", f"/api/v1/bots/{name}")


def test_kill_9_is_respawned_at_once(
    fleet: Fleet, sandbox: Sandbox, watched: drills.Snapshot
) -> None:
    name = victim(fleet, sandbox)
    killed = fleet.bot(name)["pid"]
    took = drills.kill_9(fleet, sandbox, name)
    assert took < 30
    crashes = drills.health_events(fleet, name, "crash")
    assert crashes and crashes[0]["data"]["exit_code"] == -9
    assert crashes[0]["reason"] == f"process {killed} exited with code -9; Circus respawns it"
    recovered = [e for e in drills.events(fleet, name) if e["reason"].startswith("healthy again")]
    assert recovered and recovered[-1]["data"]["recovery_s"] < 30
    assert recovered[-1]["data"]["failure"] == "crash"
    assert fleet.bot(name)["restarts"] >= 1
    destroy(fleet, name)


@pytest.mark.parametrize("how", ["sigstop", "cpu_spin"])
def test_a_hung_process_is_killed_and_respawned(
    fleet: Fleet, sandbox: Sandbox, watched: drills.Snapshot, how: str
) -> None:
    name = victim(fleet, sandbox)
    drill = drills.sigstop if how == "sigstop" else drills.cpu_spin
    took = drill(fleet, sandbox, name)
    assert took < 30
    hung = drills.health_events(fleet, name, "hung")
    assert any(e["reason"].startswith("detected: no heartbeat") for e in hung)
    assert any(e["kind"] == "transition" and e["actor"] == "health" for e in hung)
    assert fleet.bot(name)["health"]["last_failure"]["kind"] == "hung"
    destroy(fleet, name)


def test_memory_over_the_soft_limit_restarts_gracefully(
    fleet: Fleet, sandbox: Sandbox, watched: drills.Snapshot
) -> None:
    name = victim(fleet, sandbox, memory_soft_limit_mb=150)
    took = drills.memory_growth(fleet, sandbox, name, 200)
    assert took < 30
    memory = drills.health_events(fleet, name, "memory")
    assert any("over the soft limit of 150 MB" in e["reason"] for e in memory)
    # A graceful restart: the old process exited on SIGTERM (code 0), no crash recorded.
    assert drills.health_events(fleet, name, "crash") == []
    destroy(fleet, name)


def test_a_crash_loop_at_start_ends_in_failed(
    fleet: Fleet, sandbox: Sandbox, webhook: WebhookSink, watched: drills.Snapshot
) -> None:
    name = drills.add_bot(fleet, sandbox, "looper", settings={"exit_at_start": 3}, wait=False)
    bot = fleet.wait_state(name, "failed", timeout=60)
    assert "exits within 60 s" in bot["reason"] and "exit code 3" in bot["reason"]
    assert bot["health"]["last_failure"]["kind"] == "crash_loop"
    wait_for("its watcher stopped", lambda: f"bot-{name}: stopped" in fleet.circusctl("status"))
    wait_for("the webhook", lambda: [b for b in webhook.bodies if b["bot"] == name])
    hook = next(b for b in webhook.bodies if b["bot"] == name)
    assert hook["failure"] == "crash_loop" and hook["state"] == "failed"
    destroy(fleet, name)


def test_a_closed_connection_is_reconnected_without_a_restart(
    fleet: Fleet, sandbox: Sandbox, watched: drills.Snapshot
) -> None:
    name = victim(fleet, sandbox)
    pid = fleet.bot(name)["pid"]
    took = drills.sandbox_fault(fleet, sandbox, name, "close")
    assert took < 30
    assert fleet.bot(name)["pid"] == pid and fleet.bot(name)["restarts"] == 0
    destroy(fleet, name)


def test_a_blackholed_connection_is_reconnected_by_the_bot_itself(
    fleet: Fleet, sandbox: Sandbox, watched: drills.Snapshot
) -> None:
    # A grace far longer than the probe needs (two unanswered probes, about 12 s):
    # only the bot's own reconnect can bring it back in time.
    name = victim(fleet, sandbox, disconnect_grace_s=120)
    pid = fleet.bot(name)["pid"]
    took = drills.sandbox_fault(fleet, sandbox, name, "blackhole", scope="live")
    assert took < 30
    bot = fleet.bot(name)
    assert bot["pid"] == pid and bot["restarts"] == 0
    assert drills.health_events(fleet, name, "telegram_unreachable") == []
    assert "the probe got no answer 2 times in a row" in fleet.cli("bots", "logs", name).stdout
    destroy(fleet, name)


def test_a_blackholed_connection_is_restarted_by_the_controller_after_the_grace(
    fleet: Fleet, sandbox: Sandbox, watched: drills.Snapshot
) -> None:
    # The first unanswered probe reports the bot disconnected; the second, which would
    # make it reconnect by itself, comes 20 s later: the 1 s grace ends well before.
    name = victim(fleet, sandbox, disconnect_grace_s=1, probe_interval_s=20, probe_timeout_s=3)
    pid = fleet.bot(name)["pid"]
    sandbox.fault(drills.sandbox_name(name), "blackhole", scope="live")
    bot = drills.connected(fleet, name, not_pid=pid, timeout=60)
    assert bot["restarts"] >= 1
    telegram = drills.health_events(fleet, name, "telegram_unreachable")
    assert any(e["reason"].startswith("detected") for e in telegram), telegram
    assert drills.answered_in(sandbox, name, 0.0, "back after the restart") > 0
    destroy(fleet, name)


def test_refused_connections_back_off_exponentially_then_recover(
    fleet: Fleet, sandbox: Sandbox, watched: drills.Snapshot
) -> None:
    name = victim(fleet, sandbox, backoff_base_s=1.0)
    target = drills.sandbox_name(name)
    sandbox.fault(target, "refuse")
    sandbox.fault(target, "close")
    try:
        backoffs = wait_for(
            "two backoff delays",
            lambda: (
                (
                    b := [
                        e
                        for e in drills.events(fleet, name)
                        if e["data"].get("failure") == "backoff"
                    ]
                )
                and len(b) >= 2
                and b
            ),
            timeout=60,
        )
        delays = [e["data"]["delay_s"] for e in backoffs]
        assert delays[1] > delays[0]  # 1 s then 2 s, each ±20 %
        restarts = [
            e
            for e in drills.health_events(fleet, name, "telegram_unreachable")
            if e["kind"] == "transition"
        ]
        assert len(restarts) >= 2
    finally:
        sandbox.clear(target)
    bot = drills.connected(fleet, name, timeout=60)
    assert bot["health"]["status"] == "healthy"
    destroy(fleet, name)


def test_a_slow_telegram_is_not_a_failure(
    fleet: Fleet, sandbox: Sandbox, watched: drills.Snapshot
) -> None:
    name = victim(fleet, sandbox)
    pid = fleet.bot(name)["pid"]
    sandbox.fault(drills.sandbox_name(name), "delay", ms=500)
    try:
        # the delay is in effect (a round trip is at least two delayed frames) ...
        assert drills.answered_in(sandbox, name, time.monotonic(), "slow but fine") >= 0.5
    finally:
        sandbox.clear(drills.sandbox_name(name))
    assert fleet.bot(name)["pid"] == pid and fleet.bot(name)["restarts"] == 0
    destroy(fleet, name)


def test_flood_wait_is_reported_never_restarted(
    fleet: Fleet, sandbox: Sandbox, watched: drills.Snapshot
) -> None:
    name = victim(fleet, sandbox)
    pid = fleet.bot(name)["pid"]
    sandbox.fault(drills.sandbox_name(name), "flood", seconds=30)
    try:
        sandbox.say("drill", drills.username(name), "please answer")
        flood = wait_for(
            "a flood_wait event",
            lambda: drills.health_events(fleet, name, "flood_wait"),
            timeout=30,
        )
        assert "FloodWait of" in flood[0]["reason"] and "not restarting" in flood[0]["reason"]
        bot = fleet.bot(name)
        assert bot["health"]["flood_wait_until"] is not None
    finally:
        sandbox.clear(drills.sandbox_name(name))
    bot = fleet.bot(name)
    assert bot["pid"] == pid and bot["restarts"] == 0 and bot["state"] == "running"
    destroy(fleet, name)


def test_revoked_credentials_fail_at_once_and_tell_the_webhook(
    fleet: Fleet, sandbox: Sandbox, webhook: WebhookSink, watched: drills.Snapshot
) -> None:
    name = victim(fleet, sandbox)
    sandbox.fault(drills.sandbox_name(name), "revoke")
    bot = fleet.wait_state(name, "failed", timeout=60)
    # a token bot: the probe is refused, it signs in again, and the token is refused
    assert "ACCESS_TOKEN_EXPIRED" in bot["reason"], bot["reason"]
    wait_for("the webhook", lambda: [b for b in webhook.bodies if b["bot"] == name])
    assert next(b for b in webhook.bodies if b["bot"] == name)["failure"] == "auth"
    wait_for("its watcher stopped", lambda: f"bot-{name}: stopped" in fleet.circusctl("status"))
    assert fleet.bot(name)["restarts"] == 0
    sandbox.clear(drills.sandbox_name(name))
    destroy(fleet, name)


def test_a_controller_killed_during_a_backoff_remembers_it(
    fleet: Fleet, sandbox: Sandbox, watched: drills.Snapshot
) -> None:
    name = victim(fleet, sandbox, backoff_base_s=5.0)
    target = drills.sandbox_name(name)
    sandbox.fault(target, "refuse")
    sandbox.fault(target, "close")
    try:
        health = wait_for(
            "a backoff in progress",
            lambda: (
                (h := fleet.bot(name)["health"])["restart_attempt"] >= 2
                and h["next_restart_at"]
                and h
            ),
            timeout=60,
        )
        controller = fleet.api("GET", "/api/v1/status")["controller"]["pid"]
        os.kill(controller, signal.SIGKILL)
        wait_for(
            "a new controller",
            lambda: fleet.api("GET", "/api/v1/status")["controller"]["pid"] != controller,
            timeout=60,
        )
        after = fleet.bot(name)["health"]
        assert after["restart_attempt"] >= health["restart_attempt"]
    finally:
        sandbox.clear(target)
    drills.connected(fleet, name, timeout=90)
    destroy(fleet, name)


def test_postgresql_away_for_a_while(
    fleet: Fleet, sandbox: Sandbox, watched: drills.Snapshot
) -> None:
    if not fleet.embedded_postgres:
        pytest.skip("stops the embedded PostgreSQL; TGFLEET_DATABASE_URL points elsewhere")
    name = victim(fleet, sandbox)
    pid = fleet.bot(name)["pid"]
    fleet.circusctl("stop", "postgres")
    try:
        wait_for(
            "the controller to notice",
            lambda: fleet.api("GET", "/api/v1/status")["database"]["reachable"] is False,
        )
        with pytest.raises(ApiError) as refused:
            fleet.api("POST", "/api/v1/bots", echo_spec("during-outage", "1:abc"))
        assert refused.value.status == 503
        assert refused.value.problem["title"] == "Database unavailable"
        bots = fleet.api("GET", "/api/v1/bots")["bots"]
        assert bots and all(b["stale"] for b in bots)
        # Health needs no database to act: a hung bot is still killed and respawned.
        os.kill(pid, signal.SIGSTOP)
        wait_for(
            "the hung bot replaced",
            lambda: (b := fleet.bot(name))["pid"] not in (None, pid) and b["telegram"]["connected"],
            timeout=60,
        )
        # A forked bot is back within a fraction of a second: the outage lasts past
        # DELAYED_AFTER_S, so that what was noted meanwhile lands late, and says so.
        holds_for(
            "the database away a while longer",
            lambda: fleet.api("GET", "/api/v1/status")["database"]["reachable"] is False,
            DELAYED_AFTER_S + 1.0,
        )
    finally:
        fleet.circusctl("start", "postgres")
    wait_for(
        "the database back",
        lambda: fleet.api("GET", "/api/v1/status")["database"]["reachable"],
        60,
    )
    hung = wait_for(
        "the events noted meanwhile",
        lambda: [e for e in drills.health_events(fleet, name, "hung") if e["data"].get("delayed")],
    )
    assert any(e["reason"].startswith("detected: no heartbeat") for e in hung), hung
    noted = [datetime.fromisoformat(e["data"]["noted_at"]) for e in hung]
    assert noted == sorted(noted), "written in another order than noted"
    assert "stale" not in fleet.bot(name)
    destroy(fleet, name)
