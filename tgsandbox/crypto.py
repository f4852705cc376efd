"""Cryptography of MTProto 2.0 on the server side: AES-256-IGE, message keys, RSA, DH group."""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

# RFC 7919 ffdhe2048: a public 2048-bit safe prime. With g = 2 it meets MTProto's
# conditions (p mod 8 == 7, so 2 generates the subgroup of order (p-1)/2).
DH_PRIME = int(
    "ffffffffffffffffadf85458a2bb4a9aafdc5620273d3cf1d8b9c583ce2d3695"
    "a9e13641146433fbcc939dce249b3ef97d2fe363630c75d8f681b202aec4617a"
    "d3df1ed5d5fd65612433f51f5f066ed0856365553ded1af3b557135e7f57c935"
    "984f0c70e0e68b77e2a689daf3efe8721df158a136ade73530acca4f483a797a"
    "bc0ab182b324fb61d108a94bb2c8e3fbb96adab760d7f4681d4f42a3de394df4"
    "ae56ede76372bb190b07a7c8ee0a6d709e02fce1cdf7e2ecc03404cd28342f61"
    "9172fe9ce98583ff8e4f1232eef28183c3fe3b1b4c6fad733bb5fcbc2ec22005"
    "c58ef1837d1683b2c6f34a26c1b2effa886b423861285c97ffffffffffffffff",
    16,
)
DH_G = 2
DH_PRIME_BYTES = DH_PRIME.to_bytes(256, "big")
#: Bits of the server's secret DH exponent. RFC 7919 (section 5.2) asks for at least
#: twice the group's security strength (~103 bits for ffdhe2048), as OpenSSL uses
#: for these groups: a full 2048-bit exponent only made each of the server's two
#: modular powers per new auth key 8x slower (~24 ms each in Python on a busy host),
#: time every new bot waited on the sandbox. The client cannot tell the difference.
DH_EXPONENT_BITS = 320

PUBLIC_KEY_FILE = "public.pem"
PRIVATE_KEY_FILE = "private.pem"


class CryptoError(Exception):
    """Data failed a cryptographic check (bad length, hash or key)."""


def _xor16(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "little") ^ int.from_bytes(b, "little")).to_bytes(16, "little")


def ige_encrypt(plain: bytes, key: bytes, iv: bytes) -> bytes:
    """AES-256 in IGE mode (iv is 32 bytes: previous cipher block, previous plain block)."""
    if len(plain) % 16:
        raise CryptoError(f"IGE input of {len(plain)} bytes is not a multiple of 16")
    block = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    prev_cipher, prev_plain = iv[:16], iv[16:32]
    out = bytearray()
    for i in range(0, len(plain), 16):
        chunk = plain[i : i + 16]
        cipher = _xor16(block.update(_xor16(chunk, prev_cipher)), prev_plain)
        out += cipher
        prev_cipher, prev_plain = cipher, chunk
    return bytes(out)


def ige_decrypt(cipher: bytes, key: bytes, iv: bytes) -> bytes:
    """Inverse of :func:`ige_encrypt`."""
    if len(cipher) % 16:
        raise CryptoError(f"IGE input of {len(cipher)} bytes is not a multiple of 16")
    block = Cipher(algorithms.AES(key), modes.ECB()).decryptor()
    prev_cipher, prev_plain = iv[:16], iv[16:32]
    out = bytearray()
    for i in range(0, len(cipher), 16):
        chunk = cipher[i : i + 16]
        plain = _xor16(block.update(_xor16(chunk, prev_plain)), prev_cipher)
        out += plain
        prev_cipher, prev_plain = chunk, plain
    return bytes(out)


@dataclass(frozen=True)
class AuthKey:
    """A 2048-bit MTProto authorization key with its id and auxiliary hash."""

    key: bytes

    @property
    def key_id(self) -> int:
        """The low 64 bits of SHA1(key), as the unsigned little-endian id on the wire."""
        return int(struct.unpack("<Q", hashlib.sha1(self.key).digest()[12:20])[0])

    @property
    def aux_hash(self) -> int:
        return int(struct.unpack("<Q", hashlib.sha1(self.key).digest()[:8])[0])

    def new_nonce_hash(self, new_nonce: bytes, number: int) -> bytes:
        """new_nonce_hashN of dh_gen_ok/retry/fail: 128 low bits of SHA1(new_nonce|N|aux)."""
        data = new_nonce + struct.pack("<BQ", number, self.aux_hash)
        return hashlib.sha1(data).digest()[4:20]


