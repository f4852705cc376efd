"""Renderings of the fleet for people and scrapers (Prometheus text)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from controller.states import BotState


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
