"""What each bot's process uses (CPU, memory, file descriptors, threads), sampled from
/proc by the controller itself, and the warning a bot gets when it nears a limit.

Decisions are pure and tested by table: ``usage_of`` (a sample and the one before it
→ what the API shows, CPU % over the interval between them) and ``crossings`` (which
limits a bot has just come near: warned once per crossing, armed again only once it
has gone well below). ``ResourceMonitor`` keeps the last sample and warnings per bot;
the reads themselves (``read_all``) run off the event loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from botspec import procinfo
from botspec.procinfo import ProcSample

#: Between two samples of every bot, seconds (CPU % is over this interval).
SAMPLE_INTERVAL_S = 2.0
#: PSS (smaps_rollup: the kernel walks the page tables) costs ~15 times all other reads
#: together (bench/observe.py): read every this many samples, i.e. every 30 s.
PSS_EVERY = 15
#: A bot at this share of a limit gets a warning event ...
WARN_AT = 0.9
#: ... and another only after it went below this share first.
REARM_BELOW = 0.8

Limit = Literal["memory", "open_files"]
LIMITS: tuple[Limit, ...] = ("memory", "open_files")


@dataclass(frozen=True)
class Usage:
    """A bot's process as last sampled (what the API and /metrics show)."""

    pid: int
    sampled_at: float  # wall time
    cpu_percent: float | None  # over the last interval; None on a process's first sample
    cpu_seconds: float
    rss_bytes: int
    pss_bytes: int | None
    data_bytes: int
    data_limit_bytes: int | None
    open_files: int | None
    open_files_limit: int | None
    threads: int

    def used(self, limit: Limit) -> tuple[int, int] | None:
        """(used, cap) of a limit, when both are known."""
        if limit == "memory":
            if self.data_limit_bytes is None:
                return None
            return self.data_bytes, self.data_limit_bytes
        if self.open_files is None or self.open_files_limit is None:
            return None
        return self.open_files, self.open_files_limit

    def to_json(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "cpu_percent": self.cpu_percent,
            "cpu_seconds": round(self.cpu_seconds, 2),
            "rss_bytes": self.rss_bytes,
            "pss_bytes": self.pss_bytes,
            "data_bytes": self.data_bytes,
            "data_limit_bytes": self.data_limit_bytes,
            "open_files": self.open_files,
            "open_files_limit": self.open_files_limit,
            "threads": self.threads,
        }


def same_process(a: ProcSample, b: ProcSample) -> bool:
    """One process, not a pid reused by another (the kernel's start time tells)."""
    return a.pid == b.pid and a.start_ticks == b.start_ticks


def usage_of(
    current: ProcSample,
    at_mono: float,
    at_wall: float,
    previous: tuple[ProcSample, float, Usage] | None,
) -> Usage:
    """What a sample shows, given the one before it (sample, its monotonic time, its usage):
    CPU % over the interval between them (100 = one core), and PSS carried over from the
    last sample that read it."""
    cpu_percent = None
    pss = current.pss_bytes
    if previous is not None and same_process(previous[0], current):
        before, before_mono, before_usage = previous
        elapsed = at_mono - before_mono
        if elapsed > 0:
            spent = max(0.0, current.cpu_seconds - before.cpu_seconds)
            cpu_percent = round(100.0 * spent / elapsed, 1)
        if pss is None:
            pss = before_usage.pss_bytes
    return Usage(
        pid=current.pid,
        sampled_at=at_wall,
        cpu_percent=cpu_percent,
        cpu_seconds=current.cpu_seconds,
        rss_bytes=current.rss_bytes,
        pss_bytes=pss,
        data_bytes=current.data_bytes,
        data_limit_bytes=current.data_limit_bytes,
        open_files=current.open_files,
        open_files_limit=current.open_files_limit,
        threads=current.threads,
    )


@dataclass(frozen=True)
class NearLimit:
    """A bot's process came near one of its limits."""

    limit: Limit
    used: int
    cap: int

    @property
    def share(self) -> float:
        return self.used / self.cap

    def reason(self) -> str:
        what = (
            f"open files {self.used} of {self.cap}"
            if self.limit == "open_files"
            else f"private memory {self.used / 2**20:.0f} MB of {self.cap / 2**20:.0f} MB"
        )
        return f"{what} ({self.share:.0%}): near its limit"

    def to_json(self) -> dict[str, Any]:
        return {
            "limit": self.limit,
            "used": self.used,
            "cap": self.cap,
            "share": round(self.share, 3),
        }


