"""The fleet: the controller's core roles, wired together, and the reconcile loop.

The roles, each in its own module: the ``Observer`` (what the bots' processes
show: bus messages, circusd events), the ``EventLog`` (every event a row,
streamed; writes that may not wait go through its outbox), the ``Healer``
(health's decisions, acted on), and the pure ``plan`` of the reconciler. Here:
the loop that reads desired state from the ``Store``, converges circusd (the
``Supervisor``) and the files to it and lets the healer act; the lifecycle
operations the API calls; the views it answers with.

A stalled or lost PostgreSQL freezes nothing: health and everything that talks to
circusd act on the last rows read and on what they see; what they want written
waits in a bounded outbox and is written, in order, when the database answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import replace
from typing import Any

import asyncpg

from botspec import procinfo, protocol
from controller.botfiles import BotFiles
from controller.circus import (
    CircusError,
    Supervisor,
    SupervisorError,
    WatcherEvent,
    WatcherNotFound,
)
from controller.clock import Clock, SystemClock
from controller.errors import (
    Conflict,
    HeldElsewhere,
    PreconditionFailed,
    StoreUnavailable,
    SupervisorUnavailable,
    TgfleetError,
    VersionMismatch,
)
from controller.eventlog import EventListener, EventLog, Pending
from controller.healer import Healer, watcher_name
from controller.health import FailureKind, HealthRecord
from controller.metrics import Histogram
from controller.observer import LiveProcess, Observer
from controller.outbox import DEFAULT_LIMIT, Outbox
from controller.reconcile import (
    Action,
    Observation,
    Release,
    Reload,
    RemoveOrphan,
    Render,
    StartWatcher,
    StopWatcher,
    Transition,
    plan,
)
from controller.resources import SAMPLE_INTERVAL_S, NearLimit, ResourceMonitor, timed_read
from controller.settings import DEFAULT_FORGET_AFTER_S, default_host
from controller.spec import (
    EffectiveSpec,
    check_defaults_keep_bots_runnable,
    check_runnable,
    effective,
    process_view,
    validate_create,
    validate_defaults,
    validate_patch,
)
from controller.states import BotState, Trigger, can
from controller.store import BotRow, EventRow, Store
from controller.sysusers import SystemUserError
from controller.views import bot_view, stale_marks

__all__ = ["Fleet", "LiveProcess", "Webhook", "etag", "watcher_name"]

log = logging.getLogger("tgfleet.fleet")

RECONCILE_INTERVAL_S = 1.0
#: How often old events are pruned.
PRUNE_INTERVAL_S = 600.0
#: A controller writes its heartbeat (the hosts table) at most this often, seconds.
HOST_BEAT_S = 1.0
#: A host seen within this many seconds counts as alive (GET /api/v1/hosts).
HOST_ALIVE_S = 10.0
#: Tries of an update that lost a race with another update of the same bot.
UPDATE_TRIES = 5
#: Restarts of one failure streak are spread by ±this fraction (bots failing
#: together do not come back together).
JITTER = 0.2


class BotFilesRefused(SystemUserError):
    """Some bots' users or files could not be made in a pass; every other action ran."""


#: What a pass can run into and survive: the next pass tries again.
PASS_ERRORS = (
    SupervisorError,
    TgfleetError,
    SystemUserError,  # a bot's user or files: the keeper refused, or useradd failed
    OSError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
)

Webhook = Callable[[dict[str, Any]], Awaitable[None]]


def _sets_host(body: object) -> bool:
    """A patch that names ``host`` (null too: back to this controller's host)."""
    return isinstance(body, dict) and "host" in body


def etag(row: BotRow) -> str:
    """The ETag of a bot: the version of its spec (an If-Match names it)."""
    return f'"{row.version}"'


