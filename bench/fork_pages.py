"""Where a forked bot's private memory comes from, page by page.

Run: .venv/bin/python bench/fork_pages.py [--settle S]
A lookalike of the fork server (``botrunner.forkserver``'s ``preload`` and
``gc.freeze()``, in this process) forks an idle sibling and a real echo bot (the
bot ``probe`` of a real fleet, stopped there, run here from its config dir; as root
it stays root, which changes none of its pages). Once the bot has logged in and
answered a message, and ``S`` seconds more, it compares the two children:
``/proc/PID/pagemap`` tells which pages the bot copied (its frame differs from the
sibling's, which still has the original), ``/proc/PID/mem`` what changed on them.
It prints the bot's Private_Dirty, the pages copied by mapping, how many hold no net
change (a reference count raised and dropped again), and how many hold a changed
code object (3.11 specializes bytecode in place and counts calls in ``co_warmup``),
with the files of those code objects. docs/internals.md, Memory, reads these.
"""

from __future__ import annotations

import argparse
import bisect
import collections
import gc
import os
import shutil
import signal
import struct
import sys
import time
import types
from pathlib import Path

from _fleet import Sandbox, echo_spec, running_fleet, short_tmpdir, use_launch

from botrunner import entry, forkserver

PAGE = 4096
PFN = (1 << 55) - 1
PRESENT = 1 << 63


def private_dirty_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Private_Dirty:"):
            return int(line.split()[1])
    return -1


def writable_mappings(pid: int) -> list[tuple[int, int, str]]:
    found = []
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        fields = line.split()
        if "w" not in fields[1]:
            continue
        low, high = (int(bound, 16) for bound in fields[0].split("-"))
        path = fields[5] if len(fields) > 5 else ""
        kind = path if path.startswith("[") else os.path.basename(path) or "anonymous"
        found.append((low, high, kind))
    return found


def frames(pid: int, low: int, high: int) -> tuple[int, ...]:
    with open(f"/proc/{pid}/pagemap", "rb") as pagemap:
        pagemap.seek(low // PAGE * 8)
        data = pagemap.read((high - low) // PAGE * 8)
    return struct.unpack(f"{len(data) // 8}Q", data)


def copied_pages(bot: int, sibling: int) -> tuple[list[int], collections.Counter[str]]:
    """Pages present in both whose frames differ: the bot wrote them since the fork."""
    pages: list[int] = []
    by_kind: collections.Counter[str] = collections.Counter()
    for low, high, kind in writable_mappings(bot):
        if kind.startswith("[v"):
            continue
        try:
            mine, theirs = frames(bot, low, high), frames(sibling, low, high)
        except OSError:
            continue  # not in the sibling: the bot's own mapping
        for index, (a, b) in enumerate(zip(mine, theirs, strict=False)):
            if a & PRESENT and b & PRESENT and (a & PFN) != (b & PFN):
                pages.append(low + index * PAGE)
                by_kind[kind] += 1
    return pages, by_kind


def changed_words(bot: int, sibling: int, pages: list[int]) -> tuple[list[int], int]:
    """Addresses of the 8-byte words that differ; how many pages differ in none."""
    words: list[int] = []
    unchanged = 0
    with open(f"/proc/{bot}/mem", "rb") as mine, open(f"/proc/{sibling}/mem", "rb") as theirs:
        for page in pages:
            mine.seek(page)
            theirs.seek(page)
            a, b = mine.read(PAGE), theirs.read(PAGE)
            found = [page + i for i in range(0, PAGE, 8) if a[i : i + 8] != b[i : i + 8]]
            unchanged += not found
            words += found
    return words, unchanged


def code_objects() -> list[types.CodeType]:
    """Every code object reachable from a function of this process."""
    seen: dict[int, types.CodeType] = {}
    stack = [f.__code__ for f in gc.get_objects() if isinstance(f, types.FunctionType)]
    while stack:
        code = stack.pop()
        if id(code) not in seen:
            seen[id(code)] = code
            stack += [c for c in code.co_consts if isinstance(c, types.CodeType)]
    return list(seen.values())


def short(path: str) -> str:
    for prefix in (sys.prefix + "/lib/python3.11/site-packages/", sys.base_prefix + "/lib/"):
        path = path.replace(prefix, "")
    return path


def run_bot(bot_dir: Path) -> int:
    os.setsid()
    os.chdir(bot_dir)
    forkserver._reseed()
    return entry.main([str(bot_dir / "config.json")], time.monotonic())


def measure(settle_s: float) -> None:
    root = short_tmpdir("tgfpg")
    sandbox = Sandbox.start(root / "sandbox")
    try:
        with running_fleet(root, sandbox) as fleet:
            use_launch(fleet, sandbox, "fork")
            token = sandbox.create_bot("probe")
            fleet.api("POST", "/api/v1/bots", echo_spec("probe", token))
            fleet.wait_state("probe", "running", timeout=120)
            fleet.api("POST", "/api/v1/bots/probe/stop")
            fleet.wait_state("probe", "stopped", timeout=60)
            compare(fleet.home.root / "bots" / "probe", sandbox, settle_s)
    finally:
        sandbox.stop()
        shutil.rmtree(root, ignore_errors=True)


def compare(bot_dir: Path, sandbox: Sandbox, settle_s: float) -> None:
    shipped = forkserver.preload()
    gc.collect()
    gc.freeze()
    print(f"lookalike fork server: preloaded Telethon, botrunner, {', '.join(shipped)}")
    sibling = os.fork()
    if sibling == 0:
        while True:
            signal.pause()
    bot = os.fork()
    if bot == 0:
        os._exit(run_bot(bot_dir))
    try:
        sandbox.cli("send", "probe_bot", "hi", "--user", "bench", "--wait", "30")
        time.sleep(settle_s)
        print(
            f"bot Private_Dirty {private_dirty_kb(bot) / 1024:.2f} MB, idle sibling's "
            f"{private_dirty_kb(sibling) / 1024:.2f} MB"
        )
        pages, by_kind = copied_pages(bot, sibling)
        words, unchanged = changed_words(bot, sibling, pages)
    finally:
        for pid in (bot, sibling):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    print(f"pages the bot copied from the image: {len(pages)} ({len(pages) * PAGE / 2**20:.2f} MB)")
    for kind, count in by_kind.most_common(6):
        print(f"  {kind:<44}{count:>6} pages")
    print(f"  with no net change: {unchanged} pages (a reference count up and down again)")
    gc.unfreeze()  # the frozen generation is out of gc.get_objects()'s sight
    codes = sorted(code_objects(), key=id)
    starts = [id(c) for c in codes]
    touched: dict[int, types.CodeType] = {}
    code_pages = set()
    for word in words:
        at = bisect.bisect_right(starts, word) - 1
        if at >= 0 and word < starts[at] + sys.getsizeof(codes[at]) and word != starts[at]:
            touched[starts[at]] = codes[at]
            code_pages.add(word & ~(PAGE - 1))
    print(
        f"  with a changed code object (bytecode, co_warmup): {len(code_pages)} pages, "
        f"{len(touched)} code objects"
    )
    files = collections.Counter(short(c.co_filename) for c in touched.values())
    for path, count in files.most_common(12):
        print(f"    {count:>4} {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--settle", type=float, default=6.0, help="seconds after the answer")
    args = parser.parse_args()
    print(f"load average at start: {os.getloadavg()[0]:.2f}")
    measure(args.settle)


if __name__ == "__main__":
    main()
