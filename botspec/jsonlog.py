"""Logs as one JSON object a line, for the controller and every bot (stdlib only).

Each line has ``ts`` (UTC, ISO 8601 with milliseconds), ``level``, ``logger`` and
``message``; ``bot``, ``event`` (an event's kind) and ``failure`` (a failure's kind)
where they apply, given with ``extra={"bot": ..., "event": ..., "failure": ...}`` or,
for ``bot``, once for the whole process; ``exc`` holds a traceback. JSON escapes
newlines, so a traceback never splits a line. Circus writes the lines to
``<home>/logs/<watcher>.err.log`` and rotates that file.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

#: Keys a log call may add with ``extra=``, in the order they appear.
EXTRA_KEYS = ("bot", "event", "failure")


class JsonFormatter(logging.Formatter):
    """One record, one line of JSON."""

    def __init__(self, bot: str | None = None) -> None:
        super().__init__()
        self._bot = bot

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in EXTRA_KEYS:
            value = getattr(record, key, None)
            if value is None and key == "bot":
                value = self._bot
            if value is not None:
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def configure(
    bot: str | None = None, level: int = logging.INFO, stream: TextIO | None = None
) -> None:
    """Send every log record of this process to ``stream`` (stderr) as JSON lines."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter(bot))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
