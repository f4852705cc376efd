"""PgStore on a real PostgreSQL: the store contract (tests/store_contract.py), the same
cases tests/unit/test_memstore.py runs against InMemoryStore."""

# The fixtures are imported (they live in pg_fixtures.py), so pytest's injection by
# argument name looks like a redefinition to ruff.
# ruff: noqa: F811

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest
from pg_fixtures import fresh_database, postgres  # noqa: F401  (fixtures)
from store_contract import CASES, Case, Subject

from controller.secretbox import SecretBox, new_key
from controller.store import PgStore

pytestmark = pytest.mark.integration


@pytest.fixture
async def pg_store(fresh_database: str) -> AsyncIterator[PgStore]:
    store = await PgStore.connect(fresh_database, SecretBox((new_key(),), "test"))
    try:
        await store.migrate()
        yield store
    finally:
        await store.close()


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
async def test_contract(case: Case, pg_store: PgStore, fresh_database: str) -> None:
    async def backdate(seconds: float) -> None:
        conn = await asyncpg.connect(fresh_database)
        try:
            await conn.execute("UPDATE events SET at = at - make_interval(secs => $1)", seconds)
            await conn.execute(
                "UPDATE hosts SET seen_at = seen_at - make_interval(secs => $1)", seconds
            )
        finally:
            await conn.close()

    async def stored_secrets() -> list[object]:
        conn = await asyncpg.connect(fresh_database)
        try:
            found: list[object] = []
            for text in await conn.fetch(
                "SELECT spec::text AS t FROM bots UNION ALL SELECT value::text FROM fleet_defaults"
            ):
                found.append(text["t"])
            return found
        finally:
            await conn.close()

    await case(Subject(pg_store, backdate, refused=(asyncpg.PostgresError,), raw=stored_secrets))
