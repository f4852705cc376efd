"""Renderings of the fleet for people and scrapers (Prometheus text)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from botspec import procinfo
from controller.eventlog import stamp
from controller.health import HealthRecord
from controller.observer import LiveProcess
from controller.spec import public_view
from controller.states import BotState
from controller.store import BotRow


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def metrics_text(bots: Sequence[dict[str, Any]]) -> str:
    """Prometheus exposition format 0.0.4 of the fleet's bots."""
    lines = [
        "# HELP tgfleet_bots Bots by lifecycle state.",
        "# TYPE tgfleet_bots gauge",
    ]
    for state in BotState:
        count = sum(1 for b in bots if b["state"] == state.value)
        lines.append(f'tgfleet_bots{{state="{state.value}"}} {count}')
    series: list[tuple[str, str, Callable[[dict[str, Any]], int | None]]] = [
        ("tgfleet_bot_up", "1 when the bot is running.", lambda b: int(b["state"] == "running")),
        (
            "tgfleet_bot_telegram_connected",
            "1 when the bot's last probe reached Telegram.",
            lambda b: int(bool(b["telegram"]["connected"])),
        ),
        ("tgfleet_bot_restarts_total", "Process restarts of the bot.", lambda b: b["restarts"]),
        (
            "tgfleet_bot_rss_bytes",
            "Resident memory of the bot's process.",
            lambda b: None if b["rss_mb"] is None else int(b["rss_mb"] * 2**20),
        ),
    ]
    for metric, help_text, value_of in series:
        kind = "counter" if metric.endswith("_total") else "gauge"
        lines += [f"# HELP {metric} {help_text}", f"# TYPE {metric} {kind}"]
        for bot in bots:
            value = value_of(bot)
            if value is not None:
                lines.append(f'{metric}{{bot="{_label(bot["name"])}"}} {value}')
    return "\n".join(lines) + "\n"


#: Every key of a bot's ``telegram`` view, always there whatever the bot last said.
NO_TELEGRAM: dict[str, Any] = {
    "connected": False,
    "last_update_age_s": None,
    "last_error": None,
    "disconnected_since": None,
    "flood_wait_until": None,
}


def bot_view(
    row: BotRow,
    alive: LiveProcess | None,
    live: LiveProcess | None,
    record: HealthRecord,
    now: float,
    *,
    local: bool = True,
) -> dict[str, Any]:
    """A bot as the API shows it (controller/schemas.py ``BotView``): ``alive`` is its
    process if that still exists, ``live`` what was last heard of it either way;
    ``local``: this controller holds it (else its live fields are not known here)."""
    pid: int | None = None
    uptime: float | None = None
    rss: float | None = None
    telegram = dict(NO_TELEGRAM)
    if alive is not None:
        pid = alive.pid
        uptime = procinfo.age_s(pid)
        rss = alive.rss_mb
        telegram = {**telegram, **alive.telegram}
    if row.state not in (BotState.RUNNING, BotState.STARTING):
        telegram["connected"] = False
    return {
        "name": row.name,
        "state": row.state.value,
        "health": health_view(row.state, live, record, now),
        "desired": row.desired,
        "since": row.state_since.isoformat(),
        "reason": row.state_reason,
        "pid": pid,
        "uptime_s": round(uptime, 1) if uptime is not None else None,
        "restarts": row.restarts,
        "rss_mb": rss,
        "telegram": telegram,
        "generation": row.generation,
        "version": row.version,
        "watcher": f"bot-{row.name}",
        "host": row.host,
        "held_by": row.held_by,
        "local": local,
        "spec": public_view(row.spec),
    }


def health_status(state: BotState, live: LiveProcess | None, record: HealthRecord) -> str:
    """One word for a bot's health: failed, backoff, failing, healthy or unknown."""
    if state is BotState.FAILED:
        return "failed"
    if record.failure_kind is not None:
        return "backoff" if record.next_restart_at else "failing"
    if live is not None and live.telegram.get("connected"):
        return "healthy"
    return "unknown"


def health_view(
    state: BotState, live: LiveProcess | None, record: HealthRecord, now: float
) -> dict[str, Any]:
    flood = live.telegram.get("flood_wait_until") if live is not None else None
    return {
        "status": health_status(state, live, record),
        "failure": None
        if record.failure_kind is None
        else {
            "kind": record.failure_kind,
            "reason": record.failure_reason,
            "since": stamp(record.failure_at),
        },
        "last_failure": None
        if record.last_kind is None
        else {"kind": record.last_kind, "reason": record.last_reason, "at": stamp(record.last_at)},
        "next_restart_at": stamp(record.next_restart_at),
        "restart_attempt": record.attempt,
        "flood_wait_until": stamp(flood) if isinstance(flood, int | float) else None,
        "heartbeat_age_s": None
        if live is None or live.last_beat_at is None
        else round(max(0.0, now - live.last_beat_at), 2),
        "heartbeats_missed": live.heartbeats_missed if live is not None else 0,
        "max_heartbeat_gap_s": round(live.max_gap_s, 2) if live is not None else None,
    }


def stale_marks(rows_at: float | None) -> dict[str, Any]:
    """What marks an answer made from memory: the rows are as of their last read."""
    return {"stale": True, "as_of": stamp(rows_at)}
