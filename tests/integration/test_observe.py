"""Seeing the fleet: each bot's CPU, memory, file descriptors and messages in the API and
in /metrics (parsed as Prometheus parses it), a warning before a bot hits its limit, and
its logs as JSON lines that rotate within their bound."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from drills import sandbox_name, username
from harness import BIN, Fleet, Sandbox, holds_for, running_fleet, short_tmpdir, wait_for
from prometheus_client.parser import text_string_to_metric_families

from controller.resources import REARM_BELOW, SAMPLE_INTERVAL_S, WARN_AT

pytestmark = pytest.mark.integration

PLUGINS = Path(__file__).parent / "plugins"
HOG = "hog:setup"
LOG_MAX_BYTES = 64 * 1024
LOG_BACKUP_COUNT = 2


@pytest.fixture(scope="module")
def fleet(sandbox: Sandbox) -> Iterator[Fleet]:
    """A fleet of its own: its bots find the test plugins, its logs rotate at 64 KiB."""
    root = short_tmpdir("tgfo")
    env = {
        "TGFLEET_PLUGIN_PATH": str(PLUGINS),
        "TGFLEET_LOG_MAX_BYTES": str(LOG_MAX_BYTES),
        "TGFLEET_LOG_BACKUP_COUNT": str(LOG_BACKUP_COUNT),
    }
    try:
        with running_fleet(root, sandbox, env=env) as running:
            yield running
        assert running.proc is not None and running.proc.returncode == 0, running.log_text()
        assert not running.leftovers()
    finally:
        shutil.rmtree(root, ignore_errors=True)


#: Each bot's sandbox account (a new one per bot: names repeat across test runs).
_accounts: dict[str, str] = {}


def create(fleet: Fleet, sandbox: Sandbox, name: str, **spec: Any) -> dict[str, Any]:
    account = f"{name}-{uuid.uuid4().hex[:6]}"
    token = sandbox.create_bot(sandbox_name(account))
    _accounts[name] = username(account)
    fleet.api("POST", "/api/v1/bots", {"name": name, "token": token, "plugins": [HOG], **spec})
    fleet.wait_state(name, "running")
    return wait_for(f"{name} sampled", lambda: (b := fleet.bot(name))["resources"] and b)


def ask(sandbox: Sandbox, name: str, text: str) -> str:
    """Send as a user; the bot's answer."""
    return sandbox.cli("send", _accounts[name], text, "--user", "alice", "--wait", "30")


def limit_events(fleet: Fleet, name: str) -> list[dict[str, Any]]:
    events = fleet.api("GET", f"/api/v1/bots/{name}/events?limit=1000")["events"]
    return [e for e in events if e["kind"] == "limit"]


def test_a_bot_near_its_file_limit_is_warned_once_per_crossing(
    fleet: Fleet, sandbox: Sandbox
) -> None:
    name = "fds"
    bot = create(fleet, sandbox, name, limits={"open_files": 64})
    assert bot["resources"]["open_files_limit"] == 64
    # 60 of 64: past the warning share (58) by a margin, since a bot's own count moves
    # by a descriptor or two (its session file's journal, a connection being replaced).
    near = int(64 * WARN_AT + 0.999) + 2
    assert bot["resources"]["open_files"] < near - 4
    assert limit_events(fleet, name) == []

    assert ask(sandbox, name, f"/fds {near}") == f"open fds: {near}"
    (warning,) = wait_for("the warning event", lambda: limit_events(fleet, name), timeout=30)
    assert warning["data"]["limit"] == "open_files"
    assert warning["data"]["cap"] == 64
    assert warning["data"]["used"] >= 64 * WARN_AT
    assert warning["actor"] == "resources"
    assert "open files" in warning["reason"]
    # Before the limit, not at it: the bot still runs and answers.
    assert fleet.bot(name)["state"] == "running"
    assert ask(sandbox, name, "still there?") == "still there?"
    # Staying near the limit is no new crossing: no warning at each sample.
    holds_for(
        "a single warning while the bot stays near its limit",
        lambda: len(limit_events(fleet, name)) == 1,
        duration=3 * SAMPLE_INTERVAL_S,
        every=0.5,
    )

    below = int(64 * REARM_BELOW) - 2
    assert ask(sandbox, name, f"/fds {below}") == f"open fds: {below}"
    wait_for(
        "the sample below the re-arm share",
        lambda: fleet.bot(name)["resources"]["open_files"] <= below,
    )
    assert ask(sandbox, name, f"/fds {near}") == f"open fds: {near}"
    wait_for(
        "a second warning, for the second crossing", lambda: len(limit_events(fleet, name)) == 2
    )


