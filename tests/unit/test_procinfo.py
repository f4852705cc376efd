"""/proc readings, checked against this very process and one that is gone."""

from __future__ import annotations

import os
import subprocess
import sys

from botspec import procinfo


def test_readings_of_a_living_process() -> None:
    pid = os.getpid()
    rss = procinfo.rss_bytes(pid)
    assert rss is not None and rss > 5 * 2**20  # a Python with pytest loaded
    before = procinfo.cpu_seconds(pid)
    sum(i * i for i in range(2_000_000))  # burn some CPU
    after = procinfo.cpu_seconds(pid)
    assert before is not None and after is not None and after > before
    age = procinfo.age_s(pid)
    assert age is not None and age > 0


def test_a_gone_process_reads_as_none() -> None:
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    gone = int(child.stdout)
    assert procinfo.rss_bytes(gone) is None
    assert procinfo.cpu_seconds(gone) is None
    assert not procinfo.pid_exists(gone)
