"""The bot process for real: ``python -m botrunner`` against a real BusServer and real sockets.

Without Telegram: a port that accepts and stays silent (connect must time out,
heartbeats must say disconnected, nothing may hang), a refused port, broken
configs and plugins. With the local sandbox (tgsandbox), when it is
usable: ready, heartbeats, an echo reply to a simulated user, a rejected token.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import psutil
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from harness import free_port, wait_for_async

from botspec import protocol
from controller.bus import BusServer
from controller.buskeys import BusKeys
from controller.home import Home

pytestmark = pytest.mark.integration

M = TypeVar("M", bound=protocol.Message)
ECHO = "botrunner.plugins.echo:setup"
FAST_HEALTH = {
    "heartbeat_interval_s": 0.2,
    "probe_interval_s": 0.5,
    "probe_timeout_s": 1.0,
    "connect_timeout_s": 1.0,
}


@pytest.fixture(scope="module")
def throwaway_key() -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.PKCS1)
        .decode()
    )


@pytest.fixture
def home() -> Iterator[Path]:
    # short: the bus socket path must stay under 107 bytes
    path = Path(tempfile.mkdtemp(prefix="bot-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


_KEYRINGS: dict[Path, BusKeys] = {}


def keyring(home: Path) -> BusKeys:
    """The one keyring of a test's home, shared by its bus and the configs it writes."""
    if home not in _KEYRINGS:
        _KEYRINGS[home] = BusKeys.open(Home(home))
    return _KEYRINGS[home]


@pytest.fixture
async def bus(home: Path) -> AsyncIterator[BusServer]:
    server = BusServer(f"ipc://{home}/bus.sock", keyring(home))
    yield server
    server.close()


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A TCP port that accepts connections and never says a word."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield listener.getsockname()[1]


@pytest.fixture
def refused_port() -> int:
    return free_port()  # reserved for this test, never bound: connecting to it is refused


def write_config(home: Path, name: str = "shop", **overrides: Any) -> Path:
    data_dir = home / "bots" / name
    data_dir.mkdir(parents=True, mode=0o700)
    bus_key = keyring(home).issue(name)
    config: dict[str, Any] = {
        "name": name,
        "generation": 1,
        "data_dir": str(data_dir),
        "bus_endpoint": f"ipc://{home}/bus.sock",
        "bus_secret_key": bus_key.secret_key,
        "bus_server_key": bus_key.server_key,
        "token": "1000001:secret",
        "session": None,
        "plugins": [ECHO],
        "settings": {"prefix": "echo: "},
        "telegram": {"api_id": 1, "api_hash": "sandbox", "server": None},
        "health": FAST_HEALTH,
        "subscribe": [],
    }
    config.update(overrides)
    path = data_dir / "config.json"
    path.write_text(json.dumps(config))
    path.chmod(0o600)
    return path


def server_at(port: int, public_key: str, host: str = "127.0.0.1") -> dict[str, Any]:
    return {
        "api_id": 1,
        "api_hash": "sandbox",
        "server": {"host": host, "port": port, "dc_id": 2, "public_key": public_key},
    }


class Bot:
    """One ``python -m botrunner`` process and the bus messages it sent."""

    def __init__(self, proc: asyncio.subprocess.Process, bus: BusServer) -> None:
        self.proc = proc
        self.bus = bus
        self.messages: list[protocol.Message] = []
        self._pump = asyncio.create_task(self._collect())

    async def _collect(self) -> None:
        async for message in self.bus:
            self.messages.append(message)

    async def expect(
        self, kind: type[M], check: Callable[[M], bool] = lambda _: True, timeout: float = 15.0
    ) -> M:
        """The first message of ``kind`` that passes ``check``, waiting up to ``timeout``
        (failing at once if the bot exits first)."""

        def arrived() -> M | None:
            found = next((m for m in self.messages if isinstance(m, kind) and check(m)), None)
            if found is None and self.proc.returncode is not None:
                raise AssertionError(f"the bot exited with {self.proc.returncode}")
            return found

        try:
            return await wait_for_async(
                f"a {kind.__name__} passing the check", arrived, timeout, ignoring=()
            )
        except AssertionError as exc:
            raise AssertionError(f"{exc}; got: {self.messages[-5:]}") from None

    async def stop(self, timeout: float = 6.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.proc.wait(), timeout)

    async def close(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        self._pump.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._pump


@pytest.fixture
async def start_bot(bus: BusServer) -> AsyncIterator[Callable[..., Any]]:
    bots: list[Bot] = []

    async def start(config: Path, env: dict[str, str] | None = None) -> Bot:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "botrunner", str(config), env={**os.environ, **(env or {})}
        )
        bot = Bot(proc, bus)
        bots.append(bot)
        return bot

    yield start
    for bot in bots:
        await bot.close()


