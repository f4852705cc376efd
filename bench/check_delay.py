"""Circus' check_delay: what polling for dead processes costs, against how fast it respawns.

Run: .venv/bin/python bench/check_delay.py [--children 100] [--seconds 10] [--kills 10]
        [--circusd circus,tgfleet] [--delays 0.1,0.25,0.5,1]

For each check_delay, a real circusd runs one watcher of N idle children
(``sleep``); the script reports circusd's CPU (% of one core, from /proc over
--seconds) and the time from kill -9 of a child to circusd's new child (median /
max of --kills). Circus' own circusd finds dead processes only by its poll every
check_delay, so that is its trade-off: lower costs CPU at many children, higher
delays every respawn. tgfleet's circusd (``python -m controller.circusd``, what
`tgfleet up` and the deployed unit run) also respawns on SIGCHLD
(controller/childwatch.py): its respawn should not depend on check_delay, which
then only sets the poll's CPU.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
DELAYS = "0.1,0.25,0.5,1"
#: How each circusd is run.
COMMANDS = {
    "circus": [sys.executable, "-m", "circus.circusd"],
    "tgfleet": [sys.executable, "-m", "controller.circusd"],
}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def children(pid: int) -> set[int]:
    found = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        found.update(int(p) for p in text)
    return found


def wait_for(what: str, check: object, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.005)
    raise SystemExit(f"timed out waiting for {what}")


def measure(
    command: list[str], check_delay: float, count: int, seconds: float, kills: int
) -> tuple[float, list[float]]:
    with tempfile.TemporaryDirectory(prefix="tgcd") as tmp:
        ini = Path(tmp) / "circus.ini"
        ini.write_text(
            "[circus]\n"
            f"endpoint = ipc://{tmp}/c.sock\n"
            f"pubsub_endpoint = ipc://{tmp}/p.sock\n"
            "statsd = false\nmulticast_endpoint =\n"
            f"check_delay = {check_delay}\nwarmup_delay = 0\n\n"
            "[watcher:idle]\ncmd = /bin/sleep\nargs = 3600\n"
            f"numprocesses = {count}\ncopy_env = false\nrespawn = true\n"
            "graceful_timeout = 0.5\n"
        )
        circusd = subprocess.Popen(
            [*command, str(ini)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_for(f"{count} children", lambda: len(children(circusd.pid)) >= count)
            time.sleep(1.0)  # let start-up settle
            before, started = cpu_seconds(circusd.pid), time.monotonic()
            time.sleep(seconds)
            cpu = (cpu_seconds(circusd.pid) - before) / (time.monotonic() - started) * 100
            respawns = []
            for _ in range(kills):
                current = children(circusd.pid)
                victim = min(current)
                killed_at = time.monotonic()
                os.kill(victim, signal.SIGKILL)

                def respawned(before: set[int] = current, gone: int = victim) -> bool:
                    now = children(circusd.pid)
                    return bool(now - before) and gone not in now

                wait_for("a respawn", respawned)
                respawns.append(time.monotonic() - killed_at)
                time.sleep(check_delay * 1.5)
            return cpu, respawns
        finally:
            circusd.send_signal(signal.SIGTERM)
            try:
                circusd.wait(timeout=20)
            except subprocess.TimeoutExpired:
                circusd.kill()
                circusd.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--children", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--circusd", default="circus,tgfleet", help="which circusd, in turn")
    parser.add_argument("--delays", default=DELAYS, help="check_delay values, seconds")
    args = parser.parse_args()
    delays = [float(d) for d in args.delays.split(",")]
    print(f"{os.cpu_count()} CPUs; {args.children} idle children; {args.kills} kills each")
    print(
        f"{'circusd':>8} {'check_delay':>11} {'circusd CPU':>12} {'respawn median':>15} {'max':>7}"
    )
    for which in args.circusd.split(","):
        for delay in delays:
            cpu, respawns = measure(COMMANDS[which], delay, args.children, args.seconds, args.kills)
            print(
                f"{which:>8} {delay:>10.2f}s {cpu:>11.1f}% "
                f"{statistics.median(respawns):>14.3f}s {max(respawns):>6.3f}s"
            )
    print(f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
