"""A test plugin that uses resources on command, so that tests watch the fleet see it.

Private messages it obeys (it answers each once done):

- ``/fds N``: open or close files (``/dev/null``) until the process has N open file
  descriptors, as ``/proc/self/fd`` counts them (what the controller reads).
- ``/grow MB``: allocate MB megabytes more, every page touched, and keep them.
- ``/log KB``: log about KB kilobytes, in lines of ~200 bytes (stderr: the bot's log).
- ``/say TEXT``: log one line holding TEXT.

Anything else is echoed back.
"""

from __future__ import annotations

import os
from typing import Any

from telethon import TelegramClient, events

_held_fds: list[int] = []
_held_memory: list[bytearray] = []


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd")) - 1  # listdir's own fd is closed again


def set_fds(target: int) -> int:
    while open_fds() < target:
        _held_fds.append(os.open("/dev/null", os.O_RDONLY))
    while open_fds() > target and _held_fds:
        os.close(_held_fds.pop())
    return open_fds()


def setup(client: TelegramClient, ctx: Any) -> None:
    async def obey(event: Any) -> None:
        text = (event.raw_text or "").strip()
        command, _, argument = text.partition(" ")
        if command == "/fds" and argument.isdigit():
            await event.respond(f"open fds: {set_fds(int(argument))}")
        elif command == "/grow" and argument.isdigit():
            chunk = bytearray(int(argument) * 2**20)
            chunk[::4096] = b"x" * len(chunk[::4096])  # touch every page
            _held_memory.append(chunk)
            await event.respond(f"holding {sum(len(c) for c in _held_memory) // 2**20} MB")
        elif command == "/log" and argument.isdigit():
            line = "x" * 180
            for index in range(int(argument) * 1024 // 200):
                ctx.log.info("filler %d %s", index, line)
            await event.respond("logged")
        elif command == "/say":
            ctx.log.info("said: %s", argument)
            await event.respond("said")
        elif text:
            await event.respond(text)

    client.add_event_handler(obey, events.NewMessage(incoming=True, func=lambda e: e.is_private))
