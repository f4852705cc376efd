"""Fork mode and exec mode, side by side; the fork server's own failures.

A fork-mode bot's watcher runs the launcher, the bot itself is a child of the fork
server: each test checks what a user sees (the API's pid is the bot's own process,
its limits, its answers) and what Circus sees (respawn, stop, crash loop).
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import drills
import psutil
import pytest
from harness import Fleet, Sandbox, running_fleet, short_tmpdir, wait_for

from botspec import forked
from controller.botusers import bot_user_name

pytestmark = pytest.mark.integration

MIB = 1024 * 1024
LAUNCHES = ["fork", "exec"]


def circus_pids(fleet: Fleet, watcher: str) -> list[int]:
    listed = fleet.circusctl("list", watcher).replace(",", " ").split()
    return [int(p) for p in listed if p.isdigit()]


def forkserver_pid(fleet: Fleet) -> int:
    pids = wait_for("the fork server", lambda: circus_pids(fleet, "forkserver"))
    return pids[0]


def add(
    fleet: Fleet,
    sandbox: Sandbox,
    prefix: str,
    launch: str,
    *,
    wait: bool = True,
    plugins: list[str] | None = None,
    **fields: Any,
) -> str:
    name = f"{prefix}-{launch}-{next(drills._serial)}"
    token = sandbox.create_bot(drills.sandbox_name(name))
    spec = {
        "name": name,
        "token": token,
        "plugins": plugins or [drills.CHAOS],
        "launch": launch,
        **fields,
    }
    fleet.api("POST", "/api/v1/bots", spec)
    if wait:
        drills.connected(fleet, name)
    return name


def check_process(fleet: Fleet, name: str, launch: str) -> int:
    """The API's pid is the bot's own process, placed as its launch mode says; its pid."""
    pid = int(fleet.bot(name)["pid"])
    [watcher] = circus_pids(fleet, f"bot-{name}")
    bot = psutil.Process(pid)
    if launch == "fork":
        assert pid != watcher, "the API shows the launcher's pid, not the bot's"
        assert bot.ppid() == forkserver_pid(fleet)
        assert psutil.Process(watcher).cmdline()[1:3] == ["-S", "-I"]
        assert forked.bot_pid(fleet.home.run_dir, name, watcher) == pid
    else:
        assert pid == watcher
        assert bot.cmdline()[1:3] == ["-m", "botrunner"]
    if os.geteuid() == 0:
        assert bot.uids().real == pwd.getpwnam(bot_user_name(fleet.home, name)).pw_uid
    return pid


def data_limit(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max data size"):
            return int(line.split()[3])
    raise AssertionError(f"no data limit in /proc/{pid}/limits")


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.parametrize("launch", LAUNCHES)
def test_a_bot_lives_its_life_in_either_launch_mode(
    fleet: Fleet, sandbox: Sandbox, launch: str
) -> None:
    name = add(fleet, sandbox, "life", launch, memory_limit_mb=300)
    pid = check_process(fleet, name, launch)
    assert data_limit(pid) == 300 * MIB
    assert drills.answered_in(sandbox, name, time.monotonic(), "hello") < 30

    # kill -9: Circus respawns it (through a new launcher in fork mode)
    drills.kill_9(fleet, sandbox, name)
    crashes = drills.health_events(fleet, name, "crash")
    assert crashes and crashes[0]["data"]["exit_code"] == -9
    assert crashes[0]["reason"].startswith(f"process {pid} exited with code -9")
    pid = check_process(fleet, name, launch)

    # SIGSTOP: the health checker kills the hung process, a new one answers
    drills.sigstop(fleet, sandbox, name)
    assert gone(pid)
    pid = check_process(fleet, name, launch)

    # stop: SIGTERM reaches the bot, which drains and exits within its graceful timeout
    crashes_before = len(drills.health_events(fleet, name, "crash"))
    started = time.monotonic()
    fleet.api("POST", f"/api/v1/bots/{name}/stop")
    fleet.wait_state(name, "stopped")
    wait_for("the bot's process to end", lambda: gone(pid), timeout=10)
    assert time.monotonic() - started < 5.0 + 3.0  # graceful_timeout_s plus the API's round trips
    assert len(drills.health_events(fleet, name, "crash")) == crashes_before  # it exited with 0

    fleet.api("POST", f"/api/v1/bots/{name}/start")
    drills.connected(fleet, name, not_pid=pid)
    check_process(fleet, name, launch)
    fleet.api("DELETE", f"/api/v1/bots/{name}")


@pytest.mark.parametrize("launch", LAUNCHES)
def test_a_crash_loop_ends_in_failed(fleet: Fleet, sandbox: Sandbox, launch: str) -> None:
    name = add(fleet, sandbox, "loop", launch, settings={"exit_at_start": 3}, wait=False)
    bot = fleet.wait_state(name, "failed", timeout=60)
    assert "exit code 3" in bot["reason"]
    assert bot["health"]["last_failure"]["kind"] == "crash_loop"
    fleet.api("DELETE", f"/api/v1/bots/{name}")
