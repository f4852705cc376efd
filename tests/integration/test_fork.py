"""Fork mode and exec mode, side by side; the fork server's own failures.

A fork-mode bot's watcher runs the launcher, the bot itself is a child of the fork
server: each test checks what a user sees (the API's pid is the bot's own process,
its limits, its answers) and what Circus sees (respawn, stop, crash loop).
"""

from __future__ import annotations

import configparser
import os
import pwd
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import drills
import psutil
import pytest
from harness import Fleet, Sandbox, holds_for, running_fleet, short_tmpdir, wait_for

from botspec import forked
from controller import watchercheck
from controller.botusers import bot_user_name

pytestmark = pytest.mark.integration

MIB = 1024 * 1024
LAUNCHES = ["fork", "exec"]


def circus_pids(fleet: Fleet, watcher: str) -> list[int]:
    listed = fleet.circusctl("list", watcher).replace(",", " ").split()
    return [int(p) for p in listed if p.isdigit()]


def forkserver_pid(fleet: Fleet) -> int:
    pids = wait_for("the fork server", lambda: circus_pids(fleet, "forkserver"))
    return pids[0]


def add(
    fleet: Fleet,
    sandbox: Sandbox,
    prefix: str,
    launch: str,
    *,
    wait: bool = True,
    plugins: list[str] | None = None,
    **fields: Any,
) -> str:
    name = f"{prefix}-{launch}-{next(drills._serial)}"
    token = sandbox.create_bot(drills.sandbox_name(name))
    spec = {
        "name": name,
        "token": token,
        "plugins": plugins or [drills.CHAOS],
        "launch": launch,
        **fields,
    }
    fleet.api("POST", "/api/v1/bots", spec)
    if wait:
        drills.connected(fleet, name)
    return name


def check_process(fleet: Fleet, name: str, launch: str) -> int:
    """The API's pid is the bot's own process, placed as its launch mode says; its pid."""
    pid = int(fleet.bot(name)["pid"])
    [watcher] = circus_pids(fleet, f"bot-{name}")
    bot = psutil.Process(pid)
    if launch == "fork":
        assert pid != watcher, "the API shows the launcher's pid, not the bot's"
        assert bot.ppid() == forkserver_pid(fleet)
        # the launcher in C, which scripts/_venv.sh builds (as setup.py does for the wheel)
        assert Path(psutil.Process(watcher).exe()).name == "tgf-launcher"
        assert forked.bot_pid(fleet.home.run_dir, name, watcher) == pid
    else:
        assert pid == watcher
        assert bot.cmdline()[1:3] == ["-m", "botrunner"]
    if os.geteuid() == 0:
        assert bot.uids().real == pwd.getpwnam(bot_user_name(fleet.home, name)).pw_uid
    return pid


