"""A user per bot (tgfleet as root, as CI runs): who a bot runs as, what it can reach,
its limits, and what is left of it once destroyed."""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from drills import sandbox_name
from harness import Fleet, Sandbox, postgres_processes, running_fleet, short_tmpdir

from controller.botusers import bot_user_name, fleet_group_name, service_user_name

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="a user per bot needs root"),
]

PLUGINS = Path(__file__).parent / "plugins"
PEEK = "peek:setup"
ECHO = "botrunner.plugins.echo:setup"


@pytest.fixture(scope="module")
def fleet(sandbox: Sandbox) -> Iterator[Fleet]:
    """A fleet of its own: its bots find the test plugins on TGFLEET_PLUGIN_PATH."""
    root = short_tmpdir("tgfu")
    try:
        with running_fleet(root, sandbox, env={"TGFLEET_PLUGIN_PATH": str(PLUGINS)}) as running:
            yield running
        assert running.proc is not None and running.proc.returncode == 0, running.log_text()
        assert not running.leftovers()
    finally:
        left = [u.pw_name for u in pwd.getpwall() if str(root) in u.pw_gecos]
        shutil.rmtree(root, ignore_errors=True)
    assert left == [], "the fleet's bot users outlived it"


def create(fleet: Fleet, sandbox: Sandbox, name: str, **spec: Any) -> dict[str, Any]:
    token = sandbox.create_bot(sandbox_name(f"{name}-{uuid.uuid4().hex[:6]}"))
    fleet.api("POST", "/api/v1/bots", {"name": name, "token": token, **spec})
    return fleet.wait_state(name, "running")


def proc_limits(pid: int) -> dict[str, tuple[str, str]]:
    """/proc/PID/limits as {name: (soft, hard)}."""
    lines = Path(f"/proc/{pid}/limits").read_text().splitlines()[1:]
    return {line[:26].strip(): (line[26:47].strip(), line[47:68].strip()) for line in lines}


def test_each_bot_runs_as_its_own_user_and_reads_nobody_elses_files(
    fleet: Fleet, sandbox: Sandbox
) -> None:
    home = fleet.home
    other = create(fleet, sandbox, "other", plugins=[ECHO])
    left_behind = Path(f"/tmp/tgfleet-left-{uuid.uuid4().hex}")
    nosy = create(
        fleet,
        sandbox,
        "nosy",
        plugins=[PEEK, ECHO],
        settings={
            "read": [
                str(home.bot_config("other")),
                str(home.bot_dir("other") / "telegram.session"),
                str(home.bot_config("nosy")),  # its own: the attempts above could succeed
                str(home.admin_token),
            ],
            "list": [str(home.bot_dir("other")), str(home.bots_dir)],
            "connect": [str(home.circus_socket), str(home.bus_socket)],
            "leave": str(left_behind),
        },
        limits={"open_files": 512, "processes": 64},
    )
    try:
        uids = {
            name: psutil.Process(bot["pid"]).uids()
            for name, bot in (("other", other), ("nosy", nosy))
        }
        for name, ids in uids.items():
            assert ids.real == ids.effective == ids.saved != 0
            assert pwd.getpwuid(ids.real).pw_name == bot_user_name(home, name)
        assert uids["nosy"].real != uids["other"].real
        assert (home.bot_dir("other") / "telegram.session").exists()

        seen = json.loads((home.bot_dir("nosy") / "peek.json").read_text())
        assert seen["uid"] == uids["nosy"].real
        assert {
            key: value for key, value in seen.items() if key not in ("uid", "gid", "groups")
        } == {
            f"read {home.bot_config('other')}": "EACCES",
            f"read {home.bot_dir('other') / 'telegram.session'}": "EACCES",
            f"read {home.bot_config('nosy')}": "ok",
            f"read {home.admin_token}": "EACCES",
            f"list {home.bot_dir('other')}": "EACCES",
            f"list {home.bots_dir}": "EACCES",
            # circusd's control socket would run anything as root: never a bot's
            f"connect {home.circus_socket}": "EACCES",
            f"connect {home.bus_socket}": "ok",
        }
        for name in ("nosy", "other"):
            private = home.bot_dir(name)
            assert private.stat().st_mode & 0o777 == 0o700
            assert home.bot_config(name).stat().st_mode & 0o777 == 0o600
            assert private.stat().st_uid == home.bot_config(name).stat().st_uid == uids[name].real

        assert left_behind.stat().st_uid == uids["nosy"].real
    finally:
        fleet.api("DELETE", "/api/v1/bots/nosy")
    # Destroyed: its user, its dir and what it left in /tmp are gone.
    with pytest.raises(KeyError):
        pwd.getpwnam(bot_user_name(home, "nosy"))
    assert not home.bot_dir("nosy").exists()
    assert not left_behind.exists()

    # A new bot of the same name starts from nothing.
    again = create(fleet, sandbox, "nosy", plugins=[ECHO])
    try:
        assert not (home.bot_dir("nosy") / "peek.json").exists()
        assert psutil.Process(again["pid"]).uids().real != 0
    finally:
        fleet.api("DELETE", "/api/v1/bots/nosy")
        fleet.api("DELETE", "/api/v1/bots/other")


