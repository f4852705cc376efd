"""Speaks to circusd: an asyncio client for its JSON-over-ZeroMQ control channel.

The ``Supervisor`` protocol is what the rest of tgfleet needs from circusd;
``CircusClient`` is the real one and ``FakeSupervisor`` an in-memory one for
unit tests of the reconciler.
"""

from __future__ import annotations

import asyncio
import configparser
import itertools
import json
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import zmq
import zmq.asyncio

from botspec import procinfo

# circus/commands/errors.py
ERRNO_MESSAGE_ERROR = 3
ERRNO_COMMAND_ERROR = 5

# Circus runs one "exclusive" command at a time (util.synchronized); another
# command arriving meanwhile is refused with errno 5 and one of these reasons.
_BUSY_REASONS = ("arbiter is already running", "arbiter is restarting")


class SupervisorError(Exception):
    """Base of every error talking to the process supervisor."""


class CircusUnavailable(SupervisorError):
    """circusd did not answer in time (not running, wedged, or wrong endpoint)."""

    def __init__(self, command: str, endpoint: str, timeout_s: float) -> None:
        super().__init__(f"circusd at {endpoint} did not answer {command!r} within {timeout_s}s")
        self.command = command
        self.endpoint = endpoint
        self.timeout_s = timeout_s


class CircusError(SupervisorError):
    """circusd answered a command with ``status: error``."""

    def __init__(self, command: str, reason: str, errno: int) -> None:
        super().__init__(f"circusd refused {command!r}: {reason} (errno {errno})")
        self.command = command
        self.reason = reason
        self.errno = errno

    @property
    def busy(self) -> bool:
        """True when circusd was running another exclusive command (worth a retry)."""
        return self.errno == ERRNO_COMMAND_ERROR and any(
            busy in self.reason for busy in _BUSY_REASONS
        )


class WatcherNotFound(CircusError):
    """The named watcher does not exist in circusd."""

    def __init__(self, command: str, reason: str, errno: int, name: str) -> None:
        super().__init__(command, reason, errno)
        self.name = name


@dataclass(frozen=True)
class ProcessStats:
    """Resource use of one supervised process, read from /proc."""

    pid: int
    rss_bytes: int
    cpu_percent: float  # average over the process's life (user + system)
    started_at: float  # unix seconds


class Supervisor(Protocol):
    """What the controller needs from the process supervisor."""

    async def reloadconfig(self) -> None:
        """Re-read the watcher files; add, change and remove watchers to match them."""

    async def start(self, name: str) -> None:
        """Start the watcher ``name``."""

    async def stop(self, name: str) -> None:
        """Stop the watcher ``name`` (its processes get their stop signal)."""

    async def restart(self, name: str) -> None:
        """Stop then start the watcher ``name``."""

    async def kill(self, name: str) -> None:
        """SIGKILL the watcher's processes; Circus respawns them (for hung processes)."""

    async def status(self) -> dict[str, str]:
        """Every watcher's status: ``active``, ``stopped``, ``stopping``, ``starting``."""
        ...

    async def pids(self, name: str) -> list[int]:
        """The pids of the watcher's live processes."""
        ...


