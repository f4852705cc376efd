"""Recovery figures: seconds from a fault to the bot answering again, failure kind by kind.

Run: .venv/bin/python bench/recovery.py [--runs N] [--kinds kill9,sigstop,...] [--launch fork|exec]
(kind kill9hops, not in the default set: kill -9 with the time of each hop printed; kill -9 kinds
kill a victim that has run RESPAWN_SPACING_S + 0.5 s, kill9young one killed within its first second)
Starts a sandbox and a fleet with 5 bystander bots (the chaos plugin), then runs each
fire drill of tests/drills.py N times (default 5), each time on a fresh victim bot (no
backoff streak carries over) that is destroyed afterwards. "Recovered" is what a user
sees: a message sent right after the fault gets its answer. The crash loop at start is
timed from the bot's `created` event to its `→ failed` transition (PostgreSQL's clock).
Prints median and max per kind against its goal, then what the bystanders went through
(missed heartbeats, goal 0; changed pids, goal none). A run that fails prints FAILED
with its reason and the benchmark goes on.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psutil
from _fleet import (
    Fleet,
    Sandbox,
    drills,
    logged_at,
    running_fleet,
    short_tmpdir,
    started_at,
    use_launch,
)

from botspec import forked
from controller.childwatch import RESPAWN_SPACING_S

BYSTANDERS = 5

Drill = Callable[[Fleet, Sandbox], float]


@dataclass(frozen=True)
class Kind:
    key: str
    label: str
    goal: str
    run: Drill


def destroy(fleet: Fleet, name: str) -> None:
    try:
        fleet.api("DELETE", f"/api/v1/bots/{name}")
    except Exception as exc:
        print(f"    (could not destroy {name}: {one_line(exc)})", flush=True)


#: A victim killed -9 has run this long first: a process that dies younger is a crash
#: loop to circusd, respawned on SIGCHLD no sooner than RESPAWN_SPACING_S after its
#: start (controller/childwatch.py); a bot killed in the field has usually run longer.
SETTLED_S = RESPAWN_SPACING_S + 0.5


def settled(fleet: Fleet, name: str) -> None:
    """Until the victim's process is SETTLED_S old (its launcher started a few ms before it)."""
    born = psutil.Process(fleet.bot(name)["pid"]).create_time()
    time.sleep(max(0.0, born + SETTLED_S - time.time()))


def on_victim(
    prefix: str,
    drill: Callable[[Fleet, Sandbox, str], float],
    health: dict[str, Any] | None = None,
    settle: bool = False,
) -> Drill:
    """A fresh victim, connected (and ``settle``: SETTLED_S old); the drill on it; the
    victim destroyed whatever happened."""

    def run(fleet: Fleet, sandbox: Sandbox) -> float:
        name = drills.add_bot(fleet, sandbox, prefix, health=health, wait=False)
        try:
            drills.connected(fleet, name)
            if settle:
                settled(fleet, name)
            return drill(fleet, sandbox, name)
        finally:
            destroy(fleet, name)

    return run


#: The hops of a kill -9 recovery, in order, as --kinds kill9hops prints them.
KILL_HOPS = (
    "killed",
    "new watcher process started",
    "new bot process forked",
    "logged in to Telegram again",
    "answered",
)
#: Per run of kill9hops: when each hop happened (wall time; None: not seen).
kill_hops: list[dict[str, float | None]] = []


