"""How long deploying takes: the Ansible role against this machine, and the renders.

Runs the role (deploy/ansible/) with `-c local` into a temp prefix, circusd as a
daemon, one echo bot on a sandbox: the first run (venv, pip install from a wheel of
this checkout, initdb, start), a second run that changes nothing, and a `--check
--diff` run; then `tgfleet render circus-ini` and `tgfleet render k8s` against the
fleet it set up. Prints wall times; stops everything. Run as root (the role makes a
system user).

    .venv/bin/python bench/deploy.py
"""

from __future__ import annotations

import json
import resource
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "integration"))

from _fleet import Sandbox, free_port, short_tmpdir
from harness import BIN
from test_ansible import TARGET_PYTHON, Deployment, bot_decl
from test_wheel import build_wheel


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(what: str, action: object) -> object:
    """Run ``action``; print its wall time and the CPU time of the processes it waited
    for (steadier than wall time on a host shared with other work)."""
    started, cpu = time.monotonic(), _children_cpu_s()
    result = action()  # type: ignore[operator]
    wall, used = time.monotonic() - started, _children_cpu_s() - cpu
    print(f"{what}: {wall:.1f} s wall, {used:.1f} s CPU", flush=True)
    return result


def main() -> None:
    root = short_tmpdir("tgfdb")
    root.chmod(0o755)
    sandbox = Sandbox.start(root / "sandbox")
    deployed = Deployment(root, f"tgfdb{secrets.token_hex(3)}", f"127.0.0.1:{free_port()}")
    try:
        wheel = timed("build the wheel", lambda: build_wheel(root))
        token = sandbox.create_bot(f"bench{secrets.token_hex(2)}")
        deployed.write_vars(
            {
                "tgfleet_prefix": str(deployed.prefix),
                "tgfleet_wheel": str(wheel),
                "tgfleet_python": TARGET_PYTHON,
                "tgfleet_user": deployed.user,
                "tgfleet_service_manager": "daemon",
                "tgfleet_listen": deployed.listen,
                "tgfleet_fleet_defaults": {"telegram": sandbox.telegram_defaults()},
                "tgfleet_bots": [bot_decl("bench", token, "bench: ")],
            }
        )
        for label, extra in (
            ("first run (install, initdb, start, declare)", ()),
            ("second run (nothing to change)", ()),
            ("--check --diff run", ("--check", "--diff")),
        ):
            recap, _ = timed(label, lambda extra=extra: deployed.play(*extra))  # type: ignore[misc]
            print(f"  recap: {json.dumps(recap)}")
        home = str(deployed.home)
        timed(
            "tgfleet render circus-ini",
            lambda: subprocess.run(
                [
                    str(BIN / "tgfleet"),
                    "render",
                    "circus-ini",
                    "--home",
                    home,
                    "--listen",
                    deployed.listen,
                ],
                capture_output=True,
                check=True,
            ),
        )
        secrets_file = root / "secrets.json"
        secrets_file.write_text(
            json.dumps(
                {
                    "defaults": {"telegram": {"api_hash": "sandbox"}},
                    "bots": {"bench": {"token": token}},
                }
            )
        )
        timed(
            "tgfleet render k8s (one bot)",
            lambda: subprocess.run(
                [
                    str(BIN / "tgfleet"),
                    "render",
                    "k8s",
                    "--home",
                    home,
                    "--api",
                    f"http://{deployed.listen}",
                    "--secrets",
                    str(secrets_file),
                ],
                capture_output=True,
                check=True,
            ),
        )
    finally:
        deployed.stop()
        deployed.remove_user()
        sandbox.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
