"""PostgreSQL, and nothing else: bots, events, tokens, fleet defaults, migrations."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from typing import Any, ParamSpec, Protocol, TypeVar

import asyncpg

from controller.access import Scope
from controller.errors import (
    BotNotFound,
    Conflict,
    HeldElsewhere,
    NotFound,
    StoreUnavailable,
    VersionMismatch,
)
from controller.secretbox import SecretBox
from controller.states import BotState

log = logging.getLogger("tgfleet.store")

#: The default bound on every query and pool acquire (the setting `database_timeout_s`).
DEFAULT_TIMEOUT_S = 2.0
#: Migrations run once at startup and may rewrite tables: they get longer.
MIGRATE_TIMEOUT_S = 120.0
#: Events deleted per statement when pruning (each statement stays short).
PRUNE_BATCH = 5000
#: The channel every controller LISTENs on (controller/migrations/0005_hosts.sql).
CHANGES_CHANNEL = "tgfleet_changes"
#: Between tries to LISTEN again after the connection was lost, seconds.
LISTEN_RETRY_S = 1.0

# How long the current caller waits per call, when it is in a hurry (the API sets it).
_patience: ContextVar[float | None] = ContextVar("tgfleet_database_patience", default=None)


@contextlib.contextmanager
def patience(seconds: float) -> Iterator[None]:
    """Within this block, a store call waits at most ``seconds`` (never more than the timeout)."""
    token = _patience.set(seconds)
    try:
        yield
    finally:
        _patience.reset(token)


# One number for every tgfleet controller: only one applies migrations at a time.
_MIGRATION_LOCK = 0x7467666C  # "tgfl"


@dataclass(frozen=True)
class BotRow:
    name: str
    spec: Mapping[str, Any]
    desired: str
    state: BotState
    state_since: datetime
    state_reason: str
    generation: int
    restarts: int
    created_at: datetime
    updated_at: datetime
    version: int = 1  # bumped by every spec change (the API's ETag)
    #: The host whose controller should run it (None: from before hosts; adopted by the
    #: first controller that looks).
    host: str | None = None
    #: The host whose controller may have a process of it now (None: no process anywhere).
    held_by: str | None = None


@dataclass(frozen=True)
class HostRow:
    """A controller's heartbeat row: one per host sharing the database."""

    name: str
    started_at: datetime
    seen_at: datetime
    #: Seconds since it was last seen, by the database's clock, as of the read.
    silent_s: float
    api_url: str


@dataclass(frozen=True)
class EventRow:
    id: int
    at: datetime
    bot: str | None
    kind: str
    actor: str
    from_state: str | None
    to_state: str | None
    reason: str
    data: Mapping[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "at": self.at.isoformat(),
            "bot": self.bot,
            "kind": self.kind,
            "actor": self.actor,
            "from_state": self.from_state,
            "to_state": self.to_state,
            "reason": self.reason,
            "data": dict(self.data),
        }


@dataclass(frozen=True)
class TokenRow:
    id: int
    name: str
    created_at: datetime
    revoked_at: datetime | None
    scope: Scope
    expires_at: datetime | None
    last_used_at: datetime | None

    def expired(self, now: datetime) -> bool:
        return self.expires_at is not None and self.expires_at <= now

    def can_administer(self, now: datetime) -> bool:
        """Live, unexpired and of admin scope: it can still create and revoke tokens."""
        return self.scope == "admin" and self.revoked_at is None and not self.expired(now)


#: A token's last use is written at most this often (not a write per request).
TOKEN_USE_RESOLUTION_S = 60


