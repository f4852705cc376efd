"""How fast `tgfleet` answers: wall time of real commands against a running fleet.

Run: .venv/bin/python bench/cli.py [--bots N] [--runs N]

Starts a real fleet (`tgfleet up`, embedded PostgreSQL, the sandbox, N echo bots),
then times `tgfleet bots list`, `tgfleet status`, `tgfleet hosts list` and
`tgfleet --help` as a user runs them (a new process each time, the installed
`tgfleet` script), N runs each:
median and p90 (goal for `bots list`: ≤ 0.25 s). Then the heaviest imports of
`bots list` (`python -X importtime`, cumulative µs), and a bare interpreter's
time for reference.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _fleet import Sandbox, echo_spec, running_fleet, short_tmpdir

TGFLEET = str(Path(sys.executable).parent / "tgfleet")
COMMANDS = {
    "tgfleet bots list": [TGFLEET, "bots", "list"],
    "tgfleet status": [TGFLEET, "status"],
    "tgfleet hosts list": [TGFLEET, "hosts", "list"],
    "tgfleet --help": [TGFLEET, "--help"],
    "python -c pass (reference)": [sys.executable, "-c", "pass"],
}


def timed(argv: list[str], env: dict[str, str], runs: int) -> tuple[list[float], list[float]]:
    """Wall times and CPU times (user + system, less sensitive to a busy host) of ``runs``."""
    walls, cpus = [], []
    for _ in range(runs):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        subprocess.run(argv, env=env, check=True, capture_output=True)
        walls.append(time.perf_counter() - started)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return walls, cpus


def p90(values: list[float]) -> float:
    return statistics.quantiles(values, n=10)[-1] if len(values) > 1 else values[0]


def top_imports(env: dict[str, str], count: int) -> list[tuple[int, str]]:
    """(cumulative µs, module) of `tgfleet bots list`'s heaviest imports."""
    code = "import sys; from controller.cli import run; sys.exit(run(['bots', 'list']))"
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    rows = []
    for line in done.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _, cumulative, name = line.split("|")
        rows.append((int(cumulative), name.rstrip()[1:]))
    total = sum(us for us, name in rows if not name.startswith(" "))  # top level only
    rows.sort(reverse=True)
    return [(total, "(all imports)"), *rows[:count]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bots", type=int, default=10)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument(
        "--before",
        metavar="DIR",
        help="a source tree of another tgfleet (git worktree or archive): its CLI's "
        "`bots list` and `--help` are timed too, against the same fleet",
    )
    args = parser.parse_args()
    commands = dict(COMMANDS)
    if args.before:
        # -P: not the current dir first on sys.path (it may be this checkout)
        old = [sys.executable, "-P", "-c", "from controller.cli import main; main()"]
        commands["before: bots list"] = [*old, "bots", "list"]
        commands["before: --help"] = [*old, "--help"]
    root = short_tmpdir("tgfc")
    sandbox = Sandbox.start(root / "sandbox")
    try:
        with running_fleet(root, sandbox) as fleet:
            for index in range(args.bots):
                token = sandbox.create_bot(f"cli_{index}")
                fleet.api("POST", "/api/v1/bots", echo_spec(f"cli-{index}", token))
            for index in range(args.bots):
                fleet.wait_state(f"cli-{index}", "running", timeout=120)
            env = {**os.environ, "TGFLEET_HOME": str(fleet.home.root)}
            figures = {}
            for label, argv in commands.items():
                own_env = env
                if label.startswith("before:"):
                    own_env = {**env, "PYTHONPATH": str(Path(args.before).resolve())}
                figures[label] = timed(argv, own_env, args.runs)
            imports = top_imports(env, 12)
            listing = subprocess.run(
                COMMANDS["tgfleet bots list"], env=env, check=True, capture_output=True, text=True
            ).stdout
    finally:
        sandbox.stop()
        shutil.rmtree(root, ignore_errors=True)
    print(
        f"machine: {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; {args.bots} bots running"
    )
    print(
        f"{'wall s / CPU s':30s} {'median':>7s} {'p90':>6s} {'max':>6s} {'CPU med':>8s}  (n={args.runs})"
    )
    for label, (walls, cpus) in figures.items():
        print(
            f"{label:30s} {statistics.median(walls):7.3f} {p90(walls):6.3f} {max(walls):6.3f}"
            f" {statistics.median(cpus):8.3f}"
        )
    print("goal: tgfleet bots list ≤ 0.25 s")
    print("\nheaviest imports of `tgfleet bots list` (python -X importtime, cumulative):")
    for micros, name in imports:
        print(f"{micros / 1000:8.1f} ms  {name}")
    print("\n" + listing)


if __name__ == "__main__":
    main()
