"""What watching the fleet costs the controller: sampling every bot's /proc, and what
prometheus_client would have cost to import.

Run: .venv/bin/python bench/observe.py [--bots 100] [--passes 20] [--runs 5]

Sampling: a parent imports Telethon (as a bot does) and forks --bots children that
sleep, each holding a few open files: processes the size of a bot whose /proc the
controller reads (a fork-server bot shares its pages the same way). Then the
controller's own code (ResourceMonitor.plan, read_all, apply) samples them all,
--passes times; the CPU time of each pass is measured (process CPU, so /proc reads
in the kernel count). A pass with PSS (smaps_rollup, every PSS_EVERY-th pass) and
one without are reported apart, then the controller's average CPU share at one
pass every SAMPLE_INTERVAL_S.

Import cost: fresh interpreters, VmRSS and wall time before/after importing
prometheus_client (bare, and on top of controller.app), median of --runs.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import time

from controller.resources import PSS_EVERY, SAMPLE_INTERVAL_S, ResourceMonitor, read_all


def fork_bots(count: int) -> list[int]:
    import telethon  # noqa: F401  # what a bot's memory is mostly made of

    pids = []
    for _ in range(count):
        pid = os.fork()
        if pid == 0:
            held = [os.open("/dev/null", os.O_RDONLY) for _ in range(8)]  # noqa: F841
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
            while True:
                time.sleep(3600)
        pids.append(pid)
    return pids


def sampling(bots: int, passes: int) -> None:
    pids = fork_bots(bots)
    try:
        monitor = ResourceMonitor(lambda bot, near: None)
        targets = {f"bot-{n}": pid for n, pid in enumerate(pids)}
        with_pss_ms: list[float] = []
        without_ms: list[float] = []
        for _ in range(passes):
            started = time.process_time()
            known, with_pss = monitor.plan()
            samples = read_all(targets, known, with_pss)
            monitor.apply(samples, time.monotonic(), time.time())
            spent_ms = (time.process_time() - started) * 1000
            (with_pss_ms if with_pss else without_ms).append(spent_ms)
        assert len(monitor.usage) == bots, "some children were not sampled"
        full = statistics.median(with_pss_ms)
        light = statistics.median(without_ms) if without_ms else full
        average_ms = (full + (PSS_EVERY - 1) * light) / PSS_EVERY
        share = average_ms / 1000 / SAMPLE_INTERVAL_S * 100
        print(f"sampling {bots} bot-sized processes, {passes} passes (median CPU per pass):")
        print(f"  with PSS (smaps_rollup, every {PSS_EVERY}th pass): {full:.1f} ms")
        print(f"  without PSS:                                    {light:.1f} ms")
        print(
            f"  controller CPU at one pass every {SAMPLE_INTERVAL_S:g} s: {share:.2f} % of a core "
            f"({share * 100 / bots:.2f} % per 100 bots)"
        )
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGTERM)
        for pid in pids:
            os.waitpid(pid, 0)


MEASURE = (
    "import time\n"
    "def rss():\n"
    "    for line in open('/proc/self/status'):\n"
    "        if line.startswith('VmRSS:'):\n"
    "            return int(line.split()[1])\n"
    "{before}\n"
    "a = rss(); t = time.perf_counter()\n"
    "import prometheus_client\n"
    "print(rss() - a, (time.perf_counter() - t) * 1000)\n"
)


def import_cost(runs: int) -> None:
    for label, before in (
        ("bare python", "pass"),
        ("after controller.app", "import controller.app"),
    ):
        kb, ms = [], []
        for _ in range(runs):
            done = subprocess.run(
                [sys.executable, "-c", MEASURE.format(before=before)],
                capture_output=True,
                text=True,
                check=True,
            )
            grown_kb, took_ms = done.stdout.split()
            kb.append(int(grown_kb))
            ms.append(float(took_ms))
        print(
            f"import prometheus_client, {label}: +{statistics.median(kb) / 1024:.1f} MB RSS, "
            f"{statistics.median(ms):.0f} ms (median of {runs})"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bots", type=int, default=100)
    parser.add_argument("--passes", type=int, default=20)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    sampling(args.bots, args.passes)
    try:
        import_cost(args.runs)
    except subprocess.CalledProcessError:
        print("prometheus_client is not installed (pip install -e '.[test]')")


if __name__ == "__main__":
    main()