class CircusClient:
    """Client of circusd's control endpoint (``ipc://…/circus.sock``).

    Each call uses its own short-lived DEALER socket, so concurrent calls and
    late answers to timed-out calls can never be mixed up.
    """

    def __init__(
        self,
        endpoint: str,
        *,
        timeout_s: float = 5.0,
        busy_retry_s: float = 10.0,
        context: zmq.asyncio.Context | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.busy_retry_s = busy_retry_s
        self._context = context if context is not None else zmq.asyncio.Context.instance()

    def close(self) -> None:
        """Nothing to release: no socket outlives a call. Here so callers may always close."""

    async def call(
        self, command: str, timeout_s: float | None = None, **properties: Any
    ) -> dict[str, Any]:
        """Send one command; return circusd's answer when its status is ok.

        Retries errno 5 ("arbiter is already running …") with a bounded
        backoff for up to ``busy_retry_s``; raises ``CircusError`` for any
        other refusal and ``CircusUnavailable`` when an answer takes longer
        than ``timeout_s``.
        """
        deadline = time.monotonic() + self.busy_retry_s
        for attempt in itertools.count():
            answer = await self._call_once(command, timeout_s or self.timeout_s, properties)
            if answer.get("status") == "ok":
                return answer
            error = self._error(command, answer, properties)
            delay = min(0.05 * 2**attempt, 1.0)
            if not error.busy or time.monotonic() + delay > deadline:
                raise error
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _call_once(
        self, command: str, timeout_s: float, properties: Mapping[str, Any]
    ) -> dict[str, Any]:
        call_id = uuid.uuid4().hex
        message = json.dumps({"id": call_id, "command": command, "properties": dict(properties)})
        socket = self._context.socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        try:
            socket.connect(self.endpoint)
            async with asyncio.timeout(timeout_s):
                await socket.send(message.encode())
                while True:
                    raw = await socket.recv()
                    answer = json.loads(raw)
                    # circusd answers on the socket that asked; an id mismatch
                    # cannot happen with one call per socket, but be strict.
                    if isinstance(answer, dict) and answer.get("id") == call_id:
                        return answer
        except TimeoutError:
            raise CircusUnavailable(command, self.endpoint, timeout_s) from None
        finally:
            socket.close(linger=0)

    @staticmethod
    def _error(command: str, answer: Mapping[str, Any], props: Mapping[str, Any]) -> CircusError:
        reason = str(answer.get("reason", "unknown"))
        errno = int(answer.get("errno", 0))
        name = props.get("name")
        if errno == ERRNO_MESSAGE_ERROR and isinstance(name, str) and "not found" in reason:
            return WatcherNotFound(command, reason, errno, name)
        return CircusError(command, reason, errno)

    # -- the Supervisor protocol ---------------------------------------------

    async def reloadconfig(self, *, timeout_s: float = 60.0) -> None:
        """Reload circus.ini and bots.d/*.ini, returning once circusd has applied them.

        Changed watchers are stopped gracefully inside this call, hence the
        longer default timeout.
        """
        await self.call("reloadconfig", timeout_s=timeout_s, waiting=True)

    async def start(self, name: str) -> None:
        await self.call("start", name=name, match="simple")

    async def stop(self, name: str) -> None:
        await self.call("stop", name=name, match="simple")

    async def restart(self, name: str) -> None:
        await self.call("restart", name=name, match="simple")

    async def kill(self, name: str) -> None:
        await self.call("signal", name=name, signum=9)

    async def status(self) -> dict[str, str]:
        answer = await self.call("status")
        statuses = answer.get("statuses", {})
        return {str(name): str(state) for name, state in statuses.items()}

    async def pids(self, name: str) -> list[int]:
        answer = await self.call("list", name=name)
        return sorted(int(pid) for pid in answer.get("pids", []))

    # -- more of circusd -------------------------------------------------------

    async def watcher_status(self, name: str) -> str:
        """One watcher's status (raises ``WatcherNotFound`` when absent)."""
        answer = await self.call("status", name=name)
        return str(answer["status"])

    async def list_watchers(self) -> list[str]:
        answer = await self.call("list")
        return [str(name) for name in answer.get("watchers", [])]

    async def stats(self, name: str) -> dict[int, ProcessStats]:
        """RSS and CPU of the watcher's processes.

        circusd's own ``stats`` answer formats memory as text ("63M"); /proc gives
        exact numbers. A process that exits meanwhile is left out.
        """
        result: dict[int, ProcessStats] = {}
        now = time.time()
        for pid in await self.pids(name):
            rss, cpu, age = procinfo.rss_bytes(pid), procinfo.cpu_seconds(pid), procinfo.age_s(pid)
            if rss is None or cpu is None or age is None:
                continue  # exited between list and read: not ours to report
            result[pid] = ProcessStats(
                pid=pid,
                rss_bytes=rss,
                cpu_percent=100.0 * cpu / max(age, 1e-3),
                started_at=now - age,
            )
        return result

    async def quit(self) -> None:
        """Stop every watcher and circusd itself (answers before it is done)."""
        await self.call("quit")


@dataclass(frozen=True)
class WatcherEvent:
    """One event circusd publishes: ``watcher.<name>.<event>`` and its JSON body."""

    watcher: str
    event: str  # spawn, reap, kill, start, stop, …
    body: Mapping[str, Any]


async def watch_events(
    endpoint: str, prefix: str = "watcher.", context: zmq.asyncio.Context | None = None
) -> AsyncIterator[WatcherEvent]:
    """circusd's pub/sub events whose topic starts with ``prefix``, forever.

    ZeroMQ reconnects by itself when circusd comes back; frames that are not
    circus events are skipped.
    """
    ctx = context if context is not None else zmq.asyncio.Context.instance()
    socket = ctx.socket(zmq.SUB)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.SUBSCRIBE, prefix.encode())
    socket.connect(endpoint)
    try:
        while True:
            frames = await socket.recv_multipart()
            if len(frames) != 2:
                continue
            parts = frames[0].decode("utf-8", "replace").split(".")
            if len(parts) < 3 or parts[0] != "watcher":
                continue
            try:
                body = json.loads(frames[1])
            except (UnicodeDecodeError, json.JSONDecodeError):
                continue
            if isinstance(body, dict):
                yield WatcherEvent(".".join(parts[1:-1]), parts[-1], body)
    finally:
        socket.close()


