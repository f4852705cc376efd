"""/proc readings, checked against this very process and one that is gone."""

from __future__ import annotations

import os
import subprocess
import sys
import time

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


def test_the_owner_of_a_process_is_read_from_its_status() -> None:
    status = "Name:\tpython\nState:\tS (sleeping)\nUid:\t1001\t1002\t1002\t1002\nGid:\t5\n"
    assert procinfo.parse_owner(status) == (1001, 1002, False)
    assert procinfo.parse_owner(status.replace("S (sleeping)", "Z (zombie)"))[2]  # type: ignore[index]
    # A zombie main thread with another thread running: the process lives on.
    leader_gone = status.replace("S (sleeping)", "Z (zombie)") + "Threads:\t2\n"
    assert procinfo.parse_owner(leader_gone) == (1001, 1002, False)
    assert procinfo.parse_owner("Name:\tx\nState:\tR (running)\n") is None
    assert procinfo.parse_owner("Uid:\tgarbled\n") is None


def test_the_processes_of_a_user_are_the_live_ones_run_by_it() -> None:
    me = os.getuid()
    assert os.getpid() in procinfo.processes_of(me)
    assert os.getpid() not in procinfo.processes_of(me + 1)
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        # Not reaped yet: a zombie, dead already, is no process of the user.
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)
        assert procinfo.is_zombie(child.pid)
        assert child.pid not in procinfo.processes_of(me)
        assert not procinfo.runs_as(child.pid, me)
    finally:
        child.wait()
    assert not procinfo.runs_as(child.pid, me)  # gone


def test_a_process_whose_main_thread_ended_still_runs_as_its_user() -> None:
    # The main thread leaves (pthread_exit) while another thread runs: /proc says Z for
    # the process, yet it runs on; a removed bot's user must not leave it behind.
    code = (
        "import ctypes, threading, time\n"
        "threading.Thread(target=time.sleep, args=(60,)).start()\n"
        "print('ready', flush=True)\n"
        "ctypes.CDLL(None).pthread_exit(None)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None and child.stdout.readline() == b"ready\n"
        deadline = time.monotonic() + 10
        while not procinfo.is_zombie(child.pid):
            assert time.monotonic() < deadline, "the main thread did not end"
            time.sleep(0.01)
        assert child.pid in procinfo.processes_of(os.getuid())
    finally:
        child.kill()
        child.communicate()
