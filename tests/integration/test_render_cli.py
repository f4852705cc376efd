"""`tgfleet render circus-ini` through the CLI: what it prints is what `tgfleet up`
writes, it touches nothing without --write, and --write says what it changed."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import BIN, Fleet, short_tmpdir

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
