"""Fixtures: an in-process sandbox on free ports with a temp data dir, and Telethon clients."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import telethon.crypto.rsa
from telethon import TelegramClient
from telethon.network import ConnectionTcpFull
from telethon.sessions import MemorySession

from botrunner.telegram import use_native_factorization
from tgsandbox.admin_client import AdminClient
from tgsandbox.server import ServerConfig
from tgsandbox.service import Address, Sandbox

ClientFactory = Callable[..., Awaitable[TelegramClient]]


async def start_sandbox(data_dir: Path, **config: Any) -> Sandbox:
    sandbox = Sandbox(ServerConfig(data_dir=data_dir, port=0, **config), Address("127.0.0.1", 0))
    await sandbox.start()
    telethon.crypto.rsa.add_key(sandbox.server.key.public_pem.decode(), old=False)
    # The factorization of pq a bot's client uses (cryptg, then Telethon's own, tried
    # again when it finds no factors): Telethon's alone fails one auth key in ~50,000,
    # and whether an earlier test in this worker had set it up must not matter.
    use_native_factorization()
    return sandbox


@pytest.fixture
async def tg(tmp_path: Path) -> AsyncIterator[Sandbox]:
    """The local Telegram, in-process (named so as not to shadow the integration one)."""
    sandbox = await start_sandbox(tmp_path / "sandbox")
    try:
        yield sandbox
    finally:
        await sandbox.stop()


@pytest.fixture
async def admin(tg: Sandbox) -> AsyncIterator[AdminClient]:
    client = AdminClient(tg.admin_url)
    try:
        yield client
    finally:
        await client.close()


def make_client(
    port: int,
    session: Any = None,
    *,
    connection: Any = ConnectionTcpFull,
    **options: Any,
) -> TelegramClient:
    """A Telethon client configured the way tgfleet's bots configure it."""
    options.setdefault("flood_sleep_threshold", 0)
    options.setdefault("connection_retries", 2)
    options.setdefault("retry_delay", 0)
    options.setdefault("timeout", 5)
    client = TelegramClient(
        session if session is not None else MemorySession(),
        api_id=1,
        api_hash="sandbox",
        connection=connection,
        **options,
    )
    client.session.set_dc(2, "127.0.0.1", port)
    return client


@pytest.fixture
async def clients() -> AsyncIterator[list[TelegramClient]]:
    """Clients a test creates; each is disconnected at teardown."""
    created: list[TelegramClient] = []
    try:
        yield created
    finally:
        for client in created:
            await asyncio.wait_for(client.disconnect(), 10)  # type: ignore[func-returns-value]


@pytest.fixture
def bot_client(tg: Sandbox, clients: list[TelegramClient]) -> ClientFactory:
    async def start(token: str, **options: Any) -> TelegramClient:
        client = make_client(tg.port, **options)
        clients.append(client)
        await asyncio.wait_for(client.start(bot_token=token), 20)  # type: ignore[arg-type]
        return client

    return start
