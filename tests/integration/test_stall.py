"""A stalled PostgreSQL (every process of it stopped with SIGSTOP: a database host that
stops answering, not one that refuses) freezes nothing: the API answers from memory
within 2 s, health acts at once, and every event noted meanwhile is written afterwards."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import drills
import pytest
from harness import Answer, Fleet, Sandbox, echo_spec, stalled_postgres, timed, wait_for

pytestmark = pytest.mark.integration

STALL_S = 20.0
ANSWER_WITHIN_S = 2.0


def test_a_stalled_database_freezes_nothing(fleet: Fleet, sandbox: Sandbox) -> None:
    if not fleet.embedded_postgres:
        pytest.skip("stops the embedded PostgreSQL; TGFLEET_DATABASE_URL points elsewhere")
    name = drills.add_bot(fleet, sandbox, "stall")
    before = drills.events(fleet, name)[-1]["id"]
    pid = fleet.bot(name)["pid"]
    reads = [
        ("GET", "/api/v1/bots"),
        ("GET", f"/api/v1/bots/{name}"),
        ("GET", "/api/v1/status"),
        ("GET", "/metrics"),
        ("GET", f"/api/v1/bots/{name}/logs?lines=5"),
    ]
    writes: list[tuple[str, str, object | None]] = [
        ("POST", f"/api/v1/bots/{name}/restart", None),
        ("PATCH", f"/api/v1/bots/{name}", {"settings": {"during": "the stall"}}),
        ("POST", "/api/v1/bots", echo_spec("born-in-a-stall", "1:abc")),
    ]
    answers: list[Answer] = []
    unready: Answer | None = None
    healthy_after_s: float | None = None
    with stalled_postgres(fleet):
        stall_began = time.monotonic()
        while time.monotonic() - stall_began < STALL_S:
            answers.extend(timed(fleet, method, path) for method, path in reads)
            answers.extend(timed(fleet, method, path, body) for method, path, body in writes)
            ready = timed(fleet, "GET", "/readyz")
            answers.extend([ready, timed(fleet, "GET", "/healthz")])
            if ready.status == 503 and unready is None:
                unready = ready
                # The controller knows the database is away: crash a bot now.
                os.kill(pid, signal.SIGKILL)
                killed = time.monotonic()

                def back() -> dict[str, Any] | None:
                    answer = timed(fleet, "GET", f"/api/v1/bots/{name}")
                    answers.append(answer)
                    bot = answer.body
                    seen = (
                        bot["state"] == "running"
                        and bot["pid"] not in (None, pid)
                        and bot["telegram"]["connected"]
                        and bot["health"]["status"] == "healthy"
                    )
                    return bot if seen else None

                wait_for("the killed bot running and healthy again", back, timeout=15)
                healthy_after_s = time.monotonic() - killed
    thawed = time.monotonic()

    def write_lands() -> bool:
        answer = timed(
            fleet, "PATCH", f"/api/v1/bots/{name}", {"health": {"heartbeat_timeout_s": 11}}
        )
        return answer.status == 200

    wait_for("a write after the thaw", write_lands, timeout=30, every=0.1)
    write_after_thaw_s = time.monotonic() - thawed

    slow = [
        f"{a.method} {a.path}: {a.took_s:.2f} s" for a in answers if a.took_s >= ANSWER_WITHIN_S
    ]
    assert slow == [], f"answered later than {ANSWER_WITHIN_S} s during the stall"
    for answer in answers:
        if answer.method == "GET" and answer.path not in ("/readyz", "/healthz"):
            assert answer.status == 200, answer
    for answer in answers:
        if answer.method != "GET":
            assert answer.status == 503, answer
            assert answer.content_type == "application/problem+json"
            assert "PostgreSQL" in answer.body["detail"]
    listed = [a.body["bots"] for a in answers if a.method == "GET" and a.path == "/api/v1/bots"]
    assert listed and all(b["stale"] and b["as_of"] for bots in listed for b in bots)
    assert all(
        a.body["stale"] for a in answers if a.method == "GET" and a.path == f"/api/v1/bots/{name}"
    )
    assert unready is not None, "/readyz never said the database was away"
    assert unready.body["database"]["reachable"] is False
    assert unready.body["database"]["unreachable_since"]
    assert any(
        a.body["database"]["reachable"] is False for a in answers if a.path == "/api/v1/status"
    )
    assert all(a.status == 200 for a in answers if a.path == "/healthz")
    assert healthy_after_s is not None and healthy_after_s < 3.0, healthy_after_s
    assert write_after_thaw_s < 5.0, write_after_thaw_s

    # Ready again, nothing stale, and what happened during the stall is written, in order.
    wait_for("/readyz ready", lambda: timed(fleet, "GET", "/readyz").status == 200)
    bot = fleet.bot(name)
    assert "stale" not in bot and bot["spec"]["settings"] == {}
    assert "born-in-a-stall" not in {b["name"] for b in fleet.api("GET", "/api/v1/bots")["bots"]}

    def noted() -> list[dict[str, Any]] | None:
        after = [e for e in drills.events(fleet, name) if e["id"] > before]
        crash = [e for e in after if e["data"].get("failure") == "crash" and e["kind"] == "health"]
        healthy = [e for e in after if e["reason"].startswith("healthy again")]
        return [crash[0], healthy[0]] if crash and healthy else None

    crash, healthy = wait_for("the events noted during the stall", noted)
    assert crash["id"] < healthy["id"]
    assert crash["data"]["exit_code"] == -9
    assert crash["data"]["delayed"] and healthy["data"]["delayed"]
    assert crash["data"]["noted_at"] <= healthy["data"]["noted_at"]
    status = fleet.api("GET", "/api/v1/status")["database"]
    assert status["reachable"] and status["writes_dropped"] == 0
    fleet.api("DELETE", f"/api/v1/bots/{name}")
