"""Step 2: every fault acts on the real connection and Telethon shows what it shows on Telegram."""

from __future__ import annotations

import asyncio
import time

import pytest
from harness import wait_for_async
from telethon import TelegramClient, errors, events, functions, types
from telethon.sessions import StringSession
from typer.testing import CliRunner

from tgsandbox import cli
from tgsandbox.admin_client import AdminClient, AdminError
from tgsandbox.service import Sandbox

from .conftest import ClientFactory, make_client


def bot_connections(tg: Sandbox, bot_id: int) -> int:
    return sum(1 for c in tg.server.connections if c.account_id == bot_id)


async def get_self(client: TelegramClient) -> types.User:
    """users.getUsers([self]) — unlike get_me() it raises instead of returning None."""
    users = await client(functions.users.GetUsersRequest([types.InputUserSelf()]))
    return users[0]


async def saved_session(tg: Sandbox, token: str) -> str:
    client = make_client(tg.port, StringSession())
    await asyncio.wait_for(client.start(bot_token=token), 20)  # type: ignore[arg-type]
    saved: str = client.session.save()
    await client.disconnect()
    return saved


async def test_refuse_closes_new_connections_of_that_bot_only(
    tg: Sandbox, admin: AdminClient, bot_client: ClientFactory, clients: list[TelegramClient]
) -> None:
    victim = await admin.create_bot("victim")
    other = await admin.create_bot("other")
    live = await bot_client(victim.token)
    session = await saved_session(tg, victim.token)
    await admin.set_fault("victim", "refuse")

    # Which bot connects is known only from its first message: that closes the
    # connection, and Telethon keeps reconnecting without ever completing connect().
    refused = make_client(tg.port, StringSession(session), retry_delay=1)
    clients.append(refused)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(refused.connect(), 2)
    # The live connection and other bots are untouched.
    assert (await get_self(live)).id == victim.id
    assert (await (await bot_client(other.token)).get_me()).id == other.id

    # A fresh login of the refused bot is closed too.
    fresh = make_client(tg.port, retry_delay=1)
    clients.append(fresh)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(fresh.start(bot_token=victim.token), 3)  # type: ignore[arg-type]

    await admin.clear_fault("victim")
    again = make_client(tg.port, StringSession(session))
    clients.append(again)
    await asyncio.wait_for(again.connect(), 20)
    assert (await get_self(again)).id == victim.id


async def test_refuse_all_refuses_even_the_handshake(
    tg: Sandbox, admin: AdminClient, clients: list[TelegramClient]
) -> None:
    await admin.set_fault("all", "refuse")
    client = make_client(tg.port)
    clients.append(client)
    with pytest.raises(ConnectionError):
        await asyncio.wait_for(client.connect(), 20)
    await admin.set_fault("all", "clear")
    await asyncio.wait_for(client.connect(), 20)
    assert client.is_connected()


async def test_close_drops_live_connections_and_telethon_reconnects(
    tg: Sandbox, admin: AdminClient, bot_client: ClientFactory
) -> None:
    bot = await admin.create_bot("phoenix")
    client = await bot_client(bot.token)
    before = {id(c) for c in tg.server.connections if c.account_id == bot.id}
    result = await admin.set_fault("phoenix", "close")
    assert result["connections"] == 1

    def reconnected() -> bool:
        now = {id(c) for c in tg.server.connections if c.account_id == bot.id}
        return bool(now) and not now & before

    await wait_for_async("Telethon's automatic reconnect", reconnected, timeout=10, ignoring=())

    @client.on(events.NewMessage(incoming=True))
    async def answer(event: events.NewMessage.Event) -> None:
        await event.respond("back")

    sent = await admin.send_as_user("carol", "phoenix_bot", "are you there?")
    reply = await admin.wait_for_reply("carol", "phoenix_bot", after_id=sent.id, timeout_s=10)
    assert reply.text == "back"


async def test_blackhole_keeps_the_socket_and_answers_nothing(
    tg: Sandbox, admin: AdminClient, bot_client: ClientFactory
) -> None:
    bot = await admin.create_bot("void")
    client = await bot_client(bot.token)
    await admin.set_fault("void", "blackhole")
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(get_self(client), 1.5)
    assert client.is_connected() and bot_connections(tg, bot.id) == 1

    await admin.clear_fault("void")
    assert (await asyncio.wait_for(get_self(client), 10)).id == bot.id


