"""Resource tracking: /proc parsing, CPU % between samples, warnings once per crossing.

Pure decisions by table; the reads checked against this very process."""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any

import pytest

from botspec import procinfo
from botspec.procinfo import ProcSample
from controller.resources import (
    PSS_EVERY,
    NearLimit,
    ResourceMonitor,
    Usage,
    crossings,
    read_all,
    usage_of,
)

LIMITS_TEXT = """\
Limit                     Soft Limit           Hard Limit           Units
Max cpu time              unlimited            unlimited            seconds
Max data size             536870912            536870912            bytes
Max open files            1024                 4096                 files
Max core file size        0                    0                    bytes
"""


def test_limits_are_read_as_soft_values_unlimited_as_none() -> None:
    soft = procinfo.parse_limits(LIMITS_TEXT)
    assert soft["Max open files"] == 1024
    assert soft["Max data size"] == 512 * 2**20
    assert soft["Max cpu time"] is None
    assert soft["Max core file size"] == 0


@pytest.mark.parametrize(
    ("text", "key", "expected"),
    [
        ("Name:\tpython\nVmRSS:\t   12 kB\nVmData:\t  300 kB\n", "VmRSS", 12 * 1024),
        ("VmRSS:\t12 kB", "VmRSS", 12 * 1024),  # the first line, no newline after it
        ("Rss: 5 kB\nPss:    7 kB\n", "Pss", 7 * 1024),
        ("Pss_Anon: 3 kB\n", "Pss", None),  # a longer key is another key
        ("Name:\tx\n", "VmRSS", None),  # a zombie has no memory lines
        ("VmRSS:\t12 MB\n", "VmRSS", None),  # not the unit we know
    ],
)
def test_kb_fields(text: str, key: str, expected: int | None) -> None:
    assert procinfo.kb_field(text, key) == expected


def test_a_sample_of_this_process_sees_a_file_it_opens() -> None:
    pid = os.getpid()
    before = procinfo.sample(pid)
    assert before is not None
    fd = os.open("/dev/null", os.O_RDONLY)
    try:
        after = procinfo.sample(pid)
    finally:
        os.close(fd)
    assert after is not None
    assert before.open_files is not None and after.open_files == before.open_files + 1
    assert after.open_files_limit == os.sysconf("SC_OPEN_MAX")
    assert after.rss_bytes > 5 * 2**20 and after.data_bytes > 0
    assert after.pss_bytes is not None and 0 < after.pss_bytes <= after.rss_bytes
    assert after.threads >= 1
    assert after.start_ticks == before.start_ticks
    # What a later sample may skip: PSS, and limits already known.
    light = procinfo.sample(pid, pss=False, limits=(7, None))
    assert light is not None and light.pss_bytes is None and light.open_files_limit == 7


def test_a_gone_process_samples_as_none() -> None:
    assert procinfo.sample(2**22 + 7) is None  # above pid_max: never a process


def _sample(**changes: Any) -> ProcSample:
    base = ProcSample(
        pid=100,
        start_ticks=5000,
        cpu_seconds=10.0,
        threads=3,
        rss_bytes=60 * 2**20,
        data_bytes=100 * 2**20,
        pss_bytes=30 * 2**20,
        open_files=20,
        open_files_limit=64,
        data_limit_bytes=128 * 2**20,
    )
    return replace(base, **changes)


@pytest.mark.parametrize(
    ("previous", "current", "elapsed", "cpu_percent", "pss"),
    [
        # name: no sample before → no CPU % yet
        (None, _sample(), 2.0, None, 30 * 2**20),
        # half a core over 2 s
        (_sample(), _sample(cpu_seconds=11.0), 2.0, 50.0, 30 * 2**20),
        # two cores busy over 1 s
        (_sample(), _sample(cpu_seconds=12.0), 1.0, 200.0, 30 * 2**20),
        # a reused pid (another start time) is another process: no CPU %, no PSS carried
        (_sample(), _sample(start_ticks=9, cpu_seconds=0.5, pss_bytes=None), 2.0, None, None),
        # PSS not read this time: the last one read stands
        (_sample(), _sample(cpu_seconds=10.0, pss_bytes=None), 2.0, 0.0, 30 * 2**20),
        # no time passed (a second look at once): no CPU % rather than a division by zero
        (_sample(), _sample(), 0.0, None, 30 * 2**20),
    ],
)
def test_usage_between_two_samples(
    previous: ProcSample | None,
    current: ProcSample,
    elapsed: float,
    cpu_percent: float | None,
    pss: int | None,
) -> None:
    before = None
    if previous is not None:
        before = (previous, 100.0, usage_of(previous, 100.0, 1.0, None))
    usage = usage_of(current, 100.0 + elapsed, 2.0, before)
    assert usage.cpu_percent == cpu_percent
    assert usage.pss_bytes == pss
    assert usage.cpu_seconds == current.cpu_seconds


