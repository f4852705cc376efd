"""MTProto TCP transports: framing of packets on one connection (full, intermediate, abridged).

The transport is detected from the first bytes the client sends, as Telegram does:
``0xef`` abridged, ``0xeeeeeeee`` intermediate, ``0xdddddddd`` padded intermediate,
anything else is the full transport (whose first 4 bytes are a packet length).
"""

from __future__ import annotations

import asyncio
import enum
import struct
import zlib
from typing import Protocol

ABRIDGED_TAG = b"\xef"
INTERMEDIATE_TAG = b"\xee\xee\xee\xee"
PADDED_TAG = b"\xdd\xdd\xdd\xdd"


class FrameError(Exception):
    """The byte stream is not a valid frame of the connection's transport."""


class TransportKind(enum.StrEnum):
    FULL = "full"
    INTERMEDIATE = "intermediate"
    PADDED = "padded-intermediate"
    ABRIDGED = "abridged"


class Codec(Protocol):
    kind: TransportKind

    async def read_packet(self, reader: asyncio.StreamReader) -> bytes: ...

    def encode(self, payload: bytes) -> bytes: ...


def _check_length(length: int, max_bytes: int) -> None:
    if length > max_bytes:
        raise FrameError(f"frame of {length} bytes is over the limit of {max_bytes}")
    if length < 4 or length % 4:
        raise FrameError(f"frame length {length} is not a positive multiple of 4")


class FullCodec:
    """length | seq | payload | crc32; seq counts packets per direction from 0."""

    kind = TransportKind.FULL

    def __init__(self, max_bytes: int, first_length: bytes | None = None) -> None:
        self._max = max_bytes
        self._pending_length = first_length
        self._recv_seq = 0
        self._send_seq = 0

    async def read_packet(self, reader: asyncio.StreamReader) -> bytes:
        if self._pending_length is not None:
            head, self._pending_length = self._pending_length, None
        else:
            head = await reader.readexactly(4)
        (length,) = struct.unpack("<i", head)
        if length < 16:
            raise FrameError(f"full transport length {length} is below 16")
        _check_length(length - 12, self._max)
        rest = await reader.readexactly(length - 4)
        (seq,) = struct.unpack("<i", rest[:4])
        (crc,) = struct.unpack("<I", rest[-4:])
        if zlib.crc32(head + rest[:-4]) != crc:
            raise FrameError("full transport CRC32 mismatch")
        if seq != self._recv_seq:
            raise FrameError(f"full transport seq {seq}, expected {self._recv_seq}")
        self._recv_seq += 1
        return rest[4:-4]

    def encode(self, payload: bytes) -> bytes:
        data = struct.pack("<ii", len(payload) + 12, self._send_seq) + payload
        self._send_seq += 1
        return data + struct.pack("<I", zlib.crc32(data))


class IntermediateCodec:
    """4-byte little-endian length, then the payload (padded variant: 0-15 random bytes)."""

    def __init__(self, max_bytes: int, *, padded: bool) -> None:
        self._max = max_bytes
        self._padded = padded
        self.kind = TransportKind.PADDED if padded else TransportKind.INTERMEDIATE

    async def read_packet(self, reader: asyncio.StreamReader) -> bytes:
        (length,) = struct.unpack("<i", await reader.readexactly(4))
        if self._padded:
            if length > self._max + 16 or length < 4:
                raise FrameError(f"frame length {length} out of range")
            data = await reader.readexactly(length)
            return data[: length - length % 4]
        _check_length(length, self._max)
        return await reader.readexactly(length)

    def encode(self, payload: bytes) -> bytes:
        # The server may send unpadded packets on the padded transport too.
        return struct.pack("<i", len(payload)) + payload


class AbridgedCodec:
    """1 byte length/4 (or 0x7f and 3 bytes), then the payload."""

    kind = TransportKind.ABRIDGED

    def __init__(self, max_bytes: int) -> None:
        self._max = max_bytes

    async def read_packet(self, reader: asyncio.StreamReader) -> bytes:
        first = (await reader.readexactly(1))[0]
        words = int.from_bytes(await reader.readexactly(3), "little") if first >= 127 else first
        _check_length(words * 4, self._max)
        return await reader.readexactly(words * 4)

    def encode(self, payload: bytes) -> bytes:
        words = len(payload) // 4
        if words < 0x7F:
            return bytes([words]) + payload
        return b"\x7f" + words.to_bytes(3, "little") + payload


async def detect(reader: asyncio.StreamReader, max_bytes: int) -> Codec:
    """Read the transport tag (or the first length) and return the connection's codec."""
    first = await reader.readexactly(1)
    if first == ABRIDGED_TAG:
        return AbridgedCodec(max_bytes)
    head = first + await reader.readexactly(3)
    if head == INTERMEDIATE_TAG:
        return IntermediateCodec(max_bytes, padded=False)
    if head == PADDED_TAG:
        return IntermediateCodec(max_bytes, padded=True)
    (length,) = struct.unpack("<i", head)
    if length < 16 or length % 4 or length - 12 > max_bytes:
        raise FrameError(
            f"unsupported transport (first bytes {head.hex()}: not a tag nor a sane length)"
        )
    return FullCodec(max_bytes, first_length=head)


def transport_error(code: int) -> bytes:
    """The 4-byte transport error Telegram sends instead of a message (e.g. -404)."""
    return struct.pack("<i", -code)