# -- the fake -------------------------------------------------------------------


@dataclass
class FakeWatcher:
    name: str
    config: str  # the text of its section, to notice changes on reload
    state: str
    pids: list[int]


class FakeSupervisor:
    """An in-memory circusd for unit tests.

    Watchers come from rendered watcher files: ``files`` maps a file name to
    its ini text (or, with ``bots_d``, the ``*.ini`` files of that dir are
    read on each ``reloadconfig``). Like circusd, a reload adds new watchers
    (started when ``autostart``), replaces changed ones (new pids) and leaves
    unchanged ones alone. Every call is appended to ``calls``; ``fail_next``
    makes the next call of a command raise.
    """

    def __init__(
        self,
        files: Mapping[str, str] | None = None,
        *,
        bots_d: Path | None = None,
        fixed: Mapping[str, str] | None = None,
    ) -> None:
        self.files: dict[str, str] = dict(files or {})
        self.bots_d = bots_d
        self.calls: list[tuple[str, ...]] = []
        self.watchers: dict[str, FakeWatcher] = {}
        self._next_pid = itertools.count(10_000)
        self._failures: dict[str, list[SupervisorError]] = {}
        # watchers from circus.ini itself (controller, postgres): name -> state
        for name, state in (fixed or {}).items():
            self.watchers[name] = FakeWatcher(name, "", state, self._spawn(state))

    def _spawn(self, state: str) -> list[int]:
        return [next(self._next_pid)] if state == "active" else []

    def fail_next(self, command: str, error: SupervisorError) -> None:
        """Make the next ``command`` call raise ``error``."""
        self._failures.setdefault(command, []).append(error)

    def _record(self, command: str, *args: str) -> None:
        self.calls.append((command, *args))
        pending = self._failures.get(command)
        if pending:
            raise pending.pop(0)

    def _get(self, command: str, name: str) -> FakeWatcher:
        try:
            return self.watchers[name]
        except KeyError:
            reason = f"program {name} not found"
            raise WatcherNotFound(command, reason, ERRNO_MESSAGE_ERROR, name) from None

    def _read_files(self) -> dict[str, str]:
        if self.bots_d is None:
            return self.files
        return {path.name: path.read_text() for path in sorted(self.bots_d.glob("*.ini"))}

    def _parse(self) -> dict[str, tuple[str, bool]]:
        """watcher name -> (its section text, autostart) from the watcher files."""
        found: dict[str, tuple[str, bool]] = {}
        for text in self._read_files().values():
            parser = configparser.RawConfigParser(interpolation=None)
            parser.read_string(text)
            for section in parser.sections():
                if not section.startswith("watcher:"):
                    continue
                items = parser.items(section)
                autostart = parser.getboolean(section, "autostart", fallback=True)
                found[section.removeprefix("watcher:")] = (repr(sorted(items)), autostart)
        return found

    async def reloadconfig(self) -> None:
        self._record("reloadconfig")
        wanted = self._parse()
        file_watchers = {name for name, w in self.watchers.items() if w.config}
        for name in file_watchers - wanted.keys():
            del self.watchers[name]
        for name, (config, autostart) in wanted.items():
            current = self.watchers.get(name)
            if current is not None and current.config == config:
                continue
            state = "active" if autostart else "stopped"
            self.watchers[name] = FakeWatcher(name, config, state, self._spawn(state))

    async def start(self, name: str) -> None:
        self._record("start", name)
        watcher = self._get("start", name)
        if watcher.state != "active":
            watcher.state = "active"
            watcher.pids = self._spawn("active")

    async def stop(self, name: str) -> None:
        self._record("stop", name)
        watcher = self._get("stop", name)
        watcher.state = "stopped"
        watcher.pids = []

    async def restart(self, name: str) -> None:
        self._record("restart", name)
        watcher = self._get("restart", name)
        watcher.state = "active"
        watcher.pids = self._spawn("active")

    async def kill(self, name: str) -> None:
        self._record("kill", name)
        watcher = self._get("kill", name)
        if watcher.state == "active":  # circusd respawns what it killed
            watcher.pids = self._spawn("active")

    async def status(self) -> dict[str, str]:
        self._record("status")
        return {name: w.state for name, w in sorted(self.watchers.items())}

    async def pids(self, name: str) -> list[int]:
        self._record("pids", name)
        return list(self._get("pids", name).pids)

    def crash(self, name: str) -> int:
        """Simulate circusd respawning a dead process; returns the new pid."""
        watcher = self.watchers[name]
        watcher.pids = self._spawn("active")
        return watcher.pids[0]
