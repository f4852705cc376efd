"""Renderings of the fleet for people and scrapers (Prometheus text)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from botspec import procinfo
from controller.eventlog import stamp
from controller.health import HealthRecord
from controller.metrics import Family, Kind
from controller.observer import LiveProcess
from controller.resources import Usage
from controller.spec import public_view
from controller.states import BotState
from controller.store import BotRow


def bot_families(
    bots: Sequence[dict[str, Any]], failures: Mapping[str, Mapping[str, int]]
) -> list[Family]:
    """The per-bot metric families, from the bots as the API shows them (so the two
    always agree) and the healer's failure counts."""
    by_state = Family("tgfleet_bots", "gauge", "Bots by lifecycle state.")
    for each in BotState:
        by_state.add(sum(1 for b in bots if b["state"] == each.value), state=each.value)
    state = Family("tgfleet_bot_state", "gauge", "1 for the state the bot is in, 0 for the others.")
    for bot in bots:
        for each in BotState:
            state.add(int(bot["state"] == each.value), bot=bot["name"], state=each.value)
    failed = Family(
        "tgfleet_bot_failures_total",
        "counter",
        "Failures health detected (and bots given up on), by kind, since the controller started.",
    )
    for bot in bots:
        for kind, count in sorted(failures.get(bot["name"], {}).items()):
            failed.add(count, bot=bot["name"], kind=kind)
    families = [by_state, state, failed]
    for name, kind, help_text, value_of in _PER_BOT:
        family = Family(name, kind, help_text)
        for bot in bots:
            family.add(value_of(bot), bot=bot["name"])
        families.append(family)
    return families


def _resource(key: str) -> Callable[[dict[str, Any]], float | None]:
    return lambda b: None if b["resources"] is None else b["resources"][key]


def _messages(key: str) -> Callable[[dict[str, Any]], float | None]:
    return lambda b: None if b["messages"] is None else b["messages"][key]


_PER_BOT: list[tuple[str, Kind, str, Callable[[dict[str, Any]], float | None]]] = [
    (
        "tgfleet_bot_up",
        "gauge",
        "1 when the bot is running.",
        lambda b: int(b["state"] == "running"),
    ),
    (
        "tgfleet_bot_telegram_connected",
        "gauge",
        "1 when the bot's last probe reached Telegram.",
        lambda b: int(bool(b["telegram"]["connected"])),
    ),
    (
        "tgfleet_bot_restarts_total",
        "counter",
        "Process restarts of the bot.",
        lambda b: b["restarts"],
    ),
    (
        "tgfleet_bot_heartbeat_age_seconds",
        "gauge",
        "Seconds since the bot's last heartbeat.",
        lambda b: b["health"]["heartbeat_age_s"],
    ),
    (
        "tgfleet_bot_cpu_seconds_total",
        "counter",
        "CPU time of the bot's process (user + system).",
        _resource("cpu_seconds"),
    ),
    (
        "tgfleet_bot_rss_bytes",
        "gauge",
        "Resident memory of the bot's process.",
        _resource("rss_bytes"),
    ),
    (
        "tgfleet_bot_pss_bytes",
        "gauge",
        "Proportional set size of the bot's process (shared pages divided among sharers).",
        _resource("pss_bytes"),
    ),
    (
        "tgfleet_bot_data_bytes",
        "gauge",
        "Private writable memory of the bot's process (what RLIMIT_DATA caps).",
        _resource("data_bytes"),
    ),
    (
        "tgfleet_bot_data_limit_bytes",
        "gauge",
        "The bot's RLIMIT_DATA (its memory_limit_mb).",
        _resource("data_limit_bytes"),
    ),
    (
        "tgfleet_bot_open_fds",
        "gauge",
        "Open file descriptors of the bot's process.",
        _resource("open_files"),
    ),
    (
        "tgfleet_bot_open_fds_limit",
        "gauge",
        "The bot's RLIMIT_NOFILE (its limits.open_files).",
        _resource("open_files_limit"),
    ),
    ("tgfleet_bot_threads", "gauge", "Threads of the bot's process.", _resource("threads")),
    (
        "tgfleet_bot_messages_received_total",
        "counter",
        "Telegram messages the bot's process received (not its own).",
        _messages("received"),
    ),
    (
        "tgfleet_bot_messages_sent_total",
        "counter",
        "Telegram messages the bot's process sent.",
        _messages("sent"),
    ),
    (
        "tgfleet_bot_handled_total",
        "counter",
        "Plugin handler runs that ended well.",
        _messages("handled"),
    ),
    (
        "tgfleet_bot_handler_errors_total",
        "counter",
        "Plugin handler runs that raised.",
        _messages("handler_errors"),
    ),
]


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
    usage: Usage | None = None,
    *,
    local: bool = True,
) -> dict[str, Any]:
    """A bot as the API shows it (controller/schemas.py ``BotView``): ``alive`` is its
    process if that still exists, ``live`` what was last heard of it either way,
    ``usage`` its process as last sampled from /proc; ``local``: this controller holds
    it (else its live fields are not known here)."""
    pid: int | None = None
    uptime: float | None = None
    rss: float | None = None
    telegram = dict(NO_TELEGRAM)
    messages: dict[str, int | None] | None = None
    if alive is not None:
        pid = alive.pid
        uptime = procinfo.age_s(pid)
        rss = alive.rss_mb
        telegram = {**telegram, **alive.telegram}
        messages = alive.messages
    resources = usage.to_json() if usage is not None and usage.pid == pid else None
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
        "resources": resources,
        "messages": messages,
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
