"""Resident memory, CPU, file descriptors, age, owner and existence of processes, read
from /proc.

psutil would cost memory in every bot (and in the controller); these few reads are
all either needs.
"""

from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass

_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int | str = "self") -> float | None:
    """Resident set size in MB; None when the process is gone.

    For this process without /proc: ru_maxrss (the peak) is the best there is.
    """
    try:
        with open(f"/proc/{pid}/statm", "rb") as statm:
            resident_pages = int(statm.read().split()[1])
    except (OSError, IndexError, ValueError):
        if pid == "self":
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux
        return None
    return round(resident_pages * _PAGE_SIZE / (1024 * 1024), 1)


def rss_bytes(pid: int | str) -> int | None:
    """Resident set size in bytes; None when the process is gone."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as statm:
            return int(statm.read().split()[1]) * _PAGE_SIZE
    except (OSError, IndexError, ValueError):
        return None


def cpu_seconds(pid: int | str) -> float | None:
    """CPU time used so far (user + system), seconds; None when the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat_file:
            fields = stat_file.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS  # utime, stime
    except (OSError, IndexError, ValueError):
        return None


def age_s(pid: int | str = "self") -> float | None:
    """Seconds since the kernel started the process; None when that cannot be read."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat_file:
            # the command name may hold spaces and parens: fields start after the last ')'
            fields = stat_file.read().rsplit(b")", 1)[1].split()
        with open("/proc/uptime", "rb") as uptime_file:
            uptime_s = float(uptime_file.read().split()[0])
        started_after_boot_s = int(fields[19]) / _CLOCK_TICKS  # field 22: starttime
    except (OSError, IndexError, ValueError):
        return None
    return max(0.0, uptime_s - started_after_boot_s)


def process_age_s(fallback_started_monotonic: float) -> float:
    """Seconds since the kernel started this process, interpreter start-up included.

    Falls back to time since ``fallback_started_monotonic`` without /proc.
    """
    age = age_s("self")
    return age if age is not None else time.monotonic() - fallback_started_monotonic


def pid_exists(pid: int) -> bool:
    """True while a process has this pid (a zombie included)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


@dataclass(frozen=True)
class ProcSample:
    """One look at a process in /proc: what the controller shows and warns about.

    ``start_ticks`` (the kernel's start time) tells a reused pid from the process
    sampled before. Values that another user's process hides (``fd/``, ``smaps_rollup``
    need the right to trace it) are None, as are limits that are unlimited.
    """

    pid: int
    start_ticks: int
    cpu_seconds: float
    threads: int
    rss_bytes: int
    data_bytes: int  # VmData: the private writable memory RLIMIT_DATA caps
    pss_bytes: int | None
    open_files: int | None
    open_files_limit: int | None  # soft RLIMIT_NOFILE
    data_limit_bytes: int | None  # soft RLIMIT_DATA


def parse_stat(raw: bytes) -> tuple[int, float, int]:
    """``/proc/PID/stat`` → (start ticks, CPU seconds user + system, threads)."""
    # the command name may hold spaces and parens: fields start after the last ')'
    fields = raw.rsplit(b")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS  # utime, stime
    return int(fields[19]), cpu, int(fields[17])  # starttime, num_threads


def kb_field(text: str, key: str) -> int | None:
    """A ``kB`` line of ``/proc/PID/status`` or ``smaps_rollup`` (``VmRSS``, ``Pss``) in bytes."""
    text = "\n" + text
    at = text.find(f"\n{key}:")
    if at < 0:
        return None
    end = text.find("\n", at + 1)
    value, _, unit = text[at + len(key) + 2 : end if end > 0 else None].strip().partition(" ")
    return int(value) * 1024 if value.isdigit() and unit == "kB" else None


def parse_limits(text: str) -> dict[str, int | None]:
    """``/proc/PID/limits`` → soft limit by name (``Max open files``); None: unlimited."""
    soft: dict[str, int | None] = {}
    for line in text.splitlines()[1:]:
        # "Max open files            1024                 4096                 files"
        name, _, rest = line.partition("  ")
        cells = rest.split()
        if name.startswith("Max ") and cells:
            soft[name] = int(cells[0]) if cells[0].isdigit() else None
    return soft


def read_text(path: str) -> str | None:
    try:
        with open(path, encoding="ascii", errors="replace") as handle:
            return handle.read()
    except OSError:  # gone, or not ours to read
        return None


def count_fds(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def sample(
    pid: int, *, pss: bool = True, limits: tuple[int | None, int | None] | None = None
) -> ProcSample | None:
    """CPU, memory, threads, file descriptors and limits of ``pid``; None when it is gone.

    ``smaps_rollup`` (PSS) costs more than every other read together (the kernel walks
    the page tables): ``pss=False`` skips it (``pss_bytes`` None). ``limits`` (open
    files, data), when known from an earlier sample of the same process, saves reading
    ``limits`` again (rlimits are set when a bot starts).
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat_file:
            start_ticks, cpu, threads = parse_stat(stat_file.read())
    except (OSError, IndexError, ValueError):
        return None
    status = read_text(f"/proc/{pid}/status")
    if status is None:
        return None
    rollup = read_text(f"/proc/{pid}/smaps_rollup") if pss else None
    if limits is None:
        soft = parse_limits(read_text(f"/proc/{pid}/limits") or "")
        limits = (soft.get("Max open files"), soft.get("Max data size"))
    return ProcSample(
        pid=pid,
        start_ticks=start_ticks,
        cpu_seconds=cpu,
        threads=threads,
        rss_bytes=kb_field(status, "VmRSS") or 0,  # a zombie has no VmRSS line
        data_bytes=kb_field(status, "VmData") or 0,
        pss_bytes=None if rollup is None else kb_field(rollup, "Pss"),
        open_files=count_fds(pid),
        open_files_limit=limits[0],
        data_limit_bytes=limits[1],
    )


def is_zombie(pid: int) -> bool:
    """True when the process has ended and waits for its parent to reap it."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            data = stat.read()
    except OSError:
        return False
    return data[data.rindex(b")") + 2 :].startswith(b"Z")


def parse_owner(status: str) -> tuple[int, int, bool] | None:
    """``/proc/PID/status`` → (real uid, effective uid, ended?); None when it says
    neither. Ended: a zombie with no thread left. A process whose main thread has
    exited shows ``Z`` too while its other threads run on: that one still lives."""
    uids: list[str] = []
    zombie = False
    threads = 1
    for line in status.splitlines():
        key, _, value = line.partition(":")
        if key == "Uid":
            uids = value.split()  # real, effective, saved, filesystem
        elif key == "State":
            zombie = value.strip().startswith("Z")
        elif key == "Threads" and value.strip().isdigit():
            threads = int(value)
    if len(uids) < 2 or not (uids[0].isdigit() and uids[1].isdigit()):
        return None
    return int(uids[0]), int(uids[1]), zombie and threads <= 1


def runs_as(pid: int, uid: int) -> bool:
    """True when ``pid`` lives (not ended: see ``parse_owner``) with ``uid`` as its real
    or effective uid."""
    owner = parse_owner(read_text(f"/proc/{pid}/status") or "")
    return owner is not None and uid in owner[:2] and not owner[2]


def processes_of(uid: int) -> list[int]:
    """The pids of the live processes (none ended: see ``parse_owner``) whose real or
    effective uid is ``uid``."""
    return [int(pid) for pid in os.listdir("/proc") if pid.isdigit() and runs_as(int(pid), uid)]