def crossings(
    warned: frozenset[Limit],
    usage: Usage,
    warn_at: float = WARN_AT,
    rearm_below: float = REARM_BELOW,
) -> tuple[frozenset[Limit], list[NearLimit]]:
    """The limits warned about after this sample, and those just crossed (to warn of now).

    A limit is warned about once when its share reaches ``warn_at``; it is armed again
    only when the share falls below ``rearm_below``, so a bot hovering at the line does
    not warn at every sample."""
    still = set(warned)
    crossed: list[NearLimit] = []
    for limit in LIMITS:
        pair = usage.used(limit)
        if pair is None or pair[1] <= 0:
            continue
        used, cap = pair
        share = used / cap
        if limit in still:
            if share < rearm_below:
                still.discard(limit)
        elif share >= warn_at:
            still.add(limit)
            crossed.append(NearLimit(limit, used, cap))
    return frozenset(still), crossed


Reader = Callable[..., ProcSample | None]


def read_all(
    pids: Mapping[str, int],
    known_limits: Mapping[int, tuple[int | None, int | None]],
    with_pss: bool,
    read: Reader = procinfo.sample,
) -> dict[str, ProcSample | None]:
    """Sample every bot's process (blocking /proc reads: run it off the event loop).

    A process seen for the first time (its limits not known yet) gets its PSS read too;
    a pass that reads PSS reads the limits again (``prlimit`` may have changed them)."""
    return {
        name: read(
            pid,
            pss=with_pss or pid not in known_limits,
            limits=None if with_pss else known_limits.get(pid),
        )
        for name, pid in pids.items()
    }


class ResourceMonitor:
    """Each bot's last sample and usage, and the limits it was warned about.

    ``warn(bot, near)`` is called once per crossing (the fleet writes it as an event).
    """

    def __init__(self, warn: Callable[[str, NearLimit], None]) -> None:
        self._warn = warn
        self.usage: dict[str, Usage] = {}
        self._last: dict[str, tuple[ProcSample, float, Usage]] = {}
        self._warned: dict[str, frozenset[Limit]] = {}
        self._passes = 0
        self.last_pass_s: float | None = None  # how long the last read_all took

    def plan(self) -> tuple[dict[int, tuple[int | None, int | None]], bool]:
        """What the next read needs: the limits already known per pid, whether to read PSS."""
        self._passes += 1
        known = {
            sample.pid: (sample.open_files_limit, sample.data_limit_bytes)
            for sample, _, _ in self._last.values()
        }
        return known, self._passes % PSS_EVERY == 1

    def apply(
        self, samples: Mapping[str, ProcSample | None], at_mono: float, at_wall: float
    ) -> None:
        """Take a pass's samples: a bot whose process is gone has no usage."""
        for name, current in samples.items():
            if current is None:
                self.forget(name)
                continue
            previous = self._last.get(name)
            if previous is not None and not same_process(previous[0], current):
                previous = None
                self._warned.pop(name, None)  # a new process: its own crossings
            usage = usage_of(current, at_mono, at_wall, previous)
            self._last[name] = (current, at_mono, usage)
            self.usage[name] = usage
            warned, crossed = crossings(self._warned.get(name, frozenset()), usage)
            self._warned[name] = warned
            for near in crossed:
                self._warn(name, near)

    def keep_only(self, names: set[str]) -> None:
        """Bots not sampled this pass (stopped, destroyed) have no usage."""
        for name in [n for n in self.usage if n not in names]:
            self.forget(name)

    def forget(self, name: str) -> None:
        self.usage.pop(name, None)
        self._last.pop(name, None)
        self._warned.pop(name, None)

    def per_bot(self) -> list[dict[str, Any]]:
        return [self.usage, self._last, self._warned]


def timed_read(
    pids: Mapping[str, int],
    known_limits: Mapping[int, tuple[int | None, int | None]],
    with_pss: bool,
    read: Reader = procinfo.sample,
) -> tuple[dict[str, ProcSample | None], float]:
    """``read_all`` and the CPU time it took this thread, seconds."""
    started = time.thread_time()
    samples = read_all(pids, known_limits, with_pss, read)
    return samples, time.thread_time() - started
