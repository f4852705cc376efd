"""Telegram-aware health: what counts as a failure, and what is done about it.

``assess`` is pure: one bot's vitals (what its process, circusd and its heartbeats
show now), its health record (kept in PostgreSQL, so a restarted controller
remembers a backoff) and its policy go in; the new record and the actions come
out. The fleet applies the actions. DESIGN.md's health table, made code:

| observed                                   | action                                   |
|--------------------------------------------|------------------------------------------|
| process exited                             | Circus respawns; > N exits in a window → failed |
| no heartbeat for heartbeat_timeout_s       | kill (a hung process cannot drain); Circus respawns |
| Telegram unreachable for disconnect_grace_s| graceful restart, exponential backoff with jitter |
| FloodWait                                  | reported, never a restart                |
| credentials refused (fatal on the bus)     | failed at once (the reconciler), webhook |
| RSS above memory_soft_limit_mb             | graceful restart before the rlimit kills it |
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from botspec.spec import Health


class FailureKind(StrEnum):
    CRASH = "crash"
    CRASH_LOOP = "crash_loop"
    HUNG = "hung"
    TELEGRAM = "telegram_unreachable"
    FLOOD_WAIT = "flood_wait"
    AUTH = "auth"
    MEMORY = "memory"


#: A bot's health settings (``health`` of its effective spec, declared in
#: botspec.spec): the controller reads its own keys, the bot process the others.
HealthPolicy = Health


def backoff_s(policy: HealthPolicy, attempt: int, jitter: float) -> float:
    """Delay before restart number ``attempt + 1`` of one failure streak.

    The first restart is immediate; then base, 2 * base, 4 * base... up to the cap,
    each spread by ``jitter`` (a fraction, e.g. ±0.2) so that bots failing
    together do not come back together.
    """
    if attempt <= 0:
        return 0.0
    delay = min(policy.backoff_cap_s, policy.backoff_base_s * 2.0 ** (attempt - 1))
    return max(0.0, delay * (1.0 + jitter))


@dataclass(frozen=True)
class HealthRecord:
    """What health remembers of a bot between passes (and controller restarts)."""

    attempt: int = 0  # restarts in the current failure streak (the backoff exponent)
    next_restart_at: float | None = None  # wall time a scheduled restart is due
    failure_kind: str | None = None  # the open failure, if any
    failure_reason: str = ""
    failure_at: float | None = None  # when the open failure was detected
    healthy_since: float | None = None
    exits: tuple[float, ...] = ()  # unexpected exits within the restart window
    last_kind: str | None = None  # the last failure, open or closed
    last_reason: str = ""
    last_at: float | None = None
    flood_reported_until: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "attempt": self.attempt,
            "next_restart_at": self.next_restart_at,
            "failure_kind": self.failure_kind,
            "failure_reason": self.failure_reason,
            "failure_at": self.failure_at,
            "healthy_since": self.healthy_since,
            "exits": list(self.exits),
            "last_kind": self.last_kind,
            "last_reason": self.last_reason,
            "last_at": self.last_at,
            "flood_reported_until": self.flood_reported_until,
        }

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> HealthRecord:
        known = {k: raw[k] for k in cls.__dataclass_fields__ if k in raw}
        if "exits" in known:
            known["exits"] = tuple(known["exits"])
        return cls(**known)


@dataclass(frozen=True)
class Exit:
    at: float
    pid: int
    code: int


@dataclass(frozen=True)
class Vitals:
    """One bot whose process should run, as observed now (wall-clock seconds)."""

    name: str
    process_up: bool  # circusd has a process for it
    since: float  # when that process (or the wait for it) started
    last_heartbeat_at: float | None  # of the current process
    connected: bool
    disconnected_since: float | None
    rss_mb: float | None
    flood_wait_until: float | None
    exits: tuple[Exit, ...] = field(default=())  # unexpected exits since the last pass


@dataclass(frozen=True)
class Restart:
    name: str
    kind: FailureKind
    reason: str
    kill: bool  # a hung process cannot drain: kill it, Circus respawns it


@dataclass(frozen=True)
class Fail:
    name: str
    kind: FailureKind
    reason: str


@dataclass(frozen=True)
class Note:
    """An event row: a detection, a backoff, a recovery."""

    name: str
    kind: str
    reason: str
    data: Mapping[str, Any] = field(default_factory=dict)


HealthAction = Restart | Fail | Note


def _open(record: HealthRecord, kind: FailureKind, reason: str, at: float) -> HealthRecord:
    """Record a failure; an open one of the same streak keeps its detection time."""
    failure_at = record.failure_at if record.failure_at is not None else at
    return replace(
        record,
        failure_kind=kind.value,
        failure_reason=reason,
        failure_at=failure_at,
        healthy_since=None,
        last_kind=kind.value,
        last_reason=reason,
        last_at=at,
    )


def assess(
    vitals: Vitals,
    record: HealthRecord,
    policy: HealthPolicy,
    now: float,
    jitter: float = 0.0,
) -> tuple[HealthRecord, list[HealthAction]]:
    """The bot's new health record and what to do, from what is observed now."""
    name = vitals.name
    actions: list[HealthAction] = []

    if vitals.exits:
        window_start = now - policy.restart_window_s
        exits = tuple(t for t in record.exits if t >= window_start) + tuple(
            e.at for e in vitals.exits
        )
        last = vitals.exits[-1]
        record = replace(record, exits=exits)
        if len(exits) > policy.max_restarts:
            reason = (
                f"{len(exits)} exits within {policy.restart_window_s:g} s "
                f"(last: pid {last.pid}, exit code {last.code})"
            )
            record = _open(record, FailureKind.CRASH_LOOP, reason, last.at)
            return replace(record, next_restart_at=None), [
                Fail(name, FailureKind.CRASH_LOOP, reason)
            ]
        reason = f"process {last.pid} exited with code {last.code}; Circus respawns it"
        record = _open(record, FailureKind.CRASH, reason, last.at)
        actions.append(Note(name, FailureKind.CRASH.value, reason, {"exit_code": last.code}))

    if not vitals.process_up:
        return record, actions

    flood = vitals.flood_wait_until
    if flood is not None and flood > now and record.flood_reported_until != flood:
        reason = f"Telegram asked for a FloodWait of {flood - now:.0f} s; not restarting for it"
        record = replace(record, flood_reported_until=flood)
        actions.append(Note(name, FailureKind.FLOOD_WAIT.value, reason, {"until": flood}))

    failure: tuple[FailureKind, str] | None = None
    heard = vitals.last_heartbeat_at
    silent_for = now - (heard if heard is not None else vitals.since)
    timeout = policy.heartbeat_timeout_s if heard is not None else policy.startup_timeout_s
    if silent_for > timeout:
        what = "no heartbeat" if heard is not None else "no heartbeat since start"
        failure = (FailureKind.HUNG, f"{what} for {silent_for:.1f} s (timeout {timeout:g} s)")
    elif (
        policy.memory_soft_limit_mb is not None
        and vitals.rss_mb is not None
        and vitals.rss_mb > policy.memory_soft_limit_mb
    ):
        failure = (
            FailureKind.MEMORY,
            f"RSS {vitals.rss_mb:.0f} MB is over the soft limit of {policy.memory_soft_limit_mb:g} MB",
        )
    elif (
        not vitals.connected
        and vitals.disconnected_since is not None
        and now - vitals.disconnected_since >= policy.disconnect_grace_s
    ):
        failure = (
            FailureKind.TELEGRAM,
            f"Telegram unreachable for {now - vitals.disconnected_since:.1f} s "
            f"(grace {policy.disconnect_grace_s:g} s)",
        )

    if failure is not None:
        kind, reason = failure
        if record.failure_kind != kind.value or record.failure_at is None:
            actions.append(Note(name, kind.value, f"detected: {reason}"))
        record = _open(record, kind, reason, now)
        if record.next_restart_at is None:
            delay = backoff_s(policy, record.attempt, jitter)
            record = replace(record, next_restart_at=now + delay)
            if delay > 0:
                actions.append(
                    Note(
                        name,
                        "backoff",
                        f"restart {record.attempt + 1} of this streak in {delay:.1f} s",
                        {"delay_s": round(delay, 3), "attempt": record.attempt + 1},
                    )
                )
        if record.next_restart_at is not None and now >= record.next_restart_at:
            actions.append(Restart(name, kind, reason, kill=kind is FailureKind.HUNG))
            record = replace(record, attempt=record.attempt + 1, next_restart_at=None)
        return record, actions

    healthy = vitals.connected and heard is not None
    if healthy:
        if record.failure_at is not None:
            recovery = max(0.0, now - record.failure_at)
            actions.append(
                Note(
                    name,
                    "recovered",
                    f"healthy again {recovery:.1f} s after {record.failure_kind}",
                    {"failure": record.failure_kind, "recovery_s": round(recovery, 3)},
                )
            )
            record = replace(
                record, failure_kind=None, failure_reason="", failure_at=None, next_restart_at=None
            )
        healthy_since = record.healthy_since if record.healthy_since is not None else now
        record = replace(record, healthy_since=healthy_since)
        if record.attempt and now - healthy_since >= policy.backoff_reset_s:
            record = replace(record, attempt=0)
    return record, actions