# ---------------------------------------------------------------- no Telegram needed


async def run_to_exit(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "botrunner", *args, stderr=asyncio.subprocess.PIPE
    )
    try:
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, err.decode()


async def test_an_invalid_config_exits_78_with_one_line(home: Path) -> None:
    config = write_config(home, telegram={"api_id": "one", "api_hash": "", "server": None})
    code, err = await run_to_exit(str(config))
    assert code == 78
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "telegram.api_id: must be a positive integer" in lines[0]
    assert "telegram.api_hash" in lines[0]


async def test_a_config_others_can_read_exits_78(home: Path) -> None:
    config = write_config(home)
    config.chmod(0o644)
    code, err = await run_to_exit(str(config))
    assert code == 78
    assert "chmod 600" in err


async def test_a_missing_config_exits_78(home: Path) -> None:
    code, err = await run_to_exit(str(home / "nope.json"))
    assert (code, err.count("\n")) == (78, 1)
    assert "cannot read" in err


async def test_a_silent_server_times_out_reports_disconnected_and_stops_at_once(
    home: Path, bus: BusServer, start_bot: Any, silent_port: int, throwaway_key: str
) -> None:
    bot = await start_bot(write_config(home, telegram=server_at(silent_port, throwaway_key)))
    first = await bot.expect(protocol.Heartbeat)
    assert first.telegram.connected is False
    assert first.bot == "shop" and first.pid == bot.proc.pid and first.generation == 1
    timed_out = await bot.expect(
        protocol.Heartbeat, lambda h: "no answer" in (h.telegram.last_error or "")
    )
    assert timed_out.telegram.connected is False
    assert timed_out.telegram.disconnected_since is not None
    assert f"127.0.0.1:{silent_port}" in (timed_out.telegram.last_error or "")
    # heartbeats keep flowing while it retries: the loop is not stuck in connect()
    later = await bot.expect(protocol.Heartbeat, lambda h: h.seq >= timed_out.seq + 3)
    assert later.uptime_s > timed_out.uptime_s
    assert 20 < later.rss_mb < 200
    stopped_at = time.monotonic()
    assert await bot.stop() == 0
    assert time.monotonic() - stopped_at < 3
    stopping = await bot.expect(protocol.Stopping, timeout=1)
    assert stopping.reason == "SIGTERM"
    assert not any(isinstance(m, protocol.Ready) for m in bot.messages)


async def test_a_refused_port_is_reported_and_retried(
    home: Path, bus: BusServer, start_bot: Any, refused_port: int, throwaway_key: str
) -> None:
    bot = await start_bot(write_config(home, telegram=server_at(refused_port, throwaway_key)))
    refused = await bot.expect(
        protocol.Heartbeat, lambda h: "cannot connect" in (h.telegram.last_error or "")
    )
    assert refused.telegram.connected is False
    assert await bot.stop() == 0
    await bot.expect(protocol.Stopping, timeout=1)


