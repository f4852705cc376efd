"""The healer: assess every bot that should be running, and act on what health decides.

The decisions are ``controller.health.assess`` (pure). Here its inputs are
gathered (``vitals_of``) and its actions carried out: restarts and kills go to
circusd at once; what is to be written (notes, transitions) waits in the event
log's outbox, so a stalled PostgreSQL never holds a restart back.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from controller.circus import Supervisor
from controller.clock import Clock
from controller.eventlog import EventLog
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
from controller.observer import LiveProcess, Observer
from controller.reconcile import should_run
from controller.states import BotState, Trigger, can
from controller.store import BotRow, Store

log = logging.getLogger("tgfleet.healer")

#: The kinds that count as failures in /metrics (``tgfleet_bot_failures_total``).
FAILURE_KINDS = frozenset(kind.value for kind in FailureKind)

Webhook = Callable[[dict[str, Any]], Awaitable[None]]


def watcher_name(bot: str) -> str:
    return f"bot-{bot}"


def vitals_of(
    row: BotRow,
    live: LiveProcess | None,
    watcher_status: str | None,
    exits: tuple[Exit, ...],
    since: float,
) -> Vitals:
    """What health assesses of one bot, from what circusd and its heartbeats show."""
    telegram = live.telegram if live is not None else {}
    return Vitals(
        name=row.name,
        process_up=watcher_status == "active",
        since=since,
        last_heartbeat_at=live.last_beat_at if live is not None else None,
        connected=bool(telegram.get("connected")),
        disconnected_since=telegram.get("disconnected_since"),
        rss_mb=live.rss_mb if live is not None else None,
        flood_wait_until=telegram.get("flood_wait_until"),
        exits=exits,
    )


class Healer:
    """Health records (kept in PostgreSQL so a restarted controller remembers a
    backoff), policies from the bots' specs, and the acting on ``assess``."""

    def __init__(
        self,
        supervisor: Supervisor,
        observer: Observer,
        events: EventLog,
        clock: Clock,
        jitter: Callable[[], float],
        *,
        nudge: Callable[[], None],
        notify: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self._supervisor = supervisor
        self._observer = observer
        self._events = events
        self._clock = clock
        self._jitter = jitter
        self._nudge = nudge
        self._notify = notify
        self.records: dict[str, HealthRecord] = {}
        self._saved: dict[str, HealthRecord] = {}
        self.policies: dict[str, HealthPolicy] = {}
        #: Failures per bot and kind since the controller started (for /metrics):
        #: each detection health notes, and each time a bot is given up on.
        self.failures: dict[str, dict[str, int]] = {}
        self._started_at = clock.wall()

    async def load(self, store: Store) -> None:
        """Read what must survive a controller restart (health records, backoffs)."""
        for name, raw in (await store.load_health()).items():
            record = HealthRecord.from_json(raw)
            self.records[name] = self._saved[name] = record

    async def save(self, store: Store) -> None:
        """Write the records that changed since they were last written."""
        for name, record in list(self.records.items()):
            if self._saved.get(name) != record:
                await store.save_health(name, record.to_json())
                self._saved[name] = record

    def record(self, name: str) -> HealthRecord:
        return self.records.get(name, HealthRecord())

    def new_streak(self, name: str) -> None:
        """A bot started by hand after failing: no backoff, no exits counted against it."""
        last = self.record(name)
        self.records[name] = HealthRecord(
            last_kind=last.last_kind, last_reason=last.last_reason, last_at=last.last_at
        )

    async def check(self, rows: list[BotRow], status: Mapping[str, str]) -> None:
        """Assess every bot that should be running; act; keep the records."""
        now = self._clock.wall()
        for row in rows:
            exits = self._observer.take_exits(row.name)
            if row.state not in (BotState.STARTING, BotState.RUNNING) or not should_run(
                row.desired, row.state
            ):
                continue
            since = max(
                self._observer.spawned_at.get(row.name, 0.0),
                self._started_at,
                row.state_since.timestamp(),
            )
            vitals = vitals_of(
                row,
                self._observer.live.get(row.name),
                status.get(watcher_name(row.name)),
                exits,
                since,
            )
            policy = self.policies.get(row.name, HealthPolicy())
            record, actions = assess(vitals, self.record(row.name), policy, now, self._jitter())
            self.records[row.name] = record
            for action in actions:
                await self._act(row, action)

    async def _act(self, row: BotRow, action: Note | Restart | Fail) -> None:
        """Act in circusd at once; what is to be written waits in the outbox."""
        if isinstance(action, Note):
            if action.kind in FAILURE_KINDS:
                self._count_failure(action.name, action.kind)
            self._events.note(
                action.name,
                "health",
                "health",
                action.reason,
                {"failure": action.kind, **action.data},
            )
        elif isinstance(action, Restart):
            name = action.name
            self._observer.expect_exit(name)
            self._observer.restarted(name)
            if action.kill:
                await self._supervisor.kill(watcher_name(name))
            else:
                await self._supervisor.restart(watcher_name(name))
            self._events.queue_transition(
                name,
                Trigger.RESPAWN,
                "health",
                f"{action.kind}: {action.reason}",
                {"failure": action.kind},
                count_restart=True,
            )
        elif isinstance(action, Fail):
            if can(row.state, Trigger.FAIL):
                self.failed(action.name, action.kind, action.reason)
                self._events.queue_transition(
                    action.name, Trigger.FAIL, "health", action.reason, {"failure": action.kind}
                )
            self._nudge()  # the next pass stops its watcher

    def failed(self, name: str, kind: str, reason: str) -> None:
        """A bot is given up on: remember why, tell the admin (``notify``)."""
        now = self._clock.wall()
        self._count_failure(name, kind)
        self.records[name] = HealthRecord(
            last_kind=kind, last_reason=reason, last_at=now, exits=self.record(name).exits
        )
        self._observer.expect_exit(name)
        log.info("%s: failed (%s): %s", name, kind, reason, extra={"bot": name, "failure": kind})
        if self._notify is not None:
            self._notify(
                {"bot": name, "state": "failed", "failure": kind, "reason": reason, "at": now}
            )

    def _count_failure(self, name: str, kind: str) -> None:
        counts = self.failures.setdefault(name, {})
        counts[kind] = counts.get(kind, 0) + 1

    def per_bot(self) -> list[dict[str, Any]]:
        return [self.records, self._saved, self.policies, self.failures]
