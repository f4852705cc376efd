"""The MTProto 2.0 message envelope: plain and encrypted messages, containers, msg_ids."""

from __future__ import annotations

import gzip
import os
import struct
import time
from dataclasses import dataclass

from .crypto import CLIENT_X, SERVER_X, AuthKey, aes_key_iv, ige_decrypt, ige_encrypt, msg_key_for

MSG_CONTAINER = 0x73F1F8DC
GZIP_PACKED = 0x3072CFA1
RPC_RESULT = 0xF35C6D01
VECTOR = 0x1CB5C415
BOOL_TRUE = 0x997275B5
BOOL_FALSE = 0xBC799737

MAX_CONTAINER_ITEMS = 1024


class EnvelopeError(Exception):
    """A packet failed the envelope's checks (length, msg_key, layout)."""


@dataclass(frozen=True)
class Inbound:
    """One decrypted client message (the top level one; containers are split later)."""

    salt: int
    session_id: int
    msg_id: int
    seq_no: int
    body: bytes


@dataclass(frozen=True)
class Item:
    """A message inside (or as) a client packet: its id, seqno and serialised object."""

    msg_id: int
    seq_no: int
    body: bytes


def auth_key_id_of(packet: bytes) -> int:
    if len(packet) < 8:
        raise EnvelopeError(f"packet of {len(packet)} bytes has no auth_key_id")
    return int(struct.unpack("<Q", packet[:8])[0])


def unpack_plain(packet: bytes) -> tuple[int, bytes]:
    """auth_key_id (0) | msg_id | length | body → (msg_id, body)."""
    if len(packet) < 20:
        raise EnvelopeError(f"plain message of {len(packet)} bytes is too short")
    msg_id, length = struct.unpack("<qi", packet[8:20])
    if length <= 0 or 20 + length > len(packet):
        raise EnvelopeError(f"plain message length {length} does not fit its packet")
    return msg_id, packet[20 : 20 + length]


def pack_plain(msg_id: int, body: bytes) -> bytes:
    return struct.pack("<qqi", 0, msg_id, len(body)) + body


def decrypt(key: AuthKey, packet: bytes) -> Inbound:
    """Check and decrypt one client packet encrypted with ``key``."""
    if len(packet) < 24 + 32 or (len(packet) - 24) % 16:
        raise EnvelopeError(f"encrypted packet of {len(packet)} bytes has a bad length")
    msg_key = packet[8:24]
    aes_key, aes_iv = aes_key_iv(key.key, msg_key, CLIENT_X)
    plain = ige_decrypt(packet[24:], aes_key, aes_iv)
    if msg_key_for(key.key, plain, CLIENT_X) != msg_key:
        raise EnvelopeError("msg_key does not match the decrypted data")
    salt, session_id, msg_id, seq_no, length = struct.unpack("<qqqii", plain[:32])
    padding = len(plain) - 32 - length
    if length < 4 or length % 4 or not 12 <= padding <= 1024:
        raise EnvelopeError(f"message length {length} does not fit its padding")
    return Inbound(salt, session_id, msg_id, seq_no, plain[32 : 32 + length])


def encrypt(
    key: AuthKey, salt: int, session_id: int, msg_id: int, seq_no: int, body: bytes
) -> bytes:
    """Encrypt one server message for the client holding ``key``."""
    plain = struct.pack("<qqqii", salt, session_id, msg_id, seq_no, len(body)) + body
    plain += os.urandom(-(len(plain) + 12) % 16 + 12)
    msg_key = msg_key_for(key.key, plain, SERVER_X)
    aes_key, aes_iv = aes_key_iv(key.key, msg_key, SERVER_X)
    return struct.pack("<Q", key.key_id) + msg_key + ige_encrypt(plain, aes_key, aes_iv)


