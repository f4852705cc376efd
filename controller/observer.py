"""What the bots' processes show: their bus messages and circusd's spawn/reap events.

The ``Observer`` keeps, in memory only, each bot's live process (pid, readiness,
Telegram view, heartbeats), the unexpected exits circusd reported since the last
health pass, and when the controller itself stopped a bot (so that exit is no
crash). It decides nothing about what to do; the decisions it needs are the pure
functions ``missed_beats`` and ``is_crash``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from botspec import procinfo, protocol
from controller.circus import WatcherEvent
from controller.clock import Clock
from controller.health import Exit
from controller.reconcile import Live

log = logging.getLogger("tgfleet.observer")

#: A heartbeat later than this many intervals counts as missed.
MISSED_HEARTBEAT_FACTOR = 2.0
#: Exits this long after the controller stopped or restarted a bot are its own doing.
EXPECTED_EXIT_MARGIN_S = 5.0
DEFAULT_HEARTBEAT_INTERVAL_S = 2.0


def missed_beats(gap_s: float, interval_s: float) -> int:
    """Heartbeats missed in a ``gap_s`` between two that arrived, ``interval_s`` apart
    when all is well: none until the gap exceeds the tolerance, then at least one."""
    if gap_s <= interval_s * MISSED_HEARTBEAT_FACTOR:
        return 0
    return max(1, int(gap_s / interval_s) - 1)


def is_crash(exit_code: int, expected: bool) -> bool:
    """An exit is a crash unless it was clean (0) or the controller asked for it."""
    return exit_code != 0 and not expected


@dataclass
class LiveProcess:
    """What we know of a bot's current process, from the bus (mutable, in memory only)."""

    pid: int
    generation: int
    ready: bool = False
    fatal: str | None = None
    fatal_kind: str | None = None
    replaced_pid: int | None = None
    # From the latest ready or heartbeat, whichever came last.
    telegram: dict[str, Any] = field(default_factory=lambda: {"connected": False})
    rss_mb: float | None = None
    #: The bot's own counters, from its latest heartbeat (None: not reported yet).
    messages: dict[str, int | None] | None = None
    last_beat_at: float | None = None  # wall time of the last ready/heartbeat
    last_beat_mono: float | None = None
    heartbeats_missed: int = 0
    max_gap_s: float = 0.0

    def beat(self, interval_s: float, clock: Clock) -> None:
        """A ready or heartbeat arrived: count a gap longer than expected as missed beats."""
        now = clock.monotonic()
        if self.last_beat_mono is not None:
            gap = now - self.last_beat_mono
            self.max_gap_s = max(self.max_gap_s, gap)
            self.heartbeats_missed += missed_beats(gap, interval_s)
        self.last_beat_mono = now
        self.last_beat_at = clock.wall()

    def observed(self, alive: bool) -> Live:
        return Live(
            pid=self.pid,
            generation=self.generation,
            ready=self.ready,
            alive=alive,
            replaced_pid=self.replaced_pid,
            fatal=self.fatal,
        )


