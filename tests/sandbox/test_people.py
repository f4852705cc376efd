"""Step 4: a person logs in by test phone number and code, and talks with a bot."""

from __future__ import annotations

import asyncio

import pytest
from telethon import TelegramClient, errors, events, functions, types

from tgsandbox.admin_client import AdminClient
from tgsandbox.service import Sandbox

from .conftest import ClientFactory, make_client

PHONE = "9996621234"  # DC 2, so the code is 22222


async def person(tg: Sandbox, clients: list[TelegramClient], phone: str = PHONE) -> TelegramClient:
    client = make_client(tg.port)
    clients.append(client)
    await asyncio.wait_for(
        client.start(phone=phone, code_callback=lambda: phone[5] * 5),  # type: ignore[arg-type]
        20,
    )
    return client


async def test_person_logs_in_by_phone_and_talks_with_a_bot(
    tg: Sandbox, admin: AdminClient, bot_client: ClientFactory, clients: list[TelegramClient]
) -> None:
    bot = await admin.create_bot("helper")
    bot_side = await bot_client(bot.token)

    @bot_side.on(events.NewMessage(incoming=True))
    async def answer(event: events.NewMessage.Event) -> None:
        await event.reply(f"you said {event.raw_text}")

    user = await person(tg, clients)
    me = await user.get_me()
    assert (me.phone, me.bot) == (PHONE, False)
    replies: asyncio.Queue[events.NewMessage.Event] = asyncio.Queue()

    @user.on(events.NewMessage(incoming=True))
    async def got(event: events.NewMessage.Event) -> None:
        replies.put_nowait(event)

    sent = await user.send_message("helper_bot", "good morning")
    reply = await asyncio.wait_for(replies.get(), 10)
    assert reply.raw_text == "you said good morning"
    assert reply.sender_id == bot.id and reply.reply_to_msg_id == sent.id
    history = await user.get_messages("helper_bot", limit=10)
    assert [m.message for m in history] == ["you said good morning", "good morning"]


async def test_wrong_code_and_bad_phone_are_telegram_errors(
    tg: Sandbox, clients: list[TelegramClient]
) -> None:
    client = make_client(tg.port)
    clients.append(client)
    await asyncio.wait_for(client.connect(), 20)
    with pytest.raises(errors.PhoneNumberInvalidError):
        await client.send_code_request("+15551234567")
    await client.send_code_request(PHONE)
    with pytest.raises(errors.PhoneCodeInvalidError):
        await client.sign_in(PHONE, code="12345")
    assert not await client.is_user_authorized()


async def test_banned_user_is_deactivated(
    tg: Sandbox, admin: AdminClient, clients: list[TelegramClient]
) -> None:
    user = await person(tg, clients, "9996625555")
    await admin.set_fault(f"user:{'9996625555'}", "revoke")
    with pytest.raises(errors.UserDeactivatedError):
        await user(functions.users.GetUsersRequest([types.InputUserSelf()]))
    await admin.clear_fault("user:9996625555")
    assert (await user.get_me()).phone == "9996625555"
