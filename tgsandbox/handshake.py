"""Auth key creation, server side: req_pq_multi → req_DH_params → set_client_DH_params.

One :class:`Handshake` per connection; :meth:`Handshake.answer` takes a decoded request
and returns the object to send back. When the exchange completes, ``auth_key`` is set.
Any inconsistency raises :class:`HandshakeError` (the connection is then closed).
"""

from __future__ import annotations

import hashlib
import os
import secrets
import time
from typing import Any

from telethon.extensions import BinaryReader
from telethon.tl import functions, types

from .crypto import (
    DH_EXPONENT_BITS,
    DH_G,
    DH_PRIME,
    DH_PRIME_BYTES,
    AuthKey,
    CryptoError,
    ServerKey,
    ige_decrypt,
    ige_encrypt,
    tmp_aes_key_iv,
)

# Both sides must keep g_a and g_b inside [2^(2048-64), dh_prime - 2^(2048-64)].
SAFETY = 2 ** (2048 - 64)


class HandshakeError(Exception):
    """The client's auth key exchange is inconsistent or out of order."""


def _is_prime(n: int) -> bool:
    """Deterministic Miller-Rabin for n < 3.3e9 (bases 2, 3, 5, 7)."""
    if n < 2:
        return False
    for small in (2, 3, 5, 7):
        if n % small == 0:
            return n == small
    d, r = n - 1, 0
    while d % 2 == 0:
        d, r = d // 2, r + 1
    for base in (2, 3, 5, 7):
        x = pow(base, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(r - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def random_prime(bits: int = 31) -> int:
    """A random prime of exactly ``bits`` bits."""
    while True:
        candidate = secrets.randbits(bits) | (1 << (bits - 1)) | 1
        if _is_prime(candidate):
            return candidate


def _int_bytes(value: int) -> bytes:
    return value.to_bytes((value.bit_length() + 7) // 8, "big")


def _le(value: int, size: int) -> bytes:
    return value.to_bytes(size, "little", signed=True)


class Handshake:
    """The server's half of one auth key exchange."""

    def __init__(self, key: ServerKey) -> None:
        self._key = key
        self._nonce: int | None = None
        self._server_nonce: int | None = None
        self._p = self._q = 0
        self._new_nonce: bytes | None = None
        self._a = 0
        self.auth_key: AuthKey | None = None
        self.server_salt = 0

    def answer(self, request: Any) -> Any:
        if isinstance(request, functions.ReqPqMultiRequest | functions.ReqPqRequest):
            return self._res_pq(request.nonce)
        if isinstance(request, functions.ReqDHParamsRequest):
            return self._dh_params(request)
        if isinstance(request, functions.SetClientDHParamsRequest):
            return self._dh_gen(request)
        raise HandshakeError(f"{type(request).__name__} is not an auth key exchange message")

    def _check_nonces(self, nonce: int, server_nonce: int) -> None:
        if self._nonce is None or nonce != self._nonce or server_nonce != self._server_nonce:
            raise HandshakeError("nonce or server_nonce does not match this exchange")

    def _res_pq(self, nonce: int) -> types.ResPQ:
        self._nonce = nonce
        self._server_nonce = int.from_bytes(os.urandom(16), "little", signed=True)
        p, q = random_prime(), random_prime()
        while q == p:
            q = random_prime()
        self._p, self._q = min(p, q), max(p, q)
        self._new_nonce = None
        self.auth_key = None
        return types.ResPQ(
            nonce=nonce,
            server_nonce=self._server_nonce,
            pq=_int_bytes(self._p * self._q),
            server_public_key_fingerprints=[self._key.fingerprint],
        )

    def _dh_params(self, request: Any) -> types.ServerDHParamsOk:
        self._check_nonces(request.nonce, request.server_nonce)
        if request.public_key_fingerprint != self._key.fingerprint:
            raise HandshakeError("unknown public key fingerprint")
        if (request.p, request.q) != (_int_bytes(self._p), _int_bytes(self._q)):
            raise HandshakeError("p and q do not factorise pq")
        try:
            plain = self._key.decrypt_raw(request.encrypted_data)
        except CryptoError as exc:
            raise HandshakeError(str(exc)) from exc
        # Telethon's (pre-RSA_PAD) layout: 0x00 | sha1(data) | data | random padding.
        body = plain[1:]
        reader = BinaryReader(body[20:])
        try:
            inner = reader.tgread_object()
        except Exception as exc:  # any decoding failure means a bad RSA payload
            raise HandshakeError(f"undecodable p_q_inner_data: {exc}") from exc
        data = body[20 : 20 + reader.tell_position()]
        if hashlib.sha1(data).digest() != body[:20]:
            raise HandshakeError("p_q_inner_data hash mismatch")
        if not isinstance(inner, types.PQInnerData | types.PQInnerDataDc):
            raise HandshakeError(f"unexpected {type(inner).__name__} in req_DH_params")
        if inner.nonce != self._nonce or inner.server_nonce != self._server_nonce:
            raise HandshakeError("p_q_inner_data nonces do not match")
        assert self._server_nonce is not None
        self._new_nonce = _le(inner.new_nonce, 32)
        g_a = 0
        while not SAFETY <= g_a <= DH_PRIME - SAFETY:  # as the client checks it
            self._a = secrets.randbits(DH_EXPONENT_BITS) | 1 << (DH_EXPONENT_BITS - 1)
            g_a = pow(DH_G, self._a, DH_PRIME)
        answer = bytes(
            types.ServerDHInnerData(
                nonce=self._nonce,
                server_nonce=self._server_nonce,
                g=DH_G,
                dh_prime=DH_PRIME_BYTES,
                g_a=_int_bytes(g_a),
                server_time=int(time.time()),
            )
        )
        with_hash = hashlib.sha1(answer).digest() + answer
        with_hash += os.urandom(-len(with_hash) % 16)
        key, iv = tmp_aes_key_iv(_le(self._server_nonce, 16), self._new_nonce)
        return types.ServerDHParamsOk(
            nonce=self._nonce,
            server_nonce=self._server_nonce,
            encrypted_answer=ige_encrypt(with_hash, key, iv),
        )

    def _dh_gen(self, request: Any) -> Any:
        self._check_nonces(request.nonce, request.server_nonce)
        if self._new_nonce is None or self._server_nonce is None:
            raise HandshakeError("set_client_DH_params before req_DH_params")
        key, iv = tmp_aes_key_iv(_le(self._server_nonce, 16), self._new_nonce)
        try:
            plain = ige_decrypt(request.encrypted_data, key, iv)
        except CryptoError as exc:
            raise HandshakeError(str(exc)) from exc
        reader = BinaryReader(plain[20:])
        try:
            inner = reader.tgread_object()
        except Exception as exc:  # any decoding failure means a bad encrypted payload
            raise HandshakeError(f"undecodable client_DH_inner_data: {exc}") from exc
        if hashlib.sha1(plain[20 : 20 + reader.tell_position()]).digest() != plain[:20]:
            raise HandshakeError("client_DH_inner_data hash mismatch")
        if not isinstance(inner, types.ClientDHInnerData):
            raise HandshakeError(f"unexpected {type(inner).__name__} in set_client_DH_params")
        if inner.nonce != self._nonce or inner.server_nonce != self._server_nonce:
            raise HandshakeError("client_DH_inner_data nonces do not match")
        g_b = int.from_bytes(inner.g_b, "big")
        if not SAFETY <= g_b <= DH_PRIME - SAFETY:
            raise HandshakeError("g_b is outside the safe range")
        gab = pow(g_b, self._a, DH_PRIME)
        auth_key = AuthKey(gab.to_bytes(256, "big"))
        if gab.bit_length() <= 2040:
            # A key with a leading zero byte: Telethon would keep it shorter than 256
            # bytes and disagree on every hash. Ask for a new exchange (dh_gen_retry).
            retry_hash = auth_key.new_nonce_hash(self._new_nonce, 2)
            self._new_nonce = None
            return types.DhGenRetry(
                nonce=self._nonce,
                server_nonce=self._server_nonce,
                new_nonce_hash2=int.from_bytes(retry_hash, "little", signed=True),
            )
        self.auth_key = auth_key
        self.server_salt = int.from_bytes(
            bytes(
                a ^ b
                for a, b in zip(self._new_nonce[:8], _le(self._server_nonce, 16)[:8], strict=False)
            ),
            "little",
            signed=True,
        )
        return types.DhGenOk(
            nonce=self._nonce,
            server_nonce=self._server_nonce,
            new_nonce_hash1=int.from_bytes(
                auth_key.new_nonce_hash(self._new_nonce, 1), "little", signed=True
            ),
        )
