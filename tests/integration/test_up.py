"""`tgfleet up` as a user runs it: the demo, Ctrl-C, and a second `up`."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator

import pytest
from harness import BIN, Fleet, Sandbox, echo_spec, free_port, short_tmpdir, wait_for

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
    finally:
        assert fleet.stop() == 0
    assert fleet.leftovers() == []
