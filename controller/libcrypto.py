"""AES-128-CBC with PKCS7 padding, from the OpenSSL libcrypto this Python already links.

The controller loads that library anyway (asyncio imports ``ssl``; ``hmac`` imports
``_hashlib``): reaching its EVP API through ``ctypes`` (0.4 MB) spares the
``cryptography`` package (6.6 MB of RSS, with an OpenSSL of its own) for the one cipher
the secret box needs. The library is the one already mapped into this process (or,
failing that, what ``_hashlib`` resolves), never one looked up on the disk: exactly
the one Python's own modules use.
"""

from __future__ import annotations

import ctypes
import functools
import re

BLOCK_BYTES = 16
KEY_BYTES = 16

# The system's soname (libcrypto.so.3), not a copy a wheel bundles (libcrypto-1a2b3c.so.3).
_SONAME = re.compile(r"/libcrypto\.so(\.\d+)*$")


class CipherError(Exception):
    """The cipher refused the input (bad padding, a length no multiple of the block)."""


class NoLibcrypto(RuntimeError):
    """This Python's libcrypto cannot be reached or used (no input's fault: never taken
    for a bad token)."""


def mapped_libcryptos(maps: str) -> list[str]:
    """The paths of the system libcryptos in ``maps`` (the text of ``/proc/PID/maps``)."""
    paths = set()
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and _SONAME.search(fields[5]):
            paths.add(fields[5])
    return sorted(paths)


class _Evp:
    """The few EVP functions used, with their C signatures (a wrong restype would cut
    64-bit pointers)."""

    def __init__(self, library: ctypes.CDLL) -> None:
        pointer, integer, buffer = ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p
        length = ctypes.POINTER(ctypes.c_int)

        def bind(name: str, restype: type | None, *argtypes: type) -> ctypes._NamedFuncPointer:
            function = getattr(library, name)
            function.restype = restype
            function.argtypes = list(argtypes)
            return function  # type: ignore[no-any-return]

        self.ctx_new = bind("EVP_CIPHER_CTX_new", pointer)
        self.ctx_free = bind("EVP_CIPHER_CTX_free", None, pointer)
        self.aes_128_cbc = bind("EVP_aes_128_cbc", pointer)
        self.err_clear = bind("ERR_clear_error", None)
        init = (pointer, pointer, pointer, buffer, buffer)  # ctx, cipher, engine, key, iv
        # out is an address (into a buffer of ours), in a bytes object
        update = (pointer, pointer, length, buffer, integer)  # ctx, out, outl, in, inl
        final = (pointer, pointer, length)  # ctx, out, outl
        self.encrypt_init = bind("EVP_EncryptInit_ex", integer, *init)
        self.encrypt_update = bind("EVP_EncryptUpdate", integer, *update)
        self.encrypt_final = bind("EVP_EncryptFinal_ex", integer, *final)
        self.decrypt_init = bind("EVP_DecryptInit_ex", integer, *init)
        self.decrypt_update = bind("EVP_DecryptUpdate", integer, *update)
        self.decrypt_final = bind("EVP_DecryptFinal_ex", integer, *final)


@functools.cache
def _evp() -> _Evp:
    import _hashlib  # noqa: F401  (maps this Python's libcrypto, if nothing has yet)

    with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
        return _Evp(library(maps.read()))


def library(maps: str) -> ctypes.CDLL:
    """This Python's libcrypto: the one in ``maps`` (``/proc/self/maps``), else the
    symbols that ``_hashlib`` resolves."""
    import _hashlib

    paths = mapped_libcryptos(maps)
    if len(paths) == 1:
        return ctypes.CDLL(paths[0])  # already loaded: dlopen returns the same library
    # None (OpenSSL linked into Python's own modules) or several (another one loaded
    # by some package): the symbols as _hashlib itself resolves them.
    module_file = getattr(_hashlib, "__file__", None)
    if module_file is not None:
        resolved = ctypes.CDLL(module_file)
        if hasattr(resolved, "EVP_aes_128_cbc"):
            return resolved
    found = ", ".join(paths) or "none mapped"
    raise NoLibcrypto(
        f"the OpenSSL libcrypto this Python uses cannot be reached ({found}; "
        f"_hashlib at {module_file or 'built in'} exports no EVP_aes_128_cbc)"
    )


def encrypt(key: bytes, iv: bytes, plaintext: bytes) -> bytes:
    """``plaintext`` PKCS7-padded and encrypted with AES-128-CBC."""
    return _run(key, iv, plaintext, decrypting=False)


def decrypt(key: bytes, iv: bytes, ciphertext: bytes) -> bytes:
    """``ciphertext`` decrypted with AES-128-CBC and unpadded; CipherError when its
    length or its padding is wrong."""
    if not ciphertext or len(ciphertext) % BLOCK_BYTES:
        raise CipherError(f"a ciphertext of {len(ciphertext)} bytes is no whole number of blocks")
    return _run(key, iv, ciphertext, decrypting=True)


#: The longest input: EVP takes its length as a C int (ctypes would wrap a longer one
#: round silently), with room for the padding block.
MAX_INPUT_BYTES = 2**31 - 1 - 2 * BLOCK_BYTES


def _run(key: bytes, iv: bytes, data: bytes, *, decrypting: bool) -> bytes:
    if len(key) != KEY_BYTES or len(iv) != BLOCK_BYTES:
        raise CipherError(f"AES-128-CBC takes a {KEY_BYTES}-byte key and a {BLOCK_BYTES}-byte IV")
    if len(data) > MAX_INPUT_BYTES:
        raise CipherError(f"{len(data)} bytes is more than AES-128-CBC here takes at once")
    evp = _evp()
    init, update, final = (
        (evp.decrypt_init, evp.decrypt_update, evp.decrypt_final)
        if decrypting
        else (evp.encrypt_init, evp.encrypt_update, evp.encrypt_final)
    )
    out = ctypes.create_string_buffer(len(data) + 2 * BLOCK_BYTES)
    written, tail = ctypes.c_int(0), ctypes.c_int(0)
    ctx = evp.ctx_new()
    if not ctx:
        raise MemoryError("EVP_CIPHER_CTX_new failed")
    try:
        if init(ctx, evp.aes_128_cbc(), None, key, iv) != 1:
            raise NoLibcrypto("EVP cipher init failed for AES-128-CBC")
        start = ctypes.addressof(out)
        if update(ctx, start, ctypes.byref(written), data, len(data)) != 1:
            # Whole blocks of a checked length: no input of ours makes this fail.
            raise NoLibcrypto("EVP cipher update failed")
        if final(ctx, start + written.value, ctypes.byref(tail)) != 1:
            raise CipherError("bad padding" if decrypting else "EVP cipher final failed")
    finally:
        evp.ctx_free(ctx)
        # A failure leaves its reason in this thread's OpenSSL error queue, where the
        # ssl module's next error report would find it.
        evp.err_clear()
    return out.raw[: written.value + tail.value]
