"""Resident memory, age and existence of processes, read from /proc.

psutil would cost memory in every bot (and in the controller); these few reads are
all either needs.
"""

from __future__ import annotations

import os
import resource
import time

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


def is_zombie(pid: int) -> bool:
    """True when the process has ended and waits for its parent to reap it."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            data = stat.read()
    except OSError:
        return False
    return data[data.rindex(b")") + 2 :].startswith(b"Z")
