"""Pure pieces of the sandbox, by tables: crypto, envelope, transports, faults, names."""

from __future__ import annotations

import asyncio
import os
import struct
from pathlib import Path

import pytest
from telethon.crypto import AES
from telethon.crypto import AuthKey as TelethonAuthKey

from tgsandbox import envelope
from tgsandbox.crypto import DH_G, DH_PRIME, AuthKey, ServerKey, ige_decrypt, ige_encrypt
from tgsandbox.envelope import EnvelopeError, Item, MsgIdClock
from tgsandbox.faults import (
    ALL,
    Effect,
    Fault,
    FaultBoard,
    FaultKind,
    InvalidFault,
    Scope,
)
from tgsandbox.handshake import _is_prime
from tgsandbox.transport import (
    AbridgedCodec,
    FrameError,
    FullCodec,
    IntermediateCodec,
    detect,
)
from tgsandbox.world import bot_username, login_code_for


@pytest.mark.parametrize("size", [16, 32, 256, 1024])
def test_ige_matches_telethons_own_implementation(size: int) -> None:
    key, iv, plain = os.urandom(32), os.urandom(32), os.urandom(size)
    cipher = ige_encrypt(plain, key, iv)
    assert cipher == AES.encrypt_ige(plain, key, iv)
    assert ige_decrypt(cipher, key, iv) == plain


def test_auth_key_id_and_nonce_hash_match_telethon() -> None:
    raw, new_nonce = os.urandom(256), int.from_bytes(os.urandom(32), "little", signed=True)
    ours, theirs = AuthKey(raw), TelethonAuthKey(raw)
    assert ours.key_id == theirs.key_id
    assert int.from_bytes(
        ours.new_nonce_hash(new_nonce.to_bytes(32, "little", signed=True), 1), "little", signed=True
    ) == theirs.calc_new_nonce_hash(new_nonce, 1)


def test_rsa_decryption_by_crt_is_textbook_rsa(tmp_path: Path) -> None:
    key = ServerKey.load_or_create(tmp_path)
    assert key.p * key.q == key.n
    for _ in range(5):
        plain = b"\0" + os.urandom(255)
        cipher = pow(int.from_bytes(plain, "big"), key.e, key.n).to_bytes(256, "big")
        assert key.decrypt_raw(cipher) == plain
        assert key.decrypt_raw(cipher) == pow(int.from_bytes(cipher, "big"), key.d, key.n).to_bytes(
            256, "big"
        )


