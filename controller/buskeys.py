"""The bus's CURVE keys on disk: the controller's key pair and each bot's public keys.

A bot proves who it is on the bus with a secret key that only its own
``config.json`` holds. The controller never keeps a bot's secret key: it
generates a new pair each time it writes the bot's config, puts the secret
into that file and keeps the public key here, so that the bus can tell, from
the key a peer proved, which bot it is.

Each bot's file holds its current public key and the one before it: the
process that is still running when its config is rewritten (until the reload
restarts it) may reconnect meanwhile, e.g. after a controller restart, and is
the same bot. Destroying a bot forgets both; a recreated bot gets a new pair.

The controller's own pair is rotated by deleting ``bus.key`` while the fleet is
stopped: the next start makes a new pair and forgets every bot's keys, so every bot
is written again with the new controller key and restarted.

Writes come from the thread that writes a bot's files; lookups from the bus's
authenticator on the event loop: each write swaps in a new lookup table whole.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import zmq

from controller.atomicfile import write_atomic
from controller.home import Home

log = logging.getLogger(__name__)


class BusKeyError(Exception):
    """A key file under the home dir cannot be read as one."""


@dataclass(frozen=True)
class IssuedKey:
    """What a bot's config gets: its own secret key and the controller's public key (Z85)."""

    secret_key: str
    server_key: str


@dataclass(frozen=True)
class _BotKeys:
    current: bytes
    previous: bytes | None

    def to_json(self) -> str:
        previous = None if self.previous is None else self.previous.decode()
        return json.dumps({"current": self.current.decode(), "previous": previous}) + "\n"


def _read_json(path: Path) -> dict[str, object]:
    try:
        data = json.loads(path.read_bytes())
    except (UnicodeDecodeError, ValueError) as exc:
        raise BusKeyError(f"{path} is not a JSON key file: {exc}") from exc
    if not isinstance(data, dict):
        raise BusKeyError(f"{path} is not a JSON object")
    return data


def _key(data: dict[str, object], field: str, path: Path) -> bytes:
    value = data.get(field)
    if not isinstance(value, str) or len(value) != 40:
        raise BusKeyError(f"{path}: {field} is not a Z85 CURVE key")
    return value.encode()


class BusKeys:
    """The keyring of one home: ``issue`` a bot's pair, ``forget`` it, ``bot_of`` a key."""

    def __init__(self, home: Home, server_public: bytes, server_secret: bytes) -> None:
        self.home = home
        self.server_public_key = server_public
        self.server_secret_key = server_secret
        self._lock = threading.Lock()
        self._bots: dict[str, _BotKeys] = {}
        self._owners: dict[bytes, str] = {}

    @classmethod
    def open(cls, home: Home) -> BusKeys:
        """The home's keyring; the controller's pair is created on first use (0600)."""
        home.bus_keys_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        home.bus_keys_dir.chmod(0o700)
        try:
            data = _read_json(home.bus_key)
        except FileNotFoundError:
            public, secret = zmq.curve_keypair()
            pair = {"public_key": public.decode(), "secret_key": secret.decode()}
            write_atomic(home.bus_key, json.dumps(pair) + "\n", 0o600)
            # A new controller key (first start, or bus.key deleted to rotate it): the
            # bots' configs name the old one, so every bot gets its files written again
            # (a bot without keys is rendered anew) and, its watcher changed, restarts.
            stale = sorted(home.bus_keys_dir.glob("*.json"))
            for path in stale:
                path.unlink()
            if stale:
                log.warning("bus: a new controller key; %d bots get new keys", len(stale))
        else:
            public = _key(data, "public_key", home.bus_key)
            secret = _key(data, "secret_key", home.bus_key)
            if zmq.curve_public(secret) != public:
                raise BusKeyError(f"{home.bus_key}: the public key is not the secret key's")
        keys = cls(home, public, secret)
        for path in sorted(home.bus_keys_dir.glob("*.json")):
            data = _read_json(path)
            previous = None if data.get("previous") is None else _key(data, "previous", path)
            keys._bots[path.stem] = _BotKeys(_key(data, "current", path), previous)
        keys._reindex()
        return keys

    def _reindex(self) -> None:
        owners = {}
        for name, pair in self._bots.items():
            owners[pair.current] = name
            if pair.previous is not None:
                owners[pair.previous] = name
        self._owners = owners  # one assignment: readers see the old table or the new one

    @property
    def server_key_id(self) -> str:
        """A short fingerprint of the controller's public key (hex, safe in any file)."""
        return hashlib.sha256(self.server_public_key).hexdigest()[:16]

    def bot_of(self, public_key: bytes) -> str | None:
        """The bot whose (Z85) public key this is, None for a key of no bot."""
        return self._owners.get(public_key)

    def has(self, name: str) -> bool:
        return name in self._bots

    def issue(self, name: str) -> IssuedKey:
        """A new key pair for ``name``: its public key kept (with the one before it),
        written before the caller writes the secret into the bot's config."""
        public, secret = zmq.curve_keypair()
        with self._lock:
            old = self._bots.get(name)
            pair = _BotKeys(public, old.current if old is not None else None)
            write_atomic(self.home.bus_public_keys(name), pair.to_json(), 0o600)
            self._bots[name] = pair
            self._reindex()
        return IssuedKey(secret.decode(), self.server_public_key.decode())

    def forget(self, name: str) -> None:
        """The bot is destroyed: no key of it opens the bus any more."""
        with self._lock:
            self.home.bus_public_keys(name).unlink(missing_ok=True)
            if self._bots.pop(name, None) is not None:
                self._reindex()
                log.info("bus: forgot the keys of %s", name)
