"""PostgreSQL, and nothing else: bots, events, tokens, fleet defaults, migrations."""

from __future__ import annotations

import functools
import inspect
import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from typing import Any, ParamSpec, Protocol, TypeVar

import asyncpg

from controller.errors import BotNotFound, Conflict, NotFound, StoreUnavailable
from controller.states import BotState

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


class Store(Protocol):
    """What the controller needs of its database."""

    async def list_bots(self) -> list[BotRow]: ...
    async def get_bot(self, name: str) -> BotRow: ...
    async def create_bot(
        self, name: str, spec: Mapping[str, Any], desired: str, actor: str
    ) -> BotRow: ...
    async def update_spec(
        self, name: str, spec: Mapping[str, Any], actor: str, restart: bool
    ) -> BotRow: ...
    async def set_desired(self, name: str, desired: str, actor: str, reason: str) -> BotRow: ...
    async def set_state(
        self, name: str, state: BotState, actor: str, reason: str, data: Mapping[str, Any] | None
    ) -> tuple[BotRow, EventRow]: ...
    async def count_restart(self, name: str) -> None: ...
    async def delete_bot(self, name: str, actor: str, reason: str) -> EventRow: ...
    async def add_event(
        self, bot: str | None, kind: str, actor: str, reason: str, data: Mapping[str, Any]
    ) -> EventRow: ...
    async def events(self, bot: str | None, after_id: int, limit: int) -> list[EventRow]: ...
    async def get_defaults(self) -> dict[str, Any]: ...
    async def set_defaults(
        self, value: Mapping[str, Any], actor: str, restart: Sequence[str]
    ) -> None: ...
    async def load_health(self) -> dict[str, dict[str, Any]]: ...
    async def save_health(self, name: str, record: Mapping[str, Any]) -> None: ...
    async def add_token(self, name: str, token_sha256: str) -> TokenRow: ...
    async def list_tokens(self) -> list[TokenRow]: ...
    async def revoke_token(self, name: str) -> TokenRow: ...
    async def token_name(self, token_sha256: str) -> str | None: ...