async def test_live_blackhole_silences_open_connections_and_serves_new_ones(
    tg: Sandbox, admin: AdminClient, bot_client: ClientFactory
) -> None:
    bot = await admin.create_bot("ghost")
    client = await bot_client(bot.token)
    result = await admin.set_fault("ghost", "blackhole", scope="live")
    assert (result["kind"], result["scope"], result["connections"]) == ("blackhole", "live", 1)
    assert await admin.faults() == []  # applied to the open connections, nothing standing

    # The TCP connection died silently: the in-flight request never gets an answer.
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(get_self(client), 1.5)
    assert client.is_connected() and bot_connections(tg, bot.id) == 1

    # A fresh login with the same token works at once, and gets its updates pushed.
    fresh = await bot_client(bot.token)
    assert (await asyncio.wait_for(get_self(fresh), 5)).id == bot.id
    sender = await first_sender(fresh)
    await admin.send_as_user("erin", "ghost_bot", "anyone?")
    await asyncio.wait_for(sender, 10)
    # ... while the silenced connection stays silent.
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(get_self(client), 1.0)

    # The same client on a new connection (same auth key) is served again.
    await asyncio.wait_for(client.disconnect(), 5)
    await asyncio.wait_for(client.connect(), 5)
    assert (await asyncio.wait_for(get_self(client), 5)).id == bot.id


async def test_clear_lifts_a_live_blackhole_on_the_same_connection(
    tg: Sandbox, admin: AdminClient, bot_client: ClientFactory
) -> None:
    one, two = await admin.create_bot("mute1"), await admin.create_bot("mute2")
    first, second = await bot_client(one.token), await bot_client(two.token)
    result = await admin.set_fault("all", "blackhole", scope="live")
    assert result["connections"] == len(tg.server.connections) >= 2
    for client in (first, second):
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(get_self(client), 1.0)

    # Clearing one bot leaves the live blackhole set on "all" in place; clearing "all" lifts it.
    await admin.clear_fault("mute1")
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(get_self(first), 1.0)
    await admin.set_fault("all", "clear")
    assert (await asyncio.wait_for(get_self(first), 10)).id == one.id
    assert (await asyncio.wait_for(get_self(second), 10)).id == two.id


async def test_cli_fault_live_blackholes_the_open_connections(
    tg: Sandbox, admin: AdminClient, bot_client: ClientFactory
) -> None:
    bot = await admin.create_bot("cli-ghost")
    client = await bot_client(bot.token)
    args = ["fault", "cli-ghost", "blackhole", "--live", "--admin", tg.admin_url]
    outcome = await asyncio.to_thread(CliRunner().invoke, cli.app, args)
    assert outcome.exit_code == 0, outcome.output
    assert "blackhole (live) on cli-ghost (1 live connection(s))" in outcome.output
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(get_self(client), 1.0)
    assert await admin.faults() == []

    # --live is for blackhole only: refused, and nothing set.
    args = ["fault", "cli-ghost", "refuse", "--live", "--admin", tg.admin_url]
    outcome = await asyncio.to_thread(CliRunner().invoke, cli.app, args)
    assert outcome.exit_code == 1
    assert await admin.faults() == []


async def test_delay_holds_every_answer(admin: AdminClient, bot_client: ClientFactory) -> None:
    bot = await admin.create_bot("slow")
    client = await bot_client(bot.token)
    await admin.set_fault("slow", "delay", ms=400)
    started = time.monotonic()
    await get_self(client)
    assert time.monotonic() - started >= 0.4

    await admin.clear_fault("slow")
    started = time.monotonic()
    await get_self(client)
    assert time.monotonic() - started < 0.4


async def first_sender(client: TelegramClient) -> asyncio.Future[int]:
    """A future of the id of the next user who writes to the bot."""
    got: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    @client.on(events.NewMessage(incoming=True))
    async def remember(event: events.NewMessage.Event) -> None:
        if not got.done():
            got.set_result(event.sender_id)

    return got


