"""Whole histories of the fleet core, scripted, in milliseconds (as honcho's test_manager).

The real Fleet, reconciler, healer and event log run against the shipped fakes:
an ``InMemoryStore`` (PostgreSQL), a ``FakeSupervisor`` (circusd, reading the real
rendered watcher files), a ``FakeClock``, seeded randomness, and a ``pid_exists``
that believes the fake's pids. Bus messages and circusd events are fed in as
the real bots and circusd would send them.
"""

from __future__ import annotations

import os
import random
import resource
import sys
from pathlib import Path
from typing import Any

import pytest

from botspec import protocol
from controller.botfiles import BotFiles
from controller.buskeys import BusKeys
from controller.circus import FakeSupervisor, WatcherEvent
from controller.clock import FakeClock
from controller.errors import StoreUnavailable
from controller.fleet import BotFilesRefused, Fleet
from controller.home import Home
from controller.keeper import KeeperRefused
from controller.memstore import InMemoryStore
from controller.resources import PSS_EVERY
from controller.states import BotState
from controller.store import EventRow

TOKEN = "1000001:abcdefABCDEF_-"


class History:
    """One controller (a Fleet) over a store, circusd and a clock that outlive it."""

    def __init__(self, tmp_path: Path) -> None:
        self.clock = FakeClock()
        self.store = InMemoryStore(self.clock)
        self.home = Home(tmp_path / "home")
        for directory in (self.home.root, self.home.bots_d, self.home.root / "bots"):
            directory.mkdir(parents=True, exist_ok=True)
        self.circus = FakeSupervisor(bots_d=self.home.bots_d)
        self.fleet = self.new_controller()

    def new_controller(self) -> Fleet:
        """A (re)started controller: fresh memory, the same store, circusd and clock."""
        return Fleet(
            self.store,
            self.circus,
            BotFiles(self.home, sys.executable, BusKeys.open(self.home)),
            clock=self.clock,
            rng=random.Random(7),
            pid_exists=self.pid_exists,
        )

    def pid_exists(self, pid: int) -> bool:
        return any(pid in watcher.pids for watcher in self.circus.watchers.values())

    def pid(self, name: str) -> int:
        return self.circus.watchers[f"bot-{name}"].pids[0]

    async def run_pass(self) -> bool:
        """One reconcile pass; False when it found PostgreSQL away (it still acted)."""
        try:
            await self.fleet.reconcile()
        except StoreUnavailable:
            return False
        return True

    def heartbeat(self, name: str, connected: bool = True) -> None:
        row_generation = self.fleet.observer.live.get(name)
        self.fleet.on_message(
            protocol.Heartbeat(
                bot=name,
                pid=self.pid(name),
                generation=row_generation.generation if row_generation else 1,
                ts=self.clock.wall(),
                seq=0,
                uptime_s=1.0,
                rss_mb=50.0,
                telegram=protocol.TelegramHealth(connected=connected),
                handled=0,
                handler_errors=0,
            )
        )

    def crash(self, name: str) -> None:
        """kill -9 of the bot's process: circusd reaps it and respawns another."""
        old = self.pid(name)
        self.circus.crash(f"bot-{name}")
        at = self.clock.wall()
        body = {"process_pid": old, "time": at, "exit_code": -9}
        self.fleet.on_circus_event(WatcherEvent(f"bot-{name}", "reap", body))

    async def events(self, name: str) -> list[EventRow]:
        return await self.store.events(name, 0, 1000)

    async def state(self, name: str) -> BotState:
        return (await self.store.get_bot(name)).state


@pytest.fixture
async def history(tmp_path: Path) -> History:
    h = History(tmp_path)
    await h.store.set_defaults({"telegram": {"api_id": 1, "api_hash": "h"}}, "test", [])
    return h


async def started(h: History, name: str) -> None:
    await h.fleet.create({"name": name, "token": TOKEN}, "api:test")
    h.heartbeat(name)
    await h.run_pass()
    assert await h.state(name) is BotState.RUNNING


