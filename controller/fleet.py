"""The fleet: the controller's core, between the API, the store, circusd and the bus.

Operations change desired state in PostgreSQL, then run a reconcile pass; the
loop runs passes on a timer and whenever a bot says something that matters.
Bus messages update an in-memory view of each bot's live process.

A stalled or lost PostgreSQL freezes nothing: health and everything that talks to
circusd act on the last rows read and on what they see; what they want written
waits in a bounded outbox and is written, in order, when the database answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg

from botspec import procinfo, protocol
from controller.botfiles import BotFiles
from controller.circus import Supervisor, SupervisorError, WatcherEvent, WatcherNotFound
from controller.errors import (
    PreconditionFailed,
    StoreUnavailable,
    SupervisorUnavailable,
    TgfleetError,
    VersionMismatch,
)
from controller.health import (
    Exit,
    Fail,
    FailureKind,
    HealthPolicy,
    HealthRecord,
    Note,
    Restart,
    Vitals,
    assess,
)
from controller.outbox import DEFAULT_LIMIT, Outbox
from controller.reconcile import (
    Action,
    Live,
    Observation,
    Reload,
    RemoveOrphan,
    Render,
    StartWatcher,
    StopWatcher,
    Transition,
    plan,
    should_run,
)
from controller.spec import (
    EffectiveSpec,
    check_defaults_keep_bots_runnable,
    check_runnable,
    effective,
    process_view,
    public_view,
    validate_create,
    validate_defaults,
    validate_patch,
)
from controller.states import BotState, Trigger, can, transition
from controller.store import BotRow, EventRow, PgStore

log = logging.getLogger("tgfleet.fleet")

RECONCILE_INTERVAL_S = 1.0
#: How often the writer retries the outbox, and pings a database that is away.
WRITER_INTERVAL_S = 0.5
#: How often old events are pruned.
PRUNE_INTERVAL_S = 600.0
#: A queued write that lands later than this after it was noted says so (``delayed``).
DELAYED_AFTER_S = 1.0
#: Tries of an update that lost a race with another update of the same bot.
UPDATE_TRIES = 5
#: A heartbeat later than this many intervals counts as missed.
MISSED_HEARTBEAT_FACTOR = 2.0
#: Exits this long after the controller stopped or restarted a bot are its own doing.
EXPECTED_EXIT_MARGIN_S = 5.0
#: What a pass can run into and survive: the next pass tries again.
PASS_ERRORS = (
    SupervisorError,
    TgfleetError,
    OSError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
)

Webhook = Callable[[dict[str, Any]], Awaitable[None]]


def watcher_name(bot: str) -> str:
    return f"bot-{bot}"


def etag(row: BotRow) -> str:
    """The ETag of a bot: the version of its spec (an If-Match names it)."""
    return f'"{row.version}"'


def _stamp(at: float | None) -> str | None:
    return datetime.fromtimestamp(at, UTC).isoformat() if at is not None else None


@dataclass(frozen=True)
class PendingEvent:
    """An event noted by health or the bus, waiting in the outbox."""

    bot: str | None
    kind: str
    actor: str
    reason: str
    data: Mapping[str, Any]
    noted_at: float


@dataclass(frozen=True)
class PendingTransition:
    """A state change health already acted on (in circusd), waiting in the outbox."""

    name: str
    trigger: Trigger
    actor: str
    reason: str
    data: Mapping[str, Any]
    noted_at: float
    count_restart: bool = False


Pending = PendingEvent | PendingTransition


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
    last_beat_at: float | None = None  # wall time of the last ready/heartbeat
    last_beat_mono: float | None = None
    heartbeats_missed: int = 0
    max_gap_s: float = 0.0

    def beat(self, interval_s: float) -> None:
        """A ready or heartbeat arrived: count a gap longer than expected as missed beats."""
        now = time.monotonic()
        if self.last_beat_mono is not None:
            gap = now - self.last_beat_mono
            self.max_gap_s = max(self.max_gap_s, gap)
            if gap > interval_s * MISSED_HEARTBEAT_FACTOR:
                self.heartbeats_missed += max(1, int(gap / interval_s) - 1)
        self.last_beat_mono = now
        self.last_beat_at = time.time()

    def alive_now(self) -> bool:
        return procinfo.pid_exists(self.pid)

    def observed(self) -> Live:
        return Live(
            pid=self.pid,
            generation=self.generation,
            ready=self.ready,
            alive=self.alive_now(),
            replaced_pid=self.replaced_pid,
            fatal=self.fatal,
        )


EventListener = Callable[[EventRow], None]


class Fleet:
    def __init__(
        self,
        store: PgStore,
        supervisor: Supervisor,
        files: BotFiles,
        *,
        publish: Callable[[str, protocol.Event], None] | None = None,
        webhook: Webhook | None = None,
        outbox_limit: int = DEFAULT_LIMIT,
        event_retention_s: float = 30 * 86400.0,
        event_retention_count: int = 100_000,
    ) -> None:
        self.store = store
        self.supervisor = supervisor
        self.files = files
        self.live: dict[str, LiveProcess] = {}
        self._lock = asyncio.Lock()
        self._acted = 0  # times the lock was released: reads older than that are stale
        self._nudge = asyncio.Event()
        self._listeners: set[EventListener] = set()
        self._publish = publish
        self._webhook = webhook
        self._tasks: set[asyncio.Task[None]] = set()
        self.last_pass_error: str | None = None
        self._subscriptions: dict[str, tuple[str, ...]] = {}
        self._specs: dict[str, EffectiveSpec] = {}
        # Health: records (also in PostgreSQL), policies, and what circusd told us.
        self.health: dict[str, HealthRecord] = {}
        self._saved_health: dict[str, HealthRecord] = {}
        self._policies: dict[str, HealthPolicy] = {}
        self._intervals: dict[str, float] = {}
        self._exits: dict[str, list[Exit]] = {}
        self._expect_exit_until: dict[str, float] = {}
        self._spawned_at: dict[str, float] = {}
        self._started_at = time.time()
        self._seeded = False
        # The last rows read, so health acts (and reads answer) while PostgreSQL is away.
        self.rows: list[BotRow] | None = None
        self.rows_at: float | None = None  # wall time they were read
        self.defaults: dict[str, Any] | None = None
        self.outbox: Outbox[Pending] = Outbox(outbox_limit)
        self._wake_writer = asyncio.Event()
        self._event_retention = (event_retention_s, event_retention_count)
        self._next_prune = 0.0  # monotonic; the first pass prunes

    async def load(self) -> None:
        """Read what must survive a controller restart (health records, backoffs)."""
        for name, raw in (await self.store.load_health()).items():
            record = HealthRecord.from_json(raw)
            self.health[name] = self._saved_health[name] = record

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def _spawn_task(self, coro: Awaitable[None], name: str) -> None:
        """A background task owned by the fleet (awaited or cancelled in close)."""

        async def run() -> None:
            try:
                await coro
            except PASS_ERRORS as exc:
                log.warning("%s failed: %s", name, exc)

        task = asyncio.get_running_loop().create_task(run(), name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ----------------------------------------------------------- the bus side

    def on_message(self, message: protocol.Message) -> None:
        """A decoded bus message from a bot (the bus already checked its sender)."""
        if self.rows is not None and message.bot not in {row.name for row in self.rows}:
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
                self._nudge.set()
            current.generation = message.generation
            current.beat(self._intervals.get(message.bot, 2.0))
            if isinstance(message, protocol.Ready):
                current.ready = message.telegram.connected
                current.telegram = {"connected": message.telegram.connected}
                self._nudge.set()
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
                if message.telegram.connected and not current.ready:
                    current.ready = True
                    self._nudge.set()
                if message.fatal is not None and current.fatal is None:
                    current.fatal = message.fatal.error
                    current.fatal_kind = message.fatal.kind
                    self._nudge.set()
        elif isinstance(message, protocol.Fatal):
            if current is None or current.pid != message.pid:
                current = LiveProcess(message.pid, message.generation)
                self.live[message.bot] = current
            current.fatal = message.error
            current.fatal_kind = message.kind
            self._nudge.set()
        elif isinstance(message, protocol.Event):
            # Delivered at once; persisted (and streamed) when PostgreSQL takes it.
            self._queue(
                PendingEvent(
                    message.bot,
                    "bus",
                    f"bot:{message.bot}",
                    message.topic,
                    {"data": message.data},
                    time.time(),
                )
            )
            if self._publish is not None:
                self._publish(message.topic, message)

    def on_circus_event(self, event: WatcherEvent) -> None:
        """circusd saw a bot's process spawn or end (its pub/sub channel)."""
        if not event.watcher.startswith("bot-"):
            return
        name = event.watcher.removeprefix("bot-")
        raw_pid, raw_time = event.body.get("process_pid"), event.body.get("time")
        pid = raw_pid if isinstance(raw_pid, int) else 0
        at = float(raw_time) if isinstance(raw_time, int | float) else time.time()
        if event.event == "spawn":
            self._spawned_at[name] = at
        elif event.event == "reap":
            raw_code = event.body.get("exit_code")
            code = raw_code if isinstance(raw_code, int) else -1
            expected = self._expect_exit_until.get(name, 0.0) > time.monotonic()
            if code != 0 and not expected:
                self._exits.setdefault(name, []).append(Exit(at, pid, code))
                log.info("%s: process %d exited with code %d", name, pid, code)
            live = self.live.get(name)
            if live is not None and live.pid == pid:
                live.telegram = {**live.telegram, "connected": False}
            self._nudge.set()

    def _expect_exit(self, name: str, within_s: float = 10.0) -> None:
        """The controller is about to stop or restart this bot: its exit is no crash."""
        until = time.monotonic() + within_s + EXPECTED_EXIT_MARGIN_S
        self._expect_exit_until[name] = max(self._expect_exit_until.get(name, 0.0), until)

    def subscribers(self, topic: str) -> list[str]:
        """Bots whose spec subscribes them to ``topic`` (as of the last pass)."""
        return [name for name, topics in self._subscriptions.items() if topic in topics]

    # ------------------------------------------------------------- listeners

    def subscribe(self, listener: EventListener) -> Callable[[], None]:
        self._listeners.add(listener)
        return lambda: self._listeners.discard(listener)

    def _emit(self, row: EventRow) -> None:
        for listener in list(self._listeners):
            listener(row)

    async def record(
        self, bot: str | None, kind: str, actor: str, reason: str, data: Mapping[str, Any]
    ) -> EventRow:
        row = await self.store.add_event(bot, kind, actor, reason, data)
        self._emit(row)
        return row

    def note(
        self, bot: str | None, kind: str, actor: str, reason: str, data: Mapping[str, Any]
    ) -> None:
        """An event written without waiting: queued, written in order when PostgreSQL takes it."""
        self._queue(PendingEvent(bot, kind, actor, reason, dict(data), time.time()))

    # ------------------------------------------------------------ the outbox

    def _queue(self, write: Pending) -> None:
        self.outbox.put(write)
        self._wake_writer.set()

    async def _drain(self) -> None:
        """Write what waits in the outbox, in order (StoreUnavailable: it keeps waiting)."""
        await self.outbox.drain(self._write_pending)

    async def _write_pending(self, write: Pending) -> None:
        late = time.time() - write.noted_at > DELAYED_AFTER_S
        extra = {"delayed": True, "noted_at": _stamp(write.noted_at)} if late else {}
        try:
            if isinstance(write, PendingEvent):
                row = await self.store.add_event(
                    write.bot, write.kind, write.actor, write.reason, {**write.data, **extra}
                )
                self._emit(row)
                return
            current = await self.store.get_bot(write.name)
            if can(current.state, write.trigger):
                await self._transition(
                    write.name, write.trigger, write.reason, write.actor, {**write.data, **extra}
                )
                if write.count_restart:
                    await self.store.count_restart(write.name)
            else:  # overtaken meanwhile: keep what health did as an event
                self._emit(
                    await self.store.add_event(
                        write.name,
                        "health",
                        write.actor,
                        f"{write.reason} (state left {current.state}: a {write.trigger} "
                        "does not apply to it)",
                        {**write.data, **extra},
                    )
                )
        except StoreUnavailable:
            raise  # it stays first in line
        except (TgfleetError, asyncpg.PostgresError) as exc:
            # The database answered no (the bot is gone, a state moved under us): a retry
            # would get the same answer and hold up everything behind it.
            log.warning("dropped a queued write %r: %s", write, exc)

    async def _keep_writing(self, stopping: asyncio.Event) -> None:
        """Drain the outbox as writes come; while PostgreSQL is away, ping it until it answers."""
        while not stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake_writer.wait(), WRITER_INTERVAL_S)
            self._wake_writer.clear()
            if not self.store.reachable:
                try:
                    await self.store.ping()
                except StoreUnavailable:
                    continue
                self._nudge.set()  # back: a full pass at once
            try:
                await self._drain()
            except StoreUnavailable as exc:
                log.info("outbox: %d writes wait: %s", len(self.outbox), exc)

    # ---------------------------------------------------------- reconciling

    async def run(self, stopping: asyncio.Event) -> None:
        """Reconcile every second, and at once when nudged, until ``stopping`` is set;
        meanwhile, write what the outbox holds."""
        writer = asyncio.create_task(self._keep_writing(stopping), name="outbox writer")
        try:
            await self._reconcile_until(stopping)
        finally:
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer

    async def _reconcile_until(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            try:
                await self.reconcile()
                self.last_pass_error = None
            except PASS_ERRORS as exc:
                self.last_pass_error = str(exc) or type(exc).__name__
                log.warning("reconcile pass failed: %s", self.last_pass_error)
            self._nudge.clear()
            waiters = [asyncio.ensure_future(e.wait()) for e in (self._nudge, stopping)]
            try:
                await asyncio.wait(
                    waiters, timeout=RECONCILE_INTERVAL_S, return_when="FIRST_COMPLETED"
                )
            finally:
                for waiter in waiters:
                    waiter.cancel()

    async def reconcile(self) -> None:
        """One pass: read desired state, converge circusd to it, assess health.

        Health runs on the last rows read when PostgreSQL does not answer; the pass
        then raises StoreUnavailable (after acting), so the loop says so.
        """
        seen = self._acted
        fresh = await self._read_desired()
        async with self._acting():
            if fresh and self._acted != seen:
                # Someone acted between our read and now (a destroy, another pass):
                # what we read may be gone, and acting on it would bring it back.
                fresh = await self._read_desired()
            status = await self._status()
            if fresh:
                try:
                    await self._converge(status)
                except StoreUnavailable:
                    fresh = False
            assert self.rows is not None
            await self._check_health(self.rows, status)
        if not fresh:
            raise StoreUnavailable(self.store.unreachable_detail())
        await self._after_pass()

    @contextlib.asynccontextmanager
    async def _acting(self) -> AsyncIterator[None]:
        """The fleet lock, held by whoever acts on circusd and the files; counted."""
        async with self._lock:
            try:
                yield
            finally:
                self._acted += 1

    async def _read_desired(self) -> bool:
        """Write what waits, then read the bots and defaults; False if PostgreSQL is away."""
        try:
            await self._drain()  # what happened first is written first
            rows = await self.store.list_bots()
            defaults = await self.store.get_defaults()
        except StoreUnavailable:
            if self.rows is None:
                raise
            return False
        self.rows, self.rows_at, self.defaults = rows, time.time(), defaults
        specs = {row.name: effective(row.spec, defaults) for row in rows}
        self._specs = specs
        self._subscriptions = {name: spec.subscribe for name, spec in specs.items()}
        self._policies = {name: spec.health for name, spec in specs.items()}
        self._intervals = {name: spec.health.heartbeat_interval_s for name, spec in specs.items()}
        self._forget_all_but({row.name for row in rows})
        return True

    async def _converge(self, status: Mapping[str, str]) -> None:
        rows = self.rows or []
        if not self._seeded:
            await self._seed_live(rows, status)
        observations = [self._observe(row, status) for row in rows]
        known = {row.name for row in rows}
        loaded = {w.removeprefix("bot-") for w in status if w.startswith("bot-")}
        orphans = sorted((loaded | set(self.files.on_disk())) - known)
        actions = plan(observations, orphans)
        if actions:
            await self._apply(actions, {row.name: row for row in rows}, self._specs)
            self.rows, self.rows_at = await self.store.list_bots(), time.time()

    async def _after_pass(self) -> None:
        """Keep changed health records, write what health noted, prune old events."""
        try:
            for name, record in list(self.health.items()):
                if self._saved_health.get(name) != record:
                    await self.store.save_health(name, record.to_json())
                    self._saved_health[name] = record
            await self._drain()
            if time.monotonic() >= self._next_prune:
                self._next_prune = time.monotonic() + PRUNE_INTERVAL_S
                age_s, count = self._event_retention
                pruned = await self.store.prune_events(age_s, count)
                if pruned:
                    log.info("pruned %d old events", pruned)
        except StoreUnavailable as exc:
            log.info("after the pass: %s (the next pass tries again)", exc)

    def _forget(self, name: str) -> None:
        """Drop everything kept in memory about a bot (it was destroyed)."""
        for per_bot in self._per_bot():
            per_bot.pop(name, None)

    def _forget_all_but(self, known: set[str]) -> None:
        """Per-bot memory holds only bots that exist (another controller may destroy one)."""
        for per_bot in self._per_bot():
            for name in [n for n in per_bot if n not in known]:
                del per_bot[name]

    def _per_bot(self) -> list[dict[str, Any]]:
        return [
            self.live,
            self.health,
            self._saved_health,
            self._policies,
            self._intervals,
            self._exits,
            self._expect_exit_until,
            self._spawned_at,
            self._subscriptions,
        ]

    async def _status(self) -> dict[str, str]:
        try:
            return await self.supervisor.status()
        except SupervisorError as exc:
            raise SupervisorUnavailable(f"circusd did not answer: {exc}") from exc

    async def _seed_live(self, rows: list[BotRow], status: Mapping[str, str]) -> None:
        """After a controller (re)start, learn the running bots' pids from circusd at
        once instead of waiting for their next heartbeat."""
        for row in rows:
            name = watcher_name(row.name)
            if row.name in self.live or status.get(name) != "active":
                continue
            with contextlib.suppress(SupervisorError):
                pids = await self.supervisor.pids(name)
                if pids:
                    # Its generation is unknown until it speaks; it is not ready either.
                    self.live[row.name] = LiveProcess(pids[0], -1)
        self._seeded = True

    def _observe(self, row: BotRow, status: Mapping[str, str]) -> Observation:
        live = self.live.get(row.name)
        return Observation(
            name=row.name,
            desired=row.desired,
            state=row.state,
            generation=row.generation,
            rendered=self.files.rendered(row.name),
            watcher=status.get(watcher_name(row.name)),
            live=live.observed() if live is not None else None,
        )

    async def _apply(
        self, actions: list[Action], rows: dict[str, BotRow], specs: Mapping[str, EffectiveSpec]
    ) -> None:
        for action in actions:
            if isinstance(action, Transition):
                data: dict[str, Any] = {}
                if action.trigger is Trigger.FAIL:
                    live = self.live.get(action.name)
                    fatal_kind = live.fatal_kind if live is not None else None
                    data = {
                        "failure": "plugin" if fatal_kind == "plugin" else FailureKind.AUTH.value
                    }
                await self._transition(
                    action.name, action.trigger, action.reason, "reconciler", data
                )
                if action.trigger is Trigger.FAIL:
                    await self._failed(action.name, str(data["failure"]), action.reason)
                if action.counts_restart:
                    await self.store.count_restart(action.name)
                if action.trigger in (Trigger.RESPAWN, Trigger.START):
                    live = self.live.get(action.name)
                    if live is not None and not live.alive_now():
                        self.live.pop(action.name, None)
                    elif live is not None:
                        live.replaced_pid = None
            elif isinstance(action, Render):
                row = rows[action.name]
                spec = specs[action.name]
                if self.files.rendered(row.name) is not None:
                    self._expect_exit(row.name, spec.graceful_timeout_s)  # reload restarts it
                # fsync: off the event loop
                await asyncio.to_thread(
                    self.files.write, row.name, row.generation, spec, action.autostart
                )
            elif isinstance(action, StartWatcher):
                await self.supervisor.start(watcher_name(action.name))
            elif isinstance(action, StopWatcher):
                self._expect_exit(action.name)
                await self.supervisor.stop(watcher_name(action.name))
            elif isinstance(action, RemoveOrphan):
                log.info("removing files of %s, which has no bot row", action.name)
                self.files.remove_watcher(action.name)
            elif isinstance(action, Reload):
                await self.supervisor.reloadconfig()

    async def _check_health(self, rows: list[BotRow], status: Mapping[str, str]) -> None:
        """Assess every bot that should be running; act; keep the records."""
        now = time.time()
        for row in rows:
            exits = tuple(self._exits.pop(row.name, ()))
            if row.state not in (BotState.STARTING, BotState.RUNNING) or not should_run(
                row.desired, row.state
            ):
                continue
            live = self.live.get(row.name)
            telegram = live.telegram if live is not None else {}
            since = max(
                self._spawned_at.get(row.name, 0.0), self._started_at, row.state_since.timestamp()
            )
            vitals = Vitals(
                name=row.name,
                process_up=status.get(watcher_name(row.name)) == "active",
                since=since,
                last_heartbeat_at=live.last_beat_at if live is not None else None,
                connected=bool(telegram.get("connected")),
                disconnected_since=telegram.get("disconnected_since"),
                rss_mb=live.rss_mb if live is not None else None,
                flood_wait_until=telegram.get("flood_wait_until"),
                exits=exits,
            )
            policy = self._policies.get(row.name, HealthPolicy())
            record = self.health.get(row.name, HealthRecord())
            record, actions = assess(vitals, record, policy, now, random.uniform(-0.2, 0.2))
            self.health[row.name] = record
            for action in actions:
                await self._apply_health(row, action)

    async def _apply_health(self, row: BotRow, action: Note | Restart | Fail) -> None:
        """Act in circusd at once; what is to be written waits in the outbox."""
        if isinstance(action, Note):
            self.note(
                action.name,
                "health",
                "health",
                action.reason,
                {"failure": action.kind, **action.data},
            )
        elif isinstance(action, Restart):
            name = action.name
            self._expect_exit(name)
            self.live.pop(name, None)
            self._spawned_at[name] = time.time()
            if action.kill:
                await self.supervisor.kill(watcher_name(name))
            else:
                await self.supervisor.restart(watcher_name(name))
            self._queue(
                PendingTransition(
                    name,
                    Trigger.RESPAWN,
                    "health",
                    f"{action.kind}: {action.reason}",
                    {"failure": action.kind},
                    time.time(),
                    count_restart=True,
                )
            )
        elif isinstance(action, Fail):
            if can(row.state, Trigger.FAIL):
                await self._failed(action.name, action.kind, action.reason)
                self._queue(
                    PendingTransition(
                        action.name,
                        Trigger.FAIL,
                        "health",
                        action.reason,
                        {"failure": action.kind},
                        time.time(),
                    )
                )
            self._nudge.set()  # the next pass stops its watcher

    async def _failed(self, name: str, kind: str, reason: str) -> None:
        """A bot is given up on: remember why, tell the admin webhook."""
        now = time.time()
        record = self.health.get(name, HealthRecord())
        self.health[name] = HealthRecord(
            last_kind=kind, last_reason=reason, last_at=now, exits=record.exits
        )
        self._expect_exit(name)
        if self._webhook is not None:
            body = {"bot": name, "state": "failed", "failure": kind, "reason": reason, "at": now}
            self._spawn_task(self._webhook(body), f"webhook for {name}")

    async def _transition(
        self,
        name: str,
        trigger: Trigger,
        reason: str,
        actor: str,
        data: Mapping[str, Any] | None = None,
    ) -> BotRow:
        row = await self.store.get_bot(name)
        new_state = transition(row.state, trigger)
        updated, event = await self.store.set_state(name, row.state, new_state, actor, reason, data)
        self._emit(event)
        log.info("%s: %s -> %s (%s)", name, row.state, new_state, reason)
        return updated

    # ------------------------------------------------------------ operations

    def _require_database(self) -> None:
        """Writes answer 503 at once while PostgreSQL is known to be away."""
        if not self.store.reachable:
            raise StoreUnavailable(self.store.unreachable_detail())

    async def create(self, body: object, actor: str) -> BotRow:
        name, own = validate_create(body)
        self._require_database()
        spec = effective(own, await self.store.get_defaults())
        check_runnable(spec)
        desired = "running" if spec.autostart else "stopped"
        await self.store.create_bot(name, own, desired, actor)
        await self._reconcile_quietly()
        return await self.store.get_bot(name)

    async def update(
        self, name: str, body: object, actor: str, if_match: frozenset[int] | None = None
    ) -> BotRow:
        """Change a bot's spec; its process restarts only if what it sees changed.

        The patch is merged into the spec as stored and written only if nobody changed
        it meanwhile (its version); a lost race merges again. With ``if_match``, the
        spec must still be at one of those versions (PreconditionFailed otherwise).
        """
        self._require_database()
        for _ in range(UPDATE_TRIES):
            row = await self.store.get_bot(name)
            if if_match is not None and row.version not in if_match:
                raise PreconditionFailed(
                    f"{name} is at version {row.version} (ETag {etag(row)}): read it again"
                )
            own = validate_patch(row.spec, body)
            defaults = await self.store.get_defaults()
            new = effective(own, defaults)
            check_runnable(new)
            restart = process_view(new) != process_view(effective(row.spec, defaults))
            try:
                await self.store.update_spec(name, own, actor, restart, row.version)
                break
            except VersionMismatch as exc:
                if if_match is not None:
                    raise PreconditionFailed(f"{exc}: read it again") from exc
        else:
            raise StoreUnavailable(f"{name} kept changing under {UPDATE_TRIES} updates: retry")
        await self._reconcile_quietly()
        return await self.store.get_bot(name)

    async def set_defaults(self, body: object, actor: str) -> dict[str, Any]:
        """Replace the fleet defaults; restart the bots whose processes see a change."""
        self._require_database()
        old = await self.store.get_defaults()
        value = validate_defaults(body, old)
        rows = await self.store.list_bots()
        check_defaults_keep_bots_runnable(value, [(row.name, row.spec) for row in rows])
        restart = [
            row.name
            for row in rows
            if process_view(effective(row.spec, value)) != process_view(effective(row.spec, old))
        ]
        await self.store.set_defaults(value, actor, restart)
        await self._reconcile_quietly()
        return await self.store.get_defaults()

    async def start(self, name: str, actor: str) -> BotRow:
        self._require_database()
        async with self._acting():
            row = await self.store.get_bot(name)
            if row.desired != "running":
                await self.store.set_desired(name, "running", actor, "start requested")
            if row.state is BotState.FAILED:
                self.live.pop(name, None)
                last = self.health.get(name, HealthRecord())
                # A new start is a new streak: no backoff, no exits counted against it.
                self.health[name] = HealthRecord(
                    last_kind=last.last_kind, last_reason=last.last_reason, last_at=last.last_at
                )
                await self._transition(name, Trigger.START, "start requested", actor)
        await self._reconcile_quietly()
        return await self.store.get_bot(name)

    async def stop(self, name: str, actor: str) -> BotRow:
        self._require_database()
        async with self._acting():
            row = await self.store.get_bot(name)
            if row.desired != "stopped":
                await self.store.set_desired(name, "stopped", actor, "stop requested")
            if row.state is BotState.FAILED:
                await self._transition(name, Trigger.STOP, "stop requested", actor)
        await self._reconcile_quietly()
        # A second pass records `stopped` once circusd says the watcher is down.
        await self._reconcile_quietly()
        return await self.store.get_bot(name)

    async def restart(self, name: str, actor: str) -> BotRow:
        self._require_database()
        row = await self.store.get_bot(name)
        if row.state is BotState.FAILED or row.desired != "running":
            return await self.start(name, actor)
        async with self._acting():
            row = await self.store.get_bot(name)
            if can(row.state, Trigger.RESPAWN):
                self._expect_exit(name)
                # Not loaded yet: the pass below renders and starts it.
                with contextlib.suppress(WatcherNotFound):
                    await self.supervisor.restart(watcher_name(name))
                self.live.pop(name, None)
                await self._transition(name, Trigger.RESPAWN, "restart requested", actor)
                await self.store.count_restart(name)
        await self._reconcile_quietly()
        return await self.store.get_bot(name)

    async def destroy(self, name: str, actor: str) -> None:
        """Stop the bot, remove its watcher, files and private dir; keep its events."""
        self._require_database()
        async with self._acting():
            row = await self.store.get_bot(name)
            if row.desired != "stopped":
                await self.store.set_desired(name, "stopped", actor, "destroy requested")
            if can(row.state, Trigger.STOP):
                row = await self._transition(name, Trigger.STOP, "destroy requested", actor)
            status = await self.supervisor.status()
            self._expect_exit(name)
            if status.get(watcher_name(name)) == "active":
                await self.supervisor.stop(watcher_name(name))
            self.files.remove_watcher(name)
            await self.supervisor.reloadconfig()
            if can(row.state, Trigger.STOPPED):
                await self._transition(name, Trigger.STOPPED, "process stopped", actor)
            await asyncio.to_thread(self.files.remove_private, name)
            self._emit(await self.store.delete_bot(name, actor, "destroy requested"))
            self._forget(name)

    async def _reconcile_quietly(self) -> None:
        """Run a pass for an operation; circusd trouble becomes a 503, the loop retries."""
        try:
            await self.reconcile()
        except StoreUnavailable:
            # The change is stored (the write before this pass succeeded); the loop
            # converges once the database answers again.
            log.warning("a pass after an operation found PostgreSQL away; the loop retries")
        except SupervisorError as exc:
            raise SupervisorUnavailable(f"circusd did not answer: {exc}") from exc

    # ------------------------------------------------------------------ views

    def view(self, row: BotRow) -> dict[str, Any]:
        live = self.live.get(row.name)
        pid: int | None = None
        uptime: float | None = None
        rss: float | None = None
        # Every key always there, whatever the bot last said.
        telegram: dict[str, Any] = {
            "connected": False,
            "last_update_age_s": None,
            "last_error": None,
            "disconnected_since": None,
            "flood_wait_until": None,
        }
        if live is not None and live.alive_now():
            pid = live.pid
            uptime = procinfo.age_s(pid)
            rss = live.rss_mb
            telegram = {**telegram, **live.telegram}
        if row.state not in (BotState.RUNNING, BotState.STARTING):
            telegram["connected"] = False
        return {
            "name": row.name,
            "state": row.state.value,
            "health": self._health_view(row, live),
            "desired": row.desired,
            "since": row.state_since.isoformat(),
            "reason": row.state_reason,
            "pid": pid,
            "uptime_s": round(uptime, 1) if uptime is not None else None,
            "restarts": row.restarts,
            "rss_mb": rss,
            "telegram": telegram,
            "generation": row.generation,
            "version": row.version,
            "watcher": watcher_name(row.name),
            "spec": public_view(row.spec),
        }

    def _health_view(self, row: BotRow, live: LiveProcess | None) -> dict[str, Any]:
        record = self.health.get(row.name, HealthRecord())

        stamp = _stamp
        if row.state is BotState.FAILED:
            status = "failed"
        elif record.failure_kind is not None:
            status = "backoff" if record.next_restart_at else "failing"
        elif live is not None and live.telegram.get("connected"):
            status = "healthy"
        else:
            status = "unknown"
        flood = live.telegram.get("flood_wait_until") if live is not None else None
        return {
            "status": status,
            "failure": None
            if record.failure_kind is None
            else {
                "kind": record.failure_kind,
                "reason": record.failure_reason,
                "since": stamp(record.failure_at),
            },
            "last_failure": None
            if record.last_kind is None
            else {
                "kind": record.last_kind,
                "reason": record.last_reason,
                "at": stamp(record.last_at),
            },
            "next_restart_at": stamp(record.next_restart_at),
            "restart_attempt": record.attempt,
            "flood_wait_until": stamp(flood) if isinstance(flood, int | float) else None,
            "heartbeat_age_s": None
            if live is None or live.last_beat_at is None
            else round(max(0.0, time.time() - live.last_beat_at), 2),
            "heartbeats_missed": live.heartbeats_missed if live is not None else 0,
            "max_heartbeat_gap_s": round(live.max_gap_s, 2) if live is not None else None,
        }

    def stale_marks(self) -> dict[str, Any]:
        """What marks an answer made from memory: the rows are as of their last read."""
        return {"stale": True, "as_of": _stamp(self.rows_at)}

    async def get_row(self, name: str) -> tuple[BotRow, bool]:
        """A bot's row, and whether it is stale (PostgreSQL away: as last read)."""
        try:
            return await self.store.get_bot(name), False
        except StoreUnavailable:
            cached = next((r for r in self.rows or () if r.name == name), None)
            if cached is None:
                raise
            return cached, True

    async def get(self, name: str) -> dict[str, Any]:
        row, stale = await self.get_row(name)
        return {**self.view(row), **self.stale_marks()} if stale else self.view(row)

    async def list(self) -> list[dict[str, Any]]:
        """Every bot; while PostgreSQL is away, as last read (each marked stale)."""
        try:
            rows = await self.store.list_bots()
        except StoreUnavailable:
            if self.rows is None:
                raise
            return [{**self.view(row), **self.stale_marks()} for row in self.rows]
        return [self.view(row) for row in rows]