class Fleet:
    def __init__(
        self,
        store: Store,
        supervisor: Supervisor,
        files: BotFiles,
        *,
        clock: Clock | None = None,
        rng: random.Random | None = None,
        pid_exists: Callable[[int], bool] = procinfo.pid_exists,
        publish: Callable[[str, protocol.Event], None] | None = None,
        webhook: Webhook | None = None,
        outbox_limit: int = DEFAULT_LIMIT,
        event_retention_s: float = 30 * 86400.0,
        event_retention_count: int = 100_000,
        host: str | None = None,
        api_url: str = "",
        forget_after_s: float = DEFAULT_FORGET_AFTER_S,
    ) -> None:
        #: This controller's host: it runs the bots it holds, and only those.
        self.host = host or default_host()
        self.api_url = api_url
        self.forget_after_s = forget_after_s
        self._next_beat = 0.0  # monotonic
        self.store = store
        self.supervisor = supervisor
        self.files = files
        self.clock: Clock = clock or SystemClock()
        rng = rng or random.Random()
        self._nudge = asyncio.Event()
        self._again = False  # a pass that acted on a move asks for the next one at once
        self._broken: dict[str, str] = {}  # bots whose user or files a pass could not make
        self._publish = publish
        self._webhook = webhook
        self.events = EventLog(store, self.clock, outbox_limit)
        self.observer = Observer(self.clock, self._nudge.set, self._bus_event, pid_exists)
        self.healer = Healer(
            supervisor,
            self.observer,
            self.events,
            self.clock,
            lambda: rng.uniform(-JITTER, JITTER),
            nudge=self._nudge.set,
            notify=self._notify,
        )
        self.resources = ResourceMonitor(self._near_limit)
        self.pass_seconds = Histogram(
            "tgfleet_reconcile_duration_seconds", "Duration of reconcile passes."
        )
        self._lock = asyncio.Lock()
        self._acted = 0  # times the lock was released: reads older than that are stale
        self._tasks: set[asyncio.Task[None]] = set()
        self.last_pass_error: str | None = None
        self._subscriptions: dict[str, tuple[str, ...]] = {}
        self._specs: dict[str, EffectiveSpec] = {}
        self._seeded = False
        # The last rows read, so health acts (and reads answer) while PostgreSQL is away.
        self.rows: list[BotRow] | None = None
        self.rows_at: float | None = None  # wall time they were read
        self.defaults: dict[str, Any] | None = None
        self._event_retention = (event_retention_s, event_retention_count)
        self._next_prune = 0.0  # monotonic; the first pass prunes

    # The roles' faces that the API and app use.
    @property
    def outbox(self) -> Outbox[Pending]:
        return self.events.outbox

    def on_message(self, message: protocol.Message) -> None:
        self.observer.on_message(message)

    def on_circus_event(self, event: WatcherEvent) -> None:
        self.observer.on_circus_event(event)

    def subscribe(self, listener: EventListener) -> Callable[[], None]:
        return self.events.subscribe(listener)

    async def record(
        self, bot: str | None, kind: str, actor: str, reason: str, data: Mapping[str, Any]
    ) -> EventRow:
        return await self.events.record(bot, kind, actor, reason, data)

    async def load(self) -> None:
        """Read what must survive a controller restart (health records, backoffs)."""
        await self.healer.load(self.store)

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

    def _notify(self, body: dict[str, Any]) -> None:
        """A bot was given up on: tell the admin webhook, without waiting for it."""
        if self._webhook is not None:
            self._spawn_task(self._webhook(body), f"webhook for {body['bot']}")

    def _bus_event(self, message: protocol.Event) -> None:
        """A bot published an event: delivered at once, persisted when PostgreSQL takes it."""
        self.events.note(
            message.bot, "bus", f"bot:{message.bot}", message.topic, {"data": message.data}
        )
        if self._publish is not None:
            self._publish(message.topic, message)

    def subscribers(self, topic: str) -> list[str]:
        """Bots whose spec subscribes them to ``topic`` (as of the last pass)."""
        return [name for name, topics in self._subscriptions.items() if topic in topics]

    # ---------------------------------------------------------- reconciling

    async def run(self, stopping: asyncio.Event) -> None:
        """Reconcile every second, and at once when nudged, until ``stopping`` is set;
        meanwhile, write what the outbox holds."""
        helpers = [
            asyncio.create_task(
                self.events.keep_writing(stopping, self._nudge.set), name="outbox writer"
            ),
            asyncio.create_task(self._sample_until(stopping), name="resource sampler"),
            # A change made through any host's API wakes the loop at once (LISTEN/NOTIFY).
            asyncio.create_task(
                self.store.watch_changes(self._nudge.set, stopping), name="change listener"
            ),
        ]
        try:
            await self._reconcile_until(stopping)
        finally:
            for helper in helpers:
                helper.cancel()
            for helper in helpers:
                with contextlib.suppress(asyncio.CancelledError):
                    await helper

    async def _sample_until(self, stopping: asyncio.Event) -> None:
        """Sample every live bot's process from /proc every SAMPLE_INTERVAL_S."""
        while not stopping.is_set():
            try:
                await self.sample_resources()
            except (OSError, ValueError) as exc:  # /proc said something unexpected: next pass
                log.warning("sampling the bots' /proc failed: %s", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), SAMPLE_INTERVAL_S)

    async def sample_resources(self) -> None:
        """One look at every live bot's process: usage for the API, warnings near limits."""
        pids = {
            name: pid for name in list(self.observer.live) if (pid := self.observer.bot_pid(name))
        }
        known, with_pss = self.resources.plan()
        samples, spent_s = await asyncio.to_thread(timed_read, pids, known, with_pss)
        # As the service user, what only a bot's own user (or root) may read: the keeper's.
        new_pid = any(pid not in known for pid in pids.values())
        samples = await asyncio.to_thread(self.files.fill_usage, samples, with_pss or new_pid)
        self.resources.last_pass_s = spent_s
        # A bot destroyed while /proc was read is forgotten already: not brought back.
        samples = {name: got for name, got in samples.items() if name in self.observer.live}
        self.resources.keep_only(set(samples))
        self.resources.apply(samples, self.clock.monotonic(), self.clock.wall())

    def _near_limit(self, name: str, near: NearLimit) -> None:
        """A bot's process came near a limit: an event (once per crossing), and a log line."""
        log.warning("%s: %s", name, near.reason(), extra={"bot": name, "event": "limit"})
        self.events.note(name, "limit", "resources", near.reason(), near.to_json())

    async def _reconcile_until(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            started = self.clock.monotonic()
            try:
                await self.reconcile()
                self.last_pass_error = None
            except PASS_ERRORS as exc:
                self.last_pass_error = str(exc) or type(exc).__name__
                log.warning("reconcile pass failed: %s", self.last_pass_error)
            self.pass_seconds.observe(self.clock.monotonic() - started)
            self._nudge.clear()
            if self._again:
                self._again = False
                self._nudge.set()
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
            await self.healer.check(self._managed(), status)
        if not fresh:
            raise StoreUnavailable(self.store.unreachable_detail())
        await self._after_pass()
        broken, self._broken = self._broken, {}
        if broken:  # the pass did all else; the status says what it could not
            raise BotFilesRefused(
                "; ".join(f"{name}: {reason}" for name, reason in sorted(broken.items()))
            )

    @contextlib.asynccontextmanager
    async def _acting(self) -> AsyncIterator[None]:
        """The fleet lock, held by whoever acts on circusd and the files; counted."""
        async with self._lock:
            try:
                yield
            finally:
                self._acted += 1

    async def _read_desired(self) -> bool:
        """Write what waits, say this host is alive, take the bots placed here that nobody
        holds, then read the bots and defaults; False if PostgreSQL is away."""
        try:
            await self.events.drain()  # what happened first is written first
            await self._beat()
            rows = await self.store.list_bots()
            if await self._claim(rows):
                rows = await self.store.list_bots()
            defaults = await self.store.get_defaults()
        except StoreUnavailable:
            if self.rows is None:
                raise
            return False
        self._restarted_elsewhere(rows)
        self.rows, self.rows_at, self.defaults = rows, self.clock.wall(), defaults
        held = self._held()
        specs = {row.name: effective(row.spec, defaults) for row in held}
        self._specs = specs
        self._subscriptions = {name: spec.subscribe for name, spec in specs.items()}
        self.healer.policies = {name: spec.health for name, spec in specs.items()}
        self.observer.intervals = {
            name: spec.health.heartbeat_interval_s for name, spec in specs.items()
        }
        self.observer.known = {row.name for row in held}
        self._forget_all_but(self.observer.known)
        return True

    # ------------------------------------------------------------- hosts

    async def _beat(self) -> None:
        """This host's heartbeat row: operators (GET /api/v1/hosts) see who is alive."""
        if self.clock.monotonic() >= self._next_beat:
            await self.store.host_seen(self.host, self.api_url)
            self._next_beat = self.clock.monotonic() + HOST_BEAT_S

    async def _claim(self, rows: list[BotRow]) -> bool:
        """Hold every bot placed on this host (or on none yet) that no host holds: the
        database lets one host at a time hold a bot, and only its holder runs it."""
        claimed = False
        for row in rows:
            if row.held_by is not None or row.host not in (None, self.host):
                continue
            taken = await self.store.claim_bot(row.name, self.host)
            if taken is not None:
                log.info("%s: held by this host (%s) now", row.name, self.host)
                await self._no_process_yet(taken)
                claimed = True
        return claimed

    async def _no_process_yet(self, row: BotRow) -> None:
        """A bot just taken has no process here: a state its last holder recorded (one that
        died, or a bot from before hosts) says otherwise; it starts afresh from here."""
        actor = f"host:{self.host}"
        if row.state is BotState.RUNNING:
            reason = f"held by {self.host} now: its process starts here"
            await self.events.transition(row.name, Trigger.RESPAWN, reason, actor)
        elif row.state is BotState.STOPPING:
            reason = f"held by {self.host} now: no process of it runs here"
            await self.events.transition(row.name, Trigger.STOPPED, reason, actor)

    def _held(self) -> list[BotRow]:
        """The bots this host holds, as last read: the only ones it acts on."""
        return [row for row in self.rows or () if row.held_by == self.host]

    def _managed(self) -> list[BotRow]:
        """The held bots as health should see them: one moving away must not run here."""
        return [
            row if row.host == self.host else replace(row, desired="stopped")
            for row in self._held()
        ]

    def _restarted_elsewhere(self, rows: list[BotRow]) -> None:
        """A failed bot of this host was started through another host's API: forget its
        failed process and streak here too, as a local start does."""
        before = {row.name: row.state for row in self.rows or ()}
        for row in rows:
            if (
                row.held_by == self.host
                and before.get(row.name) is BotState.FAILED
                and row.state is not BotState.FAILED
            ):
                self.observer.live.pop(row.name, None)
                self.healer.new_streak(row.name)

    def _require_held(self, row: BotRow) -> None:
        """Only the holder acts on a bot's process (HeldElsewhere, a 409, otherwise)."""
        if row.held_by is None:
            raise Conflict(
                f"{row.name} is placed on host {row.host!r}, whose controller has not taken "
                "it yet (is it running?): nothing runs it now"
            )
        if row.held_by != self.host:
            raise HeldElsewhere(row.name, row.held_by)

    async def _converge(self, status: Mapping[str, str]) -> None:
        rows = self._held()
        self._broken = {}
        if not self._seeded:
            await self._seed_live(rows, status)
        observations = [self._observe(row, status) for row in rows]
        known = {row.name for row in rows}
        loaded = {w.removeprefix("bot-") for w in status if w.startswith("bot-")}
        orphans = sorted((loaded | set(self.files.on_disk())) - known)
        actions = plan(observations, orphans)
        if actions:
            self._broken = await self._apply(actions, {row.name: row for row in rows}, self._specs)
            # A move waits on this host's steps (stopped, then let go of): take the next
            # one at once rather than at the next poll.
            self._again = any(obs.leaving for obs in observations)
            self.rows, self.rows_at = await self.store.list_bots(), self.clock.wall()

    async def _after_pass(self) -> None:
        """Keep changed health records, write what health noted, prune old events."""
        try:
            await self.healer.save(self.store)
            await self.events.drain()
            if self.clock.monotonic() >= self._next_prune:
                self._next_prune = self.clock.monotonic() + PRUNE_INTERVAL_S
                age_s, count = self._event_retention
                pruned = await self.store.prune_events(age_s, count)
                if pruned:
                    log.info("pruned %d old events", pruned)
        except StoreUnavailable as exc:
            log.info("after the pass: %s (the next pass tries again)", exc)

    def _per_bot(self) -> list[dict[str, Any]]:
        return [
            *self.observer.per_bot(),
            *self.healer.per_bot(),
            *self.resources.per_bot(),
            self._subscriptions,
        ]

    def _forget(self, name: str) -> None:
        """Drop everything kept in memory about a bot (it was destroyed), its last read
        row included: a stale answer (PostgreSQL slow or away) must not bring it back."""
        for per_bot in self._per_bot():
            per_bot.pop(name, None)
        if self.rows is not None:
            self.rows = [row for row in self.rows if row.name != name]

    def _forget_all_but(self, known: set[str]) -> None:
        """Per-bot memory holds only bots that exist (another controller may destroy one)."""
        for per_bot in self._per_bot():
            for name in [n for n in per_bot if n not in known]:
                del per_bot[name]

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
            if row.name in self.observer.live or status.get(name) != "active":
                continue
            with contextlib.suppress(SupervisorError):
                pids = await self.supervisor.pids(name)
                if pids:
                    # Its generation is unknown until it speaks; it is not ready either.
                    pid = self.files.process_pid(row.name, pids[0])
                    self.observer.live[row.name] = LiveProcess(pid, -1)
        self._seeded = True

    def _observe(self, row: BotRow, status: Mapping[str, str]) -> Observation:
        return Observation(
            name=row.name,
            desired=row.desired,
            state=row.state,
            generation=row.generation,
            rendered=self.files.rendered(row.name),
            watcher=status.get(watcher_name(row.name)),
            live=self.observer.observed(row.name),
            leaving=row.host != self.host,
        )

    async def _apply(
        self, actions: list[Action], rows: dict[str, BotRow], specs: Mapping[str, EffectiveSpec]
    ) -> dict[str, str]:
        """Run the pass's actions; return the bots whose user or files could not be made
        (name → why), whose later actions were skipped."""
        released: list[str] = []
        orphans: list[str] = []
        # A bot whose user or files could not be made (the keeper refused, useradd
        # failed) keeps its own later actions from running, never the other bots'.
        broken: dict[str, str] = {}
        for action in actions:
            if getattr(action, "name", None) in broken:
                continue
            if isinstance(action, Transition):
                data: dict[str, Any] = {}
                if action.trigger is Trigger.FAIL:
                    live = self.observer.live.get(action.name)
                    fatal_kind = live.fatal_kind if live is not None else None
                    data = {
                        "failure": "plugin" if fatal_kind == "plugin" else FailureKind.AUTH.value
                    }
                await self.events.transition(
                    action.name, action.trigger, action.reason, "reconciler", data
                )
                if action.trigger is Trigger.FAIL:
                    self.healer.failed(action.name, str(data["failure"]), action.reason)
                if action.counts_restart:
                    await self.store.count_restart(action.name)
                if action.trigger in (Trigger.RESPAWN, Trigger.START):
                    live = self.observer.alive(action.name)
                    if live is None:
                        self.observer.live.pop(action.name, None)
                    else:
                        live.replaced_pid = None
            elif isinstance(action, Render):
                row = rows[action.name]
                spec = specs[action.name]
                if self.files.rendered(row.name) is not None:
                    # reload restarts it
                    self.observer.expect_exit(row.name, spec.graceful_timeout_s)
                try:  # fsync: off the event loop
                    await asyncio.to_thread(
                        self.files.write, row.name, row.generation, spec, action.autostart
                    )
                except SystemUserError as exc:
                    broken[row.name] = str(exc) or type(exc).__name__
                    log.error("%s: its user or files could not be made: %s", row.name, exc)
            elif isinstance(action, StartWatcher):
                await self.supervisor.start(watcher_name(action.name))
            elif isinstance(action, StopWatcher):
                self.observer.expect_exit(action.name)
                await self.supervisor.stop(watcher_name(action.name))
            elif isinstance(action, RemoveOrphan):
                log.info("removing %s: this host holds no such bot", action.name)
                self.files.remove_watcher(action.name)
                orphans.append(action.name)
            elif isinstance(action, Release):
                self.files.remove_watcher(action.name)
                released.append(action.name)
            elif isinstance(action, Reload):
                await self.supervisor.reloadconfig()
        for name in released:
            await self._release(name)
        for name in orphans:
            # Destroyed through another host, or held elsewhere now (this host was
            # forgotten): its watcher went with the reload; its config (secrets) goes too.
            await asyncio.to_thread(self.files.remove_private, name)
        return broken

    async def _release(self, name: str) -> None:
        """A bot moved away is stopped here and its watcher gone (the reload above): its
        files, secrets and user go too, then the database lets the new host take it."""
        await asyncio.to_thread(self.files.remove_private, name)
        row = await self.store.release_bot(name, self.host)
        if row is not None:
            log.info("%s: stopped here and let go of, for host %s", name, row.host)
            self._forget(name)

    # ------------------------------------------------------------ operations

    def _require_database(self) -> None:
        """Writes answer 503 at once while PostgreSQL is known to be away."""
        if not self.store.reachable:
            raise StoreUnavailable(self.store.unreachable_detail())

    async def create(self, body: object, actor: str) -> BotRow:
        name, own = validate_create(body)
        host = own.pop("host", None) or self.host
        self._require_database()
        spec = effective(own, await self.store.get_defaults())
        check_runnable(spec)
        desired = "running" if spec.autostart else "stopped"
        await self.store.create_bot(name, own, desired, actor, host)
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
            # The host is a column, not part of the spec; null: this controller's host.
            host: str | None = None
            if _sets_host(body):
                host = own.pop("host", None) or self.host
            defaults = await self.store.get_defaults()
            new = effective(own, defaults)
            check_runnable(new)
            restart = process_view(new) != process_view(effective(row.spec, defaults))
            try:
                await self.store.update_spec(
                    name, own, actor, restart, row.version, None if host == row.host else host
                )
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
                self.observer.live.pop(name, None)
                self.healer.new_streak(name)
                await self.events.transition(name, Trigger.START, "start requested", actor)
        await self._reconcile_quietly()
        return await self.store.get_bot(name)

    async def stop(self, name: str, actor: str) -> BotRow:
        self._require_database()
        async with self._acting():
            row = await self.store.get_bot(name)
            if row.desired != "stopped":
                await self.store.set_desired(name, "stopped", actor, "stop requested")
            if row.state is BotState.FAILED:
                await self.events.transition(name, Trigger.STOP, "stop requested", actor)
        await self._reconcile_quietly()
        # A second pass records `stopped` once circusd says the watcher is down.
        await self._reconcile_quietly()
        return await self.store.get_bot(name)

    async def restart(self, name: str, actor: str) -> BotRow:
        self._require_database()
        row = await self.store.get_bot(name)
        if row.state is BotState.FAILED or row.desired != "running":
            return await self.start(name, actor)
        self._require_held(row)
        async with self._acting():
            row = await self.store.get_bot(name)
            if can(row.state, Trigger.RESPAWN):
                self.observer.expect_exit(name)
                # Not loaded yet: the pass below renders and starts it.
                with contextlib.suppress(WatcherNotFound):
                    await self.supervisor.restart(watcher_name(name))
                self.observer.live.pop(name, None)
                await self.events.transition(name, Trigger.RESPAWN, "restart requested", actor)
                await self.store.count_restart(name)
        await self._reconcile_quietly()
        return await self.store.get_bot(name)

    async def destroy(self, name: str, actor: str) -> None:
        """Stop the bot, remove its watcher, files and private dir; keep its events."""
        self._require_database()
        async with self._acting():
            row = await self.store.get_bot(name)
            if row.held_by not in (None, self.host):
                raise HeldElsewhere(name, row.held_by)
            if row.desired != "stopped":
                await self.store.set_desired(name, "stopped", actor, "destroy requested")
            if can(row.state, Trigger.STOP):
                row = await self.events.transition(name, Trigger.STOP, "destroy requested", actor)
            status = await self.supervisor.status()
            self.observer.expect_exit(name)
            if status.get(watcher_name(name)) == "active":
                await self.supervisor.stop(watcher_name(name))
            self.files.remove_watcher(name)
            await self.supervisor.reloadconfig()
            if can(row.state, Trigger.STOPPED):
                await self.events.transition(name, Trigger.STOPPED, "process stopped", actor)
            await asyncio.to_thread(self.files.remove_private, name)
            self.events.emit(
                await self.store.delete_bot(name, actor, "destroy requested", self.host)
            )
            self._forget(name)

    async def _reconcile_quietly(self) -> None:
        """Run a pass for an operation whose change is stored: a database away or a
        circusd busy with another command (a bot's graceful stop holds its one lock)
        only delays it, the loop converges; a circusd that does not answer is a 503."""
        try:
            await self.reconcile()
        except StoreUnavailable:
            log.warning("a pass after an operation found PostgreSQL away; the loop retries")
        except SystemUserError as exc:  # stored all the same; the status shows the pass error
            self.last_pass_error = str(exc) or type(exc).__name__
            log.error("a pass after an operation failed: %s; the loop retries", exc)
        except (SupervisorError, SupervisorUnavailable) as exc:
            cause = exc if isinstance(exc, SupervisorError) else exc.__cause__
            if isinstance(cause, CircusError) and cause.busy:
                log.info("a pass after an operation found circusd busy; the loop retries")
                return
            raise SupervisorUnavailable(f"circusd did not answer: {exc}") from exc

    # ------------------------------------------------------------------ hosts

    async def hosts(self) -> list[dict[str, Any]]:
        """Every host sharing the database (its heartbeat), with the bots it holds."""
        rows = await self.store.list_bots()
        found = await self.store.list_hosts()
        names = {host.name for host in found}
        views = [
            {
                "name": host.name,
                "started_at": host.started_at.isoformat(),
                "seen_at": host.seen_at.isoformat(),
                "silent_s": round(host.silent_s, 2),
                "alive": host.silent_s < HOST_ALIVE_S,
                "api_url": host.api_url,
                "held": sum(1 for row in rows if row.held_by == host.name),
                "placed": sum(1 for row in rows if row.host == host.name),
                "answering": host.name == self.host,
            }
            for host in found
        ]
        return views + [
            # Placed on a host that never came (a typo, a host not yet set up).
            {
                "name": name,
                "started_at": None,
                "seen_at": None,
                "silent_s": None,
                "alive": False,
                "api_url": "",
                "held": sum(1 for row in rows if row.held_by == name),
                "placed": sum(1 for row in rows if row.host == name),
                "answering": False,
            }
            for name in sorted({row.host for row in rows if row.host} - names)
        ]

    async def forget_host(self, name: str, actor: str) -> list[str]:
        """The operator says ``name`` is gone for good: nobody holds its bots any more, so
        each starts on its own host (move them first). Refused while it was seen lately."""
        self._require_database()
        if name == self.host:
            raise Conflict(f"{name} is the host answering: it cannot forget itself")
        released = await self.store.forget_host(name, self.forget_after_s, actor)
        await self._reconcile_quietly()
        return released

    # ------------------------------------------------------------------ views

    def view(self, row: BotRow) -> dict[str, Any]:
        """A bot as the API shows it; its process only as this host sees it: a bot another
        host holds shows what its controller recorded, no live fields (``local`` false)."""
        if row.held_by != self.host:
            return bot_view(row, None, None, HealthRecord(), self.clock.wall(), local=False)
        return bot_view(
            row,
            self.observer.alive(row.name),
            self.observer.live.get(row.name),
            self.healer.record(row.name),
            self.clock.wall(),
            self.resources.usage.get(row.name),
        )

    def stale_marks(self) -> dict[str, Any]:
        """What marks an answer made from memory: the rows are as of their last read."""
        return stale_marks(self.rows_at)

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
