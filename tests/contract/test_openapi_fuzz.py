"""The API against its own OpenAPI document, judged by schemathesis (every check, stateful too).

A real fleet (circusd, PostgreSQL, controller, bot processes) runs; schemathesis
reads /openapi.json and sends what it generates from it: valid and invalid
bodies, parameters and methods, and chains of requests that follow the
document's links (create a bot, then get, patch, stop, destroy it). Every answer
must be what the document says. It all runs in a network namespace of its own
(tests/contract/fuzz_fleet.py): fuzzed specs name random Telegram servers.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

pytestmark = pytest.mark.integration

HERE = Path(__file__).resolve().parent


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None,
    reason="needs root and unshare(1) for a network namespace (CI has both)",
)
def test_schemathesis_finds_nothing(tmp_path: Path) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    pem = tmp_path / "key.pem"
    pem.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.PKCS1)
    )
    report = tmp_path / "schemathesis.log"
    examples = os.environ.get("TGFLEET_FUZZ_EXAMPLES", "25")
    done = subprocess.run(
        [
            "unshare",
            "--net",
            sys.executable,
            str(HERE / "fuzz_fleet.py"),
            str(report),
            examples,
            str(pem),
        ],
        timeout=1200,
    )
    text = report.read_text() if report.exists() else "(no report)"
    shutil.copy(
        report, Path(os.environ.get("TGFLEET_FUZZ_REPORT", "/tmp/tgfleet-schemathesis.log"))
    )
    summary = [line for line in text.splitlines() if "generated," in line or "Selected" in line]
    print("schemathesis:", "; ".join(s.strip() for s in summary))
    assert done.returncode == 0, text[-8000:]
    # Every operation but the endless event stream and token revocation.
    assert "Selected: 24/26" in text
    assert "Authentication failed" not in text