def _bot(row: asyncpg.Record) -> BotRow:
    return BotRow(
        name=row["name"],
        spec=row["spec"],
        desired=row["desired"],
        state=BotState(row["state"]),
        state_since=row["state_since"],
        state_reason=row["state_reason"],
        generation=row["generation"],
        restarts=row["restarts"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


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
    return TokenRow(row["id"], row["name"], row["created_at"], row["revoked_at"])


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


def _unavailable_is_503(method: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """Translate a lost database into StoreUnavailable (the API answers 503)."""

    @functools.wraps(method)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await method(*args, **kwargs)
        except _UNAVAILABLE as exc:
            raise StoreUnavailable(
                f"PostgreSQL is unavailable: {exc or type(exc).__name__}"
            ) from exc

    return wrapper


def _translating(cls: type[T]) -> type[T]:
    for name, member in list(vars(cls).items()):
        if inspect.iscoroutinefunction(member) and not name.startswith("_") and name != "connect":
            setattr(cls, name, _unavailable_is_503(member))
    return cls


T = TypeVar("T")


@_translating
class PgStore:
    """The Store on PostgreSQL through an asyncpg pool (a lost database: StoreUnavailable)."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    @classmethod
    async def connect(cls, dsn: str, *, timeout: float = 10.0) -> PgStore:
        try:
            pool = await asyncpg.create_pool(
                dsn, min_size=1, max_size=4, timeout=timeout, init=_init_connection
            )
        except (OSError, asyncpg.PostgresError) as exc:
            raise StoreUnavailable(f"cannot connect to PostgreSQL: {exc}") from exc
        return cls(pool)

    async def close(self) -> None:
        await self._pool.close()

    async def migrate(self) -> list[str]:
        """Apply the migrations not yet applied, each in its own transaction; their names."""
        applied: list[str] = []
        async with self._pool.acquire() as conn:
            await conn.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK)
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
                        await conn.execute(sql)
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
        rows = await self._pool.fetch("SELECT * FROM bots ORDER BY name")
        return [_bot(r) for r in rows]

    async def get_bot(self, name: str) -> BotRow:
        row = await self._pool.fetchrow("SELECT * FROM bots WHERE name = $1", name)
        if row is None:
            raise BotNotFound(name)
        return _bot(row)

    async def create_bot(
        self, name: str, spec: Mapping[str, Any], desired: str, actor: str
    ) -> BotRow:
        async with self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                """INSERT INTO bots (name, spec, desired, state) VALUES ($1, $2, $3, $4)
                   ON CONFLICT (name) DO NOTHING RETURNING *""",
                name,
                dict(spec),
                desired,
                BotState.CONFIGURING.value,
            )
            if row is None:
                raise Conflict(f"a bot named {name!r} already exists")
            await conn.execute(
                _INSERT_EVENT, name, "created", actor, None, "configuring", "created", {}
            )
        return _bot(row)

    async def update_spec(
        self, name: str, spec: Mapping[str, Any], actor: str, restart: bool
    ) -> BotRow:
        """Store a bot's new spec; a new generation (its process restarts) when ``restart``."""
        async with self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                """UPDATE bots SET spec = $2, generation = generation + $3, updated_at = now()
                   WHERE name = $1 RETURNING *""",
                name,
                dict(spec),
                1 if restart else 0,
            )
            if row is None:
                raise BotNotFound(name)
            await conn.execute(
                _INSERT_EVENT,
                name,
                "updated",
                actor,
                None,
                None,
                "spec changed" if restart else "spec changed; the process keeps running",
                {"generation": row["generation"], "restart": restart},
            )
        return _bot(row)

    async def set_desired(self, name: str, desired: str, actor: str, reason: str) -> BotRow:
        async with self._pool.acquire() as conn, conn.transaction():
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
        return _bot(row)

    async def set_state(
        self,
        name: str,
        state: BotState,
        actor: str,
        reason: str,
        data: Mapping[str, Any] | None = None,
    ) -> tuple[BotRow, EventRow]:
        """Move a bot to ``state``; the bot's new row and the transition's event row."""
        async with self._pool.acquire() as conn, conn.transaction():
            old = await conn.fetchrow("SELECT state FROM bots WHERE name = $1 FOR UPDATE", name)
            if old is None:
                raise BotNotFound(name)
            row = await conn.fetchrow(
                """UPDATE bots SET state = $2, state_since = now(), state_reason = $3,
                   updated_at = now() WHERE name = $1 RETURNING *""",
                name,
                state.value,
                reason,
            )
            event = await conn.fetchrow(
                _INSERT_EVENT,
                name,
                "transition",
                actor,
                old["state"],
                state.value,
                reason,
                dict(data or {}),
            )
        return _bot(row), _event(event)

    async def count_restart(self, name: str) -> None:
        await self._pool.execute("UPDATE bots SET restarts = restarts + 1 WHERE name = $1", name)

    async def delete_bot(self, name: str, actor: str, reason: str) -> EventRow:
        """Delete a bot (its events stay); the event row of its destruction."""
        async with self._pool.acquire() as conn, conn.transaction():
            old = await conn.fetchrow("DELETE FROM bots WHERE name = $1 RETURNING state", name)
            if old is None:
                raise BotNotFound(name)
            await conn.execute("DELETE FROM bot_health WHERE name = $1", name)
            event = await conn.fetchrow(
                _INSERT_EVENT, name, "transition", actor, old["state"], "destroyed", reason, {}
            )
        return _event(event)

    async def add_event(
        self, bot: str | None, kind: str, actor: str, reason: str, data: Mapping[str, Any]
    ) -> EventRow:
        row = await self._pool.fetchrow(
            _INSERT_EVENT, bot, kind, actor, None, None, reason, dict(data)
        )
        return _event(row)

    async def events(self, bot: str | None, after_id: int = 0, limit: int = 100) -> list[EventRow]:
        if bot is None:
            rows = await self._pool.fetch(
                "SELECT * FROM events WHERE id > $1 ORDER BY id LIMIT $2", after_id, limit
            )
        else:
            rows = await self._pool.fetch(
                "SELECT * FROM events WHERE bot = $1 AND id > $2 ORDER BY id LIMIT $3",
                bot,
                after_id,
                limit,
            )
        return [_event(r) for r in rows]

    async def get_defaults(self) -> dict[str, Any]:
        value = await self._pool.fetchval("SELECT value FROM fleet_defaults")
        return dict(value or {})

    async def set_defaults(
        self, value: Mapping[str, Any], actor: str, restart: Sequence[str]
    ) -> None:
        """Replace the fleet defaults; the bots in ``restart`` get a new generation."""
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute("UPDATE fleet_defaults SET value = $1", dict(value))
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
        rows = await self._pool.fetch("SELECT name, record FROM bot_health")
        return {r["name"]: r["record"] for r in rows}

    async def save_health(self, name: str, record: Mapping[str, Any]) -> None:
        """Keep a bot's health record; nothing is kept for a bot that is gone."""
        await self._pool.execute(
            """INSERT INTO bot_health (name, record)
               SELECT $1, $2 WHERE EXISTS (SELECT 1 FROM bots WHERE name = $1)
               ON CONFLICT (name) DO UPDATE SET record = $2, updated_at = now()""",
            name,
            dict(record),
        )

    async def add_token(self, name: str, token_sha256: str) -> TokenRow:
        row = await self._pool.fetchrow(
            """INSERT INTO api_tokens (name, token_sha256) VALUES ($1, $2)
               ON CONFLICT DO NOTHING RETURNING *""",
            name,
            token_sha256,
        )
        if row is None:
            raise Conflict(f"a token named {name!r} already exists")
        return _token(row)

    async def ensure_token(self, name: str, token_sha256: str) -> None:
        """Register a token known from disk (the admin token) if the database lacks it."""
        await self._pool.execute(
            """INSERT INTO api_tokens (name, token_sha256) VALUES ($1, $2)
               ON CONFLICT DO NOTHING""",
            name,
            token_sha256,
        )

    async def list_tokens(self) -> list[TokenRow]:
        rows = await self._pool.fetch("SELECT * FROM api_tokens ORDER BY id")
        return [_token(r) for r in rows]

    async def revoke_token(self, name: str) -> TokenRow:
        row = await self._pool.fetchrow(
            """UPDATE api_tokens SET revoked_at = coalesce(revoked_at, now())
               WHERE name = $1 RETURNING *""",
            name,
        )
        if row is None:
            raise NotFound(f"no token named {name!r}")
        return _token(row)

    async def token_name(self, token_sha256: str) -> str | None:
        name: str | None = await self._pool.fetchval(
            "SELECT name FROM api_tokens WHERE token_sha256 = $1 AND revoked_at IS NULL",
            token_sha256,
        )
        return name
