"""circusd for real: rendered circus.ini and watcher files, reloadconfig, respawn, errno 5."""

# The fixtures are imported (they live in circus_fixtures.py), so pytest's
# injection by argument name looks like a redefinition to ruff.
# ruff: noqa: F811

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import pwd
import signal
import stat
import subprocess
import time
from collections.abc import Awaitable, Callable

import psutil
import pytest
from circus_fixtures import (  # noqa: F401  (fixtures; tests/integration is on sys.path)
    PYTHON,
    TGFLEET_CIRCUSD,
    Circusd,
    circusd_factory,
    short_home,
    write_sleeper,
)
from harness import wait_for_async

from controller.atomicfile import write_atomic
from controller.botusers import BotUsers
from controller.childwatch import RESPAWN_SPACING_S
from controller.circus import CircusClient, CircusError, CircusUnavailable, WatcherNotFound
from controller.home import Home
from controller.render import BotWatcher, render_circus_ini, render_watcher

pytestmark = pytest.mark.integration

CHECK_DELAY_S = 0.5
#: A poll no test waits for: what circusd then notices, it learned from SIGCHLD.
NO_POLL_S = 3600
Factory = Callable[..., Awaitable[Circusd]]


def write_circus_ini(home: Home, *, poll_s: float | None = None) -> None:
    text = render_circus_ini(
        home,
        python=PYTHON,
        listen="127.0.0.1:0",
        embedded_pg=None,
        sandbox=None,
        check_delay=CHECK_DELAY_S,
        controller_argv=[PYTHON, "-c", "import time; time.sleep(1e6)"],
    )
    if poll_s is not None:  # beyond what render allows (a fleet's circusd must poll too)
        line = f"check_delay = {CHECK_DELAY_S}\n"
        assert line in text
        text = text.replace(line, f"check_delay = {poll_s}\n")
    write_atomic(home.circus_ini, text, 0o600)


def write_bot(home: Home, bot: BotWatcher, python: str) -> None:
    home.bot_dir(bot.name).mkdir(mode=0o700, exist_ok=True)
    write_atomic(home.watcher_file(bot.name), render_watcher(home, bot, python=python), 0o600)


async def test_reloadconfig_touches_only_changed_watchers(
    short_home: Home, circusd_factory: Factory
) -> None:
    home = short_home
    sleeper = str(write_sleeper(home.root / "fakepy"))
    write_circus_ini(home)
    for name in ("keep", "change", "gone"):
        write_bot(home, BotWatcher(name, autostart=True, memory_limit_mb=128), sleeper)
    circusd = await circusd_factory(home)
    client = circusd.client

    await circusd.wait_for(
        "the three watchers active",
        lambda: _all_active(client, ["bot-keep", "bot-change", "bot-gone"]),
    )
    before = {name: await client.pids(name) for name in ("controller", "bot-keep", "bot-change")}
    await circusd.remember_pids()
    assert all(len(pids) == 1 for pids in before.values())

    # the rendered limits reached the process
    keep = psutil.Process(before["bot-keep"][0])
    assert keep.rlimit(psutil.RLIMIT_DATA) == (128 * 2**20, 128 * 2**20)
    # circus adds PWD, and leaks the section name as "__name__"; nothing else
    env = keep.environ()
    assert env.pop("PWD") == str(home.bot_dir("keep"))
    assert env.pop("__name__") == "env:bot-keep"
    assert env == {
        "HOME": str(home.bot_dir("keep")),
        "LANG": "C.UTF-8",
        "MALLOC_ARENA_MAX": "2",
        "PYTHONUNBUFFERED": "1",
        "TGFLEET_GENERATION": "0",
    }
    assert keep.cwd() == str(home.bot_dir("keep"))
    # umask 077: the control socket (0700: x means nothing on a socket) and logs are private
    assert stat.S_IMODE(os.stat(home.circus_socket).st_mode) & 0o077 == 0
    assert stat.S_IMODE(os.stat(home.logs_dir / "bot-keep.out.log").st_mode) == 0o600

    write_bot(home, BotWatcher("added", autostart=True, memory_limit_mb=128), sleeper)
    write_bot(home, BotWatcher("change", autostart=True, memory_limit_mb=256), sleeper)
    home.watcher_file("gone").unlink()
    await client.reloadconfig()

    status = await client.status()
    assert "bot-gone" not in status
    # created after startup: circusd's own umask 077 applies
    assert stat.S_IMODE(os.stat(home.logs_dir / "bot-added.err.log").st_mode) == 0o600
    await circusd.wait_for(
        "kept, changed and added active",
        lambda: _all_active(client, ["bot-keep", "bot-change", "bot-added"]),
    )
    await circusd.remember_pids()
    assert await client.pids("bot-keep") == before["bot-keep"]
    assert await client.pids("controller") == before["controller"]
    assert await client.pids("bot-change") != before["bot-change"]
    changed = psutil.Process((await client.pids("bot-change"))[0])
    assert changed.rlimit(psutil.RLIMIT_DATA)[0] == 256 * 2**20
    with pytest.raises(WatcherNotFound):
        await client.pids("bot-gone")

    # a reload with nothing changed touches nothing at all
    snapshot = {name: await client.pids(name) for name in status if name != "bot-gone"}
    await client.reloadconfig()
    assert {name: await client.pids(name) for name in snapshot} == snapshot


