"""`tgfleet up` as a user runs it: the demo, Ctrl-C, and a second `up`."""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import stat
import subprocess
from collections.abc import Iterator
from typing import Any

import psutil
import pytest
from harness import BIN, Fleet, Sandbox, echo_spec, free_port, short_tmpdir, wait_for

from controller.botusers import BotUsers, bot_user_name, service_user_name

pytestmark = pytest.mark.integration


@pytest.fixture
def fresh() -> Iterator[Fleet]:
    """A fleet not started yet, in its own temp dir; whatever it leaves is cleaned up."""
    root = short_tmpdir("tgfu")
    fleet = Fleet.create(root)
    try:
        yield fleet
    finally:
        fleet.kill_leftovers()
        shutil.rmtree(root, ignore_errors=True)


def test_ctrl_c_stops_everything_and_a_second_up_brings_bots_back(
    fresh: Fleet, sandbox: Sandbox
) -> None:
    fleet = fresh
    fleet.start()
    fleet.api("PUT", "/api/v1/defaults", {"telegram": sandbox.telegram_defaults()})
    for name in ("keep", "parked"):
        fleet.api("POST", "/api/v1/bots", echo_spec(name, sandbox.create_bot(f"up_{name}")))
    fleet.wait_state("keep", "running")
    fleet.wait_state("parked", "running")
    fleet.api("POST", "/api/v1/bots/parked/stop")
    fleet.wait_state("parked", "stopped")
    first_pid = fleet.bot("keep")["pid"]
    assert fleet.processes()

    assert fleet.stop() == 0
    assert fleet.leftovers() == []
    bot_log = (fleet.home.logs_dir / "bot-keep.err.log").read_text()
    assert "stopping: SIGTERM" in bot_log
    assert json.loads(bot_log.splitlines()[-1])["message"] == "stopped", bot_log[-500:]
    assert "stopped" in fleet.log_text().splitlines()[-1]

    fleet.start()
    back = wait_for(
        "keep running with a live connection",
        lambda: (b := fleet.bot("keep"))["telegram"]["connected"] and b["pid"] and b,
    )
    assert back["pid"] != first_pid
    assert fleet.bot("parked")["state"] == "stopped"
    assert fleet.bot("parked")["pid"] is None
    assert sandbox.cli("send", "up_keep_bot", "again", "--user", "bob", "--wait", "20") == "again"
    assert fleet.stop() == 0
    assert fleet.leftovers() == []


def test_a_deleted_bus_key_is_a_new_one_and_every_bot_speaks_with_it(
    fresh: Fleet, sandbox: Sandbox
) -> None:
    """Rotating the controller's bus key: stop, delete bus.key, start. Every bot is
    written again with the new key and restarted, and is heard on the bus again."""
    fleet = fresh
    fleet.start()
    fleet.api("PUT", "/api/v1/defaults", {"telegram": sandbox.telegram_defaults()})
    fleet.api("POST", "/api/v1/bots", echo_spec("keyed", sandbox.create_bot("up_keyed")))

    def heard() -> dict[str, Any] | None:
        bot = fleet.bot("keyed")
        return bot if bot["pid"] and bot["health"]["heartbeat_age_s"] is not None else None

    before = wait_for("keyed heard on the bus", heard, timeout=60)
    old_key = json.loads(fleet.home.bus_key.read_text())["public_key"]
    assert fleet.stop() == 0
    fleet.home.bus_key.unlink()
    fleet.start()
    after = wait_for("keyed heard on the bus with the new key", heard, timeout=90)
    new_key = json.loads(fleet.home.bus_key.read_text())["public_key"]
    assert new_key != old_key
    config = json.loads(fleet.home.bot_config("keyed").read_text())
    assert config["bus_server_key"] == new_key
    assert after["pid"] != before["pid"]
    assert sandbox.cli("send", "up_keyed_bot", "rotated", "--user", "bob", "--wait", "20") == (
        "rotated"
    )
    assert fleet.stop() == 0
    assert fleet.leftovers() == []


def test_demo_runs_bots_that_answer_with_no_credentials(fresh: Fleet) -> None:
    fleet = fresh
    admin = f"127.0.0.1:{free_port()}"
    fleet.env = {
        "TGFLEET_SANDBOX_LISTEN": f"127.0.0.1:{free_port()}",
        "TGFLEET_SANDBOX_ADMIN": admin,
    }
    fleet.start("--demo")
    try:
        bots = wait_for(
            "three demo bots connected",
            lambda: (
                (bs := fleet.api("GET", "/api/v1/bots")["bots"])
                and len(bs) == 3
                and all(b["telegram"]["connected"] for b in bs)
                and bs
            ),
            timeout=60,
        )
        assert {b["name"] for b in bots} == {"echo", "greeter", "parrot"}
        status = fleet.circusctl("status")
        assert "sandbox: active" in status
        sandbox_pid = int(fleet.circusctl("list", "sandbox").replace(",", " ").split()[0])
        if os.geteuid() == 0:
            # As root, the local Telegram runs as the fleet's service user, which owns its data.
            service = pwd.getpwnam(service_user_name(fleet.home))
            assert psutil.Process(sandbox_pid).uids().real == service.pw_uid != 0
            data = fleet.home.sandbox_dir.stat()
            assert (data.st_uid, stat.S_IMODE(data.st_mode)) == (service.pw_uid, 0o700)
            assert (fleet.home.sandbox_dir / "public.pem").stat().st_uid == service.pw_uid
        assert ("postgres: active" in status) == fleet.embedded_postgres
        reply = subprocess.run(
            [
                str(BIN / "tgfleet"),
                "sandbox",
                "send",
                "echo_bot",
                "hi",
                "--admin",
                admin,
                "--wait",
                "20",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout.strip()
        assert reply == "echo: hi"
        wait_for(
            "the demo conversation printed",
            lambda: "@greeter_bot → alice: Hello!" in fleet.log_text(),
        )
        # Its users are not to be removed while it runs
        refused = remove_users(fleet)
        assert refused.returncode == 1
        assert (
            "a fleet is running in" in refused.stderr
            if os.geteuid() == 0
            else "only root removes system users" in refused.stderr
        )
    finally:
        assert fleet.stop() == 0
    assert fleet.leftovers() == []
    if os.geteuid() == 0:
        # The home thrown away: `tgfleet remove-users` removes what the fleet made
        users = BotUsers(fleet.home)
        made = [bot_user_name(fleet.home, n) for n in ("echo", "greeter", "parrot")]
        assert all(pwd.getpwnam(name) for name in made)
        shutil.rmtree(fleet.home.root)
        done = remove_users(fleet)
        assert done.returncode == 0, done.stderr
        lines = done.stdout.splitlines()
        assert {f"removed user {n}" for n in [*made, service_user_name(fleet.home)]} <= set(lines)
        assert f"removed group {users.fleet_group}" in lines
        assert users.remove_all() == []  # nothing of it left
        with pytest.raises(KeyError):
            grp.getgrnam(users.fleet_group)
        again = remove_users(fleet)
        assert again.stdout.startswith("nothing to remove"), again.stdout


def remove_users(fleet: Fleet) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "tgfleet"), "remove-users", "--home", str(fleet.home.root)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
