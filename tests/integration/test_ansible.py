"""The Ansible role (deploy/ansible/) as an operator runs it, against this machine.

`ansible-playbook -c local` installs tgfleet from a wheel of this checkout into a
temporary prefix, starts circusd as a daemon (no systemd runs here; the unit is
still installed and checked with `systemd-analyze verify`), serves the API over
HTTPS (`tgfleet_tls_cert`/`tgfleet_tls_key`), and declares two bots on the sandbox
through the API, one with its `host`. A second run changes nothing; `--check --diff`
shows a change without making it; the bots answer; everything stops afterwards.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
from harness import (
    BIN,
    EXTERNAL_DSN,
    ROOT,
    Sandbox,
    create_database,
    drop_database,
    free_port,
    self_signed_certificate,
    short_tmpdir,
    wait_for,
    write_pem,
)
from test_wheel import build_wheel

from controller.client import ApiClient, ApiUnreachable
from controller.sysusers import delete_group

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

PLAYBOOK_DIR = ROOT / "deploy" / "ansible"
# The target's own Python for Ansible's modules and the fleet's venv: the fleet's user
# must be able to run it (this venv's interpreter may live where it cannot).
TARGET_PYTHON = "/usr/bin/python3"
RECAP = re.compile(
    r"^localhost\s*:\s*ok=(?P<ok>\d+)\s+changed=(?P<changed>\d+)\s+"
    r"unreachable=(?P<unreachable>\d+)\s+failed=(?P<failed>\d+)",
    re.M,
)


@dataclass
class Deployment:
    root: Path
    user: str
    listen: str
    database: str | None = None  # its own database on the external server, if any
    ca_file: Path | None = None  # the API's certificate, when it serves HTTPS

    @property
    def prefix(self) -> Path:
        return self.root / "p"

    @property
    def home(self) -> Path:
        return self.prefix / "srv" / "tgfleet"

    @property
    def venv(self) -> Path:
        return self.prefix / "opt" / "tgfleet"

    @property
    def unit(self) -> Path:
        return self.prefix / "etc" / "systemd" / "system" / "tgfleet.service"

    @property
    def circus_endpoint(self) -> str:
        return f"ipc://{self.home}/run/circus.sock"

    def write_vars(self, variables: dict[str, Any]) -> Path:
        path = self.root / "vars.json"
        path.write_text(json.dumps(variables))
        return path

    def play(self, *extra: str) -> tuple[dict[str, int], str]:
        """One `ansible-playbook` run: its recap for localhost and its output."""
        inventory = self.root / "inventory.yml"
        inventory.write_text(
            "tgfleet:\n  hosts:\n    localhost:\n"
            "      ansible_connection: local\n"
            f"      ansible_python_interpreter: {TARGET_PYTHON}\n"
            # No sudo here; su needs a shell for the fleet's nologin user.
            "      ansible_become_method: su\n"
            '      ansible_become_flags: "-s /bin/sh"\n'
        )
        env = {
            **os.environ,
            "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_PIPELINING": "1",
            "ANSIBLE_LOCAL_TEMP": str(self.root / "ansible-tmp"),
            "ANSIBLE_HOME": str(self.root / "ansible-home"),
        }
        done = subprocess.run(
            [
                str(BIN / "ansible-playbook"),
                "-i",
                str(inventory),
                "-e",
                f"@{self.root / 'vars.json'}",
                *extra,
                "playbook.yml",
            ],
            cwd=PLAYBOOK_DIR,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        output = done.stdout + done.stderr
        found = RECAP.search(done.stdout)
        assert done.returncode == 0 and found, f"ansible-playbook {extra} failed:\n{output}"
        return {key: int(value) for key, value in found.groupdict().items()}, output

    def api(self) -> ApiClient:
        token = (self.home / "admin.token").read_text().strip()
        if self.ca_file is None:
            return ApiClient(f"http://{self.listen}", token, timeout_s=30)
        return ApiClient(f"https://{self.listen}", token, timeout_s=30, cafile=str(self.ca_file))

    def processes(self) -> list[psutil.Process]:
        found = []
        for proc in psutil.process_iter(["cmdline"]):
            if str(self.root) in " ".join(proc.info["cmdline"] or []):
                found.append(proc)
        return found

    def stop(self) -> None:
        """Stop what the role started, as an operator would (circusctl quit), then make
        sure: whatever still runs is killed."""
        circusctl = self.venv / "bin" / "circusctl"
        if circusctl.exists():
            subprocess.run(
                [str(circusctl), "--endpoint", self.circus_endpoint, "--timeout", "30", "quit"],
                capture_output=True,
                timeout=60,
                check=False,
            )
        with contextlib.suppress(AssertionError):
            wait_for("the fleet's processes to end", lambda: not self.processes(), timeout=60)
        for proc in self.processes():
            with contextlib.suppress(psutil.Error):
                proc.kill()

    def remove_user(self) -> None:
        subprocess.run(["userdel", self.user], capture_output=True, check=False)
        delete_group(self.user)


@pytest.fixture
def deployment() -> Iterator[Deployment]:
    root = short_tmpdir("tgfa")
    root.chmod(0o755)  # the fleet's user must reach its venv and home below it
    deployed = Deployment(root, f"tgfa{secrets.token_hex(3)}", f"127.0.0.1:{free_port()}")
    try:
        if EXTERNAL_DSN is not None:
            # The role's DSN path (a vault variable in real life): a database of its own.
            deployed.database = create_database(EXTERNAL_DSN)
        yield deployed
    finally:
        deployed.stop()
        deployed.remove_user()
        if deployed.database is not None and EXTERNAL_DSN is not None:
            drop_database(EXTERNAL_DSN, deployed.database)
        shutil.rmtree(root, ignore_errors=True)


def bot_decl(name: str, token: str, prefix: str) -> dict[str, Any]:
    return {
        "name": name,
        "token": token,
        "plugins": ["botrunner.plugins.echo:setup"],
        "settings": {"prefix": prefix},
    }


def verify_unit(unit: Path) -> None:
    """`systemd-analyze verify` on the installed unit where the tool exists; it only
    warns about a bad setting, so any line naming the unit fails the check."""
    tool = shutil.which("systemd-analyze")
    if tool is None:
        print(f"skipped: systemd-analyze verify {unit}: systemd-analyze is not installed")
        return
    done = subprocess.run(
        [tool, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )
    about_unit = [line for line in done.stderr.splitlines() if unit.name in line]
    assert done.returncode == 0 and not about_unit, done.stderr


def certificate_from_an_authority(directory: Path) -> tuple[Path, Path, Path]:
    """An authority (self-signed, ca.pem) and the server's certificate for 127.0.0.1 it
    signed (no authority itself: trusting it alone verifies nothing), with its key:
    ``directory``/ca.pem, cert.pem and key.pem."""
    import ipaddress
    from datetime import UTC, datetime, timedelta

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    authority, _ = self_signed_certificate(directory)
    authority = authority.rename(directory / "ca.pem")
    ca_cert = x509.load_pem_x509_certificate(authority.read_bytes())
    ca_key = serialization.load_pem_private_key((directory / "key.pem").read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "tgfleet")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(hours=2))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    cert_path, key_path = write_pem(directory, cert, key)
    return authority, cert_path, key_path


def test_the_role_deploys_a_fleet_idempotently_and_its_bots_answer(
    deployment: Deployment, sandbox: Sandbox
) -> None:
    wheel = build_wheel(deployment.root)
    tag = secrets.token_hex(2)
    tokens = {name: sandbox.create_bot(f"ans{tag}_{name}") for name in ("one", "two")}
    tls = deployment.root / "tls"
    tls.mkdir(mode=0o755)
    # An authority's certificate, not the server's own, is what the role must trust.
    authority, cert, key = certificate_from_an_authority(tls)
    key.chmod(0o644)  # a test's key: the fleet's user, made by the role, must read it
    deployment.ca_file = authority
    host = f"ans{tag}"  # the controller's TGFLEET_HOST, and bot two's declared host
    variables: dict[str, Any] = {
        "tgfleet_prefix": str(deployment.prefix),
        "tgfleet_wheel": str(wheel),
        "tgfleet_python": TARGET_PYTHON,
        "tgfleet_user": deployment.user,
        "tgfleet_service_manager": "daemon",
        "tgfleet_listen": deployment.listen,
        "tgfleet_tls_cert": str(cert),
        "tgfleet_tls_key": str(key),
        "tgfleet_tls_ca": str(authority),
        "tgfleet_environment": {"TGFLEET_HOST": host},
        "tgfleet_database_url": deployment.database or "",
        "tgfleet_fleet_defaults": {"telegram": sandbox.telegram_defaults()},
        "tgfleet_bots": [
            bot_decl("one", tokens["one"], "one: "),
            {**bot_decl("two", tokens["two"], "two: "), "host": host},
        ],
    }
    deployment.write_vars(variables)

    first, output = deployment.play()
    assert first["failed"] == 0 and first["changed"] > 0, output
    second, output = deployment.play("--diff")
    assert second["changed"] == 0 and second["failed"] == 0, output
    for secret in (*tokens.values(), deployment.database):
        assert secret is None or secret not in output

    # The fleet answers its API and runs the declared bots, as the role's user.
    api = deployment.api()
    for name in ("one", "two"):
        wait_for(
            f"{name} running with Telegram connected",
            lambda n=name: (
                (b := api.request("GET", f"/api/v1/bots/{n}"))["state"] == "running"
                and b["telegram"]["connected"]
            ),
            timeout=60,
        )
        answer = sandbox.cli("send", f"ans{tag}_{name}_bot", "hi", "--wait", "30")
        assert answer == f"{name}: hi"
    circusd = [p for p in deployment.processes() if "circusd" in " ".join(p.cmdline())]
    assert circusd and all(p.username() == deployment.user for p in circusd)
    circus_ini = (deployment.home / "circus.ini").read_text()
    assert circus_ini.startswith("# Rendered by `tgfleet up`")
    # The embedded PostgreSQL is a watcher exactly when no DSN was given.
    assert ("[watcher:postgres]" in circus_ini) == (deployment.database is None)
    # The controller serves HTTPS with the role's certificate, and nothing in clear.
    settings = json.loads((deployment.home / "controller.json").read_text())
    assert (settings["tls_cert"], settings["tls_key"], settings["host"]) == (
        str(cert),
        str(key),
        host,
    )
    with pytest.raises(ApiUnreachable):
        ApiClient(f"http://{deployment.listen}", None, timeout_s=10).request("GET", "/healthz")
    assert api.request("GET", "/api/v1/bots/two")["host"] == host

    unit = deployment.unit.read_text()
    assert f"ExecStart={deployment.venv}/bin/python -m controller.circusd" in unit
    assert f"User={deployment.user}" in unit
    verify_unit(deployment.unit)

    # --check --diff shows what a changed declaration would do, and does nothing.
    variables["tgfleet_bots"][0]["settings"] = {"prefix": "uno: "}
    variables["tgfleet_bots"][1]["host"] = "elsewhere"
    deployment.write_vars(variables)
    checked, output = deployment.play("--check", "--diff")
    assert checked["changed"] == 1, output
    assert '+        "prefix": "uno: "' in output, output
    assert f'-    "host": "{host}",' in output and '+    "host": "elsewhere",' in output, output
    assert tokens["one"] not in output
    assert api.request("GET", "/api/v1/bots/one")["spec"]["settings"] == {"prefix": "one: "}
    assert api.request("GET", "/api/v1/bots/two")["host"] == host


def test_ansible_lint_passes_on_the_role_and_playbook(tmp_path: Path) -> None:
    done = subprocess.run(
        [str(BIN / "ansible-lint"), "--offline", "--nocolor", "roles/tgfleet", "playbook.yml"],
        cwd=PLAYBOOK_DIR,
        env={**os.environ, "ANSIBLE_HOME": str(tmp_path), "XDG_CACHE_HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 failure(s), 0 warning(s)" in done.stdout + done.stderr
