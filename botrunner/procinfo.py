"""This process's resident memory and age, read from /proc (psutil costs memory per bot)."""

from __future__ import annotations

import os
import resource
import time

_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def rss_mb() -> float:
    """Resident set size in MB (from /proc/self/statm; ru_maxrss where there is no /proc)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            resident_pages = int(statm.read().split()[1])
    except (OSError, IndexError, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux
    return round(resident_pages * _PAGE_SIZE / (1024 * 1024), 1)


def process_age_s(fallback_started_monotonic: float) -> float:
    """Seconds since the kernel started this process, interpreter start-up included.

    Falls back to time since ``fallback_started_monotonic`` without /proc.
    """
    try:
        with open("/proc/self/stat", "rb") as stat_file:
            # the command name may hold spaces and parens: fields start after the last ')'
            fields = stat_file.read().rsplit(b")", 1)[1].split()
        with open("/proc/uptime", "rb") as uptime_file:
            uptime_s = float(uptime_file.read().split()[0])
        started_after_boot_s = int(fields[19]) / _CLOCK_TICKS  # field 22: starttime
    except (OSError, IndexError, ValueError):
        return time.monotonic() - fallback_started_monotonic
    return max(0.0, uptime_s - started_after_boot_s)