async def test_a_plugin_that_cannot_be_imported_is_fatal_and_the_bot_idles(
    home: Path, bus: BusServer, start_bot: Any, refused_port: int, throwaway_key: str
) -> None:
    bot = await start_bot(
        write_config(
            home,
            plugins=[ECHO, "no_such_plugin_module:setup"],
            telegram=server_at(refused_port, throwaway_key),
        )
    )
    fatal = await bot.expect(protocol.Fatal)
    assert (fatal.kind, fatal.error) == ("plugin", "ModuleNotFoundError")
    assert "no_such_plugin_module:setup" in fatal.detail
    # it stays alive (no respawn loop under Circus), saying why in every heartbeat
    after = await bot.expect(
        protocol.Heartbeat, lambda h: h.fatal is not None and h.ts > fatal.ts + 0.5
    )
    assert after.fatal == protocol.FatalInfo("plugin", fatal.error, fatal.detail)
    assert bot.proc.returncode is None
    assert await bot.stop() == 0
    await bot.expect(protocol.Stopping, timeout=1)


async def test_no_controller_does_not_stop_the_bot(
    home: Path, refused_port: int, throwaway_key: str
) -> None:
    config = write_config(home, telegram=server_at(refused_port, throwaway_key))
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "botrunner", str(config))
    try:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), 1.5)
        assert proc.returncode is None
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 5) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_a_plugin_whose_setup_raises_is_fatal_without_touching_telegram(
    home: Path, bus: BusServer, start_bot: Any, silent_port: int, throwaway_key: str
) -> None:
    plugins = home / "plugins"
    plugins.mkdir()
    (plugins / "broken_setup.py").write_text(
        "async def setup(client, ctx):\n    raise RuntimeError('no prefix configured')\n"
    )
    config = write_config(
        home,
        plugins=[ECHO, "broken_setup:setup"],
        telegram=server_at(silent_port, throwaway_key),
    )
    bot = await start_bot(config, env={"PYTHONPATH": str(plugins)})
    fatal = await bot.expect(protocol.Fatal)
    assert (fatal.kind, fatal.error) == ("plugin", "RuntimeError")
    assert "broken_setup:setup: setup failed" in fatal.detail
    assert "no prefix configured" in fatal.detail
    assert await bot.stop() == 0


# ---------------------------------------------------------------- with the local sandbox
# (the session-scoped ``sandbox`` fixture of tests/conftest.py: a real process)


def sandbox_usable() -> str | None:
    """Why the sandbox cannot be used here, or None."""
    package = Path(__file__).resolve().parents[2] / "tgsandbox"
    if not (package / "__main__.py").exists():
        return "the sandbox (tgsandbox) is not there"
    return None


needs_sandbox = pytest.mark.skipif(sandbox_usable() is not None, reason=str(sandbox_usable()))


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:8]}"


@needs_sandbox
async def test_echo_bot_against_the_sandbox(
    home: Path, bus: BusServer, start_bot: Any, sandbox: Any
) -> None:
    from tgsandbox.admin_client import AdminClient

    name = unique("echo")
    async with AdminClient(sandbox.admin) as admin:
        created = await admin.create_bot(name)
        bot = await start_bot(
            write_config(
                home,
                name=name,
                token=created.token,
                telegram=sandbox.telegram_defaults(),
                settings={"prefix": "echo: "},
            )
        )
        ready = await bot.expect(protocol.Ready)
        assert ready.telegram.connected is True
        assert ready.telegram.me_id == created.id
        assert ready.telegram.me_username == created.username
        assert 0 < ready.startup_s < 10
        healthy = await bot.expect(protocol.Heartbeat, lambda h: h.telegram.connected)
        assert healthy.telegram.disconnected_since is None
        rss_after_ready = healthy.rss_mb
        memory = psutil.Process(bot.proc.pid).memory_full_info()
        assert abs(memory.rss / 2**20 - rss_after_ready) < 5  # the heartbeat tells the truth
        # Telethon without aiohttp is ~53 MB; nothing heavy may come on top (memory x bots)
        assert rss_after_ready < 80

        user = unique("u")
        sent = await admin.send_as_user(user, created.username, "hello there")
        reply = await admin.wait_for_reply(user, created.username, after_id=sent.id, timeout_s=10)
        assert reply.text == "echo: hello there"
        counted = await bot.expect(protocol.Heartbeat, lambda h: h.handled >= 1)
        assert counted.handler_errors == 0
        assert counted.telegram.last_update_age_s is not None
        # probes keep it connected (not just Telethon's optimism)
        await bot.expect(
            protocol.Heartbeat, lambda h: h.telegram.connected and h.seq > counted.seq + 3
        )

    stopped_at = time.monotonic()
    assert await bot.stop() == 0
    assert time.monotonic() - stopped_at < 5
    stopping = await bot.expect(protocol.Stopping, timeout=1)
    assert stopping.reason == "SIGTERM"
    print(
        f"\nbot {name}: startup_s={ready.startup_s} rss_mb_after_ready={rss_after_ready}"
        f" uss_mb={memory.uss / 2**20:.1f}"
    )