class Store(Protocol):
    """What the controller needs of its database: ``PgStore``, and ``InMemoryStore``
    (controller/memstore.py) for tests. A lost or stalled database makes every call
    raise StoreUnavailable; it stays unreachable until ``ping`` gets an answer."""

    #: The bound on every call, in seconds (the setting ``database_timeout_s``).
    timeout_s: float
    #: Wall time since when the database has not answered; None while it does.
    unreachable_since: float | None
    #: What the last failed call saw; None while the database answers.
    unreachable_error: str | None
    #: Seals the declared secrets of specs and defaults before they are stored.
    secrets: SecretBox

    @property
    def reachable(self) -> bool: ...
    def unreachable_detail(self) -> str: ...
    async def ping(self) -> None: ...

    async def list_bots(self) -> list[BotRow]: ...
    async def get_bot(self, name: str) -> BotRow: ...
    async def create_bot(
        self, name: str, spec: Mapping[str, Any], desired: str, actor: str, host: str | None = None
    ) -> BotRow: ...
    async def update_spec(
        self,
        name: str,
        spec: Mapping[str, Any],
        actor: str,
        restart: bool,
        version: int,
        host: str | None = None,
    ) -> BotRow: ...
    async def set_desired(self, name: str, desired: str, actor: str, reason: str) -> BotRow: ...
    async def set_state(
        self,
        name: str,
        expected: BotState,
        state: BotState,
        actor: str,
        reason: str,
        data: Mapping[str, Any] | None,
    ) -> tuple[BotRow, EventRow]: ...
    async def count_restart(self, name: str) -> None: ...
    async def delete_bot(
        self, name: str, actor: str, reason: str, host: str | None = None
    ) -> EventRow: ...
    async def claim_bot(self, name: str, host: str) -> BotRow | None: ...
    async def release_bot(self, name: str, host: str) -> BotRow | None: ...
    async def host_seen(self, host: str, api_url: str) -> None: ...
    async def list_hosts(self) -> list[HostRow]: ...
    async def forget_host(self, host: str, silent_for_s: float, actor: str) -> list[str]: ...
    async def watch_changes(
        self, on_change: Callable[[], None], stopping: asyncio.Event
    ) -> None: ...
    async def add_event(
        self, bot: str | None, kind: str, actor: str, reason: str, data: Mapping[str, Any]
    ) -> EventRow: ...
    async def events(self, bot: str | None, after_id: int, limit: int) -> list[EventRow]: ...
    async def recent_events(self, bot: str, limit: int) -> list[EventRow]: ...
    async def prune_events(self, max_age_s: float, max_count: int) -> int: ...
    async def get_defaults(self) -> dict[str, Any]: ...
    async def set_defaults(
        self, value: Mapping[str, Any], actor: str, restart: Sequence[str]
    ) -> None: ...
    async def load_health(self) -> dict[str, dict[str, Any]]: ...
    async def save_health(self, name: str, record: Mapping[str, Any]) -> None: ...
    async def add_token(
        self, name: str, token_sha256: str, scope: Scope, expires_at: datetime | None
    ) -> TokenRow: ...
    async def ensure_token(self, name: str, token_sha256: str) -> None: ...
    async def list_tokens(self) -> list[TokenRow]: ...
    async def revoke_token(self, name: str) -> TokenRow: ...
    async def use_token(self, token_sha256: str) -> TokenRow | None: ...
    async def seal_secrets(self, secrets: SecretBox, rotate: bool) -> int: ...


