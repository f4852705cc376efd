"""Shared fixtures for tests that run a real circusd in a throwaway home.

Import the fixtures you need in a test module::

    from circus_fixtures import short_home, circusd_factory  # noqa: F401
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
from harness import wait_for_async

from controller.circus import CircusClient, CircusUnavailable
from controller.home import Home

CIRCUSD = Path(sys.executable).parent / "circusd"
PYTHON = sys.executable


@pytest.fixture
def short_home() -> Iterator[Home]:
    """A fresh home under /tmp with a short path (unix sockets: 107 bytes at most)."""
    root = Path(tempfile.mkdtemp(prefix="tgf", dir="/tmp"))
    home = Home(root)
    home.check_socket_paths()
    home.make_dirs()
    yield home
    shutil.rmtree(root, ignore_errors=True)


def write_sleeper(path: Path, *, ignore_term: bool = False) -> Path:
    """An executable that stands in for python: ignores its args, sleeps until signalled."""
    trap = "trap '' TERM\n" if ignore_term else ""
    path.write_text(f"#!/bin/sh\n{trap}exec sleep 1000000\n")
    path.chmod(0o755)
    return path


@dataclass
class Circusd:
    """One circusd process and a client for it; ``stop`` leaves no process behind."""

    home: Home
    process: subprocess.Popen[bytes]
    client: CircusClient
    seen_pids: set[int] = field(default_factory=set)

    async def remember_pids(self) -> None:
        """Note every watcher pid, so teardown can make sure each one is gone."""
        for name in await self.client.list_watchers():
            self.seen_pids.update(await self.client.pids(name))

    async def wait_for(
        self, what: str, predicate: Callable[[], Awaitable[bool]], timeout_s: float = 10.0
    ) -> float:
        """Poll ``predicate`` until true (harness.wait_for_async); return the seconds it took."""
        started = time.monotonic()
        await wait_for_async(what, predicate, timeout_s, 0.02, ignoring=())
        return time.monotonic() - started

    async def stop(self) -> None:
        if self.process.poll() is None:
            try:
                await self.remember_pids()
                await self.client.quit()
            except CircusUnavailable:
                pass  # wedged: the kill below ends it
            try:
                await asyncio.to_thread(self.process.wait, 15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)
        for pid in self.seen_pids:  # last resort: nothing a test started may survive it
            try:
                proc = psutil.Process(pid)
                if proc.status() != psutil.STATUS_ZOMBIE:
                    proc.kill()
            except psutil.NoSuchProcess:
                continue


#: circusd as tgfleet runs it: circus' main in a process tgfleet prepared (SIGCHLD handled).
TGFLEET_CIRCUSD = [PYTHON, "-m", "controller.circusd"]


def spawn_circusd(home: Home, command: list[str] | None = None) -> subprocess.Popen[bytes]:
    """Fork circusd on ``home.circus_ini`` (returns at once; its log in logs/circusd.log);
    ``command``: how to run it (circus' own ``circusd`` by default)."""
    with (home.logs_dir / "circusd.log").open("ab") as log:
        return subprocess.Popen(
            [*(command or [str(CIRCUSD)]), str(home.circus_ini)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=home.root,
            # as `tgfleet up` must: circusd opens the first watchers' log files
            # before it applies its own `umask = 077`
            umask=0o077,
        )


@pytest.fixture
async def circusd_factory() -> AsyncIterator[Callable[..., Awaitable[Circusd]]]:
    """Start circusd on ``home.circus_ini`` (already written), with ``command`` if given
    (as spawn_circusd); stopped at teardown."""
    started: list[Circusd] = []

    async def start(home: Home, command: list[str] | None = None) -> Circusd:
        process = spawn_circusd(home, command)
        daemon = Circusd(home, process, CircusClient(home.circus_endpoint, timeout_s=5.0))
        started.append(daemon)

        async def answering() -> bool:
            try:
                await CircusClient(home.circus_endpoint, timeout_s=0.5).list_watchers()
            except CircusUnavailable:
                if process.poll() is not None:
                    raise AssertionError(f"circusd exited with {process.returncode}") from None
                return False
            return True

        try:
            await wait_for_async("circusd to answer", answering, 10, 0.02, ignoring=())
        except AssertionError as exc:
            text = (home.logs_dir / "circusd.log").read_text()
            raise AssertionError(f"circusd did not come up ({exc}):\n{text}") from None
        return daemon

    yield start
    for daemon in started:
        await daemon.stop()
