"""Several hosts on one database, in milliseconds: two controllers (each a real Fleet with
its own home and FakeSupervisor) over one InMemoryStore, and the reconciler's plan for a
bot that leaves. tests/integration/test_hosts.py does the same with real circusd,
PostgreSQL, bots and the sandbox."""

from __future__ import annotations

import random
import socket
import sys
from pathlib import Path

import pytest

from botspec import protocol
from controller.botfiles import BotFiles
from controller.buskeys import BusKeys
from controller.circus import FakeSupervisor
from controller.clock import FakeClock
from controller.errors import Conflict, HeldElsewhere, InvalidSpec
from controller.fleet import Fleet
from controller.home import Home
from controller.memstore import InMemoryStore
from controller.reconcile import Live, Observation, Release, Rendered, StopWatcher, plan
from controller.settings import ControllerSettings, SettingsError, default_host
from controller.states import BotState

TOKEN = "1000001:abcdefABCDEF_-"
S = BotState


# ------------------------------------------------------------- the plan


def leaving(
    state: BotState, watcher: str | None, live: Live | None, rendered: Rendered | None = None
) -> Observation:
    return Observation("a", "running", state, 1, rendered, watcher, live, leaving=True)


DEAD = Live(pid=10, generation=1, ready=True, alive=False)
ALIVE = Live(pid=10, generation=1, ready=True, alive=True)


@pytest.mark.parametrize(
    ("observation", "released"),
    [
        # Stopped, its watcher stopped or gone, no process: let go of it.
        (leaving(S.STOPPED, "stopped", None, Rendered(1, False)), True),
        (leaving(S.STOPPED, None, DEAD), True),
        (leaving(S.FAILED, "stopped", DEAD, Rendered(1, False)), True),
        # Anything that may still run keeps it held here.
        (leaving(S.STOPPED, "active", None, Rendered(1, False)), False),
        (leaving(S.STOPPED, "stopping", None, Rendered(1, False)), False),
        (leaving(S.STOPPED, "stopped", ALIVE, Rendered(1, False)), False),
        (leaving(S.FAILED, "active", ALIVE, Rendered(1, False)), False),
        (leaving(S.RUNNING, "active", ALIVE, Rendered(1, True)), False),
        (leaving(S.STOPPING, "active", None, Rendered(1, False)), False),
        (leaving(S.STOPPING, "stopped", ALIVE, Rendered(1, False)), False),
        (leaving(S.STOPPING, "stopped", None, Rendered(1, True)), False),  # not rendered off
        # Stopping, and now down: recorded stopped and let go of in one pass.
        (leaving(S.STOPPING, "stopped", None, Rendered(1, False)), True),
    ],
)
def test_a_leaving_bot_is_released_only_once_nothing_of_it_runs(
    observation: Observation, released: bool
) -> None:
    actions = plan([observation])
    assert (Release("a") in actions) is released
    if released:
        assert actions[-1] != Release("a")  # the reload (last) drops its watcher


def test_a_leaving_bot_that_runs_is_stopped_as_if_it_were_not_wanted() -> None:
    actions = plan([leaving(S.RUNNING, "active", ALIVE, Rendered(1, True))])
    assert [type(a).__name__ for a in actions] == ["Transition", "Render", "Reload"]
    actions = plan([leaving(S.STOPPED, "active", None, Rendered(1, False))])
    assert actions == [StopWatcher("a")]


# ------------------------------------------------------- two controllers


class Host:
    """One host: its controller (a Fleet), its circusd (a FakeSupervisor) and home."""

    def __init__(self, name: str, root: Path, store: InMemoryStore, clock: FakeClock) -> None:
        self.home = Home(root / name)
        for directory in (self.home.root, self.home.bots_d, self.home.root / "bots"):
            directory.mkdir(parents=True, exist_ok=True)
        self.circus = FakeSupervisor(bots_d=self.home.bots_d)
        self.fleet = Fleet(
            store,
            self.circus,
            BotFiles(self.home, sys.executable, BusKeys.open(self.home)),
            clock=clock,
            rng=random.Random(7),
            pid_exists=self.pid_exists,
            host=name,
        )

    def pid_exists(self, pid: int) -> bool:
        return any(pid in watcher.pids for watcher in self.circus.watchers.values())

    def pids(self, bot: str) -> list[int]:
        watcher = self.circus.watchers.get(f"bot-{bot}")
        return list(watcher.pids) if watcher is not None else []

    def heartbeat(self, bot: str) -> None:
        live = self.fleet.observer.live.get(bot)
        self.fleet.on_message(
            protocol.Heartbeat(
                bot=bot,
                pid=self.pids(bot)[0],
                generation=live.generation if live and live.generation > 0 else 1,
                ts=0.0,
                seq=1,
                uptime_s=1.0,
                rss_mb=50.0,
                telegram=protocol.TelegramHealth(connected=True),
                handled=0,
                handler_errors=0,
            )
        )