def kill_9_hops(fleet: Fleet, sandbox: Sandbox, name: str) -> float:
    """The kill -9 drill, noting when each of KILL_HOPS happened: circusd's respawn of
    the watcher process (its start in /proc), the fork server's fork of the bot (fork
    mode), the bot's `logged in` log line, the answer's arrival."""
    pid = fleet.bot(name)["pid"]
    killed, started = time.time(), time.monotonic()
    os.kill(pid, signal.SIGKILL)
    took = drills.answered_in(sandbox, name, started, f"after kill at {killed:.6f}")
    drills.connected(fleet, name, not_pid=pid)
    bot_pid = fleet.bot(name)["pid"]
    record = forked.read(fleet.home.run_dir, name)
    launched = record is not None and record.bot_pid == bot_pid
    watcher_pid = record.launcher_pid if record is not None and launched else bot_pid
    err_log = fleet.home.watcher_log(f"bot-{name}", "err")
    kill_hops.append(
        {
            "killed": killed,
            "new watcher process started": started_at(watcher_pid),
            "new bot process forked": started_at(bot_pid) if launched else None,
            # log lines have whole milliseconds: one that ends the kill's ms counts
            "logged in to Telegram again": logged_at(err_log, "logged in", killed - 0.001),
            "answered": killed + took,
        }
    )
    return took


def print_kill_hops() -> None:
    """Median time of each hop after the kill, and from the hop before."""
    print(f"kill -9, hop by hop (median of {len(kill_hops)}, seconds)")
    print(f"  {'hop':<30} {'since kill':>10} {'this hop':>9}")
    previous = KILL_HOPS[0]
    for hop in KILL_HOPS[1:]:
        since, step = [], []
        for run in kill_hops:
            at, killed, before = run[hop], run["killed"], run[previous]
            if at is not None and killed is not None:
                since.append(at - killed)
                if before is not None:
                    step.append(at - before)
        if not since:
            continue  # not a hop of this launch mode
        print(f"  {hop:<30} {statistics.median(since):>10.3f} {statistics.median(step):>9.3f}")
        previous = hop


def crash_loop(fleet: Fleet, sandbox: Sandbox) -> float:
    """Seconds from `created` to `→ failed` of a bot that exits at start (DB clock)."""
    name = drills.add_bot(fleet, sandbox, "loop", settings={"exit_at_start": 3}, wait=False)
    try:
        fleet.wait_state(name, "failed", timeout=120)
        events = drills.events(fleet, name)
        created = next(e["at"] for e in events if e["kind"] == "created")
        failed = next(e["at"] for e in events if e.get("to_state") == "failed")
        return (datetime.fromisoformat(failed) - datetime.fromisoformat(created)).total_seconds()
    finally:
        destroy(fleet, name)


KINDS = [
    Kind("kill9", "kill -9", "≤ 3 s", on_victim("kill", drills.kill_9, settle=True)),
    Kind("kill9hops", "kill -9 (hops noted)", "≤ 3 s", on_victim("kill", kill_9_hops, settle=True)),
    Kind("kill9young", "kill -9, <1 s old", "≤ 3 s", on_victim("kill", drills.kill_9)),
    Kind("sigstop", "hung (SIGSTOP)", "≤ 15 s", on_victim("stop", drills.sigstop)),
    Kind("spin", "hung (CPU spin)", "≤ 15 s", on_victim("spin", drills.cpu_spin)),
    Kind(
        "memory",
        "memory > soft limit",
        "≤ 30 s (seed)",
        on_victim(
            "grow",
            lambda fleet, sandbox, name: drills.memory_growth(fleet, sandbox, name, 200),
            health={"memory_soft_limit_mb": 150},
        ),
    ),
    Kind(
        "close",
        "closed connection",
        "≤ 5 s",
        on_victim("close", lambda f, s, n: drills.sandbox_fault(f, s, n, "close")),
    ),
    Kind(
        "blackhole",
        "blackhole (live)",
        "≤ 20 s",
        on_victim("hole", lambda f, s, n: drills.sandbox_fault(f, s, n, "blackhole", scope="live")),
    ),
    Kind("crashloop", "crash loop at start", "≤ 30 s (seed)", crash_loop),
]


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text[:300]}"