def test_a_bot_near_its_memory_limit_is_warned_before_it_hits_it(
    fleet: Fleet, sandbox: Sandbox
) -> None:
    name = "grower"
    limit_mb = 160
    bot = create(fleet, sandbox, name, memory_limit_mb=limit_mb)
    usage = bot["resources"]
    assert usage["data_limit_bytes"] == limit_mb * 2**20
    baseline_mb = usage["data_bytes"] / 2**20
    assert baseline_mb < limit_mb * REARM_BELOW, f"a bot at rest already uses {baseline_mb:.0f} MB"
    grow = int(limit_mb * WARN_AT - baseline_mb) + 4  # past 90 %, ~10 MB short of the limit
    assert ask(sandbox, name, f"/grow {grow}") == f"holding {grow} MB"
    (warning,) = wait_for("the memory warning", lambda: limit_events(fleet, name), timeout=30)
    assert warning["data"]["limit"] == "memory"
    assert warning["data"]["cap"] == limit_mb * 2**20
    assert warning["data"]["used"] >= WARN_AT * limit_mb * 2**20
    assert "private memory" in warning["reason"]
    # Warned before the limit: the same process still runs and answers.
    assert fleet.bot(name)["pid"] == bot["pid"]
    assert ask(sandbox, name, "alive?") == "alive?"


def test_the_api_shows_what_the_bots_process_uses(fleet: Fleet, sandbox: Sandbox) -> None:
    name = "usage"
    create(fleet, sandbox, name, memory_limit_mb=256)
    for text in ("one", "two", "three"):
        assert ask(sandbox, name, text) == text
    bot = wait_for(
        "three messages each way, counted",
        lambda: (
            (b := fleet.bot(name))["messages"]
            and b["messages"]["received"] >= 3
            and b["messages"]["sent"] >= 3
            and b["resources"]["cpu_percent"] is not None
            and b["resources"]["pss_bytes"] is not None
            and b
        ),
    )
    assert bot["messages"]["handled"] >= 3
    assert bot["messages"]["handler_errors"] == 0
    usage = bot["resources"]
    pid = bot["pid"]
    assert usage["pid"] == pid
    process = psutil.Process(pid)
    # The bot's own process, never its launcher: a forked bot is named tgf:<bot>, an
    # exec'd one runs `python -m botrunner`.
    forked = process.name() == f"tgf:{bot['name']}"[:15]
    assert forked or process.cmdline()[1:3] == ["-m", "botrunner"], process.cmdline()
    assert "launcher" not in " ".join(process.cmdline())
    assert usage["data_limit_bytes"] == 256 * 2**20
    assert usage["open_files_limit"] == 1024
    # The same process as psutil sees it (sampled within 2 s: values near, not equal).
    assert abs(usage["rss_bytes"] - process.memory_info().rss) < 0.2 * usage["rss_bytes"]
    assert abs(usage["open_files"] - len(os.listdir(f"/proc/{pid}/fd"))) <= 3
    assert usage["threads"] == pytest.approx(process.num_threads(), abs=2)
    assert 0 < usage["pss_bytes"] <= usage["rss_bytes"]
    spent = process.cpu_times()
    assert 0 < usage["cpu_seconds"] <= spent.user + spent.system + 0.01
    assert 0 <= usage["cpu_percent"] <= 200  # two cores at most here


