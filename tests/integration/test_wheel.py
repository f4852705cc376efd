"""tgfleet as a user installs it: a wheel in a fresh venv, run away from the checkout.

Nothing of the checkout may be reachable from that venv (no editable install, no
PYTHONPATH, another working directory), so a template, migration or module that
only the checkout holds makes `tgfleet up` fail here.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from harness import ROOT, descendants, free_port, short_tmpdir, wait_for

from controller.botusers import BotUsers
from controller.client import ApiClient, ApiError
from controller.home import Home

pytestmark = pytest.mark.integration

BUILD_TIMEOUT_S = 300
#: What only the checkout holds; copying it would be slow, and none of it ships.
NOT_SOURCE = shutil.ignore_patterns(
    ".git",
    ".venv",
    ".tgfleet",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    ".*_cache",
    "tgf-launcher",  # built by _venv.sh in the checkout: the wheel's build must make its own
    "tests",
    "bench",
)


def package_data() -> set[str]:
    """The non-Python files the controller reads at run time, as the checkout holds them."""
    controller = ROOT / "controller"
    found = {
        path.relative_to(ROOT).as_posix()
        for pattern in ("templates/**/*", "migrations/*.sql")
        for path in controller.glob(pattern)
        if path.is_file()
    }
    # A glob that matches nothing must not make the wheel check pass by default.
    assert {
        "controller/templates/circus.ini.j2",
        "controller/templates/watcher.ini.j2",
        "controller/templates/fleet.html",
        "controller/templates/static/dashboard.js",
        "controller/migrations/0001_initial.sql",
    } <= found, found
    return found


def package_modules(source: Path) -> set[str]:
    """Every module of every top-level package in ``source`` (a package left out of
    pyproject's packages.find would be missing from the wheel)."""
    return {
        path.relative_to(source).as_posix()
        for init in source.glob("*/__init__.py")
        for path in init.parent.rglob("*.py")
    }


def run(command: list[str], cwd: Path) -> None:
    done = subprocess.run(
        command, cwd=cwd, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, check=False
    )
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout}\n{done.stderr}"


def build_wheel(root: Path) -> Path:
    """Build from a copy of the sources: an in-tree build would write build/ and *.egg-info
    into the checkout, and setuptools reuses a stale build/lib (a removed module ships)."""
    source = root / "src"
    shutil.copytree(ROOT, source, ignore=NOT_SOURCE)
    dist = root / "dist"
    run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(dist), "."], source
    )
    (wheel,) = dist.glob("tgfleet-*.whl")
    return wheel


def install(wheel: Path, venv: Path) -> None:
    """A venv without pip of its own (this one's pip installs into it: ensurepip costs
    seconds); dependencies come from pip's usual index and cache. --no-compile: the
    first run compiles what it imports (measured 19 s instead of 24 s for the install)."""
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], venv.parent)
    python = str(venv / "bin" / "python")
    command = [sys.executable, "-m", "pip", "--python", python, "install", "--quiet"]
    run([*command, "--no-compile", str(wheel)], venv.parent)


def user_env(venv: Path) -> dict[str, str]:
    """A shell's environment, minus everything that would point at the checkout or at
    this test run's own venv and fleets (the wheel must bring its own PostgreSQL)."""
    own_bin = str(Path(sys.executable).parent)
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("TGFLEET_", "PYTHON", "PYTEST", "VIRTUAL_ENV"))
    }
    path = [p for p in env.get("PATH", "/usr/bin:/bin").split(os.pathsep) if p != own_bin]
    env["PATH"] = os.pathsep.join([str(venv / "bin"), *path])
    return env


def processes_naming(root: Path) -> list[psutil.Process]:
    """Live processes whose command line names anything under ``root``."""
    return [
        proc
        for proc in psutil.process_iter(["cmdline"])
        if str(root) in " ".join(proc.info["cmdline"] or [])
    ]


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A temp dir under /tmp, mode 0755: as root, the embedded PostgreSQL runs as the
    `pgserver` user and must reach its binaries inside the venv made here."""
    root = short_tmpdir("tgfw")
    try:
        yield root
    finally:
        for proc in processes_naming(root):
            with contextlib.suppress(psutil.Error):
                proc.kill()
        shutil.rmtree(root, ignore_errors=True)


def test_a_wheel_installed_in_a_fresh_venv_runs_the_fleet_away_from_the_checkout(
    scratch: Path,
) -> None:
    wheel = build_wheel(scratch)
    with zipfile.ZipFile(wheel) as archive:
        shipped = set(archive.namelist())
    modules = package_modules(scratch / "src")
    assert "botrunner/__main__.py" in modules and "controller/__main__.py" in modules
    missing = (package_data() | modules | {"botrunner/tgf-launcher"}) - shipped
    assert not missing, f"{wheel.name} lacks {sorted(missing)}"
    assert "-py3-none-linux_" in wheel.name, wheel.name  # one binary: any Python 3.11+

    venv = scratch / "venv"
    install(wheel, venv)
    for pth in venv.glob("lib/python*/site-packages/*.pth"):
        assert str(ROOT) not in pth.read_text(), f"{pth} points into the checkout"
    # The launcher in C arrives executable and runs (without arguments: its usage, 64)
    [launcher] = venv.glob("lib/python*/site-packages/botrunner/tgf-launcher")
    assert subprocess.run([launcher], capture_output=True, check=False).returncode == 64

    elsewhere = scratch / "cwd"
    elsewhere.mkdir()
    home = scratch / "home"
    listen = f"127.0.0.1:{free_port()}"
    output = scratch / "up.log"
    with open(output, "wb") as log:
        up = subprocess.Popen(
            [str(venv / "bin" / "tgfleet"), "up", "--home", str(home), "--listen", listen],
            cwd=elsewhere,
            env=user_env(venv),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        api = ApiClient(f"http://{listen}", None, timeout_s=30)

        def healthy() -> bool:
            if up.poll() is not None:
                raise AssertionError(f"tgfleet up exited {up.returncode}: {output.read_text()}")
            api.request("GET", "/healthz")
            return True

        wait_for("GET /healthz from the installed tgfleet", healthy, timeout=120)

        token = (home / "admin.token").read_text().strip()
        assert ApiClient(f"http://{listen}", token).request("GET", "/api/v1/bots") == {"bots": []}
        with pytest.raises(ApiError) as refused:
            api.request("GET", "/api/v1/bots")
        assert refused.value.status == 401
        assert 'name="token"' in api.request("GET", "/login")  # the dashboard's login form

        # Every process of the fleet runs from the new venv (pgserver's postgres included).
        fleet = descendants(up.pid)
        commands = [p.cmdline() for p in fleet]
        programs = {c[0] for c in commands if c and c[0].startswith("/")}
        assert programs, commands
        assert all(p.startswith(str(venv)) for p in programs), commands
        assert any("controller" in c for c in commands), commands
        assert any(c[0].endswith("/postgres") for c in commands if c), commands
    finally:
        if up.poll() is None:
            up.send_signal(signal.SIGINT)  # Ctrl-C
        try:
            code = up.wait(timeout=60)
        except subprocess.TimeoutExpired:
            up.kill()
            code = up.wait()
        # As root the fleet made its group (and its bots' users, none here): not ours to keep.
        BotUsers(Home(home)).remove_all()
    assert code == 0, output.read_text()
    assert output.read_text().rstrip().endswith("stopped"), output.read_text()[-2000:]
    assert [p for p in fleet if p.is_running()] == []  # postgres backends included
    assert [p.info["cmdline"] for p in processes_naming(scratch)] == []