@needs_sandbox
async def test_a_rejected_token_is_fatal_and_the_bot_waits_for_sigterm(
    home: Path, bus: BusServer, start_bot: Any, sandbox: Any
) -> None:
    bot = await start_bot(
        write_config(
            home,
            name=unique("bad"),
            token="999999999:NotARealTokenAtAll",
            telegram=sandbox.telegram_defaults(),
        )
    )
    fatal = await bot.expect(protocol.Fatal)
    assert fatal.kind == "auth"
    assert fatal.error in ("ACCESS_TOKEN_INVALID", "ACCESS_TOKEN_EXPIRED")
    after = await bot.expect(
        protocol.Heartbeat, lambda h: h.fatal is not None and h.ts > fatal.ts + 1.0
    )
    assert after.telegram.connected is False
    assert bot.proc.returncode is None  # still alive: no respawn loop
    assert await bot.stop() == 0
    await bot.expect(protocol.Stopping, timeout=1)


async def start_echo_bot(
    home: Path, start_bot: Any, sandbox: Any, admin: Any, **settings: Any
) -> tuple[Any, Bot]:
    created = await admin.create_bot(unique("f"))
    bot = await start_bot(
        write_config(
            home,
            name=created.name,
            token=created.token,
            telegram=sandbox.telegram_defaults(),
            settings=settings or {"prefix": "echo: "},
        )
    )
    await bot.expect(protocol.Ready)
    return created, bot


@needs_sandbox
async def test_a_blackhole_is_reported_then_recovered_from(
    home: Path, bus: BusServer, start_bot: Any, sandbox: Any
) -> None:
    from tgsandbox.admin_client import AdminClient

    async with AdminClient(sandbox.admin) as admin:
        created, bot = await start_echo_bot(home, start_bot, sandbox, admin)
        fault_at = time.time()
        await admin.set_fault(created.name, "blackhole")
        lost = await bot.expect(
            protocol.Heartbeat, lambda h: not h.telegram.connected and h.ts > fault_at
        )
        assert "probe" in (lost.telegram.last_error or "")
        assert lost.telegram.disconnected_since is not None
        # a peer that stays silent is not waited on for minutes: the bot reconnects
        await bot.expect(
            protocol.Heartbeat,
            lambda h: "connect_timeout_s" in (h.telegram.last_error or "") and h.ts > fault_at,
        )
        await admin.clear_fault(created.name)
        await bot.expect(
            protocol.Heartbeat, lambda h: h.telegram.connected and h.seq > lost.seq, timeout=20
        )
        user = unique("u")
        sent = await admin.send_as_user(user, created.username, "still there?")
        reply = await admin.wait_for_reply(user, created.username, after_id=sent.id)
        assert reply.text == "echo: still there?"
    assert await bot.stop() == 0


@needs_sandbox
async def test_a_flood_wait_in_a_handler_is_counted_and_reported(
    home: Path, bus: BusServer, start_bot: Any, sandbox: Any
) -> None:
    from tgsandbox.admin_client import AdminClient

    async with AdminClient(sandbox.admin) as admin:
        created, bot = await start_echo_bot(home, start_bot, sandbox, admin)
        await admin.set_fault(created.name, "flood", seconds=300)
        await admin.send_as_user(unique("u"), created.username, "hello")
        flooded = await bot.expect(protocol.Heartbeat, lambda h: h.handler_errors >= 1)
        assert flooded.telegram.flood_wait_until is not None
        assert flooded.telegram.flood_wait_until > time.time() + 200
        assert flooded.telegram.connected is True  # never a reason to restart
        await admin.clear_fault(created.name)
    assert await bot.stop() == 0