def missed_since(before: drills.Snapshot, after: drills.Snapshot) -> int:
    """Heartbeats missed between two snapshots (a new process counts from zero)."""
    total = 0
    for name, missed in after.missed.items():
        same = after.pids[name] == before.pids[name]
        total += missed - before.missed[name] if same else missed
    return total


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument(
        "--kinds",
        default=",".join(k.key for k in KINDS if k.key != "kill9hops"),
        help=f"comma-separated subset of: {', '.join(k.key for k in KINDS)}",
    )
    parser.add_argument("--launch", choices=["fork", "exec"], default="fork")
    args = parser.parse_args()
    wanted = [k.strip() for k in args.kinds.split(",") if k.strip()]
    unknown = sorted(set(wanted) - {k.key for k in KINDS})
    if unknown:
        parser.error(f"unknown kinds: {', '.join(unknown)}")
    kinds = [k for k in KINDS if k.key in wanted]

    print(
        f"machine: {os.cpu_count()} CPUs, load average {load()}; launch: {args.launch}", flush=True
    )
    results: dict[str, list[float]] = {k.key: [] for k in kinds}
    missed_by_kind: dict[str, int] = {}
    first: drills.Snapshot | None = None
    last: drills.Snapshot | None = None
    crew_error = ""
    started = time.monotonic()
    root = short_tmpdir("tgfr")
    sandbox = Sandbox.start(root / "sandbox")
    try:
        with running_fleet(root, sandbox) as fleet:
            use_launch(fleet, sandbox, args.launch)
            crew = [drills.add_bot(fleet, sandbox, "crew") for _ in range(BYSTANDERS)]
            first = last = drills.snapshot(fleet, crew)
            for kind in kinds:
                for run in range(1, args.runs + 1):
                    try:
                        took = kind.run(fleet, sandbox)
                    except Exception as exc:
                        print(f"  {kind.label} run {run}: FAILED: {one_line(exc)}", flush=True)
                        if os.environ.get("BENCH_TRACEBACK"):
                            traceback.print_exc()
                        continue
                    results[kind.key].append(took)
                    print(f"  {kind.label} run {run}: {took:.3f} s", flush=True)
                try:
                    now = drills.snapshot(fleet, crew)
                except Exception as exc:
                    crew_error = (
                        f"bystanders not all heard from after {kind.label}: {one_line(exc)}"
                    )
                    print(f"  {crew_error}", flush=True)
                    continue
                assert last is not None
                missed_by_kind[kind.key] = missed_since(last, now)
                last = now
    finally:
        sandbox.stop()
        shutil.rmtree(root, ignore_errors=True)

    print(
        f"\n{len(kinds)} kinds, {args.runs} runs each, in {time.monotonic() - started:.0f} s; "
        f"load average now {load()}"
    )
    print(f"{'kind':<22}{'goal':<16}{'median s':>10}{'max s':>10}{'runs':>7}")
    for kind in kinds:
        times = results[kind.key]
        median = f"{statistics.median(times):.2f}" if times else "-"
        worst = f"{max(times):.2f}" if times else "-"
        print(f"{kind.label:<22}{kind.goal:<16}{median:>10}{worst:>10}{len(times):>4}/{args.runs}")
    if kill_hops:
        print_kill_hops()
    if first is None or last is None:
        print("bystanders: never heard from, no figures")
        return
    missed = missed_since(first, last)
    detail = ", ".join(f"{k} {n}" for k, n in missed_by_kind.items() if n)
    print(
        f"bystanders ({len(first.pids)}): {missed} heartbeats missed over the whole run"
        f"{f' ({detail})' if detail else ''}  [goal 0]"
    )
    changed = [
        f"{n}: {first.pids[n]} → {last.pids[n]}"
        for n in first.pids
        if first.pids[n] != last.pids[n]
    ]
    print(f"bystander pids changed: {', '.join(changed) or 'none'}  [goal: none]")
    if crew_error:
        print(f"(incomplete: {crew_error})")


if __name__ == "__main__":
    main()
