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
from harness import (
    Fleet,
    Sandbox,
    postgres_processes,
    running_fleet,
    short_tmpdir,
    wait_for,
)

from controller import watchercheck
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
            {"op": "usage", "pids": {"victim": "1"}},
        ],
        service.pw_uid,
        controller_gid,
    )
    assert [a["ok"] for a in answers] == [False] * 8
    errors = [a["error"] for a in answers]
    assert errors[0].startswith("'op' must be one of ensure_user, remove_user, own_dir")
    assert errors[1] == "'bot' must be a bot name matching ^[a-z][a-z0-9-]{0,31}$, not '../../etc'"
    assert errors[2].endswith("not 'Upper'")
    assert errors[3] == "write_config takes no 'path'"
    assert errors[4] == "the config written for bot 'victim' names another bot"
    assert errors[5].endswith("not 7")
    assert errors[6] == "the request must be a JSON object"
    assert errors[7] == "usage: each pid must be an integer"
    # What only a bot's user may read of its process, for a pid its user runs alone.
    (usage,) = ask_keeper(
        fleet, [{"op": "usage", "pids": {"victim": 1}, "pss": True}], service.pw_uid, controller_gid
    )
    assert usage == {"ok": True, "usage": {"victim": [None, None]}}
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


def test_the_keeper_writes_no_watcher_file_outside_the_allow_list(
    fleet: Fleet, sandbox: Sandbox, tmp_path: Path
) -> None:
    """circusd loads bots.d/ as root: a watcher file is the keeper's to write, for the
    bot's own user, the fleet's python, its own logs, circus' FileStream, nothing else."""
    home = fleet.home
    service = pwd.getpwnam(service_user_name(home))
    controller_gid = grp.getgrnam(fleet_group_name(home)).gr_gid
    python_link = tmp_path / "python"  # points at the fleet's python, for now
    python_link.symlink_to(sys.executable)
    create(fleet, sandbox, "target", plugins=[ECHO])
    create(fleet, sandbox, "bystander", plugins=[ECHO])
    try:
        # The controller reads /proc/PID/fd and smaps_rollup of the bots through the keeper.
        usage = wait_for(
            "the bot's open files and PSS",
            lambda: (u := fleet.bot("target")["resources"]) and u["pss_bytes"] and u,
            timeout=60,
        )
        assert usage["open_files"] > 3 and usage["pss_bytes"] > 1 << 20
        bots_d = home.bots_d.stat()
        assert (bots_d.st_uid, bots_d.st_mode & 0o777) == (0, 0o750)  # ACL: the service user
        written = home.watcher_file("target").read_text()
        assert home.watcher_file("target").stat().st_uid == 0
        own = bot_user_name(home, "target")
        other = bot_user_name(home, "bystander")
        out_log = str(home.watcher_log("bot-target", "out"))
        assert f"uid = {own}\n" in written and out_log in written
        launcher = watchercheck.launcher_binary()  # launch: fork, the C launcher
        assert f"cmd = {launcher}\nargs = " in written, written
        python = written.split("\nargs = ", 1)[1].split()[0]  # the fleet's python, as given
        assert os.path.samefile(python, sys.executable)
        forged = {
            "root": written.replace(f"uid = {own}\n", "uid = root\n"),
            "uid 0": written.replace(f"uid = {own}\n", "uid = 0\n"),
            "no uid": written.replace(f"uid = {own}\n", ""),
            "another bot": written.replace(f"uid = {own}\n", f"uid = {other}\n"),
            "a class": written.replace(
                "stdout_stream.class = FileStream", "stdout_stream.class = evil.Stream"
            ),
            "a log elsewhere": written.replace(out_log, "/etc/cron.d/tgfleet"),
            "a command": written.replace(f"cmd = {launcher}\n", "cmd = /bin/sh\n"),
            "a hook": written.replace(
                "[watcher:bot-target]\n", "[watcher:bot-target]\nhooks.before_start = os.system\n"
            ),
            "a section": written + "[plugin:evil]\nuse = evil.Plugin\n",
            "a substitution": written.replace("TERM", "$(circus.env.SIGNAL)"),
            # circus reads with universal newlines: "\r" ends a line there (review H1)
            "a carriage return": written + "# note\r[watcher:evil]\rcmd = /bin/sh\rargs = -c id\r",
            # tgf-launcher execs its first argument when no fork server answers
            "a link to python": written.replace(f"args = {python} ", f"args = {python_link} "),
            "a shell to exec": written.replace(f"args = {python} ", "args = /bin/sh "),
        }
        unchanged = [what for what, text in forged.items() if text == written]
        assert not unchanged, f"forgeries that forge nothing: {unchanged}"
        answers = ask_keeper(
            fleet,
            [{"op": "write_watcher", "bot": "target", "text": text} for text in forged.values()],
            service.pw_uid,
            controller_gid,
        )
        accepted = [what for what, a in zip(forged, answers, strict=True) if "error" not in a]
        assert not accepted, f"the keeper wrote forged watchers: {accepted}"
        refused = {what: a["error"] for what, a in zip(forged, answers, strict=True)}
        assert [a["ok"] for a in answers] == [False] * len(forged), refused
        assert "uid/gid must be the own user and group of bot 'target'" in refused["root"]
        assert "uid/gid must be the own user and group of bot 'target'" in refused["another bot"]
        assert "stdout_stream.class must be FileStream" in refused["a class"]
        assert "stdout_stream.filename must be" in refused["a log elsewhere"]
        assert "cmd must be the fleet's python" in refused["a command"]
        assert "key 'hooks.before_start' is not one a bot's watcher has" in refused["a hook"]
        assert "the only sections are" in refused["a section"]
        assert "what circus would alter" in refused["a substitution"]
        assert "character '\\r'" in refused["a carriage return"]
        assert "args must run botrunner or its launcher" in refused["a link to python"]
        assert "args must run botrunner or its launcher" in refused["a shell to exec"]
        assert home.watcher_file("target").read_text() == written
    finally:
        for name in ("target", "bystander"):
            fleet.api("DELETE", f"/api/v1/bots/{name}")


