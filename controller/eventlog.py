"""The event log: every transition and event a row in PostgreSQL, streamed to listeners.

Writers that may not wait (health, the bus) ``note`` events and ``queue``
transitions; they wait in a bounded outbox and are written in order when the
database answers (``drain``, and ``keep_writing`` in the background). Writers
that answer an API request ``record`` and ``transition`` directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg

from controller.clock import Clock
from controller.errors import StoreUnavailable, TgfleetError
from controller.outbox import DEFAULT_LIMIT, Outbox
from controller.states import Trigger, can, transition
from controller.store import BotRow, EventRow, Store

log = logging.getLogger("tgfleet.eventlog")

#: How often the writer retries the outbox, and pings a database that is away.
WRITER_INTERVAL_S = 0.5
#: A queued write that lands later than this after it was noted says so (``delayed``).
DELAYED_AFTER_S = 1.0

EventListener = Callable[[EventRow], None]


def stamp(at: float | None) -> str | None:
    """Unix seconds as ISO 8601 (UTC), or None."""
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


class EventLog:
    def __init__(self, store: Store, clock: Clock, outbox_limit: int = DEFAULT_LIMIT) -> None:
        self.store = store
        self._clock = clock
        self._listeners: set[EventListener] = set()
        self.outbox: Outbox[Pending] = Outbox(outbox_limit)
        self._wake_writer = asyncio.Event()

    # ------------------------------------------------------------- listeners

    def subscribe(self, listener: EventListener) -> Callable[[], None]:
        self._listeners.add(listener)
        return lambda: self._listeners.discard(listener)

    def emit(self, row: EventRow) -> None:
        for listener in list(self._listeners):
            listener(row)

    # ------------------------------------------------------ writes that wait

    async def record(
        self, bot: str | None, kind: str, actor: str, reason: str, data: Mapping[str, Any]
    ) -> EventRow:
        row = await self.store.add_event(bot, kind, actor, reason, data)
        self.emit(row)
        if kind != "bus":  # bus traffic is the bots' own: one line each would drown the rest
            failure = data.get("failure")
            log.info(
                "%s (by %s)",
                reason,
                actor,
                extra={
                    "bot": bot,
                    "event": kind,
                    "failure": failure if isinstance(failure, str) else None,
                },
            )
        return row

    async def transition(
        self,
        name: str,
        trigger: Trigger,
        reason: str,
        actor: str,
        data: Mapping[str, Any] | None = None,
    ) -> BotRow:
        """Move a bot by ``trigger`` from the state it is in now; its event is emitted."""
        row = await self.store.get_bot(name)
        new_state = transition(row.state, trigger)
        updated, event = await self.store.set_state(name, row.state, new_state, actor, reason, data)
        self.emit(event)
        failure = (data or {}).get("failure")
        log.info(
            "%s: %s -> %s (%s)",
            name,
            row.state,
            new_state,
            reason,
            extra={
                "bot": name,
                "event": "state",
                "failure": failure if isinstance(failure, str) else None,
            },
        )
        return updated

    # ------------------------------------------------- writes that do not wait

    def note(
        self, bot: str | None, kind: str, actor: str, reason: str, data: Mapping[str, Any]
    ) -> None:
        """An event written without waiting: queued, written in order when PostgreSQL takes it."""
        self.queue(PendingEvent(bot, kind, actor, reason, dict(data), self._clock.wall()))

    def queue_transition(
        self,
        name: str,
        trigger: Trigger,
        actor: str,
        reason: str,
        data: Mapping[str, Any],
        *,
        count_restart: bool = False,
    ) -> None:
        """A transition already acted on, written when PostgreSQL takes it."""
        self.queue(
            PendingTransition(
                name, trigger, actor, reason, dict(data), self._clock.wall(), count_restart
            )
        )

    def queue(self, write: Pending) -> None:
        self.outbox.put(write)
        self._wake_writer.set()

    async def drain(self) -> None:
        """Write what waits in the outbox, in order (StoreUnavailable: it keeps waiting)."""
        await self.outbox.drain(self._write_pending)

    async def _write_pending(self, write: Pending) -> None:
        late = self._clock.wall() - write.noted_at > DELAYED_AFTER_S
        extra = {"delayed": True, "noted_at": stamp(write.noted_at)} if late else {}
        try:
            if isinstance(write, PendingEvent):
                await self.record(
                    write.bot, write.kind, write.actor, write.reason, {**write.data, **extra}
                )
                return
            current = await self.store.get_bot(write.name)
            if can(current.state, write.trigger):
                await self.transition(
                    write.name, write.trigger, write.reason, write.actor, {**write.data, **extra}
                )
                if write.count_restart:
                    await self.store.count_restart(write.name)
            else:  # overtaken meanwhile: keep what health did as an event
                await self.record(
                    write.name,
                    "health",
                    write.actor,
                    f"{write.reason} (state left {current.state}: a {write.trigger} "
                    "does not apply to it)",
                    {**write.data, **extra},
                )
        except StoreUnavailable:
            raise  # it stays first in line
        except (TgfleetError, asyncpg.PostgresError) as exc:
            # The database answered no (the bot is gone, a state moved under us): a retry
            # would get the same answer and hold up everything behind it.
            log.warning("dropped a queued write %r: %s", write, exc)

    async def keep_writing(self, stopping: asyncio.Event, back: Callable[[], None]) -> None:
        """Drain the outbox as writes come; while PostgreSQL is away, ping it until it
        answers, then call ``back``."""
        while not stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake_writer.wait(), WRITER_INTERVAL_S)
            self._wake_writer.clear()
            if not self.store.reachable:
                try:
                    await self.store.ping()
                except StoreUnavailable:
                    continue
                back()
            try:
                await self.drain()
            except StoreUnavailable as exc:
                log.info("outbox: %d writes wait: %s", len(self.outbox), exc)
