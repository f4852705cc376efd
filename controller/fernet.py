"""Fernet tokens (https://github.com/fernet/spec, version 0x80), interchangeable with
the ``cryptography`` package's: what sealed the secrets at rest before stays readable.

A key is 32 url-safe base64 bytes: the HMAC-SHA256 signing key, then the AES-128
encryption key. A token is url-safe base64 of
``0x80 | seconds since 1970 (8 bytes, big-endian) | IV (16) | AES-128-CBC ciphertext of
the PKCS7-padded message | HMAC-SHA256 of all that``. Only what ``cryptography``'s
``Fernet`` does without a ``ttl`` is here: the time is written, never checked.
"""

from __future__ import annotations

import base64
import hmac
import os
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass

from controller import libcrypto

VERSION = 0x80
_HEADER = struct.Struct(">BQ")  # version, timestamp
_IV_BYTES = libcrypto.BLOCK_BYTES
_MAC_BYTES = 32  # HMAC-SHA256
# the version, time, IV, one block (the padding always adds one) and the HMAC
_SHORTEST = _HEADER.size + _IV_BYTES + libcrypto.BLOCK_BYTES + _MAC_BYTES


class InvalidToken(Exception):
    """Not a token, or not one that this key signed."""


@dataclass(frozen=True, repr=False)
class FernetKey:
    """The two halves of a Fernet key (``repr`` shows neither)."""

    signing: bytes
    encryption: bytes

    @classmethod
    def parse(cls, text: str) -> FernetKey:
        """ValueError unless ``text`` is 32 bytes in url-safe base64."""
        # Decoded as the secret box gave it to cryptography's Fernet before (the text's
        # UTF-8 bytes, base64's non-strict decoding: what is no base64, such as a byte
        # order mark, is left out), so every key that opened before opens now.
        raw = base64.urlsafe_b64decode(text.encode("utf-8"))
        if len(raw) != 32:
            raise ValueError("a Fernet key is 32 url-safe base64-encoded bytes")
        return cls(raw[:16], raw[16:])

    def __repr__(self) -> str:
        return "FernetKey(…)"


def generate_key() -> str:
    return base64.urlsafe_b64encode(os.urandom(32)).decode("ascii")


def encrypt(
    key: FernetKey, message: bytes, *, now: int | None = None, iv: bytes | None = None
) -> str:
    """A token of ``message`` (``now`` and ``iv``: the current time and a random IV
    unless given, for known-answer tests)."""
    iv = os.urandom(_IV_BYTES) if iv is None else iv
    when = int(time.time()) if now is None else now
    signed = _HEADER.pack(VERSION, when) + iv + libcrypto.encrypt(key.encryption, iv, message)
    mac = hmac.digest(key.signing, signed, "sha256")
    return base64.urlsafe_b64encode(signed + mac).decode("ascii")


def decrypt(keys: Sequence[FernetKey], token: str) -> bytes:
    """The message of ``token``, opened by whichever of ``keys`` signed it."""
    try:
        # As the secret box gave it to cryptography's Fernet before: its UTF-8 bytes.
        data = base64.urlsafe_b64decode(token.encode("utf-8"))
    except ValueError:  # binascii.Error: bad base64
        raise InvalidToken("not url-safe base64") from None
    if len(data) < _SHORTEST or data[0] != VERSION:
        raise InvalidToken("too short, or not a version 0x80 token")
    signed, mac = data[:-_MAC_BYTES], data[-_MAC_BYTES:]
    iv = signed[_HEADER.size : _HEADER.size + _IV_BYTES]
    ciphertext = signed[_HEADER.size + _IV_BYTES :]
    why = "signed by none of the keys"
    for key in keys:
        if hmac.compare_digest(hmac.digest(key.signing, signed, "sha256"), mac):
            try:
                return libcrypto.decrypt(key.encryption, iv, ciphertext)
            except libcrypto.CipherError as exc:
                # The next key may share this signing half (MultiFernet tries it too).
                why = f"signed, but does not decrypt: {exc}"
    raise InvalidToken(why)
