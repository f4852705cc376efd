"""InMemoryStore, the Store shipped for tests: the store contract (tests/store_contract.py,
also run against PgStore on PostgreSQL), its clock, and a database that goes away."""

from __future__ import annotations

import inspect
import json
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import pytest
from store_contract import CASES, Case, Subject

from controller.clock import FakeClock, SystemClock
from controller.errors import StoreUnavailable
from controller.memstore import InMemoryStore
from controller.states import BotState
from controller.store import DEFAULT_TIMEOUT_S, Store


def subject(store: InMemoryStore, clock: FakeClock) -> Subject:
    async def backdate(seconds: float) -> None:
        clock.advance(seconds)  # what is stored grows older as the clock moves on

    async def stored() -> list[object]:
        return [json.dumps(v) for v in store.sealed_values()]

    return Subject(store, backdate, refused=(ValueError,), raw=stored)


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
async def test_contract(case: Case) -> None:
    clock = FakeClock()
    await case(subject(InMemoryStore(clock), clock))


def at(wall: float) -> datetime:
    return datetime.fromtimestamp(wall, UTC)


async def test_timestamps_come_from_the_clock() -> None:
    clock = FakeClock(wall=1_800_000_000.25)
    store = InMemoryStore(clock)
    created = await store.create_bot("echo", {}, "running", "t")
    assert created.created_at == at(1_800_000_000.25)
    clock.advance(7)
    row, event = await store.set_state(
        "echo", BotState.CONFIGURING, BotState.STARTING, "fleet", "rendered", None
    )
    assert row.state_since == row.updated_at == event.at == at(1_800_000_007.25)
    assert row.created_at == created.created_at
    clock.advance(60)
    token = await store.add_token("ci", "c" * 64, "read", None)
    assert token.created_at == at(1_800_000_067.25)


# Every call of the Store Protocol, with arguments that would succeed.
CALLS: dict[str, Callable[[Store], Awaitable[object]]] = {
    "ping": lambda s: s.ping(),
    "list_bots": lambda s: s.list_bots(),
    "get_bot": lambda s: s.get_bot("echo"),
    "create_bot": lambda s: s.create_bot("other", {}, "running", "t"),
    "update_spec": lambda s: s.update_spec("echo", {}, "t", True, 1),
    "set_desired": lambda s: s.set_desired("echo", "stopped", "t", "r"),
    "set_state": lambda s: s.set_state(
        "echo", BotState.CONFIGURING, BotState.STARTING, "t", "r", None
    ),
    "count_restart": lambda s: s.count_restart("echo"),
    "delete_bot": lambda s: s.delete_bot("echo", "t", "r"),
    "add_event": lambda s: s.add_event(None, "note", "t", "r", {}),
    "events": lambda s: s.events(None, 0, 10),
    "prune_events": lambda s: s.prune_events(0, 1),
    "get_defaults": lambda s: s.get_defaults(),
    "set_defaults": lambda s: s.set_defaults({}, "t", ["echo"]),
    "load_health": lambda s: s.load_health(),
    "save_health": lambda s: s.save_health("echo", {}),
    "add_token": lambda s: s.add_token("ci", "c" * 64, "read", None),
    "ensure_token": lambda s: s.ensure_token("ci", "c" * 64),
    "list_tokens": lambda s: s.list_tokens(),
    "revoke_token": lambda s: s.revoke_token("admin"),
    "use_token": lambda s: s.use_token("a" * 64),
    "recent_events": lambda s: s.recent_events("echo", 10),
    "seal_secrets": lambda s: s.seal_secrets(s.secrets, False),
    "claim_bot": lambda s: s.claim_bot("echo", "here"),
    "release_bot": lambda s: s.release_bot("echo", "here"),
    "host_seen": lambda s: s.host_seen("here", ""),
    "list_hosts": lambda s: s.list_hosts(),
    "forget_host": lambda s: s.forget_host("gone", 0, "t"),
}


