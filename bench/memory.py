"""Memory figures: manager overhead and the whole system with N running bots.

Run: .venv/bin/python bench/memory.py [--bots N] [--launch fork,exec] [--detail] [--merge-pages]
For each launch mode in turn (a fleet of its own, N echo bots each): RSS of circusd +
controller (goal ≤ 80 MB; NF4 limit 100 MB), of the whole system (circusd, controller,
PostgreSQL, sandbox, fork server, N bots and their launchers; goal ≤ 350 MB PSS at 10
bots, TC4 2 GB), and per bot (its process and its launcher; goal ≤ 15 MB PSS) — as RSS
(shared pages counted in every process) and as PSS (shared pages split fairly).
`tgfleet up` is circusd itself (controller/upwait.py). --detail: where the manager's
memory is (anonymous vs file-backed, the largest mappings), from /proc/PID/smaps.

tgfleet's own packages are compiled to bytecode first, as `pip install` does: the
controller runs as the service user, which cannot write `__pycache__` into a checkout
owned by root, and compiling every module at each start leaves ~1 MB more in it (and
~1.5 MB in circusd when PYTHONDONTWRITEBYTECODE is set). The load average is printed
before and after: figures taken while other work runs are noisy.

--merge-pages: the fleet runs with TGFLEET_MERGE_PAGES=1 (the fork server offers its
memory to the kernel's same-page merging); when KSM runs on this host
(/sys/kernel/mm/ksm/run = 1, which this script does not set), it waits for four of
ksmd's full scans before measuring, and prints ksmd's CPU and the pages it merged.
"""

from __future__ import annotations

import argparse
import compileall
import os
import shutil
import time
from pathlib import Path

import psutil
from _fleet import Sandbox, echo_spec, running_fleet, short_tmpdir, use_launch

MB = 2**20
ROOT = Path(__file__).resolve().parent.parent


def usage(proc: psutil.Process) -> tuple[float, float]:
    info = proc.memory_full_info()
    return info.rss / MB, getattr(info, "pss", info.rss) / MB


def classify(proc: psutil.Process) -> str:
    cmd = " ".join(proc.cmdline())
    if proc.name().startswith("tgf:"):
        return "bots"  # forked by the fork server: its command line is the fork server's
    if "botrunner/launch" in cmd or "botrunner/tgf-launcher" in cmd:  # C or Python
        return "launchers"
    if "botrunner.forkserver" in cmd:
        return "forkserver"
    if "controller.upwait" in cmd or " up " in f"{cmd} ":
        return "up"  # `tgfleet up`, resident while the fleet runs
    if "circusd" in cmd:
        return "circusd"
    if "-m controller serve" in cmd:
        return "controller"
    if "-m botrunner" in cmd:
        return "bots"
    if "tgsandbox" in cmd:
        return "sandbox"
    if "postgres" in proc.name() or "postgres" in cmd:
        return "postgres"
    return "other"


