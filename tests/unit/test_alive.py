"""The alive file a bot keeps for a supervisor's probe (botrunner/alive.py), by table."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from botrunner.alive import alive_record, main, problem, write_alive
from botspec.protocol import TelegramHealth

NOW = 1_000_000.0


def record(at: float, connected: bool, since: float | None = None) -> bytes:
    return alive_record(TelegramHealth(connected, disconnected_since=since), False, at)


@pytest.mark.parametrize(
    ("data", "kwargs", "expected"),
    [
        (record(NOW - 1, True), {}, None),
        (None, {}, "no heartbeat written yet"),
        (b"{not json", {}, "unreadable heartbeat file"),
        (b'{"at": "x", "connected": true}', {}, "unreadable heartbeat file"),
        (json.dumps({"connected": True}).encode(), {}, "unreadable heartbeat file"),
        # hung loop or stopped process: the file is not rewritten
        (record(NOW - 11, True), {}, "last heartbeat 11.0 s ago (more than 10 s)"),
        # starting: not logged in yet; alive, but not for a startup probe
        (record(NOW - 1, False, NOW - 3), {"disconnect_grace_s": 5}, None),
        (
            record(NOW - 1, False, NOW - 3),
            {"require_connected": True},
            "not logged in to Telegram yet",
        ),
        (
            record(NOW - 1, False, NOW - 8),
            {"disconnect_grace_s": 5},
            "Telegram unreachable for 8.0 s (more than 5 s)",
        ),
        # without a grace, a disconnection alone never fails liveness
        (record(NOW - 1, False, NOW - 800), {}, None),
    ],
)
def test_problem(data: bytes | None, kwargs: dict[str, object], expected: str | None) -> None:
    found = problem(data, NOW, max_age_s=10, **kwargs)  # type: ignore[arg-type]
    if expected is None:
        assert found is None
    else:
        assert found is not None and found.startswith(expected), found


def test_the_command_reads_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "alive.json"
    assert main([str(path), "--max-age", "10"]) == 1
    assert "no heartbeat written yet" in capsys.readouterr().err
    write_alive(path, record(time.time(), True))
    assert main([str(path), "--max-age", "10", "--connected"]) == 0
    write_alive(path, record(time.time() - 60, True))
    assert main([str(path), "--max-age", "10"]) == 1
    assert "last heartbeat" in capsys.readouterr().err