class Observer:
    """Turns bus messages and circusd events into what each bot's process shows now.

    ``nudge`` asks for a reconcile pass soon (something changed that matters);
    ``bus_event`` receives the bots' published events (to persist and deliver).
    """

    def __init__(
        self,
        clock: Clock,
        nudge: Callable[[], None],
        bus_event: Callable[[protocol.Event], None],
        pid_exists: Callable[[int], bool] = procinfo.pid_exists,
    ) -> None:
        self._clock = clock
        self._pid_exists = pid_exists
        self._nudge = nudge
        self._bus_event = bus_event
        self.live: dict[str, LiveProcess] = {}
        self.intervals: dict[str, float] = {}  # heartbeat interval per bot, from its spec
        self.known: set[str] | None = None  # the fleet's bots, once read
        self._exits: dict[str, list[Exit]] = {}
        self._expect_exit_until: dict[str, float] = {}
        self.spawned_at: dict[str, float] = {}
        # The last process each bot spoke from: a fork-mode bot's exit is reported by
        # circusd under its launcher's pid, possibly after a pass forgot the bot's process.
        self.last_pid: dict[str, int] = {}

    # ---------------------------------------------------------------- the bus

    def on_message(self, message: protocol.Message) -> None:
        """A decoded bus message from a bot (the bus already checked its sender)."""
        if self.known is not None and message.bot not in self.known:
            log.warning(
                "bus: dropped a %s from %r, which is no bot of this fleet",
                message.TYPE,
                message.bot,
            )
            return
        current = self.live.get(message.bot)
        if isinstance(message, protocol.Ready | protocol.Heartbeat):
            if current is None or current.pid != message.pid:
                replaced = current.pid if current is not None else None
                current = LiveProcess(message.pid, message.generation, replaced_pid=replaced)
                self.live[message.bot] = current
                self.last_pid[message.bot] = message.pid
                self._nudge()
            current.generation = message.generation
            interval = self.intervals.get(message.bot, DEFAULT_HEARTBEAT_INTERVAL_S)
            current.beat(interval, self._clock)
            if isinstance(message, protocol.Ready):
                current.ready = message.telegram.connected
                current.telegram = {"connected": message.telegram.connected}
                self._nudge()
            else:
                health = message.telegram
                current.telegram = {
                    "connected": health.connected,
                    "last_update_age_s": health.last_update_age_s,
                    "last_error": health.last_error,
                    "disconnected_since": health.disconnected_since,
                    "flood_wait_until": health.flood_wait_until,
                }
                current.rss_mb = message.rss_mb
                current.messages = {
                    "received": message.messages_in,
                    "sent": message.messages_out,
                    "handled": message.handled,
                    "handler_errors": message.handler_errors,
                }
                if message.telegram.connected and not current.ready:
                    current.ready = True
                    self._nudge()
                if message.fatal is not None and current.fatal is None:
                    current.fatal = message.fatal.error
                    current.fatal_kind = message.fatal.kind
                    self._nudge()
        elif isinstance(message, protocol.Fatal):
            if current is None or current.pid != message.pid:
                current = LiveProcess(message.pid, message.generation)
                self.live[message.bot] = current
                self.last_pid[message.bot] = message.pid
            current.fatal = message.error
            current.fatal_kind = message.kind
            self._nudge()
        elif isinstance(message, protocol.Event):
            self._bus_event(message)

    # ---------------------------------------------------------------- circusd

    def on_circus_event(self, event: WatcherEvent) -> None:
        """circusd saw a bot's process spawn or end (its pub/sub channel)."""
        if not event.watcher.startswith("bot-"):
            return
        name = event.watcher.removeprefix("bot-")
        raw_pid, raw_time = event.body.get("process_pid"), event.body.get("time")
        pid = raw_pid if isinstance(raw_pid, int) else 0
        at = float(raw_time) if isinstance(raw_time, int | float) else self._clock.wall()
        if event.event == "spawn":
            self.spawned_at[name] = at
        elif event.event == "reap":
            raw_code = event.body.get("exit_code")
            code = raw_code if isinstance(raw_code, int) else -1
            expected = self._expect_exit_until.get(name, 0.0) > self._clock.monotonic()
            live = self.live.get(name)
            spoke = self.last_pid.get(name)
            if (
                spoke is not None
                and spoke != pid
                and (not self._pid_exists(spoke) or procinfo.is_zombie(spoke))
            ):
                # a fork-mode watcher's process is the bot's launcher, which ends after
                # the bot and as it did: the exit is the bot's own
                pid = spoke
            if is_crash(code, expected):
                self._exits.setdefault(name, []).append(Exit(at, pid, code))
                log.info(
                    "%s: process %d exited with code %d",
                    name,
                    pid,
                    code,
                    extra={"bot": name, "failure": "crash"},
                )
            if live is not None and live.pid == pid:
                live.telegram = {**live.telegram, "connected": False}
            self._nudge()

    def expect_exit(self, name: str, within_s: float = 10.0) -> None:
        """The controller is about to stop or restart this bot: its exit is no crash."""
        until = self._clock.monotonic() + within_s + EXPECTED_EXIT_MARGIN_S
        self._expect_exit_until[name] = max(self._expect_exit_until.get(name, 0.0), until)

    def alive(self, name: str) -> LiveProcess | None:
        """The bot's process as last heard of, if that process still exists."""
        live = self.live.get(name)
        return live if live is not None and self._pid_exists(live.pid) else None

    def bot_pid(self, name: str) -> int | None:
        """The pid of the bot's own process, whose /proc the resource monitor reads: the
        process its bus messages come from (they carry its pid), while it exists. The one
        place that says which pid is the bot's, should a launcher stand between the
        watcher and the bot."""
        live = self.alive(name)
        return live.pid if live is not None else None

    def observed(self, name: str) -> Live | None:
        """The bot's process as the reconciler's plan sees it."""
        live = self.live.get(name)
        return live.observed(self._pid_exists(live.pid)) if live is not None else None

    def take_exits(self, name: str) -> tuple[Exit, ...]:
        """The crashes seen since the last call (each is assessed once)."""
        return tuple(self._exits.pop(name, ()))

    def restarted(self, name: str) -> None:
        """The controller restarted the bot: forget its process, count from now."""
        self.live.pop(name, None)
        self.spawned_at[name] = self._clock.wall()

    # ---------------------------------------------------------------- memory

    def per_bot(self) -> list[dict[str, Any]]:
        """Every per-bot table (the fleet forgets destroyed bots in each)."""
        return [
            self.live,
            self.intervals,
            self._exits,
            self._expect_exit_until,
            self.spawned_at,
            self.last_pid,
        ]
