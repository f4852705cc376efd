"""What `tgfleet render k8s` gives a bot, run for real: the config.json of its Secret
starts a bot that logs in to the sandbox and answers, and the probes of its
Deployment pass while it lives and fail when it hangs (SIGSTOP), as the kubelet
would run them. No cluster: the pod's paths are moved into a temp dir.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from harness import Sandbox, short_tmpdir, wait_for

from botspec.config import dump, parse
from controller.k8s import BotSource, K8sOptions, Secrets, manifests

pytestmark = pytest.mark.integration


@pytest.fixture
def scratch() -> Iterator[Path]:
    root = short_tmpdir("tgfk")
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def probe(command: list[str], data_dir: str, pod_data_dir: str) -> subprocess.CompletedProcess[str]:
    """Run a probe's exec command as the kubelet would, with the pod's paths moved."""
    argv = [sys.executable if a == "python" else a.replace(pod_data_dir, data_dir) for a in command]
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)


def test_the_rendered_bot_runs_and_its_probes_see_it_live_and_hang(
    scratch: Path, sandbox: Sandbox
) -> None:
    token = sandbox.create_bot("k8s_probe")
    bot = BotSource(
        "probe",
        {
            "plugins": ["botrunner.plugins.echo:setup"],
            "settings": {"prefix": "k8s: "},
            "health": {"heartbeat_interval_s": 0.5, "heartbeat_timeout_s": 3},
        },
    )
    telegram = sandbox.telegram_defaults()
    secrets = Secrets(
        defaults={"telegram": {"api_hash": telegram.pop("api_hash")}},
        bots={"probe": {"token": token}},
    )
    docs = manifests([bot], {"telegram": telegram}, secrets, K8sOptions(), only="probe")
    secret = next(d for d in docs if d["kind"] == "Secret")
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    env: dict[str, Any] = {e["name"]: e["value"] for e in container["env"]}

    pod_config = parse(secret["stringData"]["config.json"].encode())
    data_dir = str(scratch / "data")
    config = msgspec.structs.replace(pod_config, data_dir=data_dir)
    config_file = scratch / "config.json"
    config_file.write_bytes(dump(config))
    config_file.chmod(0o600)
    alive_file = env["TGFLEET_ALIVE_FILE"].replace(pod_config.data_dir, data_dir)
    command = [sys.executable, *container["command"][1:-1], str(config_file)]
    assert container["command"][1:3] == ["-m", "botrunner"]

    log = open(scratch / "bot.log", "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        command,
        env={**os.environ, **env, "TGFLEET_ALIVE_FILE": alive_file, "HOME": data_dir},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        startup = container["startupProbe"]["exec"]["command"]
        liveness = container["livenessProbe"]["exec"]["command"]
        wait_for(
            "the startup probe to pass (logged in)",
            lambda: probe(startup, data_dir, pod_config.data_dir).returncode == 0,
            timeout=60,
        )
        assert sandbox.cli("send", "k8s_probe_bot", "hi", "--wait", "30") == "k8s: hi"
        assert probe(liveness, data_dir, pod_config.data_dir).returncode == 0
        record = json.loads(Path(alive_file).read_text())
        assert record["connected"] is True

        process.send_signal(signal.SIGSTOP)  # hung: no heartbeat any more
        failed = wait_for(
            "the liveness probe to fail",
            lambda: (p := probe(liveness, data_dir, pod_config.data_dir)).returncode == 1 and p,
            timeout=30,
        )
        assert "last heartbeat" in failed.stderr
        process.send_signal(signal.SIGCONT)
        wait_for(
            "the liveness probe to pass again",
            lambda: probe(liveness, data_dir, pod_config.data_dir).returncode == 0,
            timeout=30,
        )
    finally:
        process.send_signal(signal.SIGCONT)
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
    assert process.returncode == 0, (scratch / "bot.log").read_text()