async def test_kill_9_respawns_within_check_delay(
    short_home: Home, circusd_factory: Factory
) -> None:
    home = short_home
    write_circus_ini(home)
    write_bot(home, BotWatcher("victim", autostart=True, memory_limit_mb=128), sleeper_in(home))
    circusd = await circusd_factory(home)
    client = circusd.client
    await circusd.wait_for("the victim active", lambda: _all_active(client, ["bot-victim"]))
    await circusd.remember_pids()

    timings = []
    for _ in range(3):
        (old,) = await client.pids("bot-victim")
        psutil.Process(old).kill()
        started = time.monotonic()
        await circusd.wait_for(
            "the victim respawned", lambda old=old: _respawned(client, "bot-victim", old)
        )
        timings.append(time.monotonic() - started)
        await circusd.remember_pids()
    (pid,) = await client.pids("bot-victim")
    stats = await client.stats("bot-victim")
    assert list(stats) == [pid]
    assert 0 < stats[pid].rss_bytes < 50 * 2**20  # a sleep(1)
    print(f"kill -9 -> respawn at check_delay={CHECK_DELAY_S}s: {[round(t, 2) for t in timings]}")
    assert max(timings) < CHECK_DELAY_S + 0.5


async def test_tgfleet_circusd_respawns_a_killed_child_on_sigchld(
    short_home: Home, circusd_factory: Factory
) -> None:
    """circusd as tgfleet runs it respawns a child killed -9 although its poll is an hour
    away, also while another command holds its lock (a 2 s graceful stop), and leaves
    the other watchers' processes alone."""
    home = short_home
    write_circus_ini(home, poll_s=NO_POLL_S)
    write_bot(home, BotWatcher("victim", autostart=True, memory_limit_mb=128), sleeper_in(home))
    write_bot(home, BotWatcher("calm", autostart=True, memory_limit_mb=128), sleeper_in(home))
    stubborn = str(write_sleeper(home.root / "stubborn", ignore_term=True))
    write_bot(
        home,
        BotWatcher("slow", autostart=True, memory_limit_mb=128, graceful_timeout_s=2.0),
        stubborn,
    )
    circusd = await circusd_factory(home, TGFLEET_CIRCUSD)
    client = circusd.client
    watchers = ["bot-victim", "bot-calm", "bot-slow"]
    await circusd.wait_for("the watchers active", lambda: _all_active(client, watchers))
    await circusd.remember_pids()
    calm = await client.pids("bot-calm")

    for _ in range(3):
        (old,) = await client.pids("bot-victim")
        psutil.Process(old).kill()
        await circusd.wait_for(
            "the victim respawned", lambda old=old: _respawned(client, "bot-victim", old)
        )
        await circusd.remember_pids()

    # the lock is held by a graceful stop when the victim dies: respawned after it
    (old,) = await client.pids("bot-victim")
    await client.stop("bot-slow")  # answers at once; circusd holds its lock ~2 s
    psutil.Process(old).kill()
    await circusd.wait_for(
        "the victim respawned after the stop",
        lambda: _respawned(client, "bot-victim", old),
    )
    await circusd.remember_pids()
    assert (await client.status())["bot-slow"] == "stopped"
    assert await client.pids("bot-calm") == calm
    assert psutil.Process(calm[0]).is_running()


