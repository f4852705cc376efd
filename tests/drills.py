"""Fire drills: inject one failure into one bot of a running fleet, time its recovery.

Shared by the health tests (which assert the action, state, events and that no other
bot was touched) and bench/recovery.py (which prints the times). "Recovered" is what
a user sees: a message sent right after the fault gets its answer.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from itertools import count
from typing import Any

import psutil
from harness import Fleet, Sandbox, wait_for

CHAOS = "botrunner.plugins.chaos:setup"
_serial = count(1)


def sandbox_name(name: str) -> str:
    """The sandbox account of a fleet bot (Telegram names have no '-')."""
    return name.replace("-", "_")


def unique_name(prefix: str) -> str:
    """``prefix-N``, N from one counter for every test module of this process: they
    share one sandbox per worker, where a bot's name may be taken once."""
    return f"{prefix}-{next(_serial)}"


def username(name: str) -> str:
    return sandbox_name(name) + "_bot"


def add_bot(
    fleet: Fleet,
    sandbox: Sandbox,
    prefix: str,
    *,
    settings: dict[str, Any] | None = None,
    health: dict[str, Any] | None = None,
    wait: bool = True,
) -> str:
    name = unique_name(prefix)
    token = sandbox.create_bot(sandbox_name(name))
    spec: dict[str, Any] = {
        "name": name,
        "token": token,
        "plugins": [CHAOS],
        "settings": settings or {},
    }
    if health:
        spec["health"] = health
    fleet.api("POST", "/api/v1/bots", spec)
    if wait:
        connected(fleet, name)
    return name


def connected(
    fleet: Fleet, name: str, not_pid: int | None = None, timeout: float = 60
) -> dict[str, Any]:
    """Wait until the bot runs a process (other than ``not_pid``) connected to Telegram."""

    def check() -> dict[str, Any] | None:
        bot = fleet.bot(name)
        ok = (
            bot["state"] == "running"
            and bot["pid"]
            and bot["pid"] != not_pid
            and bot["telegram"]["connected"]
        )
        return bot if ok else None

    return wait_for(f"{name} connected (not pid {not_pid})", check, timeout)


@dataclass(frozen=True)
class Snapshot:
    pids: dict[str, int]
    missed: dict[str, int]


def snapshot(fleet: Fleet, names: list[str]) -> Snapshot:
    def all_heard() -> dict[str, Any] | None:
        bots = {b["name"]: b for b in fleet.api("GET", "/api/v1/bots")["bots"]}
        heard = all(
            bots[n]["pid"] and bots[n]["health"]["heartbeat_age_s"] is not None for n in names
        )
        return bots if heard else None

    bots = wait_for("every bot heard from", all_heard, timeout=30)
    return Snapshot(
        {n: bots[n]["pid"] for n in names},
        {n: bots[n]["health"]["heartbeats_missed"] for n in names},
    )


def untouched(fleet: Fleet, before: Snapshot) -> list[str]:
    """What changed for the bots of ``before``: pids, missed heartbeats (empty: nothing)."""
    after = snapshot(fleet, list(before.pids))
    problems = [
        f"{n}: pid {before.pids[n]} -> {after.pids[n]}"
        for n in before.pids
        if after.pids[n] != before.pids[n]
    ]
    problems += [
        f"{n}: {after.missed[n] - before.missed[n]} heartbeats missed"
        for n in before.missed
        if after.missed[n] != before.missed[n]
    ]
    return problems


def answered_in(sandbox: Sandbox, name: str, started: float, text: str, wait: float = 60) -> float:
    """Send ``text`` now; seconds from ``started`` until the bot's answer arrives."""
    return _answer(sandbox, name, text, lambda reply: reply == text, wait) - started


def _answer(
    sandbox: Sandbox, name: str, text: str, wanted: Callable[[str], bool], wait: float
) -> float:
    """Send ``text``; the moment a reply that is ``wanted`` arrived (others are skipped:
    e.g. the answer to a refused command)."""
    seen = sandbox.say("drill", username(name), text)
    skipped: list[str] = []

    def arrived() -> float | None:
        nonlocal seen
        for message_id, reply in sandbox.replies("drill", username(name), seen, wait=5):
            if wanted(reply):
                return time.monotonic()
            seen = max(seen, message_id)
            skipped.append(reply)
        return None

    try:
        return wait_for(f"{name} to answer {text!r}", arrived, wait, every=0, ignoring=())
    except AssertionError as exc:
        raise AssertionError(f"{exc}; other replies: {skipped[-5:]}") from None


def events(fleet: Fleet, name: str) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = fleet.api("GET", f"/api/v1/bots/{name}/events?limit=1000")[
        "events"
    ]
    return result


def health_events(fleet: Fleet, name: str, failure: str) -> list[dict[str, Any]]:
    return [e for e in events(fleet, name) if e["data"].get("failure") == failure]


# -- the drills: each returns seconds from the fault to the bot answering again


def kill_9(fleet: Fleet, sandbox: Sandbox, name: str) -> float:
    pid = fleet.bot(name)["pid"]
    started = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    took = answered_in(sandbox, name, started, f"after kill {next(_serial)}")
    connected(fleet, name, not_pid=pid)
    return took


def sigstop(fleet: Fleet, sandbox: Sandbox, name: str) -> float:
    pid = fleet.bot(name)["pid"]
    started = time.monotonic()
    os.kill(pid, signal.SIGSTOP)
    try:
        took = answered_in(sandbox, name, started, f"after stop {next(_serial)}")
        connected(fleet, name, not_pid=pid)
    finally:
        if psutil.pid_exists(pid):
            os.kill(pid, signal.SIGCONT)
    return took


def command(sandbox: Sandbox, name: str, text: str, answer_starts: str) -> float:
    """Send a chaos command; the moment its answer (sent just before it acts) arrived."""
    return _answer(sandbox, name, text, lambda reply: reply.startswith(answer_starts), 30)


def cpu_spin(fleet: Fleet, sandbox: Sandbox, name: str) -> float:
    pid = fleet.bot(name)["pid"]
    started = command(sandbox, name, "/spin 300", "spinning")
    took = answered_in(sandbox, name, started, f"after spin {next(_serial)}")
    connected(fleet, name, not_pid=pid)
    return took


def memory_growth(fleet: Fleet, sandbox: Sandbox, name: str, megabytes: int) -> float:
    pid = fleet.bot(name)["pid"]
    started = command(sandbox, name, f"/grow {megabytes}", "holding")
    wait_for(f"{name} restarted for memory", lambda: fleet.bot(name)["pid"] not in (None, pid), 60)
    took = answered_in(sandbox, name, started, f"after grow {next(_serial)}")
    connected(fleet, name, not_pid=pid)
    return took


def sandbox_fault(fleet: Fleet, sandbox: Sandbox, name: str, kind: str, **options: object) -> float:
    """A fault on the bot's live Telegram connection (close, blackhole --live)."""
    started = time.monotonic()
    sandbox.fault(sandbox_name(name), kind, **options)
    took = answered_in(sandbox, name, started, f"after {kind} {next(_serial)}")
    connected(fleet, name)
    return took
