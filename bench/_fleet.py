"""What the benchmarks share: the test harness (real `tgfleet up`, real sandbox) and figures."""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import drills
from harness import (
    Fleet,
    Sandbox,
    echo_spec,
    free_port,
    running_fleet,
    short_tmpdir,
    wait_for,
    wait_for_async,
)

from botspec import forked

__all__ = [
    "Fleet",
    "Sandbox",
    "drills",
    "echo_spec",
    "free_port",
    "logged_at",
    "median_max",
    "running_fleet",
    "short_tmpdir",
    "started_at",
    "use_launch",
    "wait_for",
    "wait_for_async",
]


def use_launch(fleet: Fleet, sandbox: Sandbox, launch: str) -> None:
    """Make ``launch`` (fork or exec) the fleet's default: every bot created after uses it."""
    fleet.api(
        "PUT", "/api/v1/defaults", {"telegram": sandbox.telegram_defaults(), "launch": launch}
    )


def median_max(values: list[float]) -> str:
    return f"median {statistics.median(values):.3f} s, max {max(values):.3f} s (n={len(values)})"


TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def started_at(pid: int) -> float | None:
    """A process's start as wall time (from /proc's ticks since boot: 10 ms steps)."""
    ticks = forked.start_time(pid)
    if ticks is None:
        return None
    age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / TICKS_PER_S
    return time.time() - age


def logged_at(path: Path, fragment: str, after: float = 0.0) -> float | None:
    """Wall time of the first JSON log line of ``path`` (not before wall time ``after``)
    whose message holds ``fragment``."""
    with contextlib.suppress(OSError):
        for line in path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                at = datetime.fromisoformat(entry["ts"]).timestamp()
                if at >= after and fragment in str(entry.get("message", "")):
                    return at
    return None