def test_limits_show_in_proc_limits(fleet: Fleet, sandbox: Sandbox) -> None:
    fleet.api(
        "PUT",
        "/api/v1/defaults",
        {"telegram": sandbox.telegram_defaults(), "limits": {"processes": 100}},
    )
    try:
        tight = create(
            fleet, sandbox, "tight", plugins=[ECHO], memory_limit_mb=300, limits={"open_files": 300}
        )
        plain = create(fleet, sandbox, "plain", plugins=[ECHO])
        assert {k: v for k, v in proc_limits(tight["pid"]).items() if k in WATCHED} == {
            "Max open files": ("300", "300"),
            "Max processes": ("100", "100"),  # the fleet default
            "Max core file size": ("0", "0"),
            "Max data size": (str(300 << 20), str(300 << 20)),
        }
        assert {k: v for k, v in proc_limits(plain["pid"]).items() if k in WATCHED} == {
            "Max open files": ("1024", "1024"),
            "Max processes": ("100", "100"),
            "Max core file size": ("0", "0"),
            "Max data size": (str(512 << 20), str(512 << 20)),
        }
    finally:
        fleet.api("PUT", "/api/v1/defaults", {"telegram": sandbox.telegram_defaults()})
        for name in ("tight", "plain"):
            fleet.api("DELETE", f"/api/v1/bots/{name}")


WATCHED = ("Max open files", "Max processes", "Max core file size", "Max data size")


def test_only_the_fleet_group_traverses_bots_and_run(fleet: Fleet) -> None:
    group = grp.getgrnam(fleet_group_name(fleet.home))
    for shared in (fleet.home.bots_dir, fleet.home.run_dir):
        info = shared.stat()
        assert (info.st_uid, info.st_gid, info.st_mode & 0o777) == (0, group.gr_gid, 0o710)
    # The bus is the controller's (the service user's), in a dir of its own in run/.
    service = pwd.getpwnam(service_user_name(fleet.home))
    bus_dir = fleet.home.bus_dir.stat()
    assert (bus_dir.st_uid, bus_dir.st_gid, bus_dir.st_mode & 0o777) == (
        service.pw_uid,
        group.gr_gid,
        0o710,
    )
    bus = fleet.home.bus_socket.stat()
    assert (bus.st_uid, bus.st_gid, bus.st_mode & 0o777) == (service.pw_uid, group.gr_gid, 0o660)
    assert fleet.home.circus_socket.stat().st_mode & 0o077 == 0


def test_the_controller_and_postgresql_run_as_the_service_user(fleet: Fleet) -> None:
    """Only circusd (and the fork server, which becomes each bot's user) stays root."""
    service = pwd.getpwnam(service_user_name(fleet.home))
    assert service.pw_uid != 0
    group = grp.getgrnam(fleet_group_name(fleet.home))
    pid = int(fleet.circusctl("list", "controller").replace(",", " ").split()[0])
    controller = psutil.Process(pid)
    assert controller.uids().real == controller.uids().effective == service.pw_uid
    assert controller.gids().real == group.gr_gid
    assert postgres_processes(fleet)[0].uids().effective == service.pw_uid
    circusd = psutil.Process(fleet.proc.pid if fleet.proc else 0)
    assert circusd.uids().effective == 0
    # What it owns in the home, what it may only read.
    for own in (fleet.home.secret_key, fleet.home.bus_key, fleet.home.admin_token):
        assert own.stat().st_uid == service.pw_uid, own
    assert fleet.home.controller_json.stat().st_uid == 0
    assert fleet.home.logs_dir.stat().st_uid == 0