def test_the_table_covers_every_call_of_the_protocol() -> None:
    calls = {name for name, member in vars(Store).items() if inspect.iscoroutinefunction(member)}
    # watch_changes is no call but a subscription: it waits out an absent database.
    assert calls - {"watch_changes"} == set(CALLS)


async def filled(clock: FakeClock) -> InMemoryStore:
    store = InMemoryStore(clock, timeout_s=1.5)
    await store.create_bot("echo", {"kind": "echo"}, "running", "t")
    await store.add_token("admin", "a" * 64, "admin", None)
    await store.add_token("second", "b" * 64, "admin", None)
    await store.host_seen("gone", "")
    return store


async def snapshot(store: InMemoryStore) -> tuple[object, ...]:
    return (
        await store.list_bots(),
        await store.events(None, 0, 1000),
        await store.list_tokens(),
        await store.get_defaults(),
        await store.load_health(),
        await store.list_hosts(),
    )


@pytest.mark.parametrize("name", sorted(CALLS))
async def test_while_away_every_call_fails_and_changes_nothing(name: str) -> None:
    clock = FakeClock(wall=1_800_000_000)
    store = await filled(clock)
    before = await snapshot(store)
    assert store.reachable and store.unreachable_since is None
    store.away = True
    with pytest.raises(StoreUnavailable) as caught:
        await CALLS[name](store)
    assert caught.value.status == 503
    assert not store.reachable
    assert store.unreachable_since == 1_800_000_000
    assert store.unreachable_error == InMemoryStore.away_error
    assert caught.value.detail == (
        f"PostgreSQL unreachable since 2027-01-15T08:00:00+00:00: {InMemoryStore.away_error}"
    )
    assert store.timeout_s == 1.5
    store.away = False
    await store.ping()
    assert await snapshot(store) == before
    await CALLS[name](store)  # and it works again


async def test_back_only_once_a_ping_gets_through() -> None:
    clock = FakeClock(wall=1_800_000_000)
    store = await filled(clock)
    store.away = True
    with pytest.raises(StoreUnavailable):
        await store.list_bots()
    clock.advance(30)
    with pytest.raises(StoreUnavailable):
        await store.ping()
    assert store.unreachable_since == 1_800_000_000  # since the first failure
    store.away = False
    # As PgStore: known unreachable, calls fail at once without trying; only ping tries.
    with pytest.raises(StoreUnavailable):
        await store.get_bot("echo")
    assert not store.reachable
    await store.ping()
    assert store.reachable
    assert (store.unreachable_since, store.unreachable_error) == (None, None)
    assert [row.name for row in await store.list_bots()] == ["echo"]


async def test_an_event_exactly_max_age_old_is_kept() -> None:
    clock = FakeClock()
    store = InMemoryStore(clock)
    await store.add_event(None, "note", "t", "", {})
    clock.advance(100)
    assert await store.prune_events(100, 1000) == 0  # older than the age, not as old
    clock.advance(0.001)
    assert await store.prune_events(100, 1000) == 1


def test_a_fake_clock_moves_only_when_told() -> None:
    clock = FakeClock(wall=100.0, monotonic=5.0)
    assert (clock.wall(), clock.monotonic()) == (100.0, 5.0)
    clock.advance(2.5)
    assert (clock.wall(), clock.monotonic()) == (102.5, 7.5)
    clock.set_wall(50.0)  # a wall clock stepped back; monotonic time is not
    assert (clock.wall(), clock.monotonic()) == (50.0, 7.5)
    with pytest.raises(ValueError):
        clock.advance(-1)
    assert clock.monotonic() == 7.5


def test_the_system_clock_is_the_real_time() -> None:
    clock = SystemClock()
    assert abs(clock.wall() - time.time()) < 5
    first = clock.monotonic()
    assert clock.monotonic() >= first


def test_a_new_store_is_reachable_with_the_default_timeout() -> None:
    store: Store = InMemoryStore()  # a Store: mypy checks it in controller/memstore.py
    assert store.reachable and store.unreachable_since is None
    assert store.timeout_s == DEFAULT_TIMEOUT_S