def read_tl_bytes(data: bytes, offset: int) -> tuple[bytes, int]:
    """A TL ``bytes`` value at ``offset`` → (value, offset after it)."""
    if offset >= len(data):
        raise EnvelopeError("TL bytes beyond the end of data")
    first = data[offset]
    if first < 254:
        start, length = offset + 1, first
    else:
        start, length = offset + 4, int.from_bytes(data[offset + 1 : offset + 4], "little")
    end = start + length
    if end > len(data):
        raise EnvelopeError("TL bytes longer than the data")
    return data[start:end], end + (-(end - offset) % 4)


def tl_bytes(data: bytes) -> bytes:
    head = bytes([len(data)]) if len(data) < 254 else b"\xfe" + len(data).to_bytes(3, "little")
    out = head + data
    return out + b"\0" * (-len(out) % 4)


def split(item: Item, *, max_unpacked: int = 16 << 20) -> list[Item]:
    """Unwrap containers and gzip_packed into the plain messages they carry."""
    if len(item.body) < 4:
        raise EnvelopeError("message body shorter than a constructor id")
    (constructor,) = struct.unpack("<I", item.body[:4])
    if constructor == GZIP_PACKED:
        packed, _ = read_tl_bytes(item.body, 4)
        try:
            unpacked = gzip.decompress(packed)
        except (OSError, EOFError) as exc:
            raise EnvelopeError(f"bad gzip_packed data: {exc}") from exc
        if len(unpacked) > max_unpacked:
            raise EnvelopeError("gzip_packed data unpacks too large")
        return split(Item(item.msg_id, item.seq_no, unpacked))
    if constructor != MSG_CONTAINER:
        return [item]
    if len(item.body) < 8:
        raise EnvelopeError("container without a count")
    (count,) = struct.unpack("<i", item.body[4:8])
    if not 0 <= count <= MAX_CONTAINER_ITEMS:
        raise EnvelopeError(f"container of {count} messages")
    items: list[Item] = []
    offset = 8
    for _ in range(count):
        if offset + 16 > len(item.body):
            raise EnvelopeError("container message header beyond its end")
        msg_id, seq_no, length = struct.unpack("<qii", item.body[offset : offset + 16])
        offset += 16
        if length < 4 or offset + length > len(item.body):
            raise EnvelopeError("container message body beyond its end")
        inner = Item(msg_id, seq_no, item.body[offset : offset + length])
        offset += length
        # Containers may not nest; gzip inside a container is allowed.
        if struct.unpack("<I", inner.body[:4])[0] == MSG_CONTAINER:
            raise EnvelopeError("nested container")
        items.extend(split(inner))
    return items


def container(messages: list[tuple[int, int, bytes]]) -> bytes:
    """msg_container of (msg_id, seq_no, body) triples."""
    out = bytearray(struct.pack("<Ii", MSG_CONTAINER, len(messages)))
    for msg_id, seq_no, body in messages:
        out += struct.pack("<qii", msg_id, seq_no, len(body)) + body
    return bytes(out)


def rpc_result(req_msg_id: int, result: bytes) -> bytes:
    """rpc_result, gzip-packing large results when it saves bytes."""
    if len(result) > 512:
        packed = struct.pack("<I", GZIP_PACKED) + tl_bytes(gzip.compress(result, 6))
        if len(packed) < len(result):
            result = packed
    return struct.pack("<Iq", RPC_RESULT, req_msg_id) + result


class MsgIdClock:
    """Server msg_ids: unix time in the high half, ≡ 1 mod 4 for answers, 3 for the rest."""

    def __init__(self) -> None:
        self._last = 0

    def next(self, *, answer: bool) -> int:
        now = time.time()
        candidate = (int(now) << 32) | (int((now % 1) * 2**30) << 2)
        candidate = max(candidate, self._last + 4) & ~3
        candidate |= 1 if answer else 3
        self._last = candidate
        return candidate


def msg_id_time(msg_id: int) -> float:
    return msg_id / 2**32