# One request per line on stdin, one answer per line out: run as the service user.
ASK_KEEPER = """
import socket, sys
for line in sys.stdin:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(60)
        conn.connect(sys.argv[1])
        conn.sendall(line.encode())
        conn.shutdown(socket.SHUT_WR)
        print(conn.makefile().read().strip(), flush=True)
"""


def ask_keeper(fleet: Fleet, requests: list[object], uid: int, gid: int) -> list[dict[str, Any]]:
    done = subprocess.run(
        [sys.executable, "-I", "-c", ASK_KEEPER, str(fleet.home.keeper_socket)],
        input="".join(json.dumps(r) + "\n" for r in requests),
        capture_output=True,
        text=True,
        timeout=120,
        user=uid,
        group=gid,
        extra_groups=[],
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def test_the_keeper_serves_only_the_service_user_and_only_its_operations(fleet: Fleet) -> None:
    service = pwd.getpwnam(service_user_name(fleet.home))
    controller_gid = grp.getgrnam(fleet_group_name(fleet.home)).gr_gid  # as circus.ini has it
    socket_info = fleet.home.keeper_socket.stat()
    assert (socket_info.st_uid, socket_info.st_mode & 0o777) == (service.pw_uid, 0o600)

    # root may open the socket, but is not the service user: refused by its uid
    (refused,) = ask_keeper(fleet, [{"op": "ensure_user", "bot": "intruder"}], 0, 0)
    assert refused == {"ok": False, "error": "uid 0 is not the fleet's service user"}
    with pytest.raises(KeyError):
        pwd.getpwnam(bot_user_name(fleet.home, "intruder"))

    answers = ask_keeper(
        fleet,
        [
            {"op": "chown", "bot": "victim"},
            {"op": "ensure_user", "bot": "../../etc"},
            {"op": "ensure_user", "bot": "Upper"},
            {"op": "write_config", "bot": "victim", "text": "{}", "path": "/etc/shadow"},
            {"op": "write_config", "bot": "victim", "text": json.dumps({"name": "other"})},
            {"op": "remove_dir", "bot": 7},
            "ensure_user victim",
        ],
        service.pw_uid,
        controller_gid,
    )
    assert [a["ok"] for a in answers] == [False] * 7
    errors = [a["error"] for a in answers]
    assert errors[0].startswith("'op' must be one of ensure_user, remove_user, own_dir")
    assert errors[1] == "'bot' must be a bot name matching ^[a-z][a-z0-9-]{0,31}$, not '../../etc'"
    assert errors[2].endswith("not 'Upper'")
    assert errors[3] == "write_config takes no 'path'"
    assert errors[4] == "the config written for bot 'victim' names another bot"
    assert errors[5].endswith("not 7")
    assert errors[6] == "the request must be a JSON object"
    with pytest.raises(KeyError):
        pwd.getpwnam(bot_user_name(fleet.home, "victim"))
    assert not fleet.home.bot_dir("victim").exists()

    # What it is there for, asked as the controller asks it.
    made, owned, config = ask_keeper(
        fleet,
        [
            {"op": "ensure_user", "bot": "kept"},
            {"op": "own_dir", "bot": "kept"},
            {"op": "write_config", "bot": "kept", "text": json.dumps({"name": "kept"})},
        ],
        service.pw_uid,
        controller_gid,
    )
    try:
        assert owned == config == {"ok": True}
        assert made["ok"] and made["user"] == bot_user_name(fleet.home, "kept")
        written = fleet.home.bot_config("kept").stat()
        assert (written.st_uid, written.st_mode & 0o777) == (made["uid"], 0o600) != (0, 0o600)
        assert json.loads(fleet.home.bot_config("kept").read_text()) == {"name": "kept"}
    finally:
        removed_dir, removed = ask_keeper(
            fleet,
            [{"op": "remove_dir", "bot": "kept"}, {"op": "remove_user", "bot": "kept"}],
            service.pw_uid,
            controller_gid,
        )
    assert removed_dir == removed == {"ok": True}
    assert not fleet.home.bot_dir("kept").exists()
    with pytest.raises(KeyError):
        pwd.getpwnam(bot_user_name(fleet.home, "kept"))