# One circus command per line on stdin, its answer per line out: run as the service user.
ASK_GATE = """
import json, sys, zmq
context = zmq.Context()
for line in sys.stdin:
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.RCVTIMEO, 30000)
    socket.connect(sys.argv[1])
    socket.send(line.strip().encode())
    print(socket.recv().decode(), flush=True)
    socket.close()
"""


def test_the_gate_forwards_only_what_the_controller_needs(fleet: Fleet, sandbox: Sandbox) -> None:
    """circusd's own socket is root's; the controller's way to it is the gate, which
    refuses what would run code as root or touch what is not a bot."""
    home = fleet.home
    service = pwd.getpwnam(service_user_name(home))
    circus = home.circus_socket.stat()
    assert (circus.st_uid, circus.st_mode & 0o077) == (0, 0)  # root's alone
    gate = home.circus_gate_socket.stat()
    assert (gate.st_uid, gate.st_mode & 0o777) == (service.pw_uid, 0o600)
    bot = create(fleet, sandbox, "gated", plugins=[ECHO])
    try:
        commands = [
            {"command": "set", "properties": {"name": "bot-gated", "key": "uid", "value": 0}},
            {"command": "add", "properties": {"name": "evil", "cmd": "/bin/sh"}},
            {"command": "rm", "properties": {"name": "bot-gated"}},
            {"command": "quit", "properties": {}},
            {"command": "signal", "properties": {"name": "controller", "signum": 9}},
            {"command": "signal", "properties": {"name": "forkserver", "signum": 9}},
            {"command": "stop", "properties": {"name": "bot-*", "match": "glob"}},
            {"command": "stop", "properties": {}},
            {"command": "stop", "properties": {"name": "bot-gated", "waiting": True}},
            {"command": "start", "properties": {"name": "bot-gated", "waiting": True}},
        ]
        done = subprocess.run(
            [sys.executable, "-I", "-c", ASK_GATE, home.circus_gate_endpoint],
            input="".join(json.dumps({"id": str(i), **c}) + "\n" for i, c in enumerate(commands)),
            capture_output=True,
            text=True,
            timeout=120,
            user=service.pw_uid,
            group=grp.getgrnam(fleet_group_name(home)).gr_gid,
            extra_groups=[],
            check=False,
        )
        assert done.returncode == 0, done.stderr
        answers = [json.loads(line) for line in done.stdout.splitlines()]
        assert [a["id"] for a in answers] == [str(i) for i in range(len(commands))]
        *refused, stopped, started = answers
        for answer in refused:
            assert answer["status"] == "error" and answer["errno"] == 3, answer
            assert answer["reason"].startswith("refused by tgfleet's gate: "), answer
        assert "'set' is not one the controller may send" in refused[0]["reason"]
        assert "not 'controller'" in refused[4]["reason"]
        assert stopped["status"] == started["status"] == "ok", (stopped, started)
        # Nothing refused happened: circusd and the controller live, the bot runs again.
        assert fleet.proc is not None and fleet.proc.poll() is None
        assert "controller" in fleet.circusctl("list")
        again = fleet.wait_state("gated", "running")
        assert again["pid"] != bot["pid"]
    finally:
        fleet.api("DELETE", "/api/v1/bots/gated")