def mappings(pid: int, kind: str, top: int = 8) -> str:
    """RSS of a process by mapping: anonymous (heap, Python's arenas) and each file."""
    by_name: dict[str, int] = {}
    name = ""
    with open(f"/proc/{pid}/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and not fields[0].endswith(":"):
                name = os.path.basename(fields[5]) if len(fields) > 5 else "[anonymous]"
                name = "[anonymous]" if name in ("[heap]", "[stack]") else name
            elif fields[0] == "Rss:":
                by_name[name] = by_name.get(name, 0) + int(fields[1])
    biggest = sorted(by_name.items(), key=lambda item: -item[1])[:top]
    total = sum(by_name.values()) / 1024
    parts = ", ".join(f"{n} {kb / 1024:.1f}" for n, kb in biggest)
    return f"{kind} (pid {pid}) RSS {total:.1f} MB: {parts}"


KSM = Path("/sys/kernel/mm/ksm")


def ksm_value(name: str) -> int:
    try:
        return int((KSM / name).read_text())
    except (OSError, ValueError):
        return -1


def ksmd() -> psutil.Process | None:
    for proc in psutil.process_iter(["name"]):
        if proc.info["name"] == "ksmd":
            return proc
    return None


def settle_merging(scans: int = 4, timeout_s: float = 600.0) -> str:
    """Wait for ``scans`` more of ksmd's full scans (a page merges once it was seen unchanged
    twice; pages that change in between wait for later scans); what it
    cost and did, as a line to print."""
    if ksm_value("run") != 1:
        return (
            f"KSM does not run on this host (run = {ksm_value('run')}): nothing is merged "
            "(as root: echo 1 > /sys/kernel/mm/ksm/run)"
        )
    daemon = ksmd()
    cpu_before = sum(daemon.cpu_times()[:2]) if daemon else 0.0
    started, first = time.monotonic(), ksm_value("full_scans")
    while ksm_value("full_scans") < first + scans and time.monotonic() - started < timeout_s:
        time.sleep(1)
    waited = time.monotonic() - started
    cpu = (sum(daemon.cpu_times()[:2]) - cpu_before) if daemon else float("nan")
    return (
        f"KSM: waited {waited:.0f} s for {scans} full scans ({ksm_value('pages_to_scan')} pages "
        f"every {ksm_value('sleep_millisecs')} ms); ksmd used {cpu:.1f} s CPU "
        f"({100 * cpu / waited:.1f} % of a core); pages_sharing {ksm_value('pages_sharing')}, "
        f"pages_shared {ksm_value('pages_shared')}"
    )


def measure(
    bots: int,
    launch: str,
    details: list[str] | None = None,
    merge_pages: bool = False,
) -> dict[str, list[float]]:
    """[processes, RSS MB, PSS MB] per part of a fleet running ``bots`` bots of ``launch``."""
    root = short_tmpdir("tgfm")
    sandbox = Sandbox.start(root / "sandbox")
    totals: dict[str, list[float]] = {}
    env = {"TGFLEET_MERGE_PAGES": "1"} if merge_pages else {}
    try:
        with running_fleet(root, sandbox, env=env) as fleet:
            use_launch(fleet, sandbox, launch)
            for index in range(bots):
                token = sandbox.create_bot(f"mem_{index}")
                fleet.api("POST", "/api/v1/bots", echo_spec(f"mem-{index}", token))
            for index in range(bots):
                fleet.wait_state(f"mem-{index}", "running", timeout=300)
            # One message each, so every bot has handled an update.
            for index in range(bots):
                sandbox.cli("send", f"mem_{index}_bot", "hi", "--user", "bench", "--wait", "30")
            if merge_pages:
                print(settle_merging())
            assert fleet.proc is not None
            # Every process a user sees in ps: `tgfleet up` itself too, not only its children.
            procs = [
                psutil.Process(fleet.proc.pid),
                *fleet.processes(),
                psutil.Process(sandbox.proc.pid),
            ]
            for proc in procs:
                try:
                    rss, pss = usage(proc)
                    kind = classify(proc)
                    if details is not None and kind in ("up", "circusd", "controller"):
                        details.append(mappings(proc.pid, kind))
                except psutil.Error:
                    continue
                entry = totals.setdefault(kind, [0, 0.0, 0.0])
                entry[0] += 1
                entry[1] += rss
                entry[2] += pss
    finally:
        sandbox.stop()
        shutil.rmtree(root, ignore_errors=True)
    return totals


def report(bots: int, launch: str, totals: dict[str, list[float]]) -> None:
    print(f"\n== launch: {launch}, {bots} bots running")
    print(f"{'part':<11}{'procs':>6}{'RSS MB':>10}{'PSS MB':>10}")
    kinds = ("up", "circusd", "controller", "postgres", "sandbox", "forkserver", "launchers")
    for kind in (*kinds, "bots", "other"):
        if kind in totals:
            count, rss, pss = totals[kind]
            print(f"{kind:<11}{int(count):>6}{rss:>10.1f}{pss:>10.1f}")
    manager = ("up", "circusd", "controller")
    manager_rss = sum(totals[k][1] for k in manager if k in totals)
    manager_pss = sum(totals[k][2] for k in manager if k in totals)
    all_rss = sum(v[1] for v in totals.values())
    all_pss = sum(v[2] for v in totals.values())
    if "bots" in totals:
        count = totals["bots"][0]
        own_rss, own_pss = totals["bots"][1] / count, totals["bots"][2] / count
        launcher = totals.get("launchers", [0, 0.0, 0.0])
        with_rss, with_pss = own_rss + launcher[1] / count, own_pss + launcher[2] / count
        server = totals.get("forkserver", [0, 0.0, 0.0])
        print(f"per bot, its process alone: RSS {own_rss:.1f} MB, PSS {own_pss:.1f} MB")
        print(
            f"per bot, with its launcher: RSS {with_rss:.1f} MB, PSS {with_pss:.1f} MB  "
            "[goal ≤ 15 MB PSS]"
        )
        print(
            f"per bot, with its launcher and 1/{int(count)} of the fork server: "
            f"PSS {with_pss + server[2] / count:.1f} MB"
        )
    print(
        f"manager (tgfleet up + circusd + controller): RSS {manager_rss:.1f} MB, "
        f"PSS {manager_pss:.1f} MB  [goal ≤ 80 MB; NF4 < 100 MB]"
    )
    print(f"whole system: RSS {all_rss:.1f} MB, PSS {all_pss:.1f} MB  [goal ≤ 350 MB PSS]")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bots", type=int, default=10)
    parser.add_argument("--launch", default="fork,exec", help="launch modes, in turn")
    parser.add_argument("--detail", action="store_true", help="the manager's mappings")
    parser.add_argument(
        "--merge-pages", action="store_true", help="TGFLEET_MERGE_PAGES=1 (KSM), see above"
    )
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB")
    packages = ("controller", "botspec", "botrunner", "tgsandbox")
    if not all(compileall.compile_dir(ROOT / name, quiet=1) for name in packages):
        raise SystemExit("compiling tgfleet's packages to bytecode failed")
    print(f"bytecode of {', '.join(packages)}: compiled first (as pip install does)")
    print(f"load average before: {loadavg()}")
    for launch in [mode.strip() for mode in args.launch.split(",") if mode.strip()]:
        details: list[str] = []
        totals = measure(args.bots, launch, details if args.detail else None, args.merge_pages)
        report(args.bots, launch, totals)
        for text in details:
            print(text)
    print(f"load average after: {loadavg()}")


def loadavg() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


if __name__ == "__main__":
    main()
