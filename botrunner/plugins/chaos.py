"""Chaos: a plugin for fire drills. It makes its own bot fail on request, so an
operator (or a test) can watch tgfleet detect the failure and recover.

Plugin reference: ``botrunner.plugins.chaos:setup``. Private messages it obeys:

- ``/spin SECONDS``: answer, then keep the CPU busy inside the handler, blocking the
  event loop (no heartbeats, no updates) — a hung bot.
- ``/grow MB``: answer, then allocate MB megabytes and keep them — a leak.
- ``/crash [CODE]``: answer, then exit at once with CODE (default 3) — a crash.

Setting ``exit_at_start`` (an integer): exit with that code while starting, before
connecting — a bot that crash-loops at start. Anything else is echoed back.

Commands sent before the process started are not obeyed (a restarted bot catches up
on missed messages, and must not repeat the drill that brought it down).
Never load it into a bot you care about.
"""

from __future__ import annotations

import os
import time
from typing import Any

from telethon import TelegramClient, events

MAX_SPIN_S = 600
MAX_GROW_MB = 4096
_hoard: list[bytearray] = []  # what /grow keeps alive


def _number(text: str, default: int, high: int) -> int | None:
    parts = text.split()
    if len(parts) == 1:
        return default
    if len(parts) == 2 and parts[1].isdigit() and 0 <= int(parts[1]) <= high:
        return int(parts[1])
    return None


def setup(client: TelegramClient, ctx: Any) -> None:
    code = ctx.settings.get("exit_at_start")
    if isinstance(code, int) and not isinstance(code, bool):
        ctx.log.warning("chaos: exiting with %d at start, as configured", code)
        os._exit(code)

    started = time.time()

    async def obey(event: Any) -> None:
        text = (event.raw_text or "").strip()
        command = text.split(maxsplit=1)[0] if text else ""
        if command.startswith("/") and event.message.date.timestamp() < started - 1:
            await event.respond(f"not obeying {command}: it was sent before this process started")
            return
        if command == "/spin":
            seconds = _number(text, 30, MAX_SPIN_S)
            if seconds is None:
                await event.respond(f"usage: /spin SECONDS (0 to {MAX_SPIN_S})")
                return
            await event.respond(f"spinning for {seconds} s")
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:  # blocks the event loop on purpose
                pass
        elif command == "/grow":
            megabytes = _number(text, 100, MAX_GROW_MB)
            if megabytes is None:
                await event.respond(f"usage: /grow MB (0 to {MAX_GROW_MB})")
                return
            chunk = bytearray(megabytes * 2**20)
            chunk[::4096] = b"x" * len(chunk[::4096])  # touch every page: real RSS
            _hoard.append(chunk)
            await event.respond(f"holding {sum(len(c) for c in _hoard) // 2**20} MB")
        elif command == "/crash":
            exit_code = _number(text, 3, 255)
            await event.respond(f"exiting with {exit_code}")
            os._exit(3 if exit_code is None else exit_code)
        elif text:
            await event.respond(text)

    client.add_event_handler(obey, events.NewMessage(incoming=True, func=lambda e: e.is_private))
