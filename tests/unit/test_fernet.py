"""Our Fernet (controller/fernet.py, AES from Python's own libcrypto) against the spec's
known answer and against the ``cryptography`` package's Fernet, which sealed the secrets
at rest before: tokens pass both ways, and every kind of bad token is refused."""

from __future__ import annotations

import base64
import ctypes
import hmac
import os
import struct
from pathlib import Path

import pytest
from cryptography import fernet as theirs
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from controller import fernet, libcrypto
from controller.home import Home
from controller.secretbox import SecretBox, SecretKeyError, new_key

# The spec's generate.json (https://github.com/fernet/spec): a token made at a fixed
# time with a fixed IV.
SPEC_KEY = "cw_0x689RpI-jtRR7oE8h_eQsKImvJapLeSbXpwF4e4="
SPEC_NOW = 499162800  # 1985-10-26T01:20:00-07:00
SPEC_TOKEN = "gAAAAAAdwJ6wAAECAwQFBgcICQoLDA0ODy021cpGVWKZ_eEwCGM4BLLF_5CV9dOPmrhuVUPgJobwOz7JcbmrR64jVmpU4IwqDA=="


def test_the_spec_token_is_made_and_opened() -> None:
    key = fernet.FernetKey.parse(SPEC_KEY)
    assert fernet.encrypt(key, b"hello", now=SPEC_NOW, iv=bytes(range(16))) == SPEC_TOKEN
    assert fernet.decrypt([key], SPEC_TOKEN) == b"hello"


@pytest.mark.parametrize("size", [0, 1, 15, 16, 17, 200])
def test_our_tokens_open_with_cryptography_and_theirs_with_ours(size: int) -> None:
    text = new_key()
    message = os.urandom(size)
    ours = fernet.encrypt(fernet.FernetKey.parse(text), message)
    assert theirs.Fernet(text.encode()).decrypt(ours.encode()) == message
    token = theirs.Fernet(text.encode()).encrypt(message).decode()
    assert fernet.decrypt([fernet.FernetKey.parse(text)], token) == message


def test_a_secret_sealed_by_cryptography_before_opens_after_a_rotation() -> None:
    old = new_key()
    sealed_before = "tgfleet-sealed:v1:" + theirs.Fernet(old.encode()).encrypt(b"1:abc").decode()
    box = SecretBox((old,), "test").with_new_key()
    assert box.open(sealed_before) == "1:abc"
    resealed = box.reseal(sealed_before)
    # MultiFernet's rule: the first key seals, any opens; the new key alone opens it now.
    assert (
        theirs.MultiFernet([theirs.Fernet(box.keys[0].encode())]).decrypt(
            resealed.removeprefix("tgfleet-sealed:v1:").encode()
        )
        == b"1:abc"
    )
    assert box.newest_only().open(resealed) == "1:abc"
    with pytest.raises(SecretKeyError, match="does not open with the key from test"):
        SecretBox((old,), "test").open(resealed)


def signed_token(key_text: str, ciphertext: bytes, iv: bytes = bytes(16)) -> str:
    """A token with a valid HMAC around ``ciphertext``: what only the key's holder makes."""
    key = fernet.FernetKey.parse(key_text)
    signed = struct.pack(">BQ", 0x80, 0) + iv + ciphertext
    return base64.urlsafe_b64encode(signed + hmac.digest(key.signing, signed, "sha256")).decode()


def raw_aes(key_text: str, blocks: bytes, iv: bytes = bytes(16)) -> bytes:
    """``blocks`` encrypted without padding: their last byte is what unpadding reads."""
    key = fernet.FernetKey.parse(key_text)
    encryptor = Cipher(algorithms.AES(key.encryption), modes.CBC(iv)).encryptor()
    return encryptor.update(blocks) + encryptor.finalize()


def bad_tokens(key: str) -> dict[str, str]:
    good = fernet.encrypt(fernet.FernetKey.parse(key), b"1:secret")
    raw = bytearray(base64.urlsafe_b64decode(good))
    raw[30] ^= 1
    return {
        "wrong key": fernet.encrypt(fernet.FernetKey.parse(new_key()), b"1:secret"),
        "tampered": base64.urlsafe_b64encode(bytes(raw)).decode(),
        "truncated": good[:-8],
        "cut to its header": base64.urlsafe_b64encode(base64.urlsafe_b64decode(good)[:9]).decode(),
        "empty": "",
        "bad base64": good[:-2] + "!",
        "bad base64 padding": good.rstrip("="),
        "not ascii": good[:-4] + "é===",
        "other version": base64.urlsafe_b64encode(b"\x81" + raw[1:]).decode(),
        "bad padding": signed_token(key, raw_aes(key, bytes(31) + b"\x11")),
        "padding of zero": signed_token(key, raw_aes(key, bytes(32))),
        "no whole block": signed_token(key, raw_aes(key, bytes(16) + b"\x01" * 16)[:-1]),
    }


@pytest.mark.parametrize("kind", list(bad_tokens(new_key())))
def test_a_bad_token_is_refused_as_cryptography_refuses_it(kind: str) -> None:
    key = new_key()
    token = bad_tokens(key)[kind]
    # The secret box gave cryptography the token's UTF-8 bytes, as ours decodes it.
    with pytest.raises(theirs.InvalidToken):
        theirs.Fernet(key.encode()).decrypt(token.encode())
    with pytest.raises(fernet.InvalidToken):
        fernet.decrypt([fernet.FernetKey.parse(key)], token)
    with pytest.raises(SecretKeyError, match="does not open with the key from test"):
        SecretBox((key,), "test").open("tgfleet-sealed:v1:" + token)