@needs_sandbox
async def test_revoked_credentials_while_running_are_fatal(
    home: Path, bus: BusServer, start_bot: Any, sandbox: Any
) -> None:
    from tgsandbox.admin_client import AdminClient

    async with AdminClient(sandbox.admin) as admin:
        created, bot = await start_echo_bot(home, start_bot, sandbox, admin)
        await admin.set_fault(created.name, "revoke")
        # Generous: the probe notices, then the re-login is refused (it may first retry
        # a transient failure on a loaded machine).
        fatal = await bot.expect(protocol.Fatal, timeout=45)
        assert fatal.kind == "auth"
        await admin.clear_fault(created.name)
    assert bot.proc.returncode is None
    assert await bot.stop() == 0


SLOW_PLUGIN = """
import asyncio
from telethon import events


def setup(client, ctx):
    async def slow(event):
        await ctx.publish("handler.started", event.raw_text)
        await asyncio.sleep(1.0)
        await event.respond("done: " + event.raw_text)

    client.add_event_handler(slow, events.NewMessage(incoming=True))
"""


@needs_sandbox
async def test_sigterm_lets_a_running_handler_finish(
    home: Path, bus: BusServer, start_bot: Any, sandbox: Any
) -> None:
    from tgsandbox.admin_client import AdminClient

    plugins = home / "plugins"
    plugins.mkdir()
    (plugins / "slow_reply.py").write_text(SLOW_PLUGIN)
    async with AdminClient(sandbox.admin) as admin:
        created = await admin.create_bot(unique("slow"))
        bot = await start_bot(
            write_config(
                home,
                name=created.name,
                token=created.token,
                plugins=["slow_reply:setup"],
                telegram=sandbox.telegram_defaults(),
            ),
            env={"PYTHONPATH": str(plugins)},
        )
        await bot.expect(protocol.Ready)
        user = unique("u")
        sent = await admin.send_as_user(user, created.username, "take your time")
        await bot.expect(protocol.Event, lambda e: e.topic == "handler.started")
        bot.proc.send_signal(signal.SIGTERM)
        reply = await admin.wait_for_reply(user, created.username, after_id=sent.id)
        assert reply.text == "done: take your time"
        assert await asyncio.wait_for(bot.proc.wait(), 6) == 0
        stopping = await bot.expect(protocol.Stopping, timeout=1)
        last = [m for m in bot.messages if isinstance(m, protocol.Heartbeat)][-1]
        assert last.ts <= stopping.ts


@needs_sandbox
async def test_a_restarted_bot_answers_what_came_while_it_was_down(
    home: Path, bus: BusServer, start_bot: Any, sandbox: Any
) -> None:
    from tgsandbox.admin_client import AdminClient

    async with AdminClient(sandbox.admin) as admin:
        created = await admin.create_bot(unique("r"))
        config = write_config(
            home, name=created.name, token=created.token, telegram=sandbox.telegram_defaults()
        )
        first = await start_bot(config)
        await first.expect(protocol.Ready)
        # One exchange first: Telethon takes a saved pts of 0 for "no saved state"
        # (and the sandbox starts a new bot at pts 0), so there must be one update.
        user = unique("u")
        sent = await admin.send_as_user(user, created.username, "hi")
        await admin.wait_for_reply(user, created.username, after_id=sent.id)
        assert await first.stop() == 0
        sent = await admin.send_as_user(user, created.username, "while you were out")
        second = await start_bot(config)  # same data dir: same session file
        ready = await second.expect(protocol.Ready)
        assert ready.pid != first.proc.pid
        reply = await admin.wait_for_reply(user, created.username, after_id=sent.id)
        assert reply.text == "echo: while you were out"
        assert await second.stop() == 0