async def test_flood_makes_send_message_raise_flood_wait_with_the_seconds(
    admin: AdminClient, bot_client: ClientFactory
) -> None:
    await admin.create_bot("chatty")
    client = await bot_client((await admin.get_bot("chatty")).token)
    sender = await first_sender(client)
    await admin.send_as_user("dave", "chatty_bot", "hi")
    dave = await asyncio.wait_for(sender, 10)
    await admin.set_fault("chatty", "flood", seconds=42)
    with pytest.raises(errors.FloodWaitError) as caught:
        await client.send_message(dave, "too fast")
    assert caught.value.seconds == 42

    # Telethon itself now holds sendMessage back for 42 s, as against Telegram;
    # once cleared, the sandbox accepts it again (seen through a second login).
    await admin.clear_fault("chatty")
    second = await bot_client((await admin.get_bot("chatty")).token)
    await second.send_message(await second.get_input_entity(dave), "ok now")
    replies = await admin.messages("dave", peer="chatty_bot", direction="in")
    assert [m.text for m in replies] == ["ok now"]


async def test_revoke_unregisters_the_key_and_expires_the_token(
    tg: Sandbox, admin: AdminClient, bot_client: ClientFactory, clients: list[TelegramClient]
) -> None:
    bot = await admin.create_bot("banned")
    client = await bot_client(bot.token)
    await admin.set_fault("banned", "revoke")
    with pytest.raises(errors.AuthKeyUnregisteredError):
        await get_self(client)
    fresh = make_client(tg.port)
    clients.append(fresh)
    with pytest.raises(errors.AccessTokenExpiredError):
        await asyncio.wait_for(fresh.start(bot_token=bot.token), 20)  # type: ignore[arg-type]

    await admin.clear_fault("banned")
    assert (await get_self(client)).id == bot.id


async def test_fault_requests_are_validated_and_change_nothing(
    admin: AdminClient,
) -> None:
    await admin.create_bot("target")
    cases = [
        ({"target": "target", "kind": "explode"}, "kind"),
        ({"target": "target", "kind": "delay"}, "ms"),
        ({"target": "target", "kind": "delay", "ms": -5}, "ms"),
        ({"target": "target", "kind": "flood", "seconds": "ten"}, "seconds"),
        ({"target": "target", "kind": "refuse", "ms": 10}, "ms"),
        ({"target": "nobody", "kind": "refuse"}, "target"),
        ({"kind": "refuse"}, "target"),
        ({"target": "target", "kind": "blackhole", "scope": "dead"}, "scope"),
        ({"target": "target", "kind": "blackhole", "scope": ["live"]}, "scope"),
        ({"target": "target", "kind": "blackhole", "scope": ""}, "scope"),
        ({"target": "target", "kind": "refuse", "scope": "live"}, "scope"),
        ({"target": "target", "kind": "delay", "ms": 10, "scope": "all"}, "scope"),
        ({"target": "target", "kind": "clear", "scope": "live"}, "scope"),
        ({"target": "nobody", "kind": "blackhole", "scope": "live"}, "target"),
    ]
    for body, field in cases:
        with pytest.raises(AdminError) as caught:
            await admin._request("POST", "/api/v1/faults", json=body)
        assert caught.value.status == 422, body
        assert field in caught.value.errors, body
    assert await admin.faults() == []


async def test_a_rejected_live_blackhole_leaves_the_connections_alone(
    admin: AdminClient, bot_client: ClientFactory
) -> None:
    bot = await admin.create_bot("steady")
    client = await bot_client(bot.token)
    for body in (
        {"target": "steady", "kind": "blackhole", "scope": "LIVE"},
        {"target": "steady", "kind": "blackhole", "scope": "live", "ms": 5},
        {"target": "steady", "kind": "blackhole", "scope": "live", "colour": "red"},
    ):
        with pytest.raises(AdminError) as caught:
            await admin._request("POST", "/api/v1/faults", json=body)
        assert caught.value.status == 422, body
    assert (await asyncio.wait_for(get_self(client), 5)).id == bot.id
    assert await admin.faults() == []