async def test_a_bot_crashing_six_times_within_the_window_ends_failed(history: History) -> None:
    h = history
    await started(h, "shop")
    for crash in range(6):
        h.clock.advance(2.0)
        h.crash("shop")
        h.heartbeat("shop")  # circusd's new process comes up and says so
        await h.run_pass()
        if crash < 5:
            assert await h.state("shop") is BotState.RUNNING, crash
    await h.run_pass()  # the pass after the failure stops the watcher
    assert await h.state("shop") is BotState.FAILED
    assert h.circus.watchers["bot-shop"].state == "stopped"
    crashes = [e for e in await h.events("shop") if e.kind == "health" and "exit_code" in e.data]
    assert len(crashes) == 5  # the sixth is the crash loop itself
    failed = [e for e in await h.events("shop") if e.to_state == "failed"]
    assert len(failed) == 1 and failed[0].data["failure"] == "crash_loop"


async def test_a_hung_bot_is_restarted_on_time_while_postgresql_is_away_and_nothing_is_lost(
    history: History,
) -> None:
    h = history
    await started(h, "shop")
    await started(h, "bystander")
    hung_pid = h.pid("shop")
    bystander_pid = h.pid("bystander")
    h.store.away = True
    passes_away = []
    for _ in range(3):  # three passes, 4 s apart: the hung bot's 10 s timeout runs out
        h.clock.advance(4.0)
        h.heartbeat("bystander")
        passes_away.append(await h.run_pass())
    assert passes_away == [False, False, False]
    # Killed (a hung process cannot drain) and respawned, with no database at all.
    assert ("kill", "bot-shop") in h.circus.calls
    assert h.pid("shop") != hung_pid
    assert h.pid("bystander") == bystander_pid
    noted = h.fleet.outbox.pending()
    assert noted, "health's writes wait in the outbox"

    h.clock.advance(4.0)  # the outage goes on a little, then PostgreSQL answers again
    h.store.away = False
    await h.store.ping()
    assert await h.run_pass()
    assert len(h.fleet.outbox) == 0
    events = await h.events("shop")
    health = [e for e in events if e.kind in ("health", "transition")][-len(noted) :]
    assert [e.reason for e in health] == [getattr(write, "reason", None) for write in noted], (
        "written in the order they were noted"
    )
    hung = [e for e in events if e.data.get("failure") == "hung"]
    assert hung and all(e.data.get("delayed") for e in hung)
    respawned = [e for e in events if e.to_state == "starting" and e.actor == "health"]
    assert len(respawned) == 1
    assert (await h.store.get_bot("shop")).restarts == 1


async def test_a_restarted_controller_keeps_the_backoff_it_was_in(history: History) -> None:
    h = history
    await started(h, "shop")
    # Telegram unreachable: first restart at once, the second after the backoff base (2 s).
    h.heartbeat("shop", connected=False)
    h.fleet.observer.live["shop"].telegram["disconnected_since"] = h.clock.wall()
    restarts = 0
    for _ in range(2):
        h.clock.advance(10.5)  # past disconnect_grace_s
        h.heartbeat("shop", connected=False)
        h.fleet.observer.live["shop"].telegram["disconnected_since"] = h.clock.wall() - 10.5
        await h.run_pass()
        restarts = sum(1 for call in h.circus.calls if call == ("restart", "bot-shop"))
    assert restarts == 1
    record = h.fleet.healer.record("shop")
    assert record.attempt == 1 and record.next_restart_at is not None
    due = record.next_restart_at

    h.fleet = h.new_controller()  # the controller restarts in the middle of the backoff
    await h.fleet.load()
    assert h.fleet.healer.record("shop").next_restart_at == due
    h.heartbeat("shop", connected=False)
    h.fleet.observer.live["shop"].telegram["disconnected_since"] = h.clock.wall() - 10.5
    await h.run_pass()
    assert sum(1 for call in h.circus.calls if call == ("restart", "bot-shop")) == 1  # not yet
    h.clock.advance(max(0.0, due - h.clock.wall()) + 0.1)
    h.heartbeat("shop", connected=False)
    h.fleet.observer.live["shop"].telegram["disconnected_since"] = h.clock.wall() - 10.5
    await h.run_pass()
    assert sum(1 for call in h.circus.calls if call == ("restart", "bot-shop")) == 2


async def test_a_destroyed_bot_is_not_served_from_memory_while_postgresql_is_away(
    history: History,
) -> None:
    h = history
    await started(h, "shop")
    await started(h, "stays")
    await h.fleet.destroy("shop", "api:test")
    h.store.away = True
    assert [bot["name"] for bot in await h.fleet.list()] == ["stays"]
    with pytest.raises(StoreUnavailable):
        await h.fleet.get_row("shop")
    row, stale = await h.fleet.get_row("stays")
    assert (row.name, stale) == ("stays", True)