def _bot(row: asyncpg.Record, secrets: SecretBox) -> BotRow:
    return BotRow(
        name=row["name"],
        spec=secrets.open_all(row["spec"]),
        desired=row["desired"],
        state=BotState(row["state"]),
        state_since=row["state_since"],
        state_reason=row["state_reason"],
        generation=row["generation"],
        restarts=row["restarts"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        version=row["version"],
        host=row["host"],
        held_by=row["held_by"],
    )


def _host(row: asyncpg.Record) -> HostRow:
    return HostRow(
        name=row["name"],
        started_at=row["started_at"],
        seen_at=row["seen_at"],
        silent_s=float(row["silent_s"]),
        api_url=row["api_url"],
    )


# What the host events say: one wording for both stores.


def claimed(host: str) -> tuple[str, dict[str, Any]]:
    return f"{host} holds it now (its controller runs it)", {"held_by": host}


def released(host: str, placed: str | None) -> tuple[str, dict[str, Any]]:
    return (
        f"{host} let go of it (its process there is gone) for {placed}",
        {"released_by": host, "host": placed},
    )


def forgotten(host: str) -> tuple[str, dict[str, Any]]:
    return f"{host} was forgotten by the operator: nobody holds it now", {"forgotten": host}


def forget_refusal(host: str, silent_s: float, silent_for_s: float) -> str:
    return (
        f"{host} was seen {silent_s:.0f} s ago: it may still run its bots; forget a host only "
        f"once it is gone (silent for at least {silent_for_s:g} s)"
    )


def update_reason(restart: bool, old_host: str | None, new_host: str | None) -> str:
    if old_host != new_host:
        return f"moved from {old_host} to {new_host}"
    return "spec changed" if restart else "spec changed; the process keeps running"


def update_data(
    generation: int, restart: bool, version: int, old_host: str | None, new_host: str | None
) -> dict[str, Any]:
    data: dict[str, Any] = {"generation": generation, "restart": restart, "version": version}
    if old_host != new_host:
        data["moved"] = {"from": old_host, "to": new_host}
    return data


def _event(row: asyncpg.Record) -> EventRow:
    return EventRow(
        id=row["id"],
        at=row["at"],
        bot=row["bot"],
        kind=row["kind"],
        actor=row["actor"],
        from_state=row["from_state"],
        to_state=row["to_state"],
        reason=row["reason"],
        data=row["data"],
    )


def _token(row: asyncpg.Record) -> TokenRow:
    return TokenRow(
        id=row["id"],
        name=row["name"],
        created_at=row["created_at"],
        revoked_at=row["revoked_at"],
        scope=row["scope"],
        expires_at=row["expires_at"],
        last_used_at=row["last_used_at"],
    )


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


_INSERT_EVENT = """
    INSERT INTO events (bot, kind, actor, from_state, to_state, reason, data)
    VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING *
"""


def migrations() -> list[tuple[int, str, str]]:
    """(version, name, sql) of every migration shipped, in order."""
    found = []
    for entry in resources.files("controller.migrations").iterdir():
        if entry.name.endswith(".sql"):
            version = int(entry.name.split("_", 1)[0])
            found.append((version, entry.name, entry.read_text(encoding="utf-8")))
    return sorted(found)


#: What a lost or refused database connection looks like from asyncpg.
_UNAVAILABLE = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
)

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")


