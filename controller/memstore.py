"""The Store in memory: the fake shipped beside ``PgStore``, for tests of the core.

It behaves as ``PgStore`` on a real PostgreSQL does, as far as its callers can see
(tests/store_contract.py runs the same cases against both): the same rows, the
same events written by the same calls, the same errors, JSON values copied as
``jsonb`` copies them, timestamps from an injected ``Clock``. Each call is one
step, as each of ``PgStore``'s is one transaction.

``away = True`` stands for a database that stopped answering: every call then
raises StoreUnavailable, and the store stays unreachable after ``away`` is set
back until ``ping`` gets through, exactly as ``PgStore`` behaves.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from controller.access import SCOPES, Scope
from controller.clock import Clock, SystemClock
from controller.errors import (
    BotNotFound,
    Conflict,
    HeldElsewhere,
    NotFound,
    StoreUnavailable,
    VersionMismatch,
)
from controller.secretbox import SecretBox, map_secrets, new_key
from controller.states import BotState
from controller.store import (
    DEFAULT_TIMEOUT_S,
    PRUNE_BATCH,
    TOKEN_USE_RESOLUTION_S,
    BotRow,
    EventRow,
    HostRow,
    TokenRow,
    claimed,
    forget_refusal,
    forgotten,
    released,
    update_data,
    update_reason,
)

log = logging.getLogger("tgfleet.store")

# The bots table's CHECK constraints (controller/migrations/0001_initial.sql).
_NAME = re.compile(r"[a-z][a-z0-9-]{0,31}")
_DESIRED = ("running", "stopped")


def _jsonb_order(value: Any) -> Any:
    if isinstance(value, dict):
        # jsonb keeps an object's keys shorter first, then bytewise.
        keys = sorted(value, key=lambda key: (len(key.encode()), key.encode()))
        return {key: _jsonb_order(value[key]) for key in keys}
    if isinstance(value, list):
        return [_jsonb_order(item) for item in value]
    return value


def _jsonb(value: Mapping[str, Any]) -> dict[str, Any]:
    """A fresh copy of ``value`` as a jsonb column gives it back (tuples become lists,
    keys reordered); ValueError/TypeError for what JSON cannot hold, as asyncpg's
    encoder refuses it."""
    copied: dict[str, Any] = _jsonb_order(json.loads(json.dumps(dict(value), allow_nan=False)))
    return copied


class InMemoryStore:
    """A ``Store`` in dicts and lists; no I/O. ``away``: the database stops answering."""

    #: What a call sees while ``away`` (what PgStore reports for a stalled server).
    away_error = "no answer (the in-memory store is away)"

    def __init__(
        self,
        clock: Clock | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        secrets: SecretBox | None = None,
    ) -> None:
        self.clock: Clock = clock or SystemClock()
        #: Secrets are kept sealed here too, as PgStore keeps them (a fresh key if none).
        self.secrets = secrets or SecretBox((new_key(),), "memory")
        self.timeout_s = timeout_s
        #: Set it to make every call fail with StoreUnavailable, as a stalled database.
        self.away = False
        self.unreachable_since: float | None = None
        self.unreachable_error: str | None = None
        self._bots: dict[str, BotRow] = {}
        self._events: list[EventRow] = []  # by id
        self._tokens: list[tuple[TokenRow, str]] = []  # (row, token_sha256) by id
        self._health: dict[str, dict[str, Any]] = {}
        self._defaults: dict[str, Any] = {}
        self._hosts: dict[str, tuple[datetime, datetime, str]] = {}  # started, seen, api url
        self._watchers: list[Callable[[], None]] = []
        # Sequences, as bigserial/serial: a value taken by a refused insert is not reused.
        self._event_ids = itertools.count(1)
        self._token_ids = itertools.count(1)

    # ------------------------------------------------------- reachability

    def _answer(self, probing: bool = False) -> None:
        """Raise StoreUnavailable as PgStore's guard does: at once while known
        unreachable (``ping`` excepted), and on reaching a database that is away."""
        if self.unreachable_since is not None and not probing:
            raise StoreUnavailable(self.unreachable_detail())
        if self.away:
            self.mark_unreachable(self.away_error)
            raise StoreUnavailable(self.unreachable_detail())

    def mark_unreachable(self, error: str) -> None:
        if self.unreachable_since is None:
            self.unreachable_since = self.clock.wall()
            log.warning("PostgreSQL unreachable: %s", error)
        self.unreachable_error = error

    def unreachable_detail(self) -> str:
        since = self.unreachable_since or self.clock.wall()
        at = datetime.fromtimestamp(since, UTC).isoformat(timespec="seconds")
        return f"PostgreSQL unreachable since {at}: {self.unreachable_error}"

    @property
    def reachable(self) -> bool:
        return self.unreachable_since is None

    async def ping(self) -> None:
        """Try the database even while it is known unreachable; it is reachable again if so."""
        self._answer(probing=True)
        self.unreachable_since = None
        self.unreachable_error = None

    # -------------------------------------------------------------- rows

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self.clock.wall(), UTC)

    def _out(self, row: BotRow) -> BotRow:
        return replace(row, spec=self.secrets.open_all(_jsonb(row.spec)))

    def _bot(self, name: str) -> BotRow:
        try:
            return self._bots[name]
        except KeyError:
            raise BotNotFound(name) from None

    def _event(
        self,
        at: datetime,
        bot: str | None,
        kind: str,
        actor: str,
        from_state: str | None,
        to_state: str | None,
        reason: str,
        data: Mapping[str, Any],
    ) -> EventRow:
        row = EventRow(
            next(self._event_ids), at, bot, kind, actor, from_state, to_state, reason, _jsonb(data)
        )
        self._events.append(row)
        return replace(row, data=_jsonb(row.data))

    # -------------------------------------------------------------- bots

    async def migrate(self) -> list[str]:
        """Nothing to migrate: the schema is the code."""
        self._answer()
        return []

    async def close(self) -> None:
        """Nothing to close."""

    async def list_bots(self) -> list[BotRow]:
        self._answer()
        return [self._out(self._bots[name]) for name in sorted(self._bots)]

    async def get_bot(self, name: str) -> BotRow:
        self._answer()
        return self._out(self._bot(name))

    def _changed(self) -> None:
        """A bot or the defaults changed: tell the watchers (PgStore's NOTIFY)."""
        for on_change in list(self._watchers):
            on_change()

    async def create_bot(
        self, name: str, spec: Mapping[str, Any], desired: str, actor: str, host: str | None = None
    ) -> BotRow:
        self._answer()
        if not _NAME.fullmatch(name):
            raise ValueError(f"a bot name must match {_NAME.pattern}, not {name!r}")
        if desired not in _DESIRED:
            raise ValueError(f"desired must be one of {_DESIRED}, not {desired!r}")
        stored = self.secrets.seal_all(_jsonb(spec))
        if name in self._bots:
            raise Conflict(f"a bot named {name!r} already exists")
        now = self._now()
        row = BotRow(
            name=name,
            spec=stored,
            desired=desired,
            state=BotState.CONFIGURING,
            state_since=now,
            state_reason="",
            generation=1,
            restarts=0,
            created_at=now,
            updated_at=now,
            version=1,
            host=host,
        )
        self._bots[name] = row
        self._event(now, name, "created", actor, None, "configuring", "created", {})
        self._changed()
        return self._out(row)

    async def update_spec(
        self,
        name: str,
        spec: Mapping[str, Any],
        actor: str,
        restart: bool,
        version: int,
        host: str | None = None,
    ) -> BotRow:
        """Store a bot's new spec, made from its spec at ``version`` (VersionMismatch if it
        changed since); a new generation (its process restarts) when ``restart``; a new
        ``host`` (not None) moves it there."""
        self._answer()
        stored = self.secrets.seal_all(_jsonb(spec))
        old = self._bot(name)
        if old.version != version:
            raise VersionMismatch(name, version, old.version)
        now = self._now()
        row = replace(
            old,
            spec=stored,
            generation=old.generation + (1 if restart else 0),
            version=old.version + 1,
            updated_at=now,
            host=old.host if host is None else host,
        )
        self._bots[name] = row
        self._event(
            now,
            name,
            "updated",
            actor,
            None,
            None,
            update_reason(restart, old.host, row.host),
            update_data(row.generation, restart, row.version, old.host, row.host),
        )
        self._changed()
        return self._out(row)

    async def set_desired(self, name: str, desired: str, actor: str, reason: str) -> BotRow:
        self._answer()
        old = self._bot(name)
        if desired not in _DESIRED:
            raise ValueError(f"desired must be one of {_DESIRED}, not {desired!r}")
        now = self._now()
        row = replace(old, desired=desired, updated_at=now)
        self._bots[name] = row
        self._event(now, name, "desired", actor, None, None, reason, {"desired": desired})
        self._changed()
        return self._out(row)

    async def set_state(
        self,
        name: str,
        expected: BotState,
        state: BotState,
        actor: str,
        reason: str,
        data: Mapping[str, Any] | None = None,
    ) -> tuple[BotRow, EventRow]:
        """Move a bot from ``expected`` to ``state`` (Conflict if it is no longer
        ``expected``); the bot's new row and the transition's event row."""
        self._answer()
        old = self._bot(name)
        if old.state != expected:
            raise Conflict(f"{name} is {old.state.value} now, no longer {expected}")
        now = self._now()
        row = replace(old, state=state, state_since=now, state_reason=reason, updated_at=now)
        self._bots[name] = row
        event = self._event(
            now, name, "transition", actor, expected.value, state.value, reason, data or {}
        )
        self._changed()
        return self._out(row), event

    async def count_restart(self, name: str) -> None:
        """One more restart of the bot; nothing if there is no such bot (as an UPDATE)."""
        self._answer()
        if name in self._bots:
            old = self._bots[name]
            self._bots[name] = replace(old, restarts=old.restarts + 1)
        self._changed()

    async def delete_bot(
        self, name: str, actor: str, reason: str, host: str | None = None
    ) -> EventRow:
        """Delete a bot (its events stay); the event row of its destruction. With
        ``host``, only a bot that no other host holds (Conflict otherwise)."""
        self._answer()
        old = self._bot(name)
        if host is not None and old.held_by not in (None, host):
            raise HeldElsewhere(name, old.held_by)
        del self._bots[name]
        self._health.pop(name, None)
        event = self._event(
            self._now(), name, "transition", actor, old.state.value, "destroyed", reason, {}
        )
        self._changed()
        return event

    # ------------------------------------------------------------- hosts

    async def claim_bot(self, name: str, host: str) -> BotRow | None:
        """``host`` holds the bot from now on, if it is placed there (or nowhere yet) and
        no host holds it; its new row, else None."""
        self._answer()
        old = self._bots.get(name)
        if old is None or old.held_by is not None or (old.host or host) != host:
            return None
        now = self._now()
        row = replace(old, held_by=host, host=host, updated_at=now)
        self._bots[name] = row
        self._event(now, name, "host", f"host:{host}", None, None, *claimed(host))
        self._changed()
        return self._out(row)

    async def release_bot(self, name: str, host: str) -> BotRow | None:
        """``host`` lets go of a bot placed elsewhere (its process there is gone); its new
        row, else None (``host`` did not hold it, or it is placed on ``host`` again)."""
        self._answer()
        old = self._bots.get(name)
        if old is None or old.held_by != host or old.host == host:
            return None
        now = self._now()
        row = replace(old, held_by=None, updated_at=now)
        self._bots[name] = row
        self._event(now, name, "host", f"host:{host}", None, None, *released(host, row.host))
        self._changed()
        return self._out(row)

    async def host_seen(self, host: str, api_url: str) -> None:
        """The controller of ``host`` is alive (its heartbeat)."""
        self._answer()
        now = self._now()
        started = self._hosts[host][0] if host in self._hosts else now
        self._hosts[host] = (started, now, api_url)

    async def list_hosts(self) -> list[HostRow]:
        self._answer()
        now = self._now()
        return [
            HostRow(name, started, seen, (now - seen).total_seconds(), api_url)
            for name, (started, seen, api_url) in sorted(self._hosts.items())
        ]

    async def forget_host(self, host: str, silent_for_s: float, actor: str) -> list[str]:
        """The operator says ``host`` is gone: every bot it holds is let go, its heartbeat
        row goes; the names of those bots. Conflict if it was seen within
        ``silent_for_s``; NotFound if it is unknown and holds nothing."""
        self._answer()
        now = self._now()
        seen = self._hosts.get(host)
        if seen is not None:
            silent_s = (now - seen[1]).total_seconds()
            if silent_s < silent_for_s:
                raise Conflict(forget_refusal(host, silent_s, silent_for_s))
        names = sorted(name for name, row in self._bots.items() if row.held_by == host)
        if seen is None and not names:
            raise NotFound(f"no host named {host!r}")
        self._hosts.pop(host, None)
        for name in names:
            self._bots[name] = replace(self._bots[name], held_by=None, updated_at=now)
            self._event(now, name, "host", actor, None, None, *forgotten(host))
        if names:
            self._changed()
        return names

    async def watch_changes(self, on_change: Callable[[], None], stopping: asyncio.Event) -> None:
        """Call ``on_change`` on every change of a bot or the defaults (and once at the
        start), until ``stopping`` is set."""
        self._watchers.append(on_change)
        try:
            on_change()
            await stopping.wait()
        finally:
            self._watchers.remove(on_change)

    # ------------------------------------------------------------ events

    async def add_event(
        self, bot: str | None, kind: str, actor: str, reason: str, data: Mapping[str, Any]
    ) -> EventRow:
        self._answer()
        return self._event(self._now(), bot, kind, actor, None, None, reason, data)

    async def events(self, bot: str | None, after_id: int = 0, limit: int = 100) -> list[EventRow]:
        self._answer()
        if limit < 0:
            raise ValueError(f"LIMIT must not be negative, not {limit}")
        found = (e for e in self._events if e.id > after_id and (bot is None or e.bot == bot))
        return [replace(e, data=_jsonb(e.data)) for e in itertools.islice(found, limit)]

    async def recent_events(self, bot: str, limit: int) -> list[EventRow]:
        self._answer()
        if limit < 0:
            raise ValueError(f"LIMIT must not be negative, not {limit}")
        found = [e for e in self._events if e.bot == bot]
        return [replace(e, data=_jsonb(e.data)) for e in found[max(0, len(found) - limit) :]]

    async def prune_events(self, max_age_s: float, max_count: int) -> int:
        """Delete events older than ``max_age_s`` or beyond the newest ``max_count``,
        oldest first, a batch of each per call; how many were deleted."""
        self._answer()
        cutoff = self._now() - timedelta(seconds=max_age_s)
        by_age = [e.id for e in self._events if e.at < cutoff][:PRUNE_BATCH]
        aged = set(by_age)
        self._events = [e for e in self._events if e.id not in aged]
        # PgStore's two statements are not one transaction: the first stays done.
        if max_count < 1:
            raise ValueError(f"OFFSET must not be negative (max_count {max_count})")
        by_count: list[int] = []
        if len(self._events) >= max_count:
            keep_from = self._events[-max_count].id  # the newest max_count stay
            by_count = [e.id for e in self._events if e.id < keep_from][:PRUNE_BATCH]
        beyond = set(by_count)
        self._events = [e for e in self._events if e.id not in beyond]
        return len(by_age) + len(by_count)

    # ---------------------------------------------------------- defaults

    async def get_defaults(self) -> dict[str, Any]:
        self._answer()
        return self.secrets.open_all(_jsonb(self._defaults))

    async def set_defaults(
        self, value: Mapping[str, Any], actor: str, restart: Sequence[str]
    ) -> None:
        """Replace the fleet defaults; the bots in ``restart`` get a new generation."""
        self._answer()
        stored = self.secrets.seal_all(_jsonb(value))
        now = self._now()
        self._defaults = stored
        for name in set(restart) & self._bots.keys():
            old = self._bots[name]
            self._bots[name] = replace(old, generation=old.generation + 1, updated_at=now)
        self._changed()
        self._event(
            now,
            None,
            "defaults",
            actor,
            None,
            None,
            "fleet defaults changed",
            {"restarted": sorted(restart)},
        )

    # ------------------------------------------------------------ health

    async def load_health(self) -> dict[str, dict[str, Any]]:
        self._answer()
        return {name: _jsonb(record) for name, record in self._health.items()}

    async def save_health(self, name: str, record: Mapping[str, Any]) -> None:
        """Keep a bot's health record; nothing is kept for a bot that is gone."""
        self._answer()
        stored = _jsonb(record)
        if name in self._bots:
            self._health[name] = stored

    # ------------------------------------------------------------ tokens

    def _insert_token(
        self, name: str, token_sha256: str, scope: Scope, expires_at: datetime | None
    ) -> TokenRow | None:
        """INSERT … ON CONFLICT DO NOTHING: None when the name or the hash is taken."""
        token_id = next(self._token_ids)  # taken even when the insert does nothing
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, not {scope!r}")
        if any(row.name == name or sha == token_sha256 for row, sha in self._tokens):
            return None
        row = TokenRow(token_id, name, self._now(), None, scope, expires_at, None)
        self._tokens.append((row, token_sha256))
        return row

    async def add_token(
        self, name: str, token_sha256: str, scope: Scope, expires_at: datetime | None
    ) -> TokenRow:
        self._answer()
        row = self._insert_token(name, token_sha256, scope, expires_at)
        if row is None:
            raise Conflict(f"a token named {name!r} already exists")
        return row

    async def ensure_token(self, name: str, token_sha256: str) -> None:
        """Register an admin token known from disk (<home>/admin.token) if the store
        lacks it."""
        self._answer()
        self._insert_token(name, token_sha256, "admin", None)

    async def list_tokens(self) -> list[TokenRow]:
        self._answer()
        return [row for row, _ in self._tokens]

    async def revoke_token(self, name: str) -> TokenRow:
        """Revoke a token; Conflict if it is the last one that can administer the fleet
        (admin scope, live, unexpired)."""
        self._answer()
        now = self._now()
        admins = [row.name for row, _ in self._tokens if row.can_administer(now)]
        if admins == [name]:
            raise Conflict(
                f"{name!r} is the last token that can administer the fleet; "
                "create another admin token before revoking it"
            )
        for index, (row, sha) in enumerate(self._tokens):
            if row.name == name:
                if row.revoked_at is None:
                    row = replace(row, revoked_at=now)
                    self._tokens[index] = (row, sha)
                return row
        raise NotFound(f"no token named {name!r}")

    async def use_token(self, token_sha256: str) -> TokenRow | None:
        """The token with this hash (revoked or expired ones too), None if there is
        none; a live, unexpired token's last use noted at most once per
        TOKEN_USE_RESOLUTION_S."""
        self._answer()
        now = self._now()
        for index, (row, sha) in enumerate(self._tokens):
            if sha != token_sha256:
                continue
            stale = row.last_used_at is None or row.last_used_at < now - timedelta(
                seconds=TOKEN_USE_RESOLUTION_S
            )
            if row.revoked_at is None and not row.expired(now) and stale:
                row = replace(row, last_used_at=now)
                self._tokens[index] = (row, sha)
            return row
        return None

    # ----------------------------------------------------------- secrets

    def sealed_values(self) -> list[Any]:
        """Every stored secret as it is kept (for tests: none may be clear)."""
        found: list[Any] = []
        for spec in [*(row.spec for row in self._bots.values()), self._defaults]:
            map_secrets(spec, lambda value: found.append(value))
        return found

    async def seal_secrets(self, secrets: SecretBox, rotate: bool) -> int:
        """Seal every stored secret with ``secrets`` (its newest key) and use it from now
        on; how many rows were rewritten (clear ones sealed; sealed ones must open,
        and are sealed again only when ``rotate``)."""
        self._answer()
        change = secrets.reseal_all if rotate else secrets.seal_all
        bots, rewritten = {}, 0
        for name, row in self._bots.items():
            secrets.open_all(row.spec)
            sealed = change(row.spec)
            rewritten += sealed != row.spec
            bots[name] = replace(row, spec=sealed)
        secrets.open_all(self._defaults)
        defaults = change(self._defaults)
        rewritten += defaults != self._defaults
        self._bots, self._defaults, self.secrets = bots, defaults, secrets
        return rewritten


if TYPE_CHECKING:
    from controller.store import PgStore, Store

    # mypy --strict checks here that both stores are a Store (it does not check tests/).
    def _stores(real: PgStore) -> tuple[Store, Store]:
        return real, InMemoryStore()
