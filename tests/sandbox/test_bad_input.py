"""Step 5: bad input closes or answers only that connection, logs one line, harms no one else."""

from __future__ import annotations

import asyncio
import logging
import os
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from telethon import TelegramClient, errors
from telethon.tl.tlobject import TLRequest

from tgsandbox.admin_client import AdminClient
from tgsandbox.service import Sandbox

from .conftest import ClientFactory, make_client, start_sandbox

INTERMEDIATE = b"\xee\xee\xee\xee"


@pytest.fixture
async def strict_tg(tmp_path: Path) -> AsyncIterator[Sandbox]:
    """A sandbox with short limits, so that each bad input shows quickly."""
    sandbox = await start_sandbox(
        tmp_path / "strict", max_frame_bytes=64 * 1024, first_packet_timeout_s=0.3
    )
    try:
        yield sandbox
    finally:
        await sandbox.stop()


async def exchange(port: int, data: bytes) -> bytes:
    """Send raw bytes, return everything the sandbox sends until it closes (or 5 s pass)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(-1), 5)
    finally:
        writer.close()
        await writer.wait_closed()


def intermediate(payload: bytes) -> bytes:
    return struct.pack("<i", len(payload)) + payload


TRANSPORT_404 = intermediate(struct.pack("<i", -404))


async def test_each_bad_input_closes_only_its_connection(
    strict_tg: Sandbox, clients: list[TelegramClient], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tgfleet.sandbox")
    async with AdminClient(strict_tg.admin_url) as admin:
        bot = await admin.create_bot("bystander")
    bystander = make_client(strict_tg.port)
    clients.append(bystander)
    await asyncio.wait_for(bystander.start(bot_token=bot.token), 20)  # type: ignore[arg-type]
    known_key_id = struct.unpack("<Q", _key_id_bytes(bystander))[0]

    cases: list[tuple[str, bytes, bytes, str]] = [
        (
            "wrong auth key id",
            INTERMEDIATE + intermediate(os.urandom(8) + os.urandom(64)),
            TRANSPORT_404,
            "unknown auth key id",
        ),
        (
            "bad msg_key",
            INTERMEDIATE + intermediate(struct.pack("<Q", known_key_id) + os.urandom(64)),
            TRANSPORT_404,
            "undecryptable message",
        ),
        (
            "malformed plain message",
            INTERMEDIATE + intermediate(b"\0" * 8 + struct.pack("<qi", 1, 4) + b"\xff" * 4),
            TRANSPORT_404,
            "malformed plain message",
        ),
        ("frame over the limit", INTERMEDIATE + struct.pack("<i", 1 << 24), b"", "over the limit"),
        (
            "full transport with a bad CRC",
            struct.pack("<ii", 24, 0) + b"\0" * 12 + b"\xde\xad\xbe\xef",
            b"",
            "CRC32",
        ),
        ("unknown transport", os.urandom(1) + b"\xff\xff\xff" + os.urandom(60), b"", "transport"),
        ("silent client", b"", b"", "sent nothing"),
    ]
    for name, data, expected, logged in cases:
        caplog.clear()
        answer = await exchange(strict_tg.port, data)
        assert answer == expected, name
        closes = [r.getMessage() for r in caplog.records if ": closed: " in r.getMessage()]
        assert len(closes) == 1 and logged in closes[0], (name, closes)

    assert (await bystander.get_me()).id == bot.id
    async with AdminClient(strict_tg.admin_url) as admin:
        assert (await admin.health())["status"] == "ok"


def _key_id_bytes(client: TelegramClient) -> bytes:
    return struct.pack("<Q", client.session.auth_key.key_id)


class _UnknownRequest(TLRequest):  # type: ignore[misc]
    CONSTRUCTOR_ID = 0x0BADF00D
    SUBCLASS_OF_ID = 0x0BADF00D

    def _bytes(self) -> bytes:
        return struct.pack("<I", self.CONSTRUCTOR_ID)


class _TruncatedSendMessage(TLRequest):  # type: ignore[misc]
    """messages.sendMessage's constructor with nothing after it."""

    CONSTRUCTOR_ID = 0x0BADF00E
    SUBCLASS_OF_ID = 0x0BADF00E

    def _bytes(self) -> bytes:
        from telethon.tl.functions.messages import SendMessageRequest

        return struct.pack("<I", SendMessageRequest.CONSTRUCTOR_ID) + b"\x01\x00\x00\x00"


async def test_unknown_constructor_and_undecodable_request_answer_rpc_errors(
    admin: AdminClient, bot_client: ClientFactory
) -> None:
    bot = await admin.create_bot("robust")
    client = await bot_client(bot.token)
    with pytest.raises(errors.InputMethodInvalidError):
        await client(_UnknownRequest())
    with pytest.raises(errors.InputFetchErrorError):
        await client(_TruncatedSendMessage())
    assert (await client.get_me()).id == bot.id
