"""Startup figures: API create → bot running (Telegram connected), and cold `tgfleet up --demo`.

Run: .venv/bin/python bench/startup.py [--bots N] [--launch fork,exec] [--no-up]
Prints a median of N creates (goal: ≤ 1.5 s; the seed's NF5 limit: 10 s), measured
from PostgreSQL's own timestamps of the `created` and `→ running` events, and the
wall time from starting `tgfleet up --demo` in an empty home to every demo bot running.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import time
from datetime import datetime

from _fleet import (
    Fleet,
    Sandbox,
    echo_spec,
    free_port,
    median_max,
    running_fleet,
    short_tmpdir,
    use_launch,
    wait_for,
)


def create_to_running(
    fleet: Fleet, sandbox: Sandbox, count: int, launch: str
) -> tuple[list[float], list[float]]:
    """Per bot: seconds from `created` to `running` (DB clock), and as a client saw it."""
    spans, walls = [], []
    use_launch(fleet, sandbox, launch)
    for index in range(count):
        name = f"bench-{launch}-{index}"
        token = sandbox.create_bot(f"bench_{launch}_{index}")
        started = time.monotonic()
        fleet.api("POST", "/api/v1/bots", echo_spec(name, token))
        fleet.wait_state(name, "running", timeout=60)
        walls.append(time.monotonic() - started)
        events = fleet.api("GET", f"/api/v1/bots/{name}/events")["events"]
        created = next(e["at"] for e in events if e["kind"] == "created")
        running = next(e["at"] for e in events if e.get("to_state") == "running")
        spans.append(
            (datetime.fromisoformat(running) - datetime.fromisoformat(created)).total_seconds()
        )
    return spans, walls


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
    for launch, (spans, walls) in figures.items():
        print(
            f"{launch}: API create → running (DB clock):      {median_max(spans)}  "
            "[goal ≤ 0.25 s median]"
        )
        print(f"{launch}: API create → running seen by a client: {median_max(walls)}")
        print(f"{launch}: median create→running: {statistics.median(spans):.3f}")
    if not args.no_up:
        cold, warm = cold_demo_up()
        print(f"cold `tgfleet up --demo` → 3 demo bots running: {cold:.2f} s (initdb included)")
        print(f"warm `tgfleet up --demo` → 3 demo bots running: {warm:.2f} s")


if __name__ == "__main__":
    main()
