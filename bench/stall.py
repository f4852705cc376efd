"""PostgreSQL stalled (every process SIGSTOPped for 20 s): how fast the API answers, and how
fast health sees a crashed bot healthy again, with and without the stall.

    .venv/bin/python bench/stall.py [--stall-s 20] [--crashes 3]

Starts the sandbox and a fleet of three bots in temporary dirs; prints figures.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import time
from typing import Any

from _fleet import Fleet, Sandbox, drills, median_max, running_fleet, short_tmpdir, wait_for
from harness import stalled_postgres, timed  # on sys.path through _fleet


def crash_to_healthy(fleet: Fleet, name: str) -> float:
    """kill -9 the bot; seconds until the API shows a new process running and healthy."""
    pid = fleet.bot(name)["pid"]
    killed = time.monotonic()
    os.kill(pid, signal.SIGKILL)

    def healthy() -> dict[str, Any] | None:
        bot = timed(fleet, "GET", f"/api/v1/bots/{name}").body
        ok = (
            bot["pid"] not in (None, pid)
            and bot["telegram"]["connected"]
            and bot["health"]["status"] == "healthy"
        )
        return bot if ok else None

    wait_for(f"{name} healthy again", healthy, timeout=60, every=0.02)
    return time.monotonic() - killed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--stall-s", type=float, default=20.0)
    parser.add_argument("--crashes", type=int, default=3)
    args = parser.parse_args()
    root = short_tmpdir("tgfbs")
    sandbox = Sandbox.start(root / "sandbox")
    try:
        with running_fleet(root, sandbox) as fleet:
            bots = [drills.add_bot(fleet, sandbox, "bench") for _ in range(3)]
            calm = []
            for n in range(args.crashes):
                calm.append(crash_to_healthy(fleet, bots[n % len(bots)]))
                drills.connected(fleet, bots[n % len(bots)])
            print(f"crash -> healthy, PostgreSQL answering: {median_max(calm)}")

            answers: dict[str, list[float]] = {}
            stalled: list[float] = []
            statuses: set[str] = set()
            with stalled_postgres(fleet):
                began = time.monotonic()
                crashes_done = 0
                while time.monotonic() - began < args.stall_s:
                    for method, path, body in [
                        ("GET", "/api/v1/bots", None),
                        ("GET", f"/api/v1/bots/{bots[0]}", None),
                        ("GET", "/api/v1/status", None),
                        ("POST", f"/api/v1/bots/{bots[0]}/restart", None),
                        ("PATCH", f"/api/v1/bots/{bots[0]}", {"settings": {"x": 1}}),
                    ]:
                        answer = timed(fleet, method, path, body)
                        answers.setdefault(
                            f"{method} {path.replace(bots[0], '{name}')}", []
                        ).append(answer.took_s)
                        statuses.add(f"{method} {answer.status}")
                    elapsed = time.monotonic() - began
                    if crashes_done < args.crashes and elapsed > 3 + 4 * crashes_done:
                        stalled.append(crash_to_healthy(fleet, bots[crashes_done % len(bots)]))
                        crashes_done += 1
            thawed = time.monotonic()
            wait_for(
                "a write",
                lambda: (
                    timed(
                        fleet,
                        "PATCH",
                        f"/api/v1/bots/{bots[0]}",
                        {"health": {"backoff_reset_s": 61}},
                    ).status
                    == 200
                ),
                timeout=60,
                every=0.05,
            )
            write_back = time.monotonic() - thawed
            every = [t for took in answers.values() for t in took]
            print(f"PostgreSQL stalled {args.stall_s:.0f} s (SIGSTOP on postmaster and backends):")
            for what, took in answers.items():
                print(f"  {what:38} {median_max(took)}")
            print(f"  every request                          {median_max(every)}")
            print(f"  answers seen: {', '.join(sorted(statuses))}")
            print(f"crash -> healthy, PostgreSQL stalled: {median_max(stalled)}")
            print(f"thaw -> first write accepted: {write_back:.2f} s")
    finally:
        sandbox.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
