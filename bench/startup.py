"""Startup figures: API create → bot running (Telegram connected), and cold `tgfleet up --demo`.

Run: .venv/bin/python bench/startup.py [--bots N] [--launch fork,exec] [--no-up] [--breakdown]
Prints a median of N creates (goal: ≤ 0.25 s; the seed's NF5 limit: 10 s), measured
from PostgreSQL's own timestamps of the `created` and `→ running` events, and the
wall time from starting `tgfleet up --demo` in an empty home to every demo bot running.

``--breakdown`` also prints where a create's time goes, hop by hop (medians), read
from what each step leaves behind, so nothing in the fleet is slowed to measure it:
the client's clock around the POST, PostgreSQL's `created` and `running` events, the
watcher file's mtime (render), the watcher process's and the bot's start times in
/proc (circusd's spawn; the fork server's fork; 10 ms ticks), and the bot's own log
lines (`logged in`, `ready`).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import time
from datetime import datetime
from typing import Any

from _fleet import (
    Fleet,
    Sandbox,
    echo_spec,
    free_port,
    logged_at,
    median_max,
    running_fleet,
    short_tmpdir,
    started_at,
    use_launch,
    wait_for,
)

from botspec import forked

#: The steps of a create, in order, as --breakdown names them.
STEPS = (
    "POST sent",
    "created (DB)",
    "watcher file written",
    "POST answered",
    "watcher process started",
    "bot process forked",
    "logged in to Telegram",
    "ready sent",
    "running (DB)",
)


def steps_of(
    fleet: Fleet, name: str, sent: float, answered: float, events: list[dict[str, Any]]
) -> dict[str, float | None]:
    """Wall time of each of ``STEPS`` for bot ``name`` (None: not seen)."""
    home = fleet.home
    bot_pid = fleet.bot(name)["pid"]
    record = forked.read(home.run_dir, name)
    launched = record is not None and record.bot_pid == bot_pid
    watcher_pid = record.launcher_pid if record is not None and launched else bot_pid
    err_log = home.watcher_log(f"bot-{name}", "err")
    return {
        "POST sent": sent,
        "created (DB)": next(_at(e) for e in events if e["kind"] == "created"),
        "watcher file written": home.watcher_file(name).stat().st_mtime,
        "POST answered": answered,
        "watcher process started": started_at(watcher_pid),
        "bot process forked": started_at(bot_pid) if launched else None,
        "logged in to Telegram": logged_at(err_log, "telegram: logged in"),
        "ready sent": logged_at(err_log, "ready in"),
        "running (DB)": next(_at(e) for e in events if e.get("to_state") == "running"),
    }


def _at(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["at"]).timestamp()


def print_breakdown(launch: str, runs: list[dict[str, float | None]]) -> None:
    """Median time of each step after the POST, and of each hop from the step before."""
    print(f"{launch}: where a create's time goes (median of {len(runs)}, seconds)")
    print(f"  {'step':<26} {'since POST':>10} {'this hop':>9}")
    previous = STEPS[0]
    for step in STEPS[1:]:
        since, hop = [], []
        for run in runs:
            at, sent, before = run[step], run[STEPS[0]], run[previous]
            if at is not None and sent is not None:
                since.append(at - sent)
                if before is not None:
                    hop.append(at - before)
        if not since:
            continue  # not a step of this launch mode
        print(f"  {step:<26} {statistics.median(since):>10.3f} {statistics.median(hop):>9.3f}")
        previous = step


def create_to_running(
    fleet: Fleet, sandbox: Sandbox, count: int, launch: str
) -> tuple[list[float], list[float], list[dict[str, float | None]]]:
    """Per bot: seconds from `created` to `running` (DB clock), as a client saw it, and
    when each step happened."""
    spans, walls, steps = [], [], []
    use_launch(fleet, sandbox, launch)
    for index in range(count):
        name = f"bench-{launch}-{index}"
        token = sandbox.create_bot(f"bench_{launch}_{index}")
        sent = time.time()
        started = time.monotonic()
        fleet.api("POST", "/api/v1/bots", echo_spec(name, token))
        answered = time.time()
        fleet.wait_state(name, "running", timeout=60)
        walls.append(time.monotonic() - started)
        events = fleet.api("GET", f"/api/v1/bots/{name}/events")["events"]
        created = next(_at(e) for e in events if e["kind"] == "created")
        running = next(_at(e) for e in events if e.get("to_state") == "running")
        spans.append(running - created)
        steps.append(steps_of(fleet, name, sent, answered, events))
    return spans, walls, steps


def cold_demo_up() -> tuple[float, float]:
    """Seconds from `tgfleet up --demo` in an empty home to all demo bots running; then again warm."""
    root = short_tmpdir("tgfb")
    figures = []
    fleet = Fleet.create(root)
    try:
        fleet.env = {
            "TGFLEET_SANDBOX_LISTEN": f"127.0.0.1:{free_port()}",
            "TGFLEET_SANDBOX_ADMIN": f"127.0.0.1:{free_port()}",
        }
        for _ in range(2):
            started = time.monotonic()
            fleet.start("--demo")
            wait_for(
                "the demo bots",
                lambda: (
                    (bots := fleet.api("GET", "/api/v1/bots")["bots"])
                    and len(bots) == 3
                    and all(b["state"] == "running" for b in bots)
                ),
                timeout=120,
                every=0.02,
            )
            figures.append(time.monotonic() - started)
            fleet.stop()
    finally:
        fleet.kill_leftovers()
        shutil.rmtree(root, ignore_errors=True)
    return figures[0], figures[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bots", type=int, default=10)
    parser.add_argument("--launch", default="fork,exec", help="launch modes, in turn")
    parser.add_argument("--no-up", action="store_true", help="skip the `tgfleet up` figures")
    parser.add_argument(
        "--breakdown", action="store_true", help="print where a create's time goes, step by step"
    )
    args = parser.parse_args()
    launches = [mode.strip() for mode in args.launch.split(",") if mode.strip()]
    root = short_tmpdir("tgfb")
    sandbox = Sandbox.start(root / "sandbox")
    figures = {}
    try:
        with running_fleet(root, sandbox) as fleet:
            for launch in launches:
                figures[launch] = create_to_running(fleet, sandbox, args.bots, launch)
    finally:
        sandbox.stop()
        shutil.rmtree(root, ignore_errors=True)
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    for launch, (spans, walls, steps) in figures.items():
        print(
            f"{launch}: API create → running (DB clock):      {median_max(spans)}  "
            "[goal ≤ 0.25 s median]"
        )
        print(f"{launch}: API create → running seen by a client: {median_max(walls)}")
        print(f"{launch}: median create→running: {statistics.median(spans):.3f}")
        if args.breakdown:
            print_breakdown(launch, steps)
    if not args.no_up:
        cold, warm = cold_demo_up()
        print(f"cold `tgfleet up --demo` → 3 demo bots running: {cold:.2f} s (initdb included)")
        print(f"warm `tgfleet up --demo` → 3 demo bots running: {warm:.2f} s")


if __name__ == "__main__":
    main()