def _guarded(name: str, method: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """Bound a store call in time; translate a lost or stalled database into StoreUnavailable.

    While the database is known unreachable, calls fail at once (only ``ping`` tries
    it), so that nobody queues up behind a stalled server.
    """
    probing = name == "ping"

    @functools.wraps(method)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        store = args[0]
        assert isinstance(store, PgStore)
        if store.unreachable_since is not None and not probing:
            raise StoreUnavailable(store.unreachable_detail())
        limit = store.call_timeout(MIGRATE_TIMEOUT_S if name == "migrate" else None)
        try:
            async with asyncio.timeout(limit):
                return await method(*args, **kwargs)
        except TimeoutError as exc:
            store.mark_unreachable(f"no answer within {limit:g} s")
            raise StoreUnavailable(store.unreachable_detail()) from exc
        except _UNAVAILABLE as exc:
            store.mark_unreachable(str(exc) or type(exc).__name__)
            raise StoreUnavailable(store.unreachable_detail()) from exc

    return wrapper


def _translating(cls: type[T]) -> type[T]:
    for name, member in list(vars(cls).items()):
        public = not name.startswith("_") and name not in ("connect", "close", "watch_changes")
        if inspect.iscoroutinefunction(member) and public:
            setattr(cls, name, _guarded(name, member))
    return cls


@_translating
class PgStore:
    """The Store on PostgreSQL through an asyncpg pool (a lost database: StoreUnavailable)."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        secrets: SecretBox,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        dsn: str | None = None,
    ) -> None:
        self._pool = pool
        self._dsn = dsn  # for the LISTEN connection (watch_changes)
        self.secrets = secrets
        self.timeout_s = timeout_s
        #: Wall time since when the database has not answered; None while it does.
        self.unreachable_since: float | None = None
        self.unreachable_error: str | None = None

    @classmethod
    async def connect(
        cls,
        dsn: str,
        secrets: SecretBox,
        *,
        timeout: float = 10.0,
        query_timeout: float = DEFAULT_TIMEOUT_S,
    ) -> PgStore:
        """A pool on ``dsn``: ``timeout`` to connect, ``query_timeout`` for every query."""
        try:
            pool = await asyncpg.create_pool(
                dsn,
                min_size=1,
                max_size=4,
                timeout=timeout,  # asyncpg's pool `timeout` is the connect timeout
                command_timeout=query_timeout,  # the default timeout of every query
                init=_init_connection,
            )
        except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
            raise StoreUnavailable(f"cannot connect to PostgreSQL: {exc}") from exc
        return cls(pool, secrets, query_timeout, dsn)

    async def close(self) -> None:
        try:
            await asyncio.wait_for(self._pool.close(), self.timeout_s)
        except TimeoutError:
            self._pool.terminate()  # a stalled server cannot say goodbye

    # ------------------------------------------------------- reachability

    def call_timeout(self, longer: float | None = None) -> float:
        """How long this call may wait: the timeout, or less when the caller is in a hurry."""
        hurry = _patience.get()
        limit = longer if longer is not None else self.timeout_s
        return limit if hurry is None else min(limit, hurry)

    def mark_unreachable(self, error: str) -> None:
        if self.unreachable_since is None:
            self.unreachable_since = time.time()
            log.warning("PostgreSQL unreachable: %s", error)
        self.unreachable_error = error

    def unreachable_detail(self) -> str:
        since = self.unreachable_since or time.time()
        at = datetime.fromtimestamp(since, UTC).isoformat(timespec="seconds")
        return f"PostgreSQL unreachable since {at}: {self.unreachable_error}"

    @property
    def reachable(self) -> bool:
        return self.unreachable_since is None

    async def ping(self) -> None:
        """Try the database even while it is known unreachable; it is reachable again if so."""
        async with self._connection() as conn:
            await conn.fetchval("SELECT 1")
        if self.unreachable_since is not None:
            log.info("PostgreSQL answers again after %.1f s", time.time() - self.unreachable_since)
        self.unreachable_since = None
        self.unreachable_error = None

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[asyncpg.Connection]:
        """A pooled connection; one whose query was cut short is closed, never reused.

        A query cancelled on a stalled server leaves its connection waiting for the
        cancel request's answer; terminating it frees the pool at once, and new
        connections are made when the server answers again.
        """
        conn = await self._pool.acquire()
        try:
            yield conn
        except (asyncio.CancelledError, *_UNAVAILABLE):
            conn.terminate()
            raise
        finally:
            # Shielded inside asyncpg; a reset that does not come back closes the connection.
            await self._pool.release(conn, timeout=self.timeout_s)

    async def _fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        async with self._connection() as conn:
            rows: list[asyncpg.Record] = await conn.fetch(query, *args)
            return rows

    async def _fetchrow(self, query: str, *args: Any) -> asyncpg.Record | None:
        async with self._connection() as conn:
            return await conn.fetchrow(query, *args)

    async def _fetchval(self, query: str, *args: Any) -> Any:
        async with self._connection() as conn:
            return await conn.fetchval(query, *args)

    async def _execute(self, query: str, *args: Any) -> str:
        async with self._connection() as conn:
            status: str = await conn.execute(query, *args)
            return status

    # ------------------------------------------------------------- schema

    async def migrate(self) -> list[str]:
        """Apply the migrations not yet applied, each in its own transaction; their names."""
        applied: list[str] = []
        async with self._connection() as conn:
            await conn.execute(
                "SELECT pg_advisory_lock($1)", _MIGRATION_LOCK, timeout=MIGRATE_TIMEOUT_S
            )
            try:
                await conn.execute(
                    """CREATE TABLE IF NOT EXISTS schema_migrations (
                        version integer PRIMARY KEY, name text NOT NULL,
                        applied_at timestamptz NOT NULL DEFAULT now())"""
                )
                done = {
                    r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")
                }
                for version, name, sql in migrations():
                    if version in done:
                        continue
                    async with conn.transaction():
                        await conn.execute(sql, timeout=MIGRATE_TIMEOUT_S)
                        await conn.execute(
                            "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                            version,
                            name,
                        )
                    applied.append(name)
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1)", _MIGRATION_LOCK)
        return applied

    async def list_bots(self) -> list[BotRow]:
        rows = await self._fetch("SELECT * FROM bots ORDER BY name")
        return [_bot(r, self.secrets) for r in rows]

    async def get_bot(self, name: str) -> BotRow:
        row = await self._fetchrow("SELECT * FROM bots WHERE name = $1", name)
        if row is None:
            raise BotNotFound(name)
        return _bot(row, self.secrets)

    async def create_bot(
        self, name: str, spec: Mapping[str, Any], desired: str, actor: str, host: str | None = None
    ) -> BotRow:
        async with self._connection() as conn, conn.transaction():
            row = await conn.fetchrow(
                """INSERT INTO bots (name, spec, desired, state, host) VALUES ($1, $2, $3, $4, $5)
                   ON CONFLICT (name) DO NOTHING RETURNING *""",
                name,
                self.secrets.seal_all(spec),
                desired,
                BotState.CONFIGURING.value,
                host,
            )
            if row is None:
                raise Conflict(f"a bot named {name!r} already exists")
            await conn.execute(
                _INSERT_EVENT, name, "created", actor, None, "configuring", "created", {}
            )
        return _bot(row, self.secrets)

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
        async with self._connection() as conn, conn.transaction():
            old_host = await conn.fetchval(
                "SELECT host FROM bots WHERE name = $1 AND version = $2 FOR UPDATE", name, version
            )
            row = await conn.fetchrow(
                """UPDATE bots SET spec = $2, generation = generation + $3,
                          version = version + 1, updated_at = now(), host = coalesce($5, host)
                   WHERE name = $1 AND version = $4 RETURNING *""",
                name,
                self.secrets.seal_all(spec),
                1 if restart else 0,
                version,
                host,
            )
            if row is None:
                current = await conn.fetchval("SELECT version FROM bots WHERE name = $1", name)
                if current is None:
                    raise BotNotFound(name)
                raise VersionMismatch(name, version, current)
            await conn.execute(
                _INSERT_EVENT,
                name,
                "updated",
                actor,
                None,
                None,
                update_reason(restart, old_host, row["host"]),
                update_data(row["generation"], restart, row["version"], old_host, row["host"]),
            )
        return _bot(row, self.secrets)

    async def set_desired(self, name: str, desired: str, actor: str, reason: str) -> BotRow:
        async with self._connection() as conn, conn.transaction():
            row = await conn.fetchrow(
                "UPDATE bots SET desired = $2, updated_at = now() WHERE name = $1 RETURNING *",
                name,
                desired,
            )
            if row is None:
                raise BotNotFound(name)
            await conn.execute(
                _INSERT_EVENT, name, "desired", actor, None, None, reason, {"desired": desired}
            )
        return _bot(row, self.secrets)

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
        async with self._connection() as conn, conn.transaction():
            row = await conn.fetchrow(
                """UPDATE bots SET state = $3, state_since = now(), state_reason = $4,
                   updated_at = now() WHERE name = $1 AND state = $2 RETURNING *""",
                name,
                expected.value,
                state.value,
                reason,
            )
            if row is None:
                current = await conn.fetchval("SELECT state FROM bots WHERE name = $1", name)
                if current is None:
                    raise BotNotFound(name)
                raise Conflict(f"{name} is {current} now, no longer {expected}")
            event = await conn.fetchrow(
                _INSERT_EVENT,
                name,
                "transition",
                actor,
                expected.value,
                state.value,
                reason,
                dict(data or {}),
            )
        return _bot(row, self.secrets), _event(event)

    async def count_restart(self, name: str) -> None:
        await self._execute("UPDATE bots SET restarts = restarts + 1 WHERE name = $1", name)

    async def delete_bot(
        self, name: str, actor: str, reason: str, host: str | None = None
    ) -> EventRow:
        """Delete a bot (its events stay); the event row of its destruction. With
        ``host``, only a bot that no other host holds (Conflict otherwise)."""
        async with self._connection() as conn, conn.transaction():
            old = await conn.fetchrow(
                """DELETE FROM bots WHERE name = $1
                   AND ($2::text IS NULL OR held_by IS NULL OR held_by = $2)
                   RETURNING state""",
                name,
                host,
            )
            if old is None:
                holder = await conn.fetchrow("SELECT held_by FROM bots WHERE name = $1", name)
                if holder is None:
                    raise BotNotFound(name)
                raise HeldElsewhere(name, holder["held_by"])
            await conn.execute("DELETE FROM bot_health WHERE name = $1", name)
            event = await conn.fetchrow(
                _INSERT_EVENT, name, "transition", actor, old["state"], "destroyed", reason, {}
            )
        return _event(event)

    # ------------------------------------------------------------- hosts

    async def claim_bot(self, name: str, host: str) -> BotRow | None:
        """``host`` holds the bot from now on, if it is placed there (or nowhere yet) and
        no host holds it; its new row, else None."""
        async with self._connection() as conn, conn.transaction():
            row = await conn.fetchrow(
                """UPDATE bots SET held_by = $2, host = coalesce(host, $2), updated_at = now()
                   WHERE name = $1 AND held_by IS NULL AND coalesce(host, $2) = $2
                   RETURNING *""",
                name,
                host,
            )
            if row is None:
                return None
            await conn.execute(
                _INSERT_EVENT, name, "host", f"host:{host}", None, None, *claimed(host)
            )
        return _bot(row, self.secrets)

    async def release_bot(self, name: str, host: str) -> BotRow | None:
        """``host`` lets go of a bot placed elsewhere (its process there is gone); its new
        row, else None (``host`` did not hold it, or it is placed on ``host`` again)."""
        async with self._connection() as conn, conn.transaction():
            row = await conn.fetchrow(
                """UPDATE bots SET held_by = NULL, updated_at = now()
                   WHERE name = $1 AND held_by = $2 AND host IS DISTINCT FROM $2 RETURNING *""",
                name,
                host,
            )
            if row is None:
                return None
            await conn.execute(
                _INSERT_EVENT,
                name,
                "host",
                f"host:{host}",
                None,
                None,
                *released(host, row["host"]),
            )
        return _bot(row, self.secrets)

    async def host_seen(self, host: str, api_url: str) -> None:
        """The controller of ``host`` is alive (its heartbeat, by the database's clock)."""
        await self._execute(
            """INSERT INTO hosts (name, api_url) VALUES ($1, $2)
               ON CONFLICT (name) DO UPDATE SET seen_at = now(), api_url = $2""",
            host,
            api_url,
        )

    async def list_hosts(self) -> list[HostRow]:
        rows = await self._fetch(
            """SELECT *, extract(epoch FROM now() - seen_at) AS silent_s
               FROM hosts ORDER BY name"""
        )
        return [_host(r) for r in rows]

    async def forget_host(self, host: str, silent_for_s: float, actor: str) -> list[str]:
        """The operator says ``host`` is gone: every bot it holds is let go (another host may
        start it), its heartbeat row goes; the names of those bots. Conflict if it was
        seen within ``silent_for_s``; NotFound if it is unknown and holds nothing."""
        async with self._connection() as conn, conn.transaction():
            seen = await conn.fetchrow(
                """SELECT extract(epoch FROM now() - seen_at) AS silent_s
                   FROM hosts WHERE name = $1 FOR UPDATE""",
                host,
            )
            if seen is not None and float(seen["silent_s"]) < silent_for_s:
                raise Conflict(forget_refusal(host, float(seen["silent_s"]), silent_for_s))
            names = [
                r["name"]
                for r in await conn.fetch(
                    """UPDATE bots SET held_by = NULL, updated_at = now() WHERE held_by = $1
                       RETURNING name""",
                    host,
                )
            ]
            if seen is None and not names:
                raise NotFound(f"no host named {host!r}")
            await conn.execute("DELETE FROM hosts WHERE name = $1", host)
            for name in sorted(names):
                await conn.execute(_INSERT_EVENT, name, "host", actor, None, None, *forgotten(host))
        return sorted(names)

    async def watch_changes(self, on_change: Callable[[], None], stopping: asyncio.Event) -> None:
        """Call ``on_change`` whenever any controller changes a bot or the fleet defaults
        (LISTEN on a connection of its own, made again when lost), and once on every
        (re)connection, for what changed meanwhile; until ``stopping`` is set. A stalled
        server only delays the news: the reconcile loop polls anyway."""
        if self._dsn is None:
            await stopping.wait()
            return
        while not stopping.is_set():
            lost = asyncio.Event()
            try:
                conn = await asyncpg.connect(self._dsn, timeout=max(self.timeout_s, 1.0))
            except (*_UNAVAILABLE, asyncpg.PostgresError) as exc:
                log.debug("LISTEN: cannot connect (%s); polling meanwhile", exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopping.wait(), LISTEN_RETRY_S)
                continue
            try:
                conn.add_termination_listener(lambda _conn, lost=lost: lost.set())
                await conn.add_listener(CHANGES_CHANNEL, lambda *_args: on_change())
                on_change()
                waiters = [asyncio.ensure_future(e.wait()) for e in (stopping, lost)]
                try:
                    await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for waiter in waiters:
                        waiter.cancel()
            except (*_UNAVAILABLE, asyncpg.PostgresError) as exc:
                log.debug("LISTEN connection lost: %s", exc)
            finally:
                conn.terminate()

    async def add_event(
        self, bot: str | None, kind: str, actor: str, reason: str, data: Mapping[str, Any]
    ) -> EventRow:
        row = await self._fetchrow(_INSERT_EVENT, bot, kind, actor, None, None, reason, dict(data))
        return _event(row)

    async def events(self, bot: str | None, after_id: int = 0, limit: int = 100) -> list[EventRow]:
        if bot is None:
            rows = await self._fetch(
                "SELECT * FROM events WHERE id > $1 ORDER BY id LIMIT $2", after_id, limit
            )
        else:
            rows = await self._fetch(
                "SELECT * FROM events WHERE bot = $1 AND id > $2 ORDER BY id LIMIT $3",
                bot,
                after_id,
                limit,
            )
        return [_event(r) for r in rows]

    async def recent_events(self, bot: str, limit: int) -> list[EventRow]:
        """A bot's newest ``limit`` events, oldest first."""
        rows = await self._fetch(
            """SELECT * FROM (SELECT * FROM events WHERE bot = $1 ORDER BY id DESC LIMIT $2) AS t
               ORDER BY id""",
            bot,
            limit,
        )
        return [_event(r) for r in rows]

    async def prune_events(self, max_age_s: float, max_count: int) -> int:
        """Delete events older than ``max_age_s`` or beyond the newest ``max_count``,
        oldest first, a batch per statement; how many were deleted."""
        async with self._connection() as conn:
            by_age = await conn.execute(
                """DELETE FROM events WHERE id IN (
                       SELECT id FROM events WHERE at < now() - make_interval(secs => $1)
                       ORDER BY id LIMIT $2)""",
                max_age_s,
                PRUNE_BATCH,
            )
            by_count = await conn.execute(
                """DELETE FROM events WHERE id IN (
                       SELECT id FROM events
                       WHERE id < (SELECT id FROM events ORDER BY id DESC OFFSET $1 LIMIT 1)
                       ORDER BY id LIMIT $2)""",
                max_count - 1,
                PRUNE_BATCH,
            )
        return int(by_age.split()[-1]) + int(by_count.split()[-1])

    async def get_defaults(self) -> dict[str, Any]:
        value = await self._fetchval("SELECT value FROM fleet_defaults")
        return self.secrets.open_all(value or {})

    async def set_defaults(
        self, value: Mapping[str, Any], actor: str, restart: Sequence[str]
    ) -> None:
        """Replace the fleet defaults; the bots in ``restart`` get a new generation."""
        async with self._connection() as conn, conn.transaction():
            await conn.execute("UPDATE fleet_defaults SET value = $1", self.secrets.seal_all(value))
            await conn.execute(
                """UPDATE bots SET generation = generation + 1, updated_at = now()
                   WHERE name = ANY($1::text[])""",
                list(restart),
            )
            await conn.execute(
                _INSERT_EVENT,
                None,
                "defaults",
                actor,
                None,
                None,
                "fleet defaults changed",
                {"restarted": sorted(restart)},
            )

    async def load_health(self) -> dict[str, dict[str, Any]]:
        rows = await self._fetch("SELECT name, record FROM bot_health")
        return {r["name"]: r["record"] for r in rows}

    async def save_health(self, name: str, record: Mapping[str, Any]) -> None:
        """Keep a bot's health record; nothing is kept for a bot that is gone."""
        await self._execute(
            """INSERT INTO bot_health (name, record)
               SELECT $1, $2 WHERE EXISTS (SELECT 1 FROM bots WHERE name = $1)
               ON CONFLICT (name) DO UPDATE SET record = $2, updated_at = now()""",
            name,
            dict(record),
        )

    async def add_token(
        self, name: str, token_sha256: str, scope: Scope, expires_at: datetime | None
    ) -> TokenRow:
        row = await self._fetchrow(
            """INSERT INTO api_tokens (name, token_sha256, scope, expires_at)
               VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING RETURNING *""",
            name,
            token_sha256,
            scope,
            expires_at,
        )
        if row is None:
            raise Conflict(f"a token named {name!r} already exists")
        return _token(row)

    async def ensure_token(self, name: str, token_sha256: str) -> None:
        """Register an admin token known from disk (<home>/admin.token) if the database
        lacks it."""
        await self._execute(
            """INSERT INTO api_tokens (name, token_sha256, scope) VALUES ($1, $2, 'admin')
               ON CONFLICT DO NOTHING""",
            name,
            token_sha256,
        )

    async def list_tokens(self) -> list[TokenRow]:
        rows = await self._fetch("SELECT * FROM api_tokens ORDER BY id")
        return [_token(r) for r in rows]

    async def revoke_token(self, name: str) -> TokenRow:
        """Revoke a token; Conflict if it is the last one that can administer the fleet
        (admin scope, live, unexpired: nobody could make or revoke tokens after it).
        The live admin tokens are locked, so two revocations at once cannot both pass
        the check and leave none."""
        async with self._connection() as conn, conn.transaction():
            # A concurrent revocation's row is re-checked after it commits (FOR UPDATE).
            admins = await conn.fetch(
                """SELECT name FROM api_tokens WHERE revoked_at IS NULL AND scope = 'admin'
                   AND (expires_at IS NULL OR expires_at > now()) ORDER BY name FOR UPDATE"""
            )
            if [record["name"] for record in admins] == [name]:
                raise Conflict(
                    f"{name!r} is the last token that can administer the fleet; "
                    "create another admin token before revoking it"
                )
            row = await conn.fetchrow(
                """UPDATE api_tokens SET revoked_at = coalesce(revoked_at, now())
                   WHERE name = $1 RETURNING *""",
                name,
            )
        if row is None:
            raise NotFound(f"no token named {name!r}")
        return _token(row)

    async def use_token(self, token_sha256: str) -> TokenRow | None:
        """The token with this hash (revoked or expired ones too: the caller says why
        it refuses), None if there is none. A live, unexpired token's last use is
        noted, at most once per TOKEN_USE_RESOLUTION_S."""
        row = await self._fetchrow(
            """WITH hit AS (SELECT * FROM api_tokens WHERE token_sha256 = $1),
               used AS (
                   UPDATE api_tokens t SET last_used_at = now() FROM hit
                   WHERE t.id = hit.id AND hit.revoked_at IS NULL
                     AND (hit.expires_at IS NULL OR hit.expires_at > now())
                     AND (hit.last_used_at IS NULL
                          OR hit.last_used_at < now() - make_interval(secs => $2))
                   RETURNING t.*)
               SELECT * FROM used UNION ALL
               SELECT * FROM hit WHERE NOT EXISTS (SELECT 1 FROM used)""",
            token_sha256,
            float(TOKEN_USE_RESOLUTION_S),
        )
        return None if row is None else _token(row)

    async def seal_secrets(self, secrets: SecretBox, rotate: bool) -> int:
        """Seal every stored secret with ``secrets`` (its newest key) and use it from now
        on; how many rows were rewritten. Clear values (from before sealing) are sealed;
        sealed ones must open (SecretKeyError if not) and are sealed again only when
        ``rotate``. One transaction: a crash leaves the rows as they were."""
        change = secrets.reseal_all if rotate else secrets.seal_all
        # Readers use the new box from now on: it opens the rows sealed before and those
        # sealed here. Set only after the commit, a pass woken by the commit's NOTIFY
        # would read rows it cannot open.
        previous, self.secrets = self.secrets, secrets
        try:
            return await self._seal_all(secrets, change)
        except BaseException:
            self.secrets = previous
            raise

    async def _seal_all(self, secrets: SecretBox, change: Callable[[Any], Any]) -> int:
        rewritten = 0
        async with self._connection() as conn, conn.transaction():
            bots = await conn.fetch("SELECT name, spec FROM bots ORDER BY name FOR UPDATE")
            for record in bots:
                secrets.open_all(record["spec"])  # every key must still open
                sealed = change(record["spec"])
                if sealed != record["spec"]:
                    await conn.execute(
                        "UPDATE bots SET spec = $2 WHERE name = $1", record["name"], sealed
                    )
                    rewritten += 1
            defaults = await conn.fetchval("SELECT value FROM fleet_defaults FOR UPDATE")
            secrets.open_all(defaults)
            sealed = change(defaults)
            if sealed != defaults:
                await conn.execute("UPDATE fleet_defaults SET value = $1", sealed)
                rewritten += 1
        return rewritten
