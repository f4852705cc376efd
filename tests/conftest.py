"""Fixtures shared by the integration tests: one sandbox and one fleet per test session."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from harness import Fleet, Sandbox, WebhookSink, running_fleet, sandbox_in_tmp, short_tmpdir


@pytest.fixture(scope="session")
def sandbox() -> Iterator[Sandbox]:
    with sandbox_in_tmp("tgfs") as box:
        yield box


@pytest.fixture(scope="session")
def webhook() -> Iterator[WebhookSink]:
    sink = WebhookSink()
    try:
        yield sink
    finally:
        sink.close()


@pytest.fixture(scope="session")
def fleet(sandbox: Sandbox, webhook: WebhookSink) -> Iterator[Fleet]:
    """A running `tgfleet up` (embedded PostgreSQL) whose default Telegram is the sandbox."""
    root = short_tmpdir("tgff")
    try:
        with running_fleet(root, sandbox, env={"TGFLEET_WEBHOOK_URL": webhook.url}) as running:
            yield running
            leftovers = running.leftovers()
        assert running.proc is not None and running.proc.returncode == 0, running.log_text()
        assert not running.leftovers(), leftovers
    finally:
        shutil.rmtree(root, ignore_errors=True)
