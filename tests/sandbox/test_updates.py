"""Step 3: messages sent while a bot is away reach it (pending pushes, getDifference by pts)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from harness import wait_for_async
from telethon import TelegramClient, events

from tgsandbox.admin_client import AdminClient
from tgsandbox.service import Sandbox

from .conftest import ClientFactory, make_client


def record_texts(client: TelegramClient) -> list[str]:
    texts: list[str] = []

    @client.on(events.NewMessage(incoming=True))
    async def remember(event: events.NewMessage.Event) -> None:
        texts.append(event.raw_text)

    return texts


async def test_reconnect_after_closed_connection_delivers_missed_messages(
    tg: Sandbox, admin: AdminClient, bot_client: ClientFactory
) -> None:
    bot = await admin.create_bot("away")
    client = await bot_client(bot.token, retry_delay=1)
    texts = record_texts(client)
    await admin.send_as_user("erin", "away_bot", "before")
    await wait_for_async("the first message", lambda: texts == ["before"], timeout=10, ignoring=())

    # Keep the bot out while the user writes, then let it back in.
    await admin.set_fault("away", "refuse")
    await admin.set_fault("away", "close")
    await wait_for_async(
        "the bot's connection to close",
        lambda: not any(c.account_id == bot.id and c.admitted for c in tg.server.connections),
        timeout=10,
        ignoring=(),
    )
    for text in ("one", "two", "three"):
        await admin.send_as_user("erin", "away_bot", text)
    await admin.clear_fault("away")
    await wait_for_async(
        "missed messages",
        lambda: texts == ["before", "one", "two", "three"],
        timeout=20,
        ignoring=(),
    )


async def test_restarted_bot_catches_up_from_its_session_file(
    tg: Sandbox, admin: AdminClient, tmp_path: Path, clients: list[TelegramClient]
) -> None:
    bot = await admin.create_bot("sleeper")
    session = str(tmp_path / "sleeper.session")
    first = make_client(tg.port, session, catch_up=True)
    clients.append(first)
    texts = record_texts(first)
    await asyncio.wait_for(first.start(bot_token=bot.token), 20)  # type: ignore[arg-type]
    await admin.send_as_user("frank", "sleeper_bot", "while up")
    await wait_for_async(
        "the first message", lambda: texts == ["while up"], timeout=10, ignoring=()
    )
    await first.disconnect()
    clients.remove(first)  # one SQLite session file, one live client at a time

    for text in ("while down 1", "while down 2"):
        await admin.send_as_user("frank", "sleeper_bot", text)

    second = make_client(tg.port, session, catch_up=True)
    clients.append(second)
    missed = record_texts(second)
    await asyncio.wait_for(second.start(bot_token=bot.token), 20)  # type: ignore[arg-type]
    await wait_for_async(
        "caught-up messages",
        lambda: missed == ["while down 1", "while down 2"],
        timeout=20,
        ignoring=(),
    )


async def test_a_bot_that_never_received_anything_still_catches_up(
    tg: Sandbox, admin: AdminClient, tmp_path: Path, clients: list[TelegramClient]
) -> None:
    """A new account's pts is not 0, which Telethon would read as "no saved state"."""
    bot = await admin.create_bot("newcomer")
    session = str(tmp_path / "newcomer.session")
    first = make_client(tg.port, session, catch_up=True)
    clients.append(first)
    await asyncio.wait_for(first.start(bot_token=bot.token), 20)  # type: ignore[arg-type]
    await first.disconnect()
    clients.remove(first)

    await admin.send_as_user("hana", "newcomer_bot", "sent while down")

    second = make_client(tg.port, session, catch_up=True)
    clients.append(second)
    missed = record_texts(second)
    await asyncio.wait_for(second.start(bot_token=bot.token), 20)  # type: ignore[arg-type]
    await wait_for_async(
        "the missed message", lambda: missed == ["sent while down"], timeout=20, ignoring=()
    )


async def test_get_difference_returns_exactly_what_follows_a_pts(
    admin: AdminClient, bot_client: ClientFactory
) -> None:
    from telethon import functions, types

    bot = await admin.create_bot("diff")
    client = await bot_client(bot.token)
    state = await client(functions.updates.GetStateRequest())
    for text in ("a", "b", "c"):
        await admin.send_as_user("gina", "diff_bot", text)
    diff = await client(
        functions.updates.GetDifferenceRequest(pts=state.pts + 1, date=state.date, qts=0)
    )
    assert isinstance(diff, types.updates.Difference)
    assert [m.message for m in diff.new_messages] == ["b", "c"]
    assert diff.state.pts == state.pts + 3
    assert any(not u.bot and u.id != bot.id for u in diff.users)
    empty = await client(
        functions.updates.GetDifferenceRequest(pts=diff.state.pts, date=state.date, qts=0)
    )
    assert isinstance(empty, types.updates.DifferenceEmpty)
