"""Relay: bots that talk to each other over tgfleet's bus.

Plugin reference: ``botrunner.plugins.relay:setup``. Settings (all optional):

- ``topic`` (str): publish the text of every private message the bot receives
  on this bus topic, as ``{"text": ..., "from": <bot name>}``; the bot answers
  the sender "relayed to <topic>".
- ``listen`` (list of str): bus topics to act on. Each event received on one of
  them is answered by publishing ``{"ack": <the event's data>, "by": <bot name>,
  "source": <publisher>}`` on ``ack_topic`` (default ``"acks"``).

A bot receives only the topics in its spec's ``subscribe`` list, so ``listen``
must be a subset of it. Events are persisted by the controller and visible in
``GET /api/v1/events`` (server-sent events) and each bot's event history.
"""

from __future__ import annotations

from typing import Any

from telethon import TelegramClient, events


def setup(client: TelegramClient, ctx: Any) -> None:
    topic = ctx.settings.get("topic")
    ack_topic = str(ctx.settings.get("ack_topic") or "acks")

    if isinstance(topic, str) and topic:

        async def relay(event: Any) -> None:
            text = event.raw_text or ""
            if not text:
                return
            sent = await ctx.publish(topic, {"text": text, "from": ctx.name})
            await event.respond(f"relayed to {topic}" if sent else "the bus is down; not relayed")

        client.add_event_handler(
            relay, events.NewMessage(incoming=True, func=lambda e: e.is_private)
        )

    async def acknowledge(bus_event: Any) -> None:
        await ctx.publish(
            ack_topic, {"ack": bus_event.data, "by": ctx.name, "source": bus_event.source}
        )

    for listened in ctx.settings.get("listen") or []:
        ctx.on_event(str(listened))(acknowledge)