class Pair:
    def __init__(self, root: Path) -> None:
        self.clock = FakeClock()
        self.store = InMemoryStore(self.clock)
        self.alpha = Host("alpha", root, self.store, self.clock)
        self.beta = Host("beta", root, self.store, self.clock)
        self.hosts = (self.alpha, self.beta)

    def running_on(self, bot: str) -> list[str]:
        return [host.fleet.host for host in self.hosts if host.pids(bot)]

    async def passes(self, count: int = 1, bot: str | None = None) -> None:
        """Passes of both controllers in turn; a bot never runs on both at once."""
        for _ in range(count):
            for host in self.hosts:
                await host.fleet.reconcile()
                if bot is not None:
                    assert len(self.running_on(bot)) <= 1, self.running_on(bot)
                    if host.pids(bot):
                        host.heartbeat(bot)
            self.clock.advance(1.0)


@pytest.fixture
async def pair(tmp_path: Path) -> Pair:
    p = Pair(tmp_path)
    await p.store.set_defaults({"telegram": {"api_id": 1, "api_hash": "h"}}, "test", [])
    return p


async def test_each_controller_runs_only_the_bots_of_its_host(pair: Pair) -> None:
    await pair.alpha.fleet.create({"name": "shop", "token": TOKEN}, "api:test")
    # Created through alpha's API, placed on beta: alpha never renders it.
    await pair.alpha.fleet.create({"name": "news", "token": TOKEN, "host": "beta"}, "api:test")
    await pair.passes(3)
    assert pair.running_on("shop") == ["alpha"] and pair.running_on("news") == ["beta"]
    assert sorted(p.stem for p in pair.alpha.home.bots_d.glob("*.ini")) == ["shop"]
    assert sorted(p.stem for p in pair.beta.home.bots_d.glob("*.ini")) == ["news"]
    for host in pair.hosts:
        host.heartbeat("shop" if host is pair.alpha else "news")
    await pair.passes(1)
    # Either API lists both, with their hosts; live fields only where the bot runs.
    for host in pair.hosts:
        views = {view["name"]: view for view in await host.fleet.list()}
        assert {name: (v["host"], v["held_by"]) for name, v in views.items()} == {
            "news": ("beta", "beta"),
            "shop": ("alpha", "alpha"),
        }
        assert views["shop"]["state"] == views["news"]["state"] == "running"
        own = "shop" if host is pair.alpha else "news"
        other = "news" if own == "shop" else "shop"
        assert views[own]["local"] and views[own]["pid"] is not None
        assert not views[other]["local"]
        assert (views[other]["pid"], views[other]["rss_mb"]) == (None, None)
        assert views[other]["health"]["status"] == "unknown"


async def test_a_moved_bot_stops_on_its_old_host_before_the_new_one_starts_it(
    pair: Pair,
) -> None:
    await pair.alpha.fleet.create({"name": "shop", "token": TOKEN}, "api:test")
    await pair.passes(3, bot="shop")
    assert pair.running_on("shop") == ["alpha"]
    # Moved through beta's API (the database is all they share).
    moved = await pair.beta.fleet.update("shop", {"host": "beta"}, "api:test")
    assert (moved.host, moved.held_by, moved.generation) == ("beta", "alpha", 1)
    await pair.passes(6, bot="shop")
    assert pair.running_on("shop") == ["beta"]
    row = await pair.store.get_bot("shop")
    assert (row.host, row.held_by, row.state) == ("beta", "beta", S.RUNNING)
    assert not pair.alpha.home.bot_dir("shop").exists()  # its config (the token) is gone there
    kinds = [
        (e.kind, e.actor, e.to_state or ",".join(sorted(e.data)))
        for e in await pair.store.events("shop", 0, 100)
        if e.kind in ("host", "transition")
    ]
    stopped = kinds.index(("transition", "reconciler", "stopped"))
    released = kinds.index(("host", "host:alpha", "host,released_by"))
    taken = kinds.index(("host", "host:beta", "held_by"))
    started = kinds.index(("transition", "reconciler", "starting"), taken)
    assert stopped < released < taken < started
    # And back, through alpha's API, with null: the host whose API is asked.
    await pair.alpha.fleet.update("shop", {"host": None}, "api:test")
    await pair.passes(6, bot="shop")
    assert pair.running_on("shop") == ["alpha"]