def test_dh_group_is_what_mtproto_accepts() -> None:
    assert DH_PRIME.bit_length() == 2048 and DH_PRIME % 8 == 7 and DH_G == 2
    assert pow(DH_G, (DH_PRIME - 1) // 2, DH_PRIME) == 1


@pytest.mark.parametrize(
    ("n", "prime"), [(2, True), (1, False), (91, False), (2_147_483_647, True), (2**31 + 1, False)]
)
def test_is_prime(n: int, prime: bool) -> None:
    assert _is_prime(n) is prime


def test_encrypted_message_round_trip_and_tampering() -> None:
    key = AuthKey(os.urandom(256))
    packet = envelope.encrypt(key, 7, 8, 9 << 32 | 1, 1, b"\x01\x02\x03\x04")
    # The server encrypts with x = 8; decrypting as a client message must fail.
    with pytest.raises(EnvelopeError, match="msg_key"):
        envelope.decrypt(key, packet)
    with pytest.raises(EnvelopeError, match="length"):
        envelope.decrypt(key, packet[:30])


def test_split_unwraps_containers_and_gzip() -> None:
    inner = [(4, 1, b"\xaa" * 8), (8, 3, b"\xbb" * 4)]
    items = envelope.split(Item(12, 4, envelope.container(inner)))
    assert [(i.msg_id, i.seq_no, i.body) for i in items] == inner
    packed = struct.pack("<I", envelope.GZIP_PACKED) + envelope.tl_bytes(
        __import__("gzip").compress(b"\xcc" * 12)
    )
    assert envelope.split(Item(1, 1, packed))[0].body == b"\xcc" * 12
    with pytest.raises(EnvelopeError):
        envelope.split(Item(1, 1, struct.pack("<Ii", envelope.MSG_CONTAINER, 5)))


def test_msg_ids_are_odd_increasing_and_typed() -> None:
    clock = MsgIdClock()
    ids = [clock.next(answer=i % 2 == 0) for i in range(100)]
    assert ids == sorted(set(ids))
    assert all(m % 4 == (1 if i % 2 == 0 else 3) for i, m in enumerate(ids))


async def _read_back(codec_bytes: bytes, max_bytes: int = 1 << 20) -> bytes:
    reader = asyncio.StreamReader()
    reader.feed_data(codec_bytes)
    reader.feed_eof()
    codec = await detect(reader, max_bytes)
    return await codec.read_packet(reader)


@pytest.mark.parametrize("size", [4, 200, 600])
async def test_transports_round_trip(size: int) -> None:
    payload = os.urandom(size)
    assert await _read_back(b"\xef" + AbridgedCodec(1 << 20).encode(payload)) == payload
    assert (
        await _read_back(b"\xee" * 4 + IntermediateCodec(1 << 20, padded=False).encode(payload))
        == payload
    )
    assert await _read_back(FullCodec(1 << 20).encode(payload)) == payload


@pytest.mark.parametrize(
    "data",
    [
        b"\xef\x7f\xff\xff\xff",  # abridged length far over the limit
        b"\xee\xee\xee\xee" + struct.pack("<i", 6),  # not a multiple of 4
        b"GET / HTTP/1.1\r\n",  # not MTProto at all
    ],
)
async def test_transports_reject_bad_frames(data: bytes) -> None:
    with pytest.raises(FrameError):
        await _read_back(data + b"\0" * 64, max_bytes=1024)


@pytest.mark.parametrize(
    ("kind", "ms", "seconds", "bad"),
    [
        ("delay", 100, None, None),
        ("delay", None, None, "ms"),
        ("delay", True, None, "ms"),
        ("flood", None, 30, None),
        ("flood", None, 0, "seconds"),
        ("close", 5, None, "ms"),
        ("nap", None, None, "kind"),
        ("revoke", None, None, None),
    ],
)
def test_fault_parse(kind: str, ms: object, seconds: object, bad: str | None) -> None:
    if bad is None:
        assert Fault.parse(kind, ms, seconds).kind == FaultKind(kind)
    else:
        with pytest.raises(InvalidFault) as caught:
            Fault.parse(kind, ms, seconds)
        assert bad in caught.value.errors


@pytest.mark.parametrize(
    ("kind", "scope", "expected", "bad"),
    [
        ("blackhole", None, Scope.ALL, None),
        ("blackhole", "all", Scope.ALL, None),
        ("blackhole", "live", Scope.LIVE, None),
        ("blackhole", "now", None, "scope"),
        ("blackhole", 1, None, "scope"),
        ("refuse", "live", None, "scope"),
        ("delay", None, None, None),
    ],
)
def test_fault_parse_scope(
    kind: str, scope: object, expected: Scope | None, bad: str | None
) -> None:
    ms = 5 if kind == "delay" else None
    if bad is None:
        fault = Fault.parse(kind, ms, None, scope)
        assert fault.scope is expected and fault.live == (expected is Scope.LIVE)
    else:
        with pytest.raises(InvalidFault) as caught:
            Fault.parse(kind, ms, None, scope)
        assert set(caught.value.errors) == {bad}


def test_a_live_blackhole_never_stands() -> None:
    board = FaultBoard()
    board.set(7, Fault.parse("blackhole", scope="live"))
    assert board.listing() == {} and board.effect(7) == Effect()
    board.set(7, Fault.parse("blackhole"))
    assert board.effect(7) == Effect(blackhole=True)


def test_fault_board_effects() -> None:
    board = FaultBoard()
    board.set(ALL, Fault(FaultKind.DELAY, ms=50))
    board.set(7, Fault(FaultKind.DELAY, ms=900))
    board.set(7, Fault(FaultKind.FLOOD, seconds=3))
    board.set(7, Fault(FaultKind.CLOSE))  # an action, never standing
    assert board.effect(7) == Effect(delay_ms=900, flood_s=3)
    assert board.effect(8) == Effect(delay_ms=50)
    assert board.effect(None) == Effect(delay_ms=50)
    board.clear(7)
    assert board.effect(7) == Effect(delay_ms=50)
    board.set(8, Fault(FaultKind.REVOKE))
    board.clear(ALL)
    assert board.effect(8) == Effect() and board.listing() == {}


@pytest.mark.parametrize(
    ("phone", "code"),
    [("9996621234", "22222"), ("9996610000", "11111"), ("9996601234", None), ("123", None)],
)
def test_test_phone_codes(phone: str, code: str | None) -> None:
    assert login_code_for(phone) == code


@pytest.mark.parametrize(
    ("name", "username"), [("shop", "shop_bot"), ("demo-echo", "demo_echo_bot")]
)
def test_bot_usernames(name: str, username: str) -> None:
    assert bot_username(name) == username
