"""`tgfleet render circus-ini` through the CLI: what it prints is what `tgfleet up`
writes, it touches nothing without --write, and --write says what it changed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import kubernetes_validate
import pytest
from harness import BIN, Fleet, Sandbox, echo_spec, short_tmpdir

from controller.botusers import BotUsers
from controller.home import Home

pytestmark = pytest.mark.integration


@pytest.fixture
def scratch() -> Iterator[Path]:
    root = short_tmpdir("tgfr")
    try:
        yield root
    finally:
        # As root, preparing a home makes the fleet's group (tgfleet-…): remove it.
        BotUsers(Home(root / "home")).remove_all()
        BotUsers(Home(root / "other")).remove_all()
        shutil.rmtree(root, ignore_errors=True)


def render(home: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TGFLEET_")}
    return subprocess.run(
        [str(BIN / "tgfleet"), "render", "circus-ini", "--home", str(home), *extra],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )


def test_render_prints_what_up_writes_and_write_prepares_the_home(scratch: Path) -> None:
    home = scratch / "home"
    printed = render(home, "--listen", "127.0.0.1:18999")
    assert printed.returncode == 0, printed.stderr
    assert not home.exists(), "rendering alone must not touch the home"
    assert "[watcher:controller]" in printed.stdout and "[watcher:postgres]" in printed.stdout
    assert "TGFLEET_LISTEN = 127.0.0.1:18999" in printed.stdout

    written = render(home, "--listen", "127.0.0.1:18999", "--write")
    assert written.returncode == 0, written.stderr
    assert written.stdout == printed.stdout
    assert (home / "circus.ini").read_text() == printed.stdout
    assert "changed: circus.ini" in written.stderr
    assert "changed: embedded PostgreSQL cluster" in written.stderr
    assert (home / "controller.json").exists() and (home / "pg" / "data" / "PG_VERSION").exists()

    again = render(home, "--listen", "127.0.0.1:18999", "--write")
    assert again.stderr.strip() == "unchanged", again.stderr
    moved = render(home, "--listen", "127.0.0.1:18998", "--write")
    assert "changed: circus.ini" in moved.stderr and "changed: controller.json" in moved.stderr


def test_up_writes_the_file_render_prints(scratch: Path) -> None:
    """The same options through `tgfleet up` (which runs it) and through render."""
    fleet = Fleet.create(scratch)
    fleet.home = Home(scratch / "other")
    expected = render(fleet.home.root, "--listen", fleet.listen)
    assert expected.returncode == 0, expected.stderr
    fleet.start()
    try:
        assert fleet.home.circus_ini.read_text() == expected.stdout
    finally:
        assert fleet.stop() == 0
        fleet.kill_leftovers()


def test_bad_options_are_refused_and_change_nothing(scratch: Path) -> None:
    home = scratch / "home"
    refused = render(home, "--listen", "0.0.0.0:8710", "--write")
    assert refused.returncode == 1
    assert "--listen 0.0.0.0:8710 is reachable from other machines" in refused.stderr
    assert not home.exists()


def test_render_k8s_reads_the_api_and_every_manifest_validates(
    fleet: Fleet, sandbox: Sandbox, tmp_path: Path
) -> None:
    token = sandbox.create_bot("k8s_render")
    fleet.api("POST", "/api/v1/bots", echo_spec("k8s-render", token))
    try:
        secrets = tmp_path / "secrets.json"
        secrets.write_text(
            json.dumps(
                {
                    "defaults": {"telegram": {"api_hash": "sandbox"}},
                    "bots": {"k8s-render": {"token": token}},
                }
            )
        )
        done = fleet.cli("render", "k8s", "--bot", "k8s-render", "--secrets", str(secrets))
        docs = [json.loads(part) for part in done.stdout.split("---\n") if part.strip()]
        assert [(d["kind"], d["metadata"]["name"]) for d in docs] == [
            ("Secret", "tgfleet-bot-k8s-render"),
            ("Deployment", "tgfleet-bot-k8s-render"),
        ]
        for doc in docs:
            kubernetes_validate.validate(doc, "1.36.0", strict=True)
        config = json.loads(docs[0]["stringData"]["config.json"])
        assert config["token"] == token and config["plugins"] == ["botrunner.plugins.echo:setup"]

        missing = fleet.cli("render", "k8s", "--bot", "k8s-render", check=False)
        assert missing.returncode == 1
        assert "no token or session in the secrets file" in missing.stderr
    finally:
        fleet.api("DELETE", "/api/v1/bots/k8s-render")


def test_a_setting_out_of_range_is_refused_before_anything_is_written(scratch: Path) -> None:
    home = scratch / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TGFLEET_")}
    refused = subprocess.run(
        [str(BIN / "tgfleet"), "render", "circus-ini", "--home", str(home), "--write"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**env, "TGFLEET_DATABASE_TIMEOUT_S": "99"},
        check=False,
    )
    assert refused.returncode == 1
    assert "database_timeout_s must be from 0.1 to 60 seconds, not 99" in refused.stderr
    assert not home.exists()