def _usage(open_files: int | None = 20, data_mb: int = 50, **changes: Any) -> Usage:
    sample = _sample(open_files=open_files, data_bytes=data_mb * 2**20, **changes)
    return usage_of(sample, 0.0, 0.0, None)


CROSSINGS: list[tuple[str, frozenset[str], Usage, frozenset[str], list[str]]] = [
    ("far from both", frozenset(), _usage(20, 50), frozenset(), []),
    ("fds at 90 %: warned", frozenset(), _usage(58, 50), frozenset({"open_files"}), ["open_files"]),
    ("fds at 89 %: not yet", frozenset(), _usage(57, 50), frozenset(), []),
    ("still near: no second warning", frozenset({"open_files"}), _usage(60, 50), frozenset({"open_files"}), []),
    ("just below the line: still armed off", frozenset({"open_files"}), _usage(56, 50), frozenset({"open_files"}), []),
    ("well below: armed again", frozenset({"open_files"}), _usage(50, 50), frozenset(), []),
    ("memory at 90 % of RLIMIT_DATA", frozenset(), _usage(20, 116), frozenset({"memory"}), ["memory"]),
    ("both at once", frozenset(), _usage(64, 128), frozenset({"memory", "open_files"}), ["memory", "open_files"]),
    ("no data limit: no memory warning", frozenset(), _usage(20, 500, data_limit_bytes=None), frozenset(), []),
    ("fds unreadable: no fd warning", frozenset(), _usage(None, 50), frozenset(), []),
]  # fmt: skip


@pytest.mark.parametrize(
    ("warned", "usage", "after", "crossed"),
    [c[1:] for c in CROSSINGS],
    ids=[c[0] for c in CROSSINGS],
)
def test_crossings(
    warned: frozenset[str], usage: Usage, after: frozenset[str], crossed: list[str]
) -> None:
    still, new = crossings(warned, usage)  # type: ignore[arg-type]
    assert still == after
    assert [n.limit for n in new] == crossed


def test_the_monitor_warns_once_per_crossing_and_again_for_a_new_process() -> None:
    warnings: list[tuple[str, NearLimit]] = []
    monitor = ResourceMonitor(lambda bot, near: warnings.append((bot, near)))
    history = [
        _sample(open_files=58),  # crosses
        _sample(open_files=60, cpu_seconds=11.0),  # stays near
        _sample(open_files=61, cpu_seconds=12.0),  # stays near
        _sample(pid=200, start_ticks=6000, open_files=59),  # a new process, near at once
    ]
    for at, sample in enumerate(history):
        monitor.apply({"shop": sample}, float(at), float(at))
    assert [(bot, near.limit, near.used) for bot, near in warnings] == [
        ("shop", "open_files", 58),
        ("shop", "open_files", 59),
    ]
    assert warnings[0][1].reason() == "open files 58 of 64 (91%): near its limit"
    assert monitor.usage["shop"].pid == 200
    monitor.apply({"shop": None}, 9.0, 9.0)  # gone
    assert "shop" not in monitor.usage


def test_the_monitor_reads_pss_every_few_passes_and_limits_once() -> None:
    calls: list[dict[str, Any]] = []

    def read(pid: int, *, pss: bool, limits: tuple[int | None, int | None] | None) -> ProcSample:
        calls.append({"pss": pss, "limits": limits})
        return _sample(pid=pid)

    monitor = ResourceMonitor(lambda bot, near: None)
    for at in range(PSS_EVERY + 1):
        known, with_pss = monitor.plan()
        monitor.apply(read_all({"shop": 100}, known, with_pss, read), float(at), float(at))
    assert [c["pss"] for c in calls] == [True, *[False] * (PSS_EVERY - 1), True]
    # Limits are read with PSS (the first pass, every PSS_EVERY-th), else taken as known.
    assert [c["limits"] is None for c in calls] == [True, *[False] * (PSS_EVERY - 1), True]
    assert all(c["limits"] == (64, 128 * 2**20) for c in calls[1:-1])