async def test_only_the_holder_restarts_or_destroys_a_bot(pair: Pair) -> None:
    await pair.alpha.fleet.create({"name": "shop", "token": TOKEN}, "api:test")
    await pair.passes(3, bot="shop")
    with pytest.raises(HeldElsewhere, match="runs on host 'alpha'"):
        await pair.beta.fleet.restart("shop", "api:test")
    with pytest.raises(HeldElsewhere):
        await pair.beta.fleet.destroy("shop", "api:test")
    assert pair.running_on("shop") == ["alpha"]
    # Stop and start go through the database: the holder acts on them.
    await pair.beta.fleet.stop("shop", "api:test")
    await pair.passes(3, bot="shop")
    assert pair.running_on("shop") == []
    assert (await pair.store.get_bot("shop")).state is S.STOPPED
    await pair.beta.fleet.start("shop", "api:test")
    await pair.passes(3, bot="shop")
    assert pair.running_on("shop") == ["alpha"]
    await pair.alpha.fleet.destroy("shop", "api:test")
    assert await pair.store.list_bots() == []


async def test_a_bot_on_a_host_that_is_gone_stays_down_until_moved_and_forgotten(
    pair: Pair,
) -> None:
    await pair.alpha.fleet.create({"name": "shop", "token": TOKEN}, "api:test")
    await pair.passes(3, bot="shop")
    # alpha dies: its controller makes no more passes (its circusd, here, keeps the watcher).
    await pair.beta.fleet.update("shop", {"host": "beta"}, "api:test")
    for _ in range(5):
        await pair.beta.fleet.reconcile()
        pair.clock.advance(1.0)
    assert pair.beta.pids("shop") == []  # alpha still holds it: beta waits
    with pytest.raises(Conflict, match="alpha was seen"):
        await pair.beta.fleet.forget_host("alpha", "api:test")
    with pytest.raises(Conflict, match="cannot forget itself"):
        await pair.beta.fleet.forget_host("beta", "api:test")
    pair.clock.advance(60.0)
    await pair.beta.fleet.reconcile()
    hosts = {h["name"]: h for h in await pair.beta.fleet.hosts()}
    assert (hosts["alpha"]["alive"], hosts["alpha"]["held"]) == (False, 1)
    assert (hosts["beta"]["alive"], hosts["beta"]["answering"]) == (True, True)
    assert await pair.beta.fleet.forget_host("alpha", "api:test") == ["shop"]
    # Taken over: no process of it runs on beta yet, so it is starting, not running (as
    # alpha last recorded it).
    assert (await pair.store.get_bot("shop")).state is S.STARTING
    taken = [e for e in await pair.store.events("shop", 0, 100) if e.actor == "host:beta"]
    assert [(e.kind, e.from_state, e.to_state) for e in taken] == [
        ("host", None, None),
        ("transition", "running", "starting"),
    ]
    await pair.beta.fleet.reconcile()
    pair.clock.advance(1.0)
    await pair.beta.fleet.reconcile()
    assert pair.beta.pids("shop")
    # alpha comes back: it holds nothing any more, so it stops what it still ran.
    await pair.alpha.fleet.reconcile()
    assert pair.alpha.pids("shop") == [] and pair.running_on("shop") == ["beta"]
    assert not pair.alpha.home.bot_dir("shop").exists()  # nor its config, with the token


async def test_a_bad_host_is_refused_and_changes_nothing(pair: Pair) -> None:
    for bad in ("Alpha", "-x", "a..b", "a_b", "x" * 64, "", 7):
        with pytest.raises(InvalidSpec) as caught:
            await pair.alpha.fleet.create({"name": "shop", "token": TOKEN, "host": bad}, "t")
        assert [e.field for e in caught.value.errors] == ["host"]
    assert await pair.store.list_bots() == []
    await pair.alpha.fleet.create({"name": "shop", "token": TOKEN}, "api:test")
    before = await pair.store.get_bot("shop")
    with pytest.raises(InvalidSpec):
        await pair.alpha.fleet.update("shop", {"host": "Not A Host"}, "t")
    assert await pair.store.get_bot("shop") == before


# ------------------------------------------------------------ the setting


@pytest.mark.parametrize(
    ("host", "good"),
    [
        ("alpha", True),
        ("web-1.example.org", True),
        ("0", True),
        ("a" * 63 + "." + "b" * 63, True),
        ("Alpha", False),  # lower case only, as a bot's `host` must be
        ("a" * 64, False),
        ("-a", False),
        ("a-", False),
        ("a..b", False),
        ("a_b", False),
        ("", False),
        ("a\n", False),
    ],
)
def test_a_controller_host_is_a_host_name(host: str, good: bool) -> None:
    settings = ControllerSettings(listen="127.0.0.1:8710", database_url="postgresql://x", host=host)
    if good:
        settings.check()
        return
    with pytest.raises(SettingsError, match="TGFLEET_HOST"):
        settings.check()


def test_the_default_host_is_the_machine_s_name_lower_cased() -> None:
    settings = ControllerSettings(listen="127.0.0.1:8710", database_url="postgresql://x")
    assert settings.host == socket.gethostname().lower() == default_host()
