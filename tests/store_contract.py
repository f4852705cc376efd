"""What a Store does, as its callers see it: one table of cases, run against both stores.

tests/unit/test_memstore.py runs every case against ``InMemoryStore`` (milliseconds);
tests/integration/test_store_pg.py runs the same cases against ``PgStore`` on a real
PostgreSQL. A behaviour of PgStore that the fake does not copy fails one of the two.
Each case gets a fresh, empty, migrated store.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

import controller.memstore
import controller.store
from controller.errors import BotNotFound, Conflict, HeldElsewhere, NotFound, VersionMismatch
from controller.secretbox import SecretKeyError
from controller.states import BotState
from controller.store import BotRow, EventRow, Store


@dataclass
class Subject:
    store: Store
    #: Make every event stored so far (and every host's heartbeat) older by this many seconds.
    backdate_events: Callable[[float], Awaitable[None]]
    #: What the store raises for a value its schema forbids (a check, JSON's NaN).
    refused: tuple[type[Exception], ...]
    #: What is kept of specs and defaults, as text (where no secret may be clear).
    raw: Callable[[], Awaitable[list[object]]]


Case = Callable[[Subject], Awaitable[None]]
CASES: list[Case] = []


def case(function: Case) -> Case:
    CASES.append(function)
    return function


SPEC: dict[str, Any] = {"kind": "echo", "settings": {"greeting": "hi"}}


async def _bot_events(store: Store, name: str) -> list[EventRow]:
    return await store.events(name, 0, 1000)


async def _created(store: Store, name: str = "echo", spec: dict[str, Any] = SPEC) -> BotRow:
    return await store.create_bot(name, spec, "running", "tester")


# --------------------------------------------------------------------- bots


@case
async def create_makes_a_configuring_bot_and_a_created_event(s: Subject) -> None:
    row = await s.store.create_bot("echo", SPEC, "running", "tester")
    assert (row.name, row.spec, row.desired, row.state) == (
        "echo",
        SPEC,
        "running",
        BotState.CONFIGURING,
    )
    assert (row.generation, row.restarts, row.version, row.state_reason) == (1, 0, 1, "")
    assert row.created_at.utcoffset() == timedelta(0)
    # One transaction, one time.
    assert row.created_at == row.updated_at == row.state_since
    assert await s.store.get_bot("echo") == row
    (event,) = await _bot_events(s.store, "echo")
    assert (event.bot, event.kind, event.actor, event.from_state, event.to_state) == (
        "echo",
        "created",
        "tester",
        None,
        "configuring",
    )
    assert (event.reason, event.data, event.at) == ("created", {}, row.created_at)


@case
async def create_refuses_a_taken_name(s: Subject) -> None:
    first = await _created(s.store)
    with pytest.raises(Conflict, match="'echo' already exists"):
        await s.store.create_bot("echo", {"other": True}, "stopped", "tester")
    assert await s.store.get_bot("echo") == first
    assert [e.kind for e in await _bot_events(s.store, "echo")] == ["created"]


@case
async def create_refuses_what_the_schema_forbids(s: Subject) -> None:
    for name, desired in [("Echo", "running"), ("9lives", "running"), ("x" * 33, "running")]:
        with pytest.raises(s.refused):
            await s.store.create_bot(name, SPEC, desired, "tester")
    with pytest.raises(s.refused):
        await s.store.create_bot("echo", SPEC, "paused", "tester")
    with pytest.raises(s.refused):
        await s.store.create_bot("echo", {"ratio": float("nan")}, "running", "tester")
    assert await s.store.list_bots() == []
    assert await s.store.events(None, 0, 100) == []
    await _created(s.store, "a" + "-" * 31)  # the longest name, the widest character set
    # The desired state is checked before the name is found taken.
    with pytest.raises(s.refused):
        await s.store.create_bot("a" + "-" * 31, SPEC, "paused", "tester")


@case
async def a_spec_comes_back_as_json_does(s: Subject) -> None:
    spec: dict[str, Any] = {"bb": (1, 2), "a": {"zz": 1, "y": None}, "ccc": 1.5}
    await s.store.create_bot("echo", spec, "running", "tester")
    spec["a"]["zz"] = "changed by the caller afterwards"
    row = await s.store.get_bot("echo")
    assert row.spec == {"a": {"y": None, "zz": 1}, "bb": [1, 2], "ccc": 1.5}
    # jsonb orders an object's keys: shorter first, then bytewise.
    assert list(row.spec) == ["a", "bb", "ccc"] and list(row.spec["a"]) == ["y", "zz"]
    row.spec["a"]["zz"] = "changed by a reader"
    assert (await s.store.get_bot("echo")).spec["a"]["zz"] == 1


@case
async def bots_are_listed_by_name_and_a_missing_one_is_not_found(s: Subject) -> None:
    for name in ("bravo", "alpha", "charlie2", "charlie"):
        await _created(s.store, name)
    assert [row.name for row in await s.store.list_bots()] == [
        "alpha",
        "bravo",
        "charlie",
        "charlie2",
    ]
    with pytest.raises(BotNotFound) as caught:
        await s.store.get_bot("delta")
    assert caught.value.name == "delta"


@case
async def update_spec_bumps_the_version_and_writes_an_updated_event(s: Subject) -> None:
    created = await _created(s.store)
    kept = await s.store.update_spec("echo", {"kind": "echo", "v": 2}, "alice", False, 1)
    assert (kept.spec, kept.version, kept.generation) == ({"kind": "echo", "v": 2}, 2, 1)
    assert kept.updated_at >= created.updated_at
    assert (kept.state, kept.state_since, kept.created_at) == (
        created.state,
        created.state_since,
        created.created_at,
    )
    restarted = await s.store.update_spec("echo", {"kind": "echo", "v": 3}, "bob", True, 2)
    assert (restarted.version, restarted.generation) == (3, 2)
    assert await s.store.get_bot("echo") == restarted
    _, first, second = await _bot_events(s.store, "echo")
    assert (first.kind, first.actor, first.reason, first.data) == (
        "updated",
        "alice",
        "spec changed; the process keeps running",
        {"generation": 1, "restart": False, "version": 2},
    )
    assert (second.kind, second.actor, second.reason, second.data) == (
        "updated",
        "bob",
        "spec changed",
        {"generation": 2, "restart": True, "version": 3},
    )
    assert (first.from_state, first.to_state) == (None, None)
    assert second.at == restarted.updated_at


@case
async def update_spec_from_a_stale_version_changes_nothing(s: Subject) -> None:
    await _created(s.store)
    current = await s.store.update_spec("echo", {"v": 2}, "alice", True, 1)
    with pytest.raises(VersionMismatch) as caught:
        await s.store.update_spec("echo", {"v": "lost"}, "bob", True, 1)
    assert (caught.value.name, caught.value.expected, caught.value.current) == ("echo", 1, 2)
    assert isinstance(caught.value, Conflict)  # a 409 at the API edge
    assert await s.store.get_bot("echo") == current
    assert [e.actor for e in await _bot_events(s.store, "echo")] == ["tester", "alice"]
    with pytest.raises(BotNotFound):
        await s.store.update_spec("ghost", {"v": 1}, "alice", False, 1)


@case
async def set_desired_changes_only_desired_and_says_so(s: Subject) -> None:
    created = await _created(s.store)
    row = await s.store.set_desired("echo", "stopped", "alice", "stop requested")
    assert row.desired == "stopped"
    assert (row.version, row.generation, row.state, row.spec) == (1, 1, created.state, SPEC)
    assert row.updated_at >= created.updated_at
    event = (await _bot_events(s.store, "echo"))[-1]
    assert (event.kind, event.actor, event.reason, event.data) == (
        "desired",
        "alice",
        "stop requested",
        {"desired": "stopped"},
    )
    with pytest.raises(s.refused):
        await s.store.set_desired("echo", "paused", "alice", "nonsense")
    assert (await s.store.get_bot("echo")).desired == "stopped"
    with pytest.raises(BotNotFound):
        await s.store.set_desired("ghost", "stopped", "alice", "stop requested")


@case
async def set_state_moves_from_the_expected_state_and_writes_a_transition(s: Subject) -> None:
    created = await _created(s.store)
    row, event = await s.store.set_state(
        "echo", BotState.CONFIGURING, BotState.STARTING, "fleet", "files rendered", {"pid": 7}
    )
    assert (row.state, row.state_reason) == (BotState.STARTING, "files rendered")
    assert row.state_since == row.updated_at == event.at
    assert row.state_since >= created.state_since
    assert (row.version, row.generation) == (1, 1)
    assert await s.store.get_bot("echo") == row
    assert (event.bot, event.kind, event.actor, event.from_state, event.to_state) == (
        "echo",
        "transition",
        "fleet",
        "configuring",
        "starting",
    )
    assert (event.reason, event.data) == ("files rendered", {"pid": 7})
    assert (await _bot_events(s.store, "echo"))[-1] == event
    _, bare = await s.store.set_state(
        "echo", BotState.STARTING, BotState.RUNNING, "fleet", "up", None
    )
    assert bare.data == {}


@case
async def set_state_from_a_state_the_bot_left_is_a_conflict(s: Subject) -> None:
    await _created(s.store)
    moved, _ = await s.store.set_state(
        "echo", BotState.CONFIGURING, BotState.STARTING, "fleet", "rendered", None
    )
    with pytest.raises(Conflict, match="echo is starting now, no longer configuring"):
        await s.store.set_state(
            "echo", BotState.CONFIGURING, BotState.FAILED, "health", "late", None
        )
    assert await s.store.get_bot("echo") == moved
    assert [e.to_state for e in await _bot_events(s.store, "echo")] == ["configuring", "starting"]
    with pytest.raises(BotNotFound):
        await s.store.set_state("ghost", BotState.RUNNING, BotState.FAILED, "health", "x", None)


@case
async def count_restart_adds_one_and_ignores_a_missing_bot(s: Subject) -> None:
    created = await _created(s.store)
    await s.store.count_restart("echo")
    await s.store.count_restart("echo")
    await s.store.count_restart("ghost")
    row = await s.store.get_bot("echo")
    assert row.restarts == 2
    assert (row.updated_at, row.version, row.generation) == (created.updated_at, 1, 1)
    assert len(await s.store.events(None, 0, 100)) == 1  # no event


@case
async def delete_keeps_the_history_and_forgets_the_bot(s: Subject) -> None:
    await _created(s.store)
    await s.store.set_state("echo", BotState.CONFIGURING, BotState.STOPPED, "fleet", "idle", None)
    await s.store.save_health("echo", {"streak": 3})
    event = await s.store.delete_bot("echo", "alice", "destroy requested")
    assert (event.bot, event.kind, event.actor, event.from_state, event.to_state) == (
        "echo",
        "transition",
        "alice",
        "stopped",
        "destroyed",
    )
    assert (event.reason, event.data) == ("destroy requested", {})
    with pytest.raises(BotNotFound):
        await s.store.get_bot("echo")
    assert await s.store.list_bots() == []
    assert await s.store.load_health() == {}
    assert [e.to_state for e in await _bot_events(s.store, "echo")] == [
        "configuring",
        "stopped",
        "destroyed",
    ]
    with pytest.raises(BotNotFound):
        await s.store.delete_bot("echo", "alice", "again")
    # The name is free again, for a bot that starts over.
    again = await _created(s.store)
    assert (again.generation, again.version, again.restarts) == (1, 1, 0)


# ------------------------------------------------------------------- events


@case
async def events_are_read_in_order_after_an_id_by_bot_and_in_pages(s: Subject) -> None:
    await _created(s.store, "alpha")
    await _created(s.store, "bravo")
    fleet_wide = await s.store.add_event(None, "webhook", "fleet", "sent", {"status": 200})
    noted = await s.store.add_event("alpha", "health", "health", "slow", {"ms": [1, 2]})
    assert (fleet_wide.bot, fleet_wide.kind, fleet_wide.from_state, fleet_wide.data) == (
        None,
        "webhook",
        None,
        {"status": 200},
    )
    assert (noted.actor, noted.reason, noted.data, noted.to_state) == (
        "health",
        "slow",
        {"ms": [1, 2]},
        None,
    )
    every = await s.store.events(None, 0, 100)
    ids = [e.id for e in every]
    assert ids == sorted(ids) and len(set(ids)) == 4
    assert [(e.bot, e.kind) for e in every] == [
        ("alpha", "created"),
        ("bravo", "created"),
        (None, "webhook"),
        ("alpha", "health"),
    ]
    assert every[-2:] == [fleet_wide, noted]
    assert [e.kind for e in await s.store.events("alpha", 0, 100)] == ["created", "health"]
    assert await s.store.events(None, ids[1], 100) == every[2:]
    assert await s.store.events(None, 0, 2) == every[:2]
    assert await s.store.events("alpha", ids[0], 100) == [noted]
    assert await s.store.events(None, ids[-1], 100) == []
    assert await s.store.events("ghost", 0, 100) == []
    later = await s.store.add_event("ghost", "note", "cli", "", {})  # no bot needed
    assert later.id > ids[-1]


@case
async def recent_events_are_a_bots_newest_oldest_first(s: Subject) -> None:
    await _created(s.store, "alpha")
    written = [await s.store.add_event("alpha", "note", "t", str(n), {}) for n in range(5)]
    await s.store.add_event("bravo", "note", "t", "other", {})
    assert await s.store.recent_events("alpha", 3) == written[-3:]
    every = await s.store.recent_events("alpha", 100)
    assert [e.kind for e in every] == ["created"] + ["note"] * 5 and every[1:] == written
    assert await s.store.recent_events("alpha", 0) == []
    assert await s.store.recent_events("ghost", 10) == []


@case
async def pruning_by_count_keeps_the_newest(s: Subject) -> None:
    written = [await s.store.add_event(None, "note", "t", str(n), {}) for n in range(10)]
    assert await s.store.prune_events(3600, 20) == 0
    assert await s.store.prune_events(3600, 3) == 7
    assert await s.store.events(None, 0, 100) == written[-3:]
    assert await s.store.prune_events(3600, 3) == 0
    assert await s.store.prune_events(3600, 1) == 2
    assert await s.store.events(None, 0, 100) == written[-1:]


@case
async def pruning_by_age_drops_the_old_then_counts_the_rest(s: Subject) -> None:
    # Events are told apart by their reason: backdating rewrites their time.
    for n in range(4):
        await s.store.add_event("echo", "note", "t", f"old {n}", {})
    await s.backdate_events(100)
    for n in range(3):
        await s.store.add_event("echo", "note", "t", f"new {n}", {})
    assert await s.store.prune_events(101, 1000) == 0
    assert await _reasons(s.store) == [
        "old 0",
        "old 1",
        "old 2",
        "old 3",
        "new 0",
        "new 1",
        "new 2",
    ]
    assert await s.store.prune_events(50, 1000) == 4
    assert await _reasons(s.store) == ["new 0", "new 1", "new 2"]
    # Both at once: the old by age, then the oldest of the rest by count.
    await s.store.add_event("echo", "note", "t", "older", {})
    await s.backdate_events(100)
    for n in range(3):
        await s.store.add_event("echo", "note", "t", f"fresh {n}", {})
    assert await s.store.prune_events(50, 2) == 4 + 1
    assert await _reasons(s.store) == ["fresh 1", "fresh 2"]


@case
async def pruning_deletes_a_batch_of_each_kind_per_call(s: Subject) -> None:
    for n in range(12):
        await s.store.add_event(None, "note", "t", str(n), {})
        if n == 5:
            await s.backdate_events(100)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(controller.store, "PRUNE_BATCH", 2)
        patch.setattr(controller.memstore, "PRUNE_BATCH", 2)
        assert await s.store.prune_events(50, 3) == 2 + 2  # the 2 oldest by age, 2 by count
        assert await _reasons(s.store) == [str(n) for n in range(4, 12)]
        assert await s.store.prune_events(50, 3) == 2 + 2
        assert await s.store.prune_events(50, 3) == 0 + 1
        assert await _reasons(s.store) == ["9", "10", "11"]


async def _reasons(store: Store) -> list[str]:
    return [event.reason for event in await store.events(None, 0, 1000)]


# ----------------------------------------------------------------- defaults


@case
async def defaults_replace_and_restart_only_the_bots_named(s: Subject) -> None:
    assert await s.store.get_defaults() == {}
    for name in ("alpha", "bravo", "charlie"):
        await _created(s.store, name)
    before = {row.name: row for row in await s.store.list_bots()}
    await s.store.set_defaults({"telegram": {"api_id": 1}}, "alice", ["charlie", "alpha", "ghost"])
    assert await s.store.get_defaults() == {"telegram": {"api_id": 1}}
    after = {row.name: row for row in await s.store.list_bots()}
    assert {name: row.generation for name, row in after.items()} == {
        "alpha": 2,
        "bravo": 1,
        "charlie": 2,
    }
    assert after["bravo"] == before["bravo"]
    assert after["alpha"].version == 1  # the bot's own spec did not change
    assert after["alpha"].updated_at >= before["alpha"].updated_at
    event = (await _all(s.store))[-1]
    assert (event.bot, event.kind, event.actor, event.reason, event.data) == (
        None,
        "defaults",
        "alice",
        "fleet defaults changed",
        {"restarted": ["alpha", "charlie", "ghost"]},
    )
    await s.store.set_defaults({"other": True}, "bob", [])
    assert await s.store.get_defaults() == {"other": True}  # replaced, not merged
    assert {row.name: row.generation for row in await s.store.list_bots()} == {
        "alpha": 2,
        "bravo": 1,
        "charlie": 2,
    }


async def _all(store: Store) -> list[EventRow]:
    return await store.events(None, 0, 10_000)


# ------------------------------------------------------------------- health


@case
async def health_is_kept_per_existing_bot(s: Subject) -> None:
    assert await s.store.load_health() == {}
    await _created(s.store, "alpha")
    await _created(s.store, "bravo")
    await s.store.save_health("alpha", {"streak": 1, "backoff_s": 2.5})
    await s.store.save_health("ghost", {"streak": 9})
    await s.store.save_health("alpha", {"streak": 2})
    await s.store.save_health("bravo", {"streak": 0})
    assert await s.store.load_health() == {"alpha": {"streak": 2}, "bravo": {"streak": 0}}


# ------------------------------------------------------------------- tokens

# Expiry times either side of any clock a store runs on (the fake's is set by tests).
LONG_AGO = datetime(2000, 1, 1, tzinfo=UTC)
FAR_AHEAD = datetime(2100, 1, 1, tzinfo=UTC)


@case
async def tokens_are_added_listed_and_found_by_their_hash(s: Subject) -> None:
    admin = await s.store.add_token("admin", "a" * 64, "admin", None)
    ci = await s.store.add_token("ci", "c" * 64, "operate", None)
    assert (admin.name, admin.scope, admin.revoked_at, admin.last_used_at) == (
        "admin",
        "admin",
        None,
        None,
    )
    assert (ci.name, ci.scope, ci.expires_at) == ("ci", "operate", None)
    assert ci.id > admin.id and ci.created_at >= admin.created_at
    assert admin.created_at.utcoffset() == timedelta(0)
    with pytest.raises(Conflict, match="'admin' already exists"):
        await s.store.add_token("admin", "d" * 64, "read", None)
    with pytest.raises(Conflict):
        await s.store.add_token("other", "c" * 64, "read", None)  # the same token again
    with pytest.raises(s.refused):
        await s.store.add_token("bogus", "b" * 64, "root", None)  # type: ignore[arg-type]
    later = await s.store.add_token("later", "e" * 64, "read", None)
    assert later.id > ci.id
    assert await s.store.list_tokens() == [admin, ci, later]
    found = await s.store.use_token("c" * 64)
    assert found is not None and (found.name, found.scope) == ("ci", "operate")
    assert await s.store.use_token("f" * 64) is None


@case
async def using_a_token_notes_its_last_use_once_a_minute(s: Subject) -> None:
    await s.store.add_token("ci", "c" * 64, "read", None)
    first = await s.store.use_token("c" * 64)
    assert first is not None and first.last_used_at is not None
    assert first.last_used_at >= first.created_at
    again = await s.store.use_token("c" * 64)  # within the minute: not written again
    assert again is not None and again.last_used_at == first.last_used_at
    (listed,) = await s.store.list_tokens()
    assert listed.last_used_at == first.last_used_at


@case
async def expired_and_revoked_tokens_are_found_but_not_marked_used(s: Subject) -> None:
    past, future = LONG_AGO, FAR_AHEAD
    await s.store.add_token("admin", "a" * 64, "admin", None)
    old = await s.store.add_token("old", "o" * 64, "read", past)
    soon = await s.store.add_token("soon", "s" * 64, "read", future)
    assert old.expires_at == past and soon.expires_at == future
    found = await s.store.use_token("o" * 64)
    assert found is not None and found.expired(FAR_AHEAD - timedelta(days=1))
    assert found.last_used_at is None
    await s.store.revoke_token("soon")
    gone = await s.store.use_token("s" * 64)
    assert gone is not None and gone.revoked_at is not None and gone.last_used_at is None


@case
async def ensure_token_adds_an_admin_token_only_if_missing(s: Subject) -> None:
    await s.store.ensure_token("admin", "a" * 64)
    await s.store.ensure_token("admin", "b" * 64)  # already there: kept as it was
    (admin,) = await s.store.list_tokens()
    assert (admin.name, admin.scope, admin.expires_at) == ("admin", "admin", None)
    assert await s.store.use_token("b" * 64) is None


@case
async def revoking_stops_a_token_but_never_the_last_admin(s: Subject) -> None:
    await s.store.add_token("admin", "a" * 64, "admin", None)
    await s.store.add_token("ci", "c" * 64, "operate", None)
    # Neither an operate token nor an expired admin token can administer the fleet.
    await s.store.add_token("old", "o" * 64, "admin", LONG_AGO)
    revoked = await s.store.revoke_token("ci")
    assert revoked.name == "ci" and revoked.revoked_at is not None
    assert revoked.revoked_at >= revoked.created_at
    # Revoking again keeps the first revocation's time.
    assert await s.store.revoke_token("ci") == revoked
    with pytest.raises(Conflict, match="'admin' is the last token that can administer"):
        await s.store.revoke_token("admin")
    found = await s.store.use_token("a" * 64)
    assert found is not None and found.revoked_at is None
    with pytest.raises(NotFound, match="no token named 'ghost'"):
        await s.store.revoke_token("ghost")
    # With a second admin token, the first can go; then the second is the last.
    await s.store.add_token("admin2", "b" * 64, "admin", FAR_AHEAD)
    await s.store.revoke_token("admin")
    with pytest.raises(Conflict, match="'admin2' is the last token"):
        await s.store.revoke_token("admin2")
    assert [(t.name, t.revoked_at is None) for t in await s.store.list_tokens()] == [
        ("admin", False),
        ("ci", False),
        ("old", True),
        ("admin2", True),
    ]


# ------------------------------------------------------------------ secrets

BOT_TOKEN = "123456:clear-token-text"
API_HASH = "0123456789abcdef-clear-hash"


@case
async def secrets_are_kept_sealed_and_read_back_clear(s: Subject) -> None:
    spec = {"token": BOT_TOKEN, "telegram": {"api_id": 1, "api_hash": API_HASH}}
    created = await s.store.create_bot("echo", spec, "running", "tester")
    assert created.spec == spec and (await s.store.get_bot("echo")).spec == spec
    await s.store.set_defaults({"telegram": {"api_id": 2, "api_hash": API_HASH}}, "t", [])
    assert (await s.store.get_defaults())["telegram"]["api_hash"] == API_HASH
    updated = await s.store.update_spec("echo", {**spec, "session": "S" * 20}, "t", True, 1)
    assert updated.spec["session"] == "S" * 20
    kept = " ".join(map(str, await s.raw()))
    assert "tgfleet-sealed:v1:" in kept
    for secret in (BOT_TOKEN, API_HASH, "S" * 20):
        assert secret not in kept


@case
async def a_new_key_seals_everything_again_and_the_old_one_is_not_needed(s: Subject) -> None:
    spec = {"token": BOT_TOKEN, "telegram": {"api_id": 1, "api_hash": API_HASH}}
    await s.store.create_bot("echo", spec, "running", "tester")
    await s.store.set_defaults({"telegram": {"api_hash": API_HASH}}, "t", [])
    before = await s.raw()
    old = s.store.secrets
    assert await s.store.seal_secrets(old, rotate=False) == 0  # nothing clear: untouched
    assert await s.raw() == before
    rotated = old.with_new_key()
    assert await s.store.seal_secrets(rotated, rotate=True) == 2  # the bot and the defaults
    s.store.secrets = rotated.newest_only()
    assert (await s.store.get_bot("echo")).spec == spec
    assert (await s.store.get_defaults())["telegram"]["api_hash"] == API_HASH
    assert not set(map(str, await s.raw())) & set(map(str, before))
    # The old key alone no longer opens what is stored.
    s.store.secrets = old
    with pytest.raises(SecretKeyError, match="does not open with the key from"):
        await s.store.get_bot("echo")


# -------------------------------------------------------------------- hosts


@case
async def a_bot_is_placed_on_a_host_or_on_none(s: Subject) -> None:
    placed = await s.store.create_bot("echo", SPEC, "running", "tester", "alpha")
    unplaced = await _created(s.store, "old")
    assert (placed.host, placed.held_by) == ("alpha", None)
    assert (unplaced.host, unplaced.held_by) == (None, None)
    assert await s.store.get_bot("echo") == placed


@case
async def one_host_at_a_time_holds_a_bot_and_only_its_own(s: Subject) -> None:
    await s.store.create_bot("echo", SPEC, "running", "tester", "alpha")
    await _created(s.store, "old")
    assert await s.store.claim_bot("echo", "beta") is None  # placed elsewhere
    held = await s.store.claim_bot("echo", "alpha")
    assert held is not None and (held.host, held.held_by, held.version) == ("alpha", "alpha", 1)
    assert await s.store.get_bot("echo") == held
    assert await s.store.claim_bot("echo", "alpha") is None  # held already
    # A bot from before hosts is adopted by the first host that claims it.
    adopted = await s.store.claim_bot("old", "beta")
    assert adopted is not None and (adopted.host, adopted.held_by) == ("beta", "beta")
    assert await s.store.claim_bot("old", "alpha") is None
    assert await s.store.claim_bot("ghost", "alpha") is None
    event = (await _bot_events(s.store, "echo"))[-1]
    assert (event.kind, event.actor, event.data) == ("host", "host:alpha", {"held_by": "alpha"})


@case
async def moving_a_bot_keeps_its_holder_until_the_holder_lets_go(s: Subject) -> None:
    await s.store.create_bot("echo", SPEC, "running", "tester", "alpha")
    await s.store.claim_bot("echo", "alpha")
    assert await s.store.release_bot("echo", "alpha") is None  # still placed on alpha
    moved = await s.store.update_spec("echo", SPEC, "alice", False, 1, "beta")
    assert (moved.host, moved.held_by, moved.version, moved.generation) == ("beta", "alpha", 2, 1)
    update = (await _bot_events(s.store, "echo"))[-1]
    assert (update.reason, update.data["moved"]) == (
        "moved from alpha to beta",
        {"from": "alpha", "to": "beta"},
    )
    assert await s.store.claim_bot("echo", "beta") is None  # alpha still holds it
    assert await s.store.release_bot("echo", "beta") is None  # beta holds nothing
    let_go = await s.store.release_bot("echo", "alpha")
    assert let_go is not None and (let_go.host, let_go.held_by) == ("beta", None)
    event = (await _bot_events(s.store, "echo"))[-1]
    assert (event.kind, event.actor, event.data) == (
        "host",
        "host:alpha",
        {"released_by": "alpha", "host": "beta"},
    )
    taken = await s.store.claim_bot("echo", "beta")
    assert taken is not None and taken.held_by == "beta"
    # No host given: the bot stays where it is.
    kept = await s.store.update_spec("echo", {"v": 2}, "alice", True, 2)
    assert (kept.host, kept.held_by) == ("beta", "beta")
    assert "moved" not in (await _bot_events(s.store, "echo"))[-1].data


@case
async def a_bot_held_by_another_host_is_not_deleted_by_this_one(s: Subject) -> None:
    await s.store.create_bot("echo", SPEC, "running", "tester", "alpha")
    await s.store.claim_bot("echo", "alpha")
    with pytest.raises(HeldElsewhere) as caught:
        await s.store.delete_bot("echo", "bob", "destroy requested", "beta")
    assert isinstance(caught.value, Conflict) and caught.value.holder == "alpha"
    assert (await s.store.get_bot("echo")).held_by == "alpha"
    event = await s.store.delete_bot("echo", "bob", "destroy requested", "alpha")
    assert event.to_state == "destroyed"
    await s.store.create_bot("free", SPEC, "running", "tester", "gamma")  # held by nobody
    await s.store.delete_bot("free", "bob", "destroy requested", "beta")
    with pytest.raises(BotNotFound):
        await s.store.delete_bot("free", "bob", "destroy requested", "beta")


@case
async def hosts_beat_and_a_silent_one_can_be_forgotten(s: Subject) -> None:
    assert await s.store.list_hosts() == []
    await s.store.host_seen("beta", "http://beta:8710")
    await s.store.host_seen("alpha", "http://alpha:8710")
    first = {h.name: h for h in await s.store.list_hosts()}
    assert list(first) == ["alpha", "beta"]
    assert first["alpha"].api_url == "http://alpha:8710"
    assert 0 <= first["alpha"].silent_s < 5
    await s.store.create_bot("echo", SPEC, "running", "tester", "alpha")
    await s.store.create_bot("idle", SPEC, "stopped", "tester", "alpha")
    await s.store.claim_bot("echo", "alpha")
    await s.backdate_events(120)
    await s.store.host_seen("beta", "http://beta:8711")  # beta is alive, alpha silent
    hosts = {h.name: h for h in await s.store.list_hosts()}
    assert hosts["alpha"].silent_s >= 120 > hosts["beta"].silent_s
    assert hosts["beta"].started_at == first["beta"].started_at  # the same host, seen again
    assert hosts["beta"].api_url == "http://beta:8711"
    with pytest.raises(Conflict, match="beta was seen 0 s ago"):
        await s.store.forget_host("beta", 60, "admin")
    with pytest.raises(NotFound):
        await s.store.forget_host("ghost", 60, "admin")
    assert await s.store.forget_host("alpha", 60, "api:admin") == ["echo"]
    row = await s.store.get_bot("echo")
    assert (row.host, row.held_by) == ("alpha", None)  # still placed there: move it
    event = (await _bot_events(s.store, "echo"))[-1]
    assert (event.kind, event.actor, event.data) == ("host", "api:admin", {"forgotten": "alpha"})
    assert [h.name for h in await s.store.list_hosts()] == ["beta"]
    with pytest.raises(NotFound):
        await s.store.forget_host("alpha", 60, "api:admin")


@case
async def a_watcher_hears_of_every_change_of_a_bot_or_the_defaults(s: Subject) -> None:
    heard = asyncio.Event()
    stopping = asyncio.Event()
    watching = asyncio.create_task(s.store.watch_changes(heard.set, stopping))
    try:
        await asyncio.wait_for(heard.wait(), 10)  # once at the start
        for change in (
            lambda: _created(s.store),
            lambda: s.store.set_desired("echo", "stopped", "t", "r"),
            lambda: s.store.claim_bot("echo", "alpha"),
            lambda: s.store.set_defaults({"memory_limit_mb": 256}, "t", []),
            lambda: s.store.delete_bot("echo", "t", "r"),
        ):
            heard.clear()
            await change()
            await asyncio.wait_for(heard.wait(), 10)
    finally:
        stopping.set()
        await asyncio.wait_for(watching, 10)