def test_the_signed_bad_padding_tokens_reach_the_cipher() -> None:
    """They fail in libcrypto's unpadding, not at the HMAC (else they test nothing new)."""
    key = new_key()
    with pytest.raises(libcrypto.CipherError, match="bad padding"):
        libcrypto.decrypt(
            fernet.FernetKey.parse(key).encryption,
            bytes(16),
            raw_aes(key, bytes(31) + b"\x11"),
        )
    with pytest.raises(fernet.InvalidToken, match="signed, but does not decrypt"):
        fernet.decrypt([fernet.FernetKey.parse(key)], bad_tokens(key)["bad padding"])


@pytest.mark.parametrize(
    "key",
    [
        base64.urlsafe_b64encode(bytes(31)).decode(),
        base64.urlsafe_b64encode(bytes(33)).decode(),
        new_key()[:-2],  # base64 without its padding
        "",
        "not-a-key",
    ],
    ids=["31 bytes", "33 bytes", "unpadded", "empty", "not base64"],
)
def test_a_key_that_is_not_32_bytes_is_refused_as_cryptography_refuses_it(key: str) -> None:
    with pytest.raises(ValueError):
        theirs.Fernet(key.encode())
    with pytest.raises(SecretKeyError, match="holds something that is no Fernet key"):
        SecretBox((new_key(), key), "TGFLEET_SECRET_KEY")


def test_the_cipher_refuses_wrong_sizes() -> None:
    with pytest.raises(libcrypto.CipherError, match="16-byte key"):
        libcrypto.encrypt(bytes(32), bytes(16), b"x")
    with pytest.raises(libcrypto.CipherError, match="no whole number of blocks"):
        libcrypto.decrypt(bytes(16), bytes(16), bytes(17))


MAPS = (
    "7f00-7f01 r-xp 00000000 08:01 12 /usr/lib/x86_64-linux-gnu/libcrypto.so.3\n"
    "7f02-7f03 r--p 00000000 08:01 12 /usr/lib/x86_64-linux-gnu/libcrypto.so.3\n"
    "7f04-7f05 r-xp 00000000 08:01 13 /venv/x.libs/libcrypto-1a2b3c4d.so.3\n"
    "7f06-7f07 rw-p 00000000 00:00 0 \n"
)
TWO = "7f08-7f09 r-xp 00000000 08:01 14 /opt/ssl/lib/libcrypto.so.1.1\n"


def test_the_libcryptos_mapped_are_the_system_sonames_only() -> None:
    assert libcrypto.mapped_libcryptos(MAPS) == ["/usr/lib/x86_64-linux-gnu/libcrypto.so.3"]
    assert len(libcrypto.mapped_libcryptos(MAPS + TWO)) == 2
    assert libcrypto.mapped_libcryptos("7f06-7f07 rw-p 00000000 00:00 0 \n") == []


def test_the_cipher_is_this_python_s_libcrypto_or_what_hashlib_resolves() -> None:
    """Both ways reach the same library here (_hashlib links it): the fallback for a
    Python with OpenSSL linked into its modules, or with a second one loaded, works."""
    with open("/proc/self/maps") as maps:
        by_map = libcrypto.library(maps.read())
    fallbacks = [libcrypto.library(""), libcrypto.library(MAPS + TWO)]
    for name in ("EVP_aes_128_cbc", "EVP_CIPHER_CTX_new", "ERR_clear_error"):
        address = ctypes.cast(getattr(by_map, name), ctypes.c_void_p).value
        assert address is not None
        for fallback in fallbacks:
            assert ctypes.cast(getattr(fallback, name), ctypes.c_void_p).value == address


def test_what_is_no_base64_in_a_key_or_token_is_left_out_as_before() -> None:
    # The secret box gave cryptography the UTF-8 bytes of both, and base64's non-strict
    # decoding leaves out what is no base64: a key file an editor began with a byte
    # order mark, a token with a stray no-break space, opened before and open now.
    key = new_key()
    token = theirs.Fernet(key.encode()).encrypt(b"1:abc").decode()
    stray = token[:10] + "\u00a0" + token[10:]
    assert theirs.Fernet(("\ufeff" + key).encode()).decrypt(stray.encode()) == b"1:abc"
    box = SecretBox.parse("\ufeff" + key + "\n", "test")
    assert box.open("tgfleet-sealed:v1:" + stray) == "1:abc"


def test_a_key_whose_signature_matches_but_does_not_decrypt_leaves_the_next_key_its_turn() -> None:
    # Two keys with the same signing half: MultiFernet tries the second when the first
    # fails to decrypt, and so do we.
    a = fernet.FernetKey.parse(new_key())
    b = fernet.FernetKey(a.signing, os.urandom(16))
    token = fernet.encrypt(b, b"secret")
    assert fernet.decrypt([a, b], token) == b"secret"
    with pytest.raises(fernet.InvalidToken, match="does not decrypt"):
        fernet.decrypt([a], token)


def test_an_input_longer_than_a_c_int_is_refused_not_cut() -> None:
    class Huge(bytes):
        def __len__(self) -> int:
            return libcrypto.MAX_INPUT_BYTES + 1

    with pytest.raises(libcrypto.CipherError, match="more than"):
        libcrypto.encrypt(bytes(16), bytes(16), Huge(b"x"))


def test_a_box_whose_cipher_cannot_run_fails_at_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unreachable() -> None:
        raise libcrypto.NoLibcrypto("none mapped")

    monkeypatch.setattr(libcrypto, "_evp", unreachable)
    with pytest.raises(SecretKeyError, match="needs a Python whose ssl module"):
        SecretBox.load(Home(tmp_path), environ={})
