"""Step 1: the real Telethon client logs a bot in, gets itself, sends and receives messages."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from harness import free_port, wait_for_async
from telethon import TelegramClient, errors, events, functions
from telethon.network import ConnectionTcpAbridged, ConnectionTcpFull, ConnectionTcpIntermediate
from telethon.sessions import StringSession

from tgsandbox.admin_client import AdminClient
from tgsandbox.service import Sandbox

from .conftest import ClientFactory, make_client, start_sandbox


@pytest.mark.parametrize(
    "connection", [ConnectionTcpFull, ConnectionTcpIntermediate, ConnectionTcpAbridged]
)
async def test_bot_logs_in_and_gets_itself_over_each_transport(
    admin: AdminClient, bot_client: ClientFactory, connection: type
) -> None:
    bot = await admin.create_bot("shop")
    client = await bot_client(bot.token, connection=connection)
    me = await client.get_me()
    assert (me.id, me.username, me.bot) == (bot.id, "shop_bot", True)
    assert bot.token.startswith(f"{bot.id}:")


async def test_users_message_reaches_handler_and_reply_reaches_user(
    admin: AdminClient, bot_client: ClientFactory
) -> None:
    bot = await admin.create_bot("echo")
    client = await bot_client(bot.token)
    seen: list[tuple[int, str]] = []

    @client.on(events.NewMessage(incoming=True))
    async def answer(event: events.NewMessage.Event) -> None:
        seen.append((event.sender_id, event.raw_text))
        await event.respond(f"echo: {event.raw_text}")

    sent = await admin.send_as_user("alice", "echo_bot", "hello there")
    reply = await admin.wait_for_reply("alice", "echo_bot", after_id=sent.id, timeout_s=10)
    assert reply.text == "echo: hello there"
    assert reply.out is False and reply.peer == "echo_bot"
    assert len(seen) == 1 and seen[0][1] == "hello there"


async def test_bot_edits_and_deletes_its_message(
    admin: AdminClient, bot_client: ClientFactory
) -> None:
    bot = await admin.create_bot("editor")
    client = await bot_client(bot.token)
    got = asyncio.get_running_loop().create_future()

    @client.on(events.NewMessage(incoming=True))
    async def remember(event: events.NewMessage.Event) -> None:
        if not got.done():
            got.set_result(event.sender_id)

    await admin.send_as_user("bob", "editor_bot", "hi")
    user_id = await asyncio.wait_for(got, 10)
    message = await client.send_message(user_id, "first")
    await client.edit_message(user_id, message.id, "second")
    box = await admin.messages("bob", peer="editor_bot", direction="in")
    assert [m.text for m in box] == ["second"] and box[0].edit_date is not None
    await client.delete_messages(user_id, [message.id], revoke=True)
    assert await admin.messages("bob", peer="editor_bot", direction="in") == []


async def test_wrong_bot_token_is_access_token_invalid(
    tg: Sandbox, clients: list[TelegramClient]
) -> None:
    client = make_client(tg.port)
    clients.append(client)
    with pytest.raises(errors.AccessTokenInvalidError):
        await asyncio.wait_for(client.start(bot_token="1000001:not-the-secret"), 20)


async def test_unknown_method_answers_rpc_error_and_keeps_the_connection(
    admin: AdminClient, bot_client: ClientFactory
) -> None:
    bot = await admin.create_bot("plain")
    client = await bot_client(bot.token)
    with pytest.raises(errors.MethodInvalidError) as caught:
        await client(functions.messages.GetAllStickersRequest(hash=0))
    assert caught.value.code == 400
    assert (await client.get_me()).id == bot.id


async def test_token_and_auth_key_survive_a_restart(tmp_path: Path) -> None:
    data = tmp_path / "data"
    first = await start_sandbox(data)
    try:
        async with AdminClient(first.admin_url) as admin:
            bot = await admin.create_bot("durable")
        client = make_client(first.port, StringSession())
        await asyncio.wait_for(client.start(bot_token=bot.token), 20)  # type: ignore[arg-type]
        saved = client.session.save()
        await client.disconnect()
    finally:
        await first.stop()
    public_pem = (data / "public.pem").read_bytes()
    second = await start_sandbox(data)
    try:
        assert (data / "public.pem").read_bytes() == public_pem
        client = make_client(second.port, StringSession(saved))
        try:
            await asyncio.wait_for(client.connect(), 20)
            assert await client.is_user_authorized()
            assert (await client.get_me()).username == "durable_bot"
        finally:
            await client.disconnect()
    finally:
        await second.stop()


async def test_serve_and_cli_as_a_newcomer_uses_them(
    tmp_path: Path, clients: list[TelegramClient]
) -> None:
    port, admin_port = free_port(), free_port()
    data = tmp_path / "served"
    env = {**os.environ, "TGFLEET_SANDBOX_ADMIN": f"127.0.0.1:{admin_port}"}
    env.pop("TGFLEET_SANDBOX_LISTEN", None)
    serve = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tgsandbox",
        "serve",
        "--listen",
        f"127.0.0.1:{port}",
        "--admin-listen",
        f"127.0.0.1:{admin_port}",
        "--data",
        str(data),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        async with AdminClient(f"127.0.0.1:{admin_port}") as admin:

            async def healthy() -> bool:
                try:
                    return (await admin.health())["status"] == "ok"
                except Exception:
                    return False

            await wait_for_async("the served sandbox", healthy, timeout=20, ignoring=())
        created = await _cli(env, "bot", "create", "demo")
        assert created.returncode == 0, created.stderr
        token = created.stdout.strip()
        assert token.count(":") == 1

        import telethon.crypto.rsa

        telethon.crypto.rsa.add_key((data / "public.pem").read_text(), old=False)
        client = make_client(port)
        clients.append(client)

        @client.on(events.NewMessage(incoming=True))
        async def answer(event: events.NewMessage.Event) -> None:
            await event.respond(event.raw_text.upper())

        await asyncio.wait_for(client.start(bot_token=token), 20)  # type: ignore[arg-type]
        sent = await _cli(env, "send", "demo_bot", "hello", "--user", "newcomer", "--wait", "10")
        assert (sent.returncode, sent.stdout.strip()) == (0, "HELLO"), sent.stderr
        listed = await _cli(env, "bot", "list", "--json")
        assert '"username": "demo_bot"' in listed.stdout
        bad = await _cli(env, "fault", "demo", "delay")
        assert bad.returncode != 0 and "ms" in bad.stderr and bad.stderr.count("\n") == 1
    finally:
        serve.send_signal(signal.SIGTERM)
        out, err = await asyncio.wait_for(serve.communicate(), 15)
    assert serve.returncode == 0, err.decode()
    assert b"BEGIN RSA PUBLIC KEY" in out
    assert b"closed" in err


async def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tgsandbox",
        *args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return subprocess.CompletedProcess(args, proc.returncode, out.decode(), err.decode())
