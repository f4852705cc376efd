"""Memory figures: manager overhead and the whole system with N running bots.

Run: .venv/bin/python bench/memory.py [--bots N] [--detail]
Prints RSS of the manager — the resident `tgfleet up`, which is circusd
(controller/upwait.py), and the controller (goal ≤ 80 MB; NF4 limit 100 MB) — and of
the whole system (manager, PostgreSQL, sandbox, N bots; goal ≤ 1 GB, TC4 2 GB) — both
as RSS (shared pages counted in every process) and as PSS (shared pages split fairly).
--detail: where the manager's memory is (anonymous vs file-backed, the largest
mappings), from /proc/PID/smaps.
"""

from __future__ import annotations

import argparse
import os
import shutil

import psutil
from _fleet import Sandbox, echo_spec, running_fleet, short_tmpdir

MB = 2**20


def usage(proc: psutil.Process) -> tuple[float, float]:
    info = proc.memory_full_info()
    return info.rss / MB, getattr(info, "pss", info.rss) / MB


def classify(proc: psutil.Process) -> str:
    cmd = " ".join(proc.cmdline())
    if "controller.upwait" in cmd or " up " in f"{cmd} ":
        return "up"  # `tgfleet up`, resident while the fleet runs: circusd itself
    if "circusd" in cmd:
        return "circusd"  # a separate circusd (tgfleet before it ran circusd in `up`)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bots", type=int, default=10)
    parser.add_argument("--detail", action="store_true", help="the manager's mappings")
    args = parser.parse_args()
    details: list[str] = []
    root = short_tmpdir("tgfm")
    sandbox = Sandbox.start(root / "sandbox")
    try:
        with running_fleet(root, sandbox) as fleet:
            for index in range(args.bots):
                token = sandbox.create_bot(f"mem_{index}")
                fleet.api("POST", "/api/v1/bots", echo_spec(f"mem-{index}", token))
            for index in range(args.bots):
                fleet.wait_state(f"mem-{index}", "running", timeout=120)
            # One message each, so every bot has handled an update.
            for index in range(args.bots):
                sandbox.cli("send", f"mem_{index}_bot", "hi", "--user", "bench", "--wait", "30")
            totals: dict[str, list[float]] = {}
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
                except psutil.Error:
                    continue
                if args.detail and kind in ("up", "circusd", "controller"):
                    details.append(mappings(proc.pid, kind))
                entry = totals.setdefault(kind, [0, 0.0, 0.0])
                entry[0] += 1
                entry[1] += rss
                entry[2] += pss
    finally:
        sandbox.stop()
        shutil.rmtree(root, ignore_errors=True)
    print(
        f"machine: {os.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB; {args.bots} bots running"
    )
    print(f"{'part':<11}{'procs':>6}{'RSS MB':>10}{'PSS MB':>10}")
    for kind in ("up", "circusd", "controller", "postgres", "sandbox", "bots", "other"):
        if kind in totals:
            count, rss, pss = totals[kind]
            print(f"{kind:<11}{int(count):>6}{rss:>10.1f}{pss:>10.1f}")
    manager = ("up", "circusd", "controller")
    for text in details:
        print(text)
    manager_rss = sum(totals[k][1] for k in manager if k in totals)
    manager_pss = sum(totals[k][2] for k in manager if k in totals)
    all_rss = sum(v[1] for v in totals.values())
    all_pss = sum(v[2] for v in totals.values())
    if "bots" in totals:
        print(
            f"per bot: RSS {totals['bots'][1] / totals['bots'][0]:.1f} MB, PSS {totals['bots'][2] / totals['bots'][0]:.1f} MB"
        )
    print(
        f"manager (tgfleet up/circusd + controller): RSS {manager_rss:.1f} MB, "
        f"PSS {manager_pss:.1f} MB  [goal ≤ 80 MB; NF4 < 100 MB]"
    )
    print(f"whole system: RSS {all_rss:.1f} MB, PSS {all_pss:.1f} MB  [goal ≤ 1024 MB]")


if __name__ == "__main__":
    main()
