"""Where a fleet's fork server listens, and its record of the bots it forked.

Shared by ``botrunner.forkserver`` (writes) and the controller (reads, to learn a
fork-mode bot's own pid from its watcher's pid, the launcher's). Standard library only.

``<home>/run/fork.sock`` is the fork server's socket; ``<home>/run/forked/<name>``
holds one line ``<launcher pid> <bot pid> <bot start time>`` (the start time in
clock ticks since boot, as /proc/PID/stat has it: a recycled pid does not match).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

SOCKET_NAME = "fork.sock"
REGISTRY_NAME = "forked"


def socket_path(run_dir: Path) -> Path:
    return run_dir / SOCKET_NAME


def registry_dir(run_dir: Path) -> Path:
    return run_dir / REGISTRY_NAME


def start_time(pid: int) -> int | None:
    """The process's start time (clock ticks after boot); None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            data = stat.read()
    except OSError:
        return None
    # comm (field 2) may hold spaces and parentheses: count from the last ')'.
    fields = data[data.rindex(b")") + 2 :].split()
    return int(fields[19])  # field 22 of the whole line


@dataclass(frozen=True)
class Forked:
    """One bot the fork server forked, and the launcher it belongs to."""

    launcher_pid: int
    bot_pid: int
    bot_started: int

    def bot_alive(self) -> bool:
        return start_time(self.bot_pid) == self.bot_started

    def line(self) -> str:
        return f"{self.launcher_pid} {self.bot_pid} {self.bot_started}\n"


def read(run_dir: Path, name: str) -> Forked | None:
    try:
        fields = (registry_dir(run_dir) / name).read_text().split()
        launcher, bot, started = (int(f) for f in fields)
    except (OSError, ValueError):
        return None
    return Forked(launcher, bot, started)


def bot_pid(run_dir: Path, name: str, watcher_pid: int) -> int:
    """The pid of bot ``name`` whose watcher process is ``watcher_pid``: the forked bot's
    when that process is its launcher and the bot lives, else ``watcher_pid`` itself
    (an exec-mode bot, or a launcher that exec'd the bot)."""
    found = read(run_dir, name)
    if found is not None and found.launcher_pid == watcher_pid and found.bot_alive():
        return found.bot_pid
    return watcher_pid


def write(run_dir: Path, name: str, forked: Forked) -> None:
    path = registry_dir(run_dir) / name
    temp = path.with_name(f".{name}.tmp")
    temp.write_text(forked.line())
    temp.chmod(0o644)  # read by the controller, another user as root: pids are no secret
    os.replace(temp, path)


def remove(run_dir: Path, name: str, bot_pid: int) -> None:
    """Forget ``name``'s record if it is still the one of ``bot_pid``."""
    found = read(run_dir, name)
    if found is not None and found.bot_pid == bot_pid:
        (registry_dir(run_dir) / name).unlink(missing_ok=True)
