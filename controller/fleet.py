"""The fleet: the controller's core, between the API, the store, circusd and the bus.

Operations change desired state in PostgreSQL, then run a reconcile pass; the
loop runs passes on a timer and whenever a bot says something that matters.
Bus messages update an in-memory view of each bot's live process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import psutil

from botrunner import protocol
from controller.botfiles import BotFiles
from controller.circus import Supervisor, SupervisorError, WatcherNotFound
from controller.errors import SupervisorUnavailable
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
)
from controller.spec import (
    check_runnable,
    effective,
    public_view,
    validate_create,
    validate_patch,
)
from controller.states import BotState, Trigger, can, transition
from controller.store import BotRow, EventRow, PgStore

log = logging.getLogger("tgfleet.fleet")

RECONCILE_INTERVAL_S = 1.0


def watcher_name(bot: str) -> str:
    return f"bot-{bot}"


@dataclass
class LiveProcess:
    """What we know of a bot's current process, from the bus (mutable, in memory only)."""

    pid: int
    generation: int
    ready: bool = False
    fatal: str | None = None
    replaced_pid: int | None = None
    last_seen: float = field(default_factory=time.monotonic)
    # From the latest ready or heartbeat, whichever came last.
    telegram: dict[str, Any] = field(default_factory=lambda: {"connected": False})
    rss_mb: float | None = None

    def alive_now(self) -> bool:
        return bool(psutil.pid_exists(self.pid))

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
    ) -> None:
        self.store = store
        self.supervisor = supervisor
        self.files = files
        self.live: dict[str, LiveProcess] = {}
        self._lock = asyncio.Lock()
        self._nudge = asyncio.Event()
        self._listeners: set[EventListener] = set()
        self._publish = publish
        self.last_pass_error: str | None = None
        self._subscriptions: dict[str, tuple[str, ...]] = {}

    # ----------------------------------------------------------- the bus side

    def on_message(self, message: protocol.Message) -> None:
        """A decoded bus message from a bot (the bus already checked its sender)."""
        now = time.monotonic()
        current = self.live.get(message.bot)
        if isinstance(message, protocol.Ready | protocol.Heartbeat):
            if current is None or current.pid != message.pid:
                replaced = current.pid if current is not None else None
                current = LiveProcess(message.pid, message.generation, replaced_pid=replaced)
                self.live[message.bot] = current
                self._nudge.set()
            current.generation = message.generation
            current.last_seen = now
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
                    self._nudge.set()
        elif isinstance(message, protocol.Fatal):
            if current is None or current.pid != message.pid:
                current = LiveProcess(message.pid, message.generation)
                self.live[message.bot] = current
            current.fatal = message.error
            current.last_seen = now
            self._nudge.set()
        elif isinstance(message, protocol.Event):
            asyncio.get_running_loop().create_task(self._bus_event(message))

    async def _bus_event(self, message: protocol.Event) -> None:
        row = await self.store.add_event(
            message.bot, "bus", f"bot:{message.bot}", message.topic, {"data": message.data}
        )
        self._emit(row)
        if self._publish is not None:
            self._publish(message.topic, message)

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

    # ---------------------------------------------------------- reconciling

    async def run(self, stopping: asyncio.Event) -> None:
        """Reconcile every second, and at once when nudged, until ``stopping`` is set."""
        while not stopping.is_set():
            try:
                await self.reconcile()
                self.last_pass_error = None
            except (SupervisorError, OSError) as exc:
                self.last_pass_error = str(exc)
                log.warning("reconcile pass failed: %s", exc)
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
        async with self._lock:
            await self._reconcile_locked()

    async def _reconcile_locked(self) -> None:
        rows = await self.store.list_bots()
        defaults = await self.store.get_defaults()
        self._subscriptions = {row.name: effective(row.spec, defaults).subscribe for row in rows}
        try:
            status = await self.supervisor.status()
        except SupervisorError as exc:
            raise SupervisorUnavailable(f"circusd did not answer: {exc}") from exc
        observations = [self._observe(row, status) for row in rows]
        known = {row.name for row in rows}
        loaded = {w.removeprefix("bot-") for w in status if w.startswith("bot-")}
        orphans = sorted((loaded | set(self.files.on_disk())) - known)
        actions = plan(observations, orphans)
        if actions:
            await self._apply(actions, {row.name: row for row in rows})

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

    async def _apply(self, actions: list[Action], rows: dict[str, BotRow]) -> None:
        defaults: dict[str, Any] | None = None
        for action in actions:
            if isinstance(action, Transition):
                await self._transition(action.name, action.trigger, action.reason, "reconciler")
                if action.counts_restart:
                    await self.store.count_restart(action.name)
                if action.trigger in (Trigger.RESPAWN, Trigger.START):
                    live = self.live.get(action.name)
                    if live is not None and not live.alive_now():
                        self.live.pop(action.name, None)
                    elif live is not None:
                        live.replaced_pid = None
            elif isinstance(action, Render):
                if defaults is None:
                    defaults = await self.store.get_defaults()
                row = rows[action.name]
                spec = effective(row.spec, defaults)
                self.files.write(row.name, row.generation, spec, action.autostart)
            elif isinstance(action, StartWatcher):
                await self.supervisor.start(watcher_name(action.name))
            elif isinstance(action, StopWatcher):
                await self.supervisor.stop(watcher_name(action.name))
            elif isinstance(action, RemoveOrphan):
                log.info("removing files of %s, which has no bot row", action.name)
                self.files.remove_watcher(action.name)
            elif isinstance(action, Reload):
                await self.supervisor.reloadconfig()

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
        updated = await self.store.set_state(name, new_state, actor, reason, data)
        events = await self.store.recent_events(name, 1)
        if events:
            self._emit(events[-1])
        log.info("%s: %s -> %s (%s)", name, row.state, new_state, reason)
        return updated

    # ------------------------------------------------------------ operations

    async def create(self, body: object, actor: str) -> BotRow:
        name, own = validate_create(body)
        spec = effective(own, await self.store.get_defaults())
        check_runnable(spec)
        desired = "running" if spec.autostart else "stopped"
        await self.store.create_bot(name, own, desired, actor)
        await self._reconcile_quietly()
        return await self.store.get_bot(name)

    async def update(self, name: str, body: object, actor: str) -> BotRow:
        row = await self.store.get_bot(name)
        own = validate_patch(row.spec, body)
        check_runnable(effective(own, await self.store.get_defaults()))
        await self.store.update_spec(name, own, actor)
        await self._reconcile_quietly()
        return await self.store.get_bot(name)

    async def start(self, name: str, actor: str) -> BotRow:
        async with self._lock:
            row = await self.store.get_bot(name)
            if row.desired != "running":
                await self.store.set_desired(name, "running", actor, "start requested")
            if row.state is BotState.FAILED:
                self.live.pop(name, None)
                await self._transition(name, Trigger.START, "start requested", actor)
        await self._reconcile_quietly()
        return await self.store.get_bot(name)

    async def stop(self, name: str, actor: str) -> BotRow:
        async with self._lock:
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
        row = await self.store.get_bot(name)
        if row.state is BotState.FAILED or row.desired != "running":
            return await self.start(name, actor)
        async with self._lock:
            row = await self.store.get_bot(name)
            if can(row.state, Trigger.RESPAWN):
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
        async with self._lock:
            row = await self.store.get_bot(name)
            if row.desired != "stopped":
                await self.store.set_desired(name, "stopped", actor, "destroy requested")
            if can(row.state, Trigger.STOP):
                row = await self._transition(name, Trigger.STOP, "destroy requested", actor)
            status = await self.supervisor.status()
            if status.get(watcher_name(name)) == "active":
                await self.supervisor.stop(watcher_name(name))
            self.files.remove_watcher(name)
            await self.supervisor.reloadconfig()
            if can(row.state, Trigger.STOPPED):
                await self._transition(name, Trigger.STOPPED, "process stopped", actor)
            self.files.remove_private(name)
            self.live.pop(name, None)
            await self.store.delete_bot(name, actor, "destroy requested")
            events = await self.store.recent_events(name, 1)
            if events:
                self._emit(events[-1])

    async def _reconcile_quietly(self) -> None:
        """Run a pass for an operation; circusd trouble becomes a 503, the loop retries."""
        try:
            await self.reconcile()
        except SupervisorError as exc:
            raise SupervisorUnavailable(f"circusd did not answer: {exc}") from exc

    # ------------------------------------------------------------------ views

    def view(self, row: BotRow) -> dict[str, Any]:
        live = self.live.get(row.name)
        pid: int | None = None
        uptime: float | None = None
        rss: float | None = None
        telegram: dict[str, Any] = {"connected": False, "last_update_age_s": None}
        if live is not None and live.alive_now():
            pid = live.pid
            try:
                uptime = max(0.0, time.time() - psutil.Process(pid).create_time())
            except psutil.Error:
                uptime = None
            rss = live.rss_mb
            telegram = {"last_update_age_s": None, **live.telegram}
        if row.state not in (BotState.RUNNING, BotState.STARTING):
            telegram["connected"] = False
        return {
            "name": row.name,
            "state": row.state.value,
            "desired": row.desired,
            "since": row.state_since.isoformat(),
            "reason": row.state_reason,
            "pid": pid,
            "uptime_s": round(uptime, 1) if uptime is not None else None,
            "restarts": row.restarts,
            "rss_mb": rss,
            "telegram": telegram,
            "generation": row.generation,
            "watcher": watcher_name(row.name),
            "spec": public_view(row.spec),
        }

    async def get(self, name: str) -> dict[str, Any]:
        return self.view(await self.store.get_bot(name))

    async def list(self) -> list[dict[str, Any]]:
        return [self.view(row) for row in await self.store.list_bots()]