def data_limit(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max data size"):
            return int(line.split()[3])
    raise AssertionError(f"no data limit in /proc/{pid}/limits")


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.parametrize("launch", LAUNCHES)
def test_a_bot_lives_its_life_in_either_launch_mode(
    fleet: Fleet, sandbox: Sandbox, launch: str
) -> None:
    name = add(fleet, sandbox, "life", launch, memory_limit_mb=300)
    pid = check_process(fleet, name, launch)
    assert data_limit(pid) == 300 * MIB
    assert drills.answered_in(sandbox, name, time.monotonic(), "hello") < 30

    # kill -9: Circus respawns it (through a new launcher in fork mode)
    drills.kill_9(fleet, sandbox, name)
    crashes = drills.health_events(fleet, name, "crash")
    assert crashes and crashes[0]["data"]["exit_code"] == -9
    assert crashes[0]["reason"].startswith(f"process {pid} exited with code -9")
    pid = check_process(fleet, name, launch)

    # SIGSTOP: the health checker kills the hung process, a new one answers
    drills.sigstop(fleet, sandbox, name)
    assert gone(pid)
    pid = check_process(fleet, name, launch)

    # stop: SIGTERM reaches the bot, which drains and exits within its graceful timeout
    crashes_before = len(drills.health_events(fleet, name, "crash"))
    started = time.monotonic()
    fleet.api("POST", f"/api/v1/bots/{name}/stop")
    fleet.wait_state(name, "stopped")
    wait_for("the bot's process to end", lambda: gone(pid), timeout=10)
    assert time.monotonic() - started < 5.0 + 3.0  # graceful_timeout_s plus the API's round trips
    assert len(drills.health_events(fleet, name, "crash")) == crashes_before  # it exited with 0

    fleet.api("POST", f"/api/v1/bots/{name}/start")
    drills.connected(fleet, name, not_pid=pid)
    check_process(fleet, name, launch)
    fleet.api("DELETE", f"/api/v1/bots/{name}")


@pytest.mark.parametrize("launch", LAUNCHES)
def test_a_crash_loop_ends_in_failed(fleet: Fleet, sandbox: Sandbox, launch: str) -> None:
    name = add(fleet, sandbox, "loop", launch, settings={"exit_at_start": 3}, wait=False)
    bot = fleet.wait_state(name, "failed", timeout=60)
    assert "exit code 3" in bot["reason"]
    assert bot["health"]["last_failure"]["kind"] == "crash_loop"
    fleet.api("DELETE", f"/api/v1/bots/{name}")


# ---------------------------------------------------------------- the fork server itself

PLUGIN = "tgf_version_plugin"
PLUGIN_SOURCE = """
from telethon import events

VERSION = {version!r}


def setup(client, ctx):
    @client.on(events.NewMessage(pattern="/version"))
    async def version(event):
        await event.reply("version " + VERSION)
"""


def write_plugin(plugin_dir: Path, version: str) -> None:
    path = plugin_dir / f"{PLUGIN}.py"
    temp = path.with_suffix(".tmp")
    temp.write_text(PLUGIN_SOURCE.format(version=version))
    temp.chmod(0o644)
    os.replace(temp, path)


@pytest.fixture(scope="module")
def plugin_dir() -> Iterator[Path]:
    root = short_tmpdir("tgfp")
    write_plugin(root, "1")
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def own_fleet(sandbox: Sandbox, plugin_dir: Path) -> Iterator[Fleet]:
    """A fleet of this module's own (its fork server is killed and stopped here), with a
    plugin dir of third-party code, whose fork server offers its pages to KSM."""
    root = short_tmpdir("tgfk")
    env = {"TGFLEET_PLUGIN_PATH": str(plugin_dir), "TGFLEET_MERGE_PAGES": "1"}
    try:
        with running_fleet(root, sandbox, env=env) as fleet:
            yield fleet
    finally:
        shutil.rmtree(root, ignore_errors=True)


def mergeable_heap(pid: int) -> bool:
    """Whether the process's heap is marked for the kernel's same-page merging."""
    in_heap = False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        if "-" in line.split()[0] and not line.startswith("VmFlags"):
            in_heap = line.endswith("[heap]")
        elif in_heap and line.startswith("VmFlags:"):
            return "mg" in line.split()[1:]
    raise AssertionError(f"no heap in /proc/{pid}/smaps")


def test_with_merge_pages_a_forked_bot_inherits_the_mark_on_its_fork_servers_pages(
    own_fleet: Fleet, fleet: Fleet, sandbox: Sandbox
) -> None:
    """TGFLEET_MERGE_PAGES=1 (own_fleet): the fork server offers its memory to KSM, and a
    bot forked from it inherits the mark; without it (the shared fleet), no mark."""
    merged = add(own_fleet, sandbox, "merge", "fork")
    plain = add(fleet, sandbox, "merge", "fork")
    try:
        assert mergeable_heap(check_process(own_fleet, merged, "fork"))
        assert mergeable_heap(forkserver_pid(own_fleet))
        log = own_fleet.home.watcher_log("forkserver", "err").read_text()
        assert "offered to the kernel's same-page merging" in log
        assert not mergeable_heap(check_process(fleet, plain, "fork"))
    finally:
        own_fleet.api("DELETE", f"/api/v1/bots/{merged}")
        fleet.api("DELETE", f"/api/v1/bots/{plain}")


def version_of(sandbox: Sandbox, name: str) -> str:
    answers: list[str] = []
    drills._answer(sandbox, name, "/version", lambda r: answers.append(r) or True, 30)
    return answers[-1]


def test_a_plugin_edited_on_disk_reaches_new_bots(
    own_fleet: Fleet, sandbox: Sandbox, plugin_dir: Path
) -> None:
    plugins = [f"{PLUGIN}:setup"]
    old = add(own_fleet, sandbox, "plug", "fork", plugins=plugins)
    assert version_of(sandbox, old) == "version 1"
    write_plugin(plugin_dir, "2")
    new = add(own_fleet, sandbox, "plug", "fork", plugins=plugins)
    check_process(own_fleet, new, "fork")
    assert version_of(sandbox, new) == "version 2"
    assert version_of(sandbox, old) == "version 1"  # a running bot keeps its process
    own_fleet.api("POST", f"/api/v1/bots/{old}/restart")
    wait_for(f"{old} on the new code", lambda: version_of(sandbox, old) == "version 2", 60)
    for name in (old, new):
        own_fleet.api("DELETE", f"/api/v1/bots/{name}")


def test_the_fork_server_killed_during_traffic_touches_no_bot(
    own_fleet: Fleet, sandbox: Sandbox
) -> None:
    names = [add(own_fleet, sandbox, "traffic", "fork") for _ in range(3)]
    before = drills.snapshot(own_fleet, names)
    server = forkserver_pid(own_fleet)
    lost: list[str] = []
    sent = 0

    def talk() -> None:
        nonlocal sent
        for round_ in range(6):
            for name in names:
                text = f"traffic {round_}"
                sent += 1
                try:
                    drills.answered_in(sandbox, name, time.monotonic(), text, wait=30)
                except AssertionError as exc:
                    lost.append(f"{name}: {exc}")

    talker = threading.Thread(target=talk)
    talker.start()
    wait_for("traffic to flow", lambda: sent >= 3)
    os.kill(server, signal.SIGKILL)
    talker.join()
    assert lost == [] and sent == 18
    assert drills.untouched(own_fleet, before) == []
    respawned = wait_for(
        "a new fork server", lambda: set(circus_pids(own_fleet, "forkserver")) - {server}
    )
    # the respawned fork server serves new bots
    late = add(own_fleet, sandbox, "traffic", "fork")
    assert psutil.Process(check_process(own_fleet, late, "fork")).ppid() in respawned
    for name in (*names, late):
        own_fleet.api("DELETE", f"/api/v1/bots/{name}")


def test_without_a_fork_server_a_bot_starts_by_exec_within_a_second(
    own_fleet: Fleet, sandbox: Sandbox
) -> None:
    server = psutil.Process(forkserver_pid(own_fleet))
    server.suspend()  # it accepts connections and answers none: the worst case for a launcher
    try:
        name = add(own_fleet, sandbox, "fallback", "fork")
        pid = int(own_fleet.bot(name)["pid"])
        assert circus_pids(own_fleet, f"bot-{name}") == [pid]  # the launcher became the bot
        log = own_fleet.home.watcher_log(f"bot-{name}", "err").read_text()
        assert "starting the bot by exec" in log
        assert drills.answered_in(sandbox, name, time.monotonic(), "hello") < 30
    finally:
        server.resume()

    # the request the stopped server finds in its queue is from a launcher that gave up
    # on it: it must not leave a second process of the bot running
    def forked_twins() -> list[int]:
        return [
            p.pid for p in psutil.process_iter(["name"]) if p.info["name"] == f"tgf:{name}"[:15]
        ]

    wait_for("the late fork to be undone", lambda: forked_twins() == [])
    holds_for("no second process of the bot", lambda: forked_twins() == [], 1.0)
    assert psutil.pid_exists(pid)
    own_fleet.api("DELETE", f"/api/v1/bots/{name}")


def memory_holds(pid: int, needle: bytes) -> bool:
    """Whether ``needle`` is anywhere in the readable memory of process ``pid`` (root)."""
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
        for line in maps:
            span, perms = line.split()[:2]
            if not perms.startswith("r"):
                continue
            start, end = (int(x, 16) for x in span.split("-"))
            try:
                mem.seek(start)
                if needle in mem.read(end - start):
                    return True
            except (OSError, ValueError, OverflowError):
                continue  # e.g. [vvar]
    return False


@pytest.mark.skipif(os.geteuid() != 0, reason="reads other processes' memory: root only")
def test_one_bot_s_secret_is_not_in_another_bot_s_memory(
    own_fleet: Fleet, sandbox: Sandbox
) -> None:
    first, second = (add(own_fleet, sandbox, "secret", "fork") for _ in range(2))
    config = own_fleet.home.bot_config(first).read_text()
    token = next(t for t in config.split('"') if ":" in t and t.split(":")[0].isdigit())
    secret = token.split(":", 1)[1].encode()
    first_pid = int(own_fleet.bot(first)["pid"])
    assert memory_holds(first_pid, secret)  # the search finds what is there
    assert not memory_holds(int(own_fleet.bot(second)["pid"]), secret)
    assert not memory_holds(forkserver_pid(own_fleet), secret)
    for name in (first, second):
        own_fleet.api("DELETE", f"/api/v1/bots/{name}")


def test_a_restarted_controller_finds_the_forked_bot_s_own_pid(
    own_fleet: Fleet, sandbox: Sandbox
) -> None:
    name = add(own_fleet, sandbox, "seen", "fork")
    before = own_fleet.bot(name)
    own_fleet.circusctl("restart", "controller")
    # at once (from circusd's pid and the fork server's record), not from a heartbeat
    seen = wait_for("the controller back", lambda: own_fleet.bot(name)["pid"])
    assert seen == before["pid"]
    holds_for(
        f"{name} keeps its process and no restart is counted",
        lambda: (
            (bot := own_fleet.bot(name))["pid"] == before["pid"]
            and bot["restarts"] == before["restarts"]
        ),
        3.0,
    )
    own_fleet.api("DELETE", f"/api/v1/bots/{name}")


def test_a_bot_whose_launcher_dies_dies_too_even_with_its_fork_server_away(
    own_fleet: Fleet, sandbox: Sandbox
) -> None:
    """No orphans: the fork server kills a bot whose launcher is gone; while it cannot
    (suspended here), the bot notices on its own."""
    name = add(own_fleet, sandbox, "orphan", "fork")
    pid = check_process(own_fleet, name, "fork")
    [launcher] = circus_pids(own_fleet, f"bot-{name}")
    server = psutil.Process(forkserver_pid(own_fleet))
    server.suspend()
    try:
        os.kill(launcher, signal.SIGKILL)
        wait_for("the orphaned bot to end", lambda: gone(pid), timeout=10)
    finally:
        server.resume()
    # Circus respawned the launcher (by exec while the fork server slept, or by fork)
    drills.connected(own_fleet, name, not_pid=pid)
    assert drills.answered_in(sandbox, name, time.monotonic(), "still here") < 30
    own_fleet.api("DELETE", f"/api/v1/bots/{name}")


#: tgf-launcher, where scripts/_venv.sh built it; launch.py beside it
LAUNCHER = watchercheck.launcher_binary()


def watcher_file(fleet: Fleet, name: str) -> configparser.RawConfigParser:
    """Bot ``name``'s watcher file as circus reads it, env keys as written."""
    watcher = configparser.RawConfigParser()
    watcher.optionxform = str  # type: ignore[assignment,method-assign]
    watcher.read(fleet.home.watcher_file(name))
    return watcher


def launcher_argv(fleet: Fleet, name: str, kind: str, socket: str | None = None) -> list[str]:
    """The command line of bot ``name``'s launcher: the C one its watcher runs, or the
    Python one a fleet runs where the C one was not built (controller/watchercheck.py)."""
    section = watcher_file(fleet, name)[f"watcher:bot-{name}"]
    binary, (python, fork_socket, *rest) = section["cmd"], section["args"].split()
    assert Path(binary).name == "tgf-launcher" and Path(binary).parent == LAUNCHER.parent
    fork_socket = socket or fork_socket
    if kind == "c":
        return [binary, python, fork_socket, *rest]
    return [python, "-S", "-I", str(LAUNCHER.with_name("launch.py")), fork_socket, *rest]


def start_launcher(fleet: Fleet, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
    """The launcher as Circus starts it: the bot's user, its env, its dir, its logs."""
    env = dict(watcher_file(fleet, name)[f"env:bot-{name}"])
    account: dict[str, Any] = {}
    if os.geteuid() == 0:
        user = pwd.getpwnam(bot_user_name(fleet.home, name))
        account = {
            "user": user.pw_uid,
            "group": user.pw_gid,
            "extra_groups": os.getgrouplist(user.pw_name, user.pw_gid),
        }
    with open(fleet.home.watcher_log(f"bot-{name}", "err"), "ab") as err:
        return subprocess.Popen(
            argv, env=env, cwd=fleet.home.bot_dir(name), stderr=err, stdout=err, **account
        )


@pytest.mark.parametrize("kind", ["c", "python"])
def test_either_launcher_runs_its_bot_through_the_real_fork_server(
    own_fleet: Fleet, sandbox: Sandbox, kind: str
) -> None:
    """tgf-launcher and launcher.py, side by side, each started as Circus would start it
    (the bot's watcher stopped meanwhile): the bot forked and answering, signals
    passed on, the bot's end its launcher's (told by the fork server, or by the bot
    when the fork server is gone), a dead launcher's bot gone, no fork server an
    exec'd bot."""
    fleet = own_fleet
    name = add(fleet, sandbox, "hand", "fork")
    old = check_process(fleet, name, "fork")
    fleet.api("POST", f"/api/v1/bots/{name}/stop")
    fleet.wait_state(name, "stopped")
    wait_for("the watcher's bot to end", lambda: gone(old), timeout=10)

    def forked_bot(launcher: subprocess.Popen[bytes]) -> int:
        def found() -> int | None:
            pid = forked.bot_pid(fleet.home.run_dir, name, launcher.pid)
            return pid if pid != launcher.pid else None

        assert psutil.Process(launcher.pid).cmdline() == launcher.args
        pid = wait_for("the launcher's bot", found, timeout=10)
        assert psutil.Process(pid).ppid() == forkserver_pid(fleet)
        assert drills.answered_in(sandbox, name, time.monotonic(), f"via {kind}") < 30
        return pid

    # SIGTERM to the launcher reaches the bot, which stops cleanly: the launcher exits 0
    launcher = start_launcher(fleet, name, launcher_argv(fleet, name, kind))
    try:
        bot = forked_bot(launcher)
        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(timeout=10) == 0
        assert gone(bot)

        # the bot killed -9: its launcher ends as it did
        launcher = start_launcher(fleet, name, launcher_argv(fleet, name, kind))
        bot = forked_bot(launcher)
        os.kill(bot, signal.SIGKILL)
        assert launcher.wait(timeout=10) == -signal.SIGKILL

        # the launcher killed -9: no orphan
        launcher = start_launcher(fleet, name, launcher_argv(fleet, name, kind))
        bot = forked_bot(launcher)
        launcher.kill()
        launcher.wait(timeout=10)
        wait_for("the orphaned bot to end", lambda: gone(bot), timeout=10)

        # SIGHUP passed on: the bot dies of it (it keeps the default action), and so
        # does its launcher
        launcher = start_launcher(fleet, name, launcher_argv(fleet, name, kind))
        bot = forked_bot(launcher)
        launcher.send_signal(signal.SIGHUP)
        assert launcher.wait(timeout=10) == -signal.SIGHUP

        # the fork server gone (killed -9; Circus starts another): the bot's own word
        # on the pair ("X0") is its launcher's exit code
        launcher = start_launcher(fleet, name, launcher_argv(fleet, name, kind))
        bot = forked_bot(launcher)
        server = forkserver_pid(fleet)
        os.kill(server, signal.SIGKILL)
        wait_for("a new fork server", lambda: forkserver_pid(fleet) != server)
        wait_for("its socket", fleet.home.fork_socket.exists)
        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(timeout=10) == 0
        wait_for("the bot to end", lambda: gone(bot), timeout=10)

        # no fork server on its socket: the launcher becomes the bot, by exec
        missing = str(fleet.home.run_dir / "no-fork.sock")
        launcher = start_launcher(fleet, name, launcher_argv(fleet, name, kind, missing))
        wait_for(
            "the launcher to exec the bot",
            lambda: psutil.Process(launcher.pid).cmdline()[1:3] == ["-m", "botrunner"],
            timeout=10,
        )
        assert drills.answered_in(sandbox, name, time.monotonic(), f"exec'd by {kind}") < 30
        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(timeout=10) == 0
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    fleet.api("DELETE", f"/api/v1/bots/{name}")
