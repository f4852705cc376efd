"""What the benchmarks share: the test harness (real `tgfleet up`, real sandbox) and figures."""

from __future__ import annotations

import statistics
import sys
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

__all__ = [
    "Fleet",
    "Sandbox",
    "drills",
    "echo_spec",
    "free_port",
    "median_max",
    "running_fleet",
    "short_tmpdir",
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