# x is 0 for messages from the client, 8 for messages from the server.
CLIENT_X = 0
SERVER_X = 8


def msg_key_for(key: bytes, plain: bytes, x: int) -> bytes:
    """msg_key = middle 128 bits of SHA256(substr(auth_key, 88+x, 32) + plaintext)."""
    return hashlib.sha256(key[88 + x : 120 + x] + plain).digest()[8:24]


def aes_key_iv(key: bytes, msg_key: bytes, x: int) -> tuple[bytes, bytes]:
    """The AES key and IV of one message, from the auth key and its msg_key."""
    a = hashlib.sha256(msg_key + key[x : x + 36]).digest()
    b = hashlib.sha256(key[40 + x : 76 + x] + msg_key).digest()
    return a[:8] + b[8:24] + a[24:32], b[:8] + a[8:24] + b[24:32]


def tmp_aes_key_iv(server_nonce: bytes, new_nonce: bytes) -> tuple[bytes, bytes]:
    """The temporary AES key and IV of the DH exchange (server_DH_params_ok)."""
    ns = hashlib.sha1(new_nonce + server_nonce).digest()
    sn = hashlib.sha1(server_nonce + new_nonce).digest()
    nn = hashlib.sha1(new_nonce + new_nonce).digest()
    return ns + sn[:12], sn[12:20] + nn + new_nonce[:4]


def _tl_bytes(data: bytes) -> bytes:
    """TL serialisation of a ``bytes`` value (for the key fingerprint)."""
    head = bytes([len(data)]) if len(data) < 254 else b"\xfe" + len(data).to_bytes(3, "little")
    body = head + data
    return body + b"\0" * (-len(body) % 4)


def _int_bytes(value: int) -> bytes:
    return value.to_bytes((value.bit_length() + 7) // 8, "big")


@dataclass(frozen=True)
class ServerKey:
    """The sandbox's RSA key: the private numbers and the PKCS#1 public PEM clients trust."""

    n: int
    e: int
    d: int
    public_pem: bytes
    # The private primes and CRT exponents: decryption as two half-size powers (4x faster).
    p: int = 0
    q: int = 0
    dmp1: int = 0
    dmq1: int = 0
    iqmp: int = 0

    @property
    def fingerprint(self) -> int:
        """Telegram's fingerprint: low 64 bits of SHA1(n, e as TL bytes), signed LE."""
        digest = hashlib.sha1(_tl_bytes(_int_bytes(self.n)) + _tl_bytes(_int_bytes(self.e)))
        return int(struct.unpack("<q", digest.digest()[-8:])[0])

    def decrypt_raw(self, cipher: bytes) -> bytes:
        """Textbook RSA decryption to 256 big-endian bytes (MTProto pads on its own)."""
        value = int.from_bytes(cipher, "big")
        if not 0 < value < self.n:
            raise CryptoError("RSA ciphertext out of range")
        if not self.p:
            return pow(value, self.d, self.n).to_bytes(256, "big")
        # Chinese remainder theorem: the same result as pow(value, d, n).
        m1, m2 = pow(value, self.dmp1, self.p), pow(value, self.dmq1, self.q)
        plain = m2 + (self.iqmp * (m1 - m2) % self.p) * self.q
        return plain.to_bytes(256, "big")

    @classmethod
    def load_or_create(cls, data_dir: Path) -> ServerKey:
        """Load the key from ``data_dir``, creating it (and ``public.pem``) on first start."""
        private_path = data_dir / PRIVATE_KEY_FILE
        public_path = data_dir / PUBLIC_KEY_FILE
        if private_path.exists():
            loaded = serialization.load_pem_private_key(private_path.read_bytes(), password=None)
            if not isinstance(loaded, rsa.RSAPrivateKey) or loaded.key_size != 2048:
                raise CryptoError(f"{private_path} is not a 2048-bit RSA private key")
            private = loaded
        else:
            private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            pem = private.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            _write_atomic(private_path, pem, 0o600)
        public_pem = private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.PKCS1
        )
        if not public_path.exists() or public_path.read_bytes() != public_pem:
            _write_atomic(public_path, public_pem, 0o644)
        numbers = private.private_numbers()
        return cls(
            n=numbers.public_numbers.n,
            e=numbers.public_numbers.e,
            d=numbers.d,
            public_pem=public_pem,
            p=numbers.p,
            q=numbers.q,
            dmp1=numbers.dmp1,
            dmq1=numbers.dmq1,
            iqmp=numbers.iqmp,
        )


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
