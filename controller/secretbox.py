"""Secrets at rest: the declared secret fields of specs and defaults (botspec.spec's
``SECRET_PATHS``), sealed with Fernet (controller/fernet.py) before they reach PostgreSQL.

The key comes from ``TGFLEET_SECRET_KEY`` or ``<home>/secret.key`` (0600, made on
first start). Either may hold several keys, newest first (comma- or line-separated):
the first seals, every one opens, so a rotation never leaves a row unreadable.
A sealed value is a string ``tgfleet-sealed:v1:<Fernet token>``; a value without
the mark is clear text from before sealing and is sealed on the next start.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from botspec.spec import SECRET_PATHS
from controller import fernet, libcrypto
from controller.atomicfile import write_atomic
from controller.home import Home

SEALED = "tgfleet-sealed:v1:"
ENV_KEY = "TGFLEET_SECRET_KEY"
_PATHS = tuple(tuple(path.split(".")) for path in SECRET_PATHS)


class SecretKeyError(Exception):
    """No usable key, or a sealed value that none of the keys opens."""


def is_sealed(value: object) -> bool:
    return isinstance(value, str) and value.startswith(SEALED)


def map_secrets(value: Mapping[str, Any], change: Callable[[Any], Any]) -> dict[str, Any]:
    """``value`` (a spec or the defaults) with ``change`` applied to each declared
    secret it holds; everything else as it was."""
    copied = dict(value)
    for path in _PATHS:
        _map_at(copied, path, change)
    return copied


def _map_at(value: dict[str, Any], path: tuple[str, ...], change: Callable[[Any], Any]) -> None:
    key, *rest = path
    if key not in value:
        return
    if not rest:
        if value[key] is not None:
            value[key] = change(value[key])
        return
    inner = value[key]
    if isinstance(inner, dict):
        value[key] = dict(inner)
        _map_at(value[key], tuple(rest), change)


def new_key() -> str:
    return fernet.generate_key()


@dataclass(frozen=True)
class SecretBox:
    """Seals and opens secret values; ``keys`` newest first."""

    keys: tuple[str, ...]
    source: str  # where the keys came from, for messages
    _parsed: tuple[fernet.FernetKey, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.keys:
            raise SecretKeyError(f"{self.source} holds no key")
        try:
            parsed = tuple(fernet.FernetKey.parse(key) for key in self.keys)
        except ValueError as exc:
            raise SecretKeyError(
                f"{self.source} holds something that is no Fernet key "
                "(32 url-safe base64-encoded bytes)"
            ) from exc
        object.__setattr__(self, "_parsed", parsed)

    @classmethod
    def parse(cls, text: str, source: str) -> SecretBox:
        keys = tuple(k.strip() for k in text.replace(",", "\n").splitlines() if k.strip())
        return cls(keys, source)

    @classmethod
    def load(cls, home: Home, environ: Mapping[str, str] = os.environ) -> SecretBox:
        """The keys from ``TGFLEET_SECRET_KEY``, else ``<home>/secret.key`` (made, 0600,
        with a new key if it does not exist)."""
        if environ.get(ENV_KEY, "").strip():
            box = cls.parse(environ[ENV_KEY], ENV_KEY)
        else:
            path = home.secret_key
            if not path.exists():
                write_atomic(path, new_key() + "\n", 0o600)
            box = cls.parse(path.read_text(encoding="utf-8"), str(path))
        box.check_cipher()
        return box

    def check_cipher(self) -> None:
        """Seal and open once: a Python whose libcrypto cannot be reached fails here, at
        start, not at the first bot created."""
        try:
            fernet.decrypt(self._parsed[:1], fernet.encrypt(self._parsed[0], b"check"))
        except libcrypto.NoLibcrypto as exc:
            raise SecretKeyError(
                f"secrets cannot be sealed: {exc}. tgfleet needs a Python whose ssl module "
                "uses OpenSSL's libcrypto as a shared library (Debian's, pyenv's, the "
                "python.org builds do)"
            ) from None

    @property
    def from_file(self) -> bool:
        return self.source != ENV_KEY

    def with_new_key(self) -> SecretBox:
        """This box with a fresh key first (it seals from now on; the old ones still open)."""
        return SecretBox((new_key(), *self.keys), self.source)

    def newest_only(self) -> SecretBox:
        return SecretBox(self.keys[:1], self.source)

    def seal(self, value: Any) -> Any:
        """A clear string sealed with the newest key; sealed values and non-strings as they are."""
        if not isinstance(value, str) or is_sealed(value):
            return value
        return SEALED + fernet.encrypt(self._parsed[0], value.encode())

    def open(self, value: Any) -> Any:
        """A sealed value opened; clear text (from before sealing) as it is."""
        if not is_sealed(value):
            return value
        try:
            return fernet.decrypt(self._parsed, value[len(SEALED) :]).decode()
        except fernet.InvalidToken:
            raise SecretKeyError(
                f"a secret in the database does not open with the key from {self.source}: "
                "the wrong key, or one removed too early after a rotation"
            ) from None

    def reseal(self, value: Any) -> Any:
        """A value sealed with the newest key, whatever sealed it before (or clear)."""
        return self.seal(self.open(value))

    def seal_all(self, spec: Mapping[str, Any]) -> dict[str, Any]:
        return map_secrets(spec, self.seal)

    def open_all(self, spec: Mapping[str, Any]) -> dict[str, Any]:
        return map_secrets(spec, self.open)

    def reseal_all(self, spec: Mapping[str, Any]) -> dict[str, Any]:
        return map_secrets(spec, self.reseal)

    def write(self, home: Home) -> None:
        """Keep these keys in <home>/secret.key (0600), newest first."""
        write_atomic(home.secret_key, "\n".join(self.keys) + "\n", 0o600)