async def test_tgfleet_circusd_spaces_the_respawns_of_a_crash_loop(
    short_home: Home, circusd_factory: Factory
) -> None:
    """A child that dies as it starts is respawned on SIGCHLD no sooner than
    RESPAWN_SPACING_S after its last start (not as fast as it dies: a core pinned),
    and still respawned although circusd's poll is an hour away."""
    home = short_home
    write_circus_ini(home, poll_s=NO_POLL_S)
    starts = home.root / "starts"
    crasher = home.root / "crashpy"
    crasher.write_text(f"#!/bin/sh\ndate +%s.%N >> {starts}\nexit 3\n")
    crasher.chmod(0o755)
    write_bot(home, BotWatcher("looper", autostart=True, memory_limit_mb=128), str(crasher))
    write_bot(home, BotWatcher("calm", autostart=True, memory_limit_mb=128), sleeper_in(home))
    circusd = await circusd_factory(home, TGFLEET_CIRCUSD)
    client = circusd.client
    await circusd.wait_for("the calm one active", lambda: _all_active(client, ["bot-calm"]))
    await circusd.remember_pids()
    calm = await client.pids("bot-calm")

    def stamps() -> list[float]:
        return [float(line) for line in starts.read_text().split()] if starts.exists() else []

    async def started_five_times() -> bool:
        return len(stamps()) >= 5

    await circusd.wait_for("five starts of the looper", started_five_times, timeout_s=30)
    times = stamps()
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    print(f"crash loop: {len(times)} starts, gaps {[round(g, 3) for g in gaps]}")
    # The child's own clock: each start is logged a little after circus spawned it, so
    # a gap may fall short of the spacing by that much; never by half of it.
    assert min(gaps) >= RESPAWN_SPACING_S / 2, gaps
    assert await client.pids("bot-calm") == calm


@pytest.mark.skipif(os.geteuid() != 0, reason="the keeper runs in circusd as root")
async def test_a_daemonised_tgfleet_circusd_serves_the_keeper_and_the_gate(
    short_home: Home,
) -> None:
    """``python -m controller.circusd --daemon`` (the Ansible role's ``daemon`` service
    manager): circus forks twice and closes every descriptor before its arbiter runs;
    the keeper, the gate and the pub/sub socket's owner still serve the service user."""
    home = short_home
    write_circus_ini(home)
    users = BotUsers(home, enabled=True)
    log = home.logs_dir / "circusd.log"
    circusd_pid: int | None = None
    try:
        service = users.ensure_service()
        assert service is not None
        # the service user reaches run/ (`tgfleet up` gives it an ACL on the home)
        home.root.chmod(0o711)
        home.run_dir.chmod(0o711)
        launched = await asyncio.to_thread(
            subprocess.run,
            [*TGFLEET_CIRCUSD, "--daemon", "--log-output", str(log), str(home.circus_ini)],
            cwd=home.root,
            umask=0o077,
            capture_output=True,
            timeout=60,
            check=False,
        )
        assert launched.returncode == 0, launched.stderr  # the daemon went on alone

        async def daemon_pid() -> int | None:
            try:
                await CircusClient(home.circus_endpoint, timeout_s=0.5).list_watchers()
                return int(home.circusd_pidfile.read_text())
            except (CircusUnavailable, FileNotFoundError, ValueError):
                return None

        circusd_pid = await wait_for_async("the daemon to answer", daemon_pid, 20, ignoring=())

        request = {"op": "has_config", "bot": "nobody"}
        answer = await asyncio.to_thread(ask_keeper_as, home, service.uid, request)
        assert answer == {"ok": True, "exists": False}, _daemon_log(home)
        # the gate forwards the service user's commands to circusd
        watchers = await CircusClient(home.circus_gate_endpoint, timeout_s=5).list_watchers()
        assert "controller" in watchers
        # and circusd's events are the service user's to read
        await wait_for_async(
            "the pub/sub socket given to the service user",
            lambda: _owned_by(home.circus_pubsub_socket, service.uid),
            10,
            0.05,
            ignoring=(),
        )
        await _stop_daemon(home, circusd_pid)
        circusd_pid = None

        # A keeper that cannot start (its socket's path taken) stops circusd, not 0.
        home.keeper_socket.unlink(missing_ok=True)
        home.keeper_socket.mkdir()
        failed = await asyncio.to_thread(
            subprocess.run,
            [*TGFLEET_CIRCUSD, "--log-output", str(log), str(home.circus_ini)],
            cwd=home.root,
            umask=0o077,
            capture_output=True,
            timeout=60,
            check=False,
        )
        assert failed.returncode == 1, _daemon_log(home)
        assert "the keeper and the gate could not start: circusd quits" in log.read_text()
    finally:
        if circusd_pid is not None:
            await _stop_daemon(home, circusd_pid)
        users.remove_all()
    assert not [u.pw_name for u in pwd.getpwall() if str(home.root) in u.pw_gecos]