async def test_crashes_and_the_give_up_are_counted_by_kind_for_metrics(history: History) -> None:
    h = history
    await started(h, "shop")
    for _ in range(6):
        h.clock.advance(2.0)
        h.crash("shop")
        h.heartbeat("shop")
        await h.run_pass()
    await h.run_pass()
    assert h.fleet.healer.failures["shop"] == {"crash": 5, "crash_loop": 1}


async def test_a_live_bot_is_sampled_and_warned_once_near_its_file_limit(
    history: History,
) -> None:
    """The sampler reads the /proc of the pid the bot's heartbeats carry (this test's own
    process, standing in for a bot), shows it in the bot's view, and writes one
    ``limit`` event when it nears its open-files limit."""
    h = history
    await started(h, "shop")
    h.circus.watchers["bot-shop"].pids = [os.getpid()]
    h.heartbeat("shop")
    assert h.fleet.observer.bot_pid("shop") == os.getpid()
    await h.fleet.sample_resources()
    view = h.fleet.view(await h.store.get_bot("shop"))
    assert view["resources"]["pid"] == os.getpid()
    assert view["resources"]["open_files"] > 0

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    held: list[int] = []
    try:
        cap = view["resources"]["open_files"] + 20
        resource.setrlimit(resource.RLIMIT_NOFILE, (cap, hard))
        while len(os.listdir("/proc/self/fd")) - 1 < int(cap * 0.95):
            held.append(os.open("/dev/null", os.O_RDONLY))
        # Limits are read again with PSS (every PSS_EVERY-th pass); every sample after
        # that sees the bot near its limit: one warning.
        for _ in range(PSS_EVERY + 2):
            h.clock.advance(2.0)
            await h.fleet.sample_resources()
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    await h.run_pass()  # writes what was noted
    warnings = [e for e in await h.events("shop") if e.kind == "limit"]
    assert len(warnings) == 1
    assert warnings[0].data["limit"] == "open_files" and warnings[0].data["cap"] == cap
    h.circus.watchers["bot-shop"].pids = []  # gone: no usage shown
    await h.fleet.sample_resources()
    assert h.fleet.view(await h.store.get_bot("shop"))["resources"] is None


class RefusingFiles(BotFiles):
    """Bot files as the keeper makes them, except for ``refused``: the keeper says no
    (a fault injected where the real keeper's refusals have tests of their own)."""

    def __init__(self, *args: Any, refused: str) -> None:
        super().__init__(*args)
        self.refused = refused

    def write(self, name: str, *args: Any, **kwargs: Any) -> None:
        if name == self.refused:
            raise KeeperRefused(f"the keeper refused write_watcher of bot {name!r}: test")
        super().write(name, *args, **kwargs)


async def test_a_bot_whose_files_are_refused_holds_back_no_other_bot(tmp_path: Path) -> None:
    """A refused user or file (the keeper, useradd) skips that bot's later actions in the
    pass; the other bots are rendered, started and health-checked, and the controller's
    pass loop goes on (the pass reports the refused bot)."""
    h = History(tmp_path)
    await h.store.set_defaults({"telegram": {"api_id": 1, "api_hash": "h"}}, "test", [])
    h.fleet = Fleet(
        h.store,
        h.circus,
        RefusingFiles(h.home, sys.executable, BusKeys.open(h.home), refused="bad"),
        clock=h.clock,
        rng=random.Random(7),
        pid_exists=h.pid_exists,
    )
    await h.fleet.create({"name": "bad", "token": TOKEN}, "api:test")  # stored all the same
    await h.fleet.create({"name": "good", "token": TOKEN}, "api:test")
    assert "bad" in (h.fleet.last_pass_error or "")
    with pytest.raises(BotFilesRefused, match="bad"):
        await h.fleet.reconcile()
    assert h.circus.watchers["bot-good"].state == "active"
    assert "bot-bad" not in h.circus.watchers
    h.heartbeat("good")
    with pytest.raises(BotFilesRefused):
        await h.fleet.reconcile()
    assert await h.state("good") is BotState.RUNNING
    assert await h.state("bad") is not BotState.RUNNING