def _series(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


#: Per-bot series and where the API has each value.
PER_BOT = {
    "tgfleet_bot_up": lambda b: int(b["state"] == "running"),
    "tgfleet_bot_restarts_total": lambda b: b["restarts"],
    "tgfleet_bot_telegram_connected": lambda b: int(b["telegram"]["connected"]),
    "tgfleet_bot_cpu_seconds_total": lambda b: b["resources"]["cpu_seconds"],
    "tgfleet_bot_rss_bytes": lambda b: b["resources"]["rss_bytes"],
    "tgfleet_bot_data_bytes": lambda b: b["resources"]["data_bytes"],
    "tgfleet_bot_data_limit_bytes": lambda b: b["resources"]["data_limit_bytes"],
    "tgfleet_bot_open_fds": lambda b: b["resources"]["open_files"],
    "tgfleet_bot_open_fds_limit": lambda b: b["resources"]["open_files_limit"],
    "tgfleet_bot_threads": lambda b: b["resources"]["threads"],
    "tgfleet_bot_messages_received_total": lambda b: b["messages"]["received"],
    "tgfleet_bot_messages_sent_total": lambda b: b["messages"]["sent"],
    "tgfleet_bot_handled_total": lambda b: b["messages"]["handled"],
    "tgfleet_bot_handler_errors_total": lambda b: b["messages"]["handler_errors"],
}


def test_metrics_parse_and_agree_with_the_api(fleet: Fleet, sandbox: Sandbox) -> None:
    name = "metered"
    create(fleet, sandbox, name)
    assert ask(sandbox, name, "count me") == "count me"
    # A bot whose token Telegram refuses: failed, one failure of kind auth.
    fleet.api("POST", "/api/v1/bots", {"name": "forged", "token": "4242:not-a-real-token"})
    fleet.wait_state("forged", "failed")
    stopped = "parked"
    create(fleet, sandbox, stopped)
    fleet.api("POST", f"/api/v1/bots/{stopped}/stop")
    fleet.wait_state(stopped, "stopped")

    def agreeing() -> tuple[dict[Any, float], list[dict[str, Any]]] | None:
        # No sample between the two scrapes: the API answer in between saw the same one.
        first = _series(fleet.api("GET", "/metrics"))
        bots = fleet.api("GET", "/api/v1/bots")["bots"]
        second = _series(fleet.api("GET", "/metrics"))
        same = {
            key: value
            for key, value in first.items()
            if key[0] != "tgfleet_bot_heartbeat_age_seconds"
            and not key[0].startswith("tgfleet_http_")
            and not key[0].startswith("tgfleet_reconcile_")
        }
        if any(second.get(key) != value for key, value in same.items()):
            return None
        return first, bots

    series, bots = wait_for("two scrapes with no sample between", agreeing)
    running = [b for b in bots if b["state"] == "running" and b["resources"] and b["messages"]]
    assert name in {b["name"] for b in running}
    for bot in running:
        for metric, value_of in PER_BOT.items():
            key = (metric, frozenset({("bot", bot["name"])}))
            assert series[key] == pytest.approx(value_of(bot)), (metric, bot["name"])
        age = series[("tgfleet_bot_heartbeat_age_seconds", frozenset({("bot", bot["name"])}))]
        assert 0 <= age < 10
    for bot in bots:
        for state in ("running", "stopped", "failed"):
            key = ("tgfleet_bot_state", frozenset({("bot", bot["name"]), ("state", state)}))
            assert series[key] == int(bot["state"] == state)
    refused = ("tgfleet_bot_failures_total", frozenset({("bot", "forged"), ("kind", "auth")}))
    assert series[refused] == 1
    assert series[("tgfleet_bot_state", frozenset({("bot", "forged"), ("state", "failed")}))] == 1
    # A stopped bot has no process: no usage series, but its state and restarts.
    parked = frozenset({("bot", stopped)})
    assert ("tgfleet_bot_rss_bytes", parked) not in series
    assert series[("tgfleet_bot_up", parked)] == 0
    states = {s["state"] for s in bots}
    for state in states:
        count = sum(1 for b in bots if b["state"] == state)
        assert series[("tgfleet_bots", frozenset({("state", state)}))] == count

    # The controller's own: its API latency, reconcile passes, database, bus.
    assert series[("tgfleet_database_up", frozenset())] == 1
    assert series[("tgfleet_reconcile_duration_seconds_count", frozenset())] >= 1
    route = ("route", "GET /api/v1/bots/{name}")  # the route's template, not the bot's path
    assert series[("tgfleet_http_request_duration_seconds_count", frozenset({route}))] >= 1
    assert ("tgfleet_bus_dropped_total", frozenset({("direction", "in")})) in series
    assert ("tgfleet_api_refusals_total", frozenset({("reason", "missing")})) in series
    # Labels stay bounded: bot names and small fixed sets, never a raw path or an id.
    labels = {name for _, labelset in series for name, _ in labelset}
    assert labels <= {"bot", "state", "kind", "reason", "route", "le", "direction"}
    fleet.api("DELETE", f"/api/v1/bots/{stopped}")
    fleet.api("DELETE", "/api/v1/bots/forged")


def test_logs_are_json_lines_that_rotate_within_their_bound(fleet: Fleet, sandbox: Sandbox) -> None:
    name = "chatty"
    create(fleet, sandbox, name)
    follower_out = fleet.home.root.parent / "follow.out"
    with open(follower_out, "wb") as sink:
        follower = subprocess.Popen(
            [str(BIN / "tgfleet"), "bots", "logs", name, "-f"],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env={**os.environ, "TGFLEET_HOME": str(fleet.home.root)},
        )
    try:
        wait_for("the follower's first lines", lambda: follower_out.read_text().strip())
        assert ask(sandbox, name, "/say first-marker") == "said"
        wait_for("the follower to print it", lambda: "first-marker" in follower_out.read_text())

        # Several times what rotation keeps: the oldest lines must be gone, not kept.
        kept = (LOG_BACKUP_COUNT + 1) * LOG_MAX_BYTES
        assert ask(sandbox, name, f"/log {3 * kept // 1024}") == "logged"
        log_file = fleet.home.logs_dir / f"bot-{name}.err.log"
        wait_for(
            "the filler's last line in the log",
            lambda: str((3 * kept // 1024) * 1024 // 200 - 1) in log_file.read_text(),
        )
        # Oldest first: .2, .1, then the file written now.
        files = [
            *(log_file.with_name(f"{log_file.name}.{n}") for n in range(LOG_BACKUP_COUNT, 0, -1)),
            log_file,
        ]
        assert sorted(fleet.home.logs_dir.glob(f"bot-{name}.err.log*")) == sorted(files)
        for path in files:
            assert path.stat().st_size < LOG_MAX_BYTES, path
        text = "".join(path.read_text() for path in files)
        assert "first-marker" not in text  # rotated away
        # Circus writes in 1 KB chunks: a line may be split across two files, and the
        # oldest file may begin inside a line whose start was rotated away.
        if not text.startswith("{"):
            text = text.partition("\n")[2]
        for line in text.splitlines():
            entry = json.loads(line)
            assert {"ts", "level", "logger", "message"} <= set(entry), line
            assert entry["bot"] == name

        # The follower goes on across rotations.
        assert ask(sandbox, name, "/say after-rotation") == "said"
        wait_for(
            "the follower after rotation", lambda: "after-rotation" in follower_out.read_text()
        )
        assert follower.poll() is None
    finally:
        follower.terminate()
        follower.wait(timeout=30)


def test_the_controller_logs_json_with_bot_and_event_kind(fleet: Fleet) -> None:
    lines = (fleet.home.logs_dir / "controller.err.log").read_text().splitlines()
    entries = [json.loads(line) for line in lines if line.strip()]
    assert all({"ts", "level", "logger", "message"} <= set(e) for e in entries)
    transitions = [e for e in entries if e.get("event") == "state"]
    assert transitions, "no state change logged"
    assert all(e["bot"] for e in transitions)