# One request on stdin, its answer out: run as the service user, standard library only.
ASK_KEEPER = """
import socket, sys
with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
    conn.settimeout(30)
    conn.connect(sys.argv[1])
    conn.sendall(sys.stdin.buffer.read())
    conn.shutdown(socket.SHUT_WR)
    print(conn.makefile().read().strip(), flush=True)
"""


def ask_keeper_as(home: Home, uid: int, request: dict[str, object]) -> object:
    account = pwd.getpwuid(uid)
    done = subprocess.run(
        [os.path.realpath(PYTHON), "-I", "-c", ASK_KEEPER, str(home.keeper_socket)],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        timeout=60,
        user=uid,
        group=account.pw_gid,
        extra_groups=[],
        check=False,
    )
    assert done.returncode == 0, done.stderr + _daemon_log(home)
    return json.loads(done.stdout)


async def _owned_by(path: os.PathLike[str], uid: int) -> bool:
    try:
        return os.lstat(path).st_uid == uid
    except FileNotFoundError:
        return False


async def _stop_daemon(home: Home, pid: int) -> None:
    """Quit the daemon (and so its watchers); kill -9 its group if it does not go."""
    with contextlib.suppress(CircusUnavailable):
        await CircusClient(home.circus_endpoint, timeout_s=5).quit()

    async def gone() -> bool:
        return not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"

    try:
        await wait_for_async("the daemon to quit", gone, 20, 0.05, ignoring=())
    except AssertionError:
        daemon = psutil.Process(pid)
        for process in [*daemon.children(recursive=True), daemon]:
            process.send_signal(signal.SIGKILL)
        raise


def _daemon_log(home: Home) -> str:
    path = home.logs_dir / "circusd.log"
    return "\n" + path.read_text() if path.exists() else ""


def sleeper_in(home: Home) -> str:
    return str(write_sleeper(home.root / "fakepy"))


async def test_busy_arbiter_errno_5_is_retried(short_home: Home, circusd_factory: Factory) -> None:
    home = short_home
    write_circus_ini(home)
    stubborn = str(write_sleeper(home.root / "stubborn", ignore_term=True))
    write_bot(
        home,
        BotWatcher("slow", autostart=True, memory_limit_mb=128, graceful_timeout_s=2.0),
        stubborn,
    )
    write_bot(home, BotWatcher("other", autostart=True, memory_limit_mb=128), sleeper_in(home))
    circusd = await circusd_factory(home)
    client = circusd.client
    await circusd.wait_for(
        "slow and other active", lambda: _all_active(client, ["bot-slow", "bot-other"])
    )
    await circusd.remember_pids()

    started = time.monotonic()
    await client.stop("bot-slow")  # answers at once; circusd holds its lock ~2 s
    impatient = CircusClient(home.circus_endpoint, busy_retry_s=0)
    with pytest.raises(CircusError) as refused:
        await impatient.restart("bot-other")
    assert refused.value.errno == 5
    assert refused.value.busy
    assert "already running" in refused.value.reason

    await client.restart("bot-other")  # retried until the stop is over
    waited = time.monotonic() - started
    print(f"restart retried through a 2 s graceful stop: answered after {waited:.2f}s")
    assert 1.5 < waited < 5
    assert (await client.status())["bot-slow"] == "stopped"
    await circusd.wait_for("the other active", lambda: _all_active(client, ["bot-other"]))
    await circusd.remember_pids()


async def _all_active(client: CircusClient, names: list[str]) -> bool:
    status = await client.status()
    if not all(status.get(name) == "active" for name in names):
        return False
    counts = [len(await client.pids(name)) for name in names]
    return counts == [1] * len(names)


async def _respawned(client: CircusClient, name: str, old: int) -> bool:
    pids = await client.pids(name)
    return bool(pids) and pids != [old]
