"""Echo: answer every incoming private text message with its own text.

Plugin reference: ``botrunner.plugins.echo:setup``. Settings (both optional):

- ``prefix`` (str, default ``""``): put before the reply, as is.
- ``greeting`` (str): when set, the reply is ``f"{greeting} {text}"``.

The reply is ``prefix + (greeting + " " if greeting else "") + text``; for
example ``{"prefix": "echo: "}`` answers "hi" with "echo: hi", and
``{"greeting": "Hello!"}`` answers it with "Hello! hi". Messages without text
(media only) are not answered.
"""

from __future__ import annotations

from typing import Any

from telethon import TelegramClient, events


def reply_text(settings: dict[str, Any], text: str) -> str:
    """The answer to ``text`` under ``settings`` (see the module docstring)."""
    prefix = settings.get("prefix") or ""
    greeting = settings.get("greeting") or ""
    return f"{prefix}{greeting} {text}" if greeting else f"{prefix}{text}"


def setup(client: TelegramClient, ctx: Any) -> None:
    """Register the echo handler on ``client``."""
    settings = dict(ctx.settings)

    async def echo(event: Any) -> None:
        text = event.raw_text
        if not text:
            return
        await event.respond(reply_text(settings, text))

    client.add_event_handler(echo, events.NewMessage(incoming=True, func=lambda e: e.is_private))
