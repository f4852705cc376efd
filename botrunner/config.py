"""The bot's runtime config: ``<home>/bots/<name>/config.json``, read once, then trusted.

The format is fixed in docs/internals.md. Parsing is by hand into frozen
dataclasses (no pydantic in the bot process: it costs memory times the number of bots),
and every refusal names its key and its reason, all of them in one message.
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,31}$")
TOKEN_RE = re.compile(r"^[0-9]{1,20}:[A-Za-z0-9_-]{1,128}$")
PLUGIN_RE = re.compile(
    r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$"
)
TOPIC_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
ENDPOINT_RE = re.compile(r"^(ipc|tcp)://\S+$")
MAX_CONFIG_BYTES = 1024 * 1024

KNOWN_KEYS = (
    "name",
    "generation",
    "data_dir",
    "bus_endpoint",
    "token",
    "session",
    "plugins",
    "settings",
    "telegram",
    "health",
    "subscribe",
    "graceful_timeout_s",
)


class ConfigError(Exception):
    """The config file cannot be read or does not describe a bot; exit code 78."""


@dataclass(frozen=True)
class ServerOverride:
    """A Telegram server other than the real one (the local sandbox)."""

    host: str
    port: int
    dc_id: int
    public_key: str  # PKCS#1 PEM


@dataclass(frozen=True)
class TelegramConfig:
    api_id: int
    api_hash: str
    server: ServerOverride | None


@dataclass(frozen=True)
class HealthConfig:
    heartbeat_interval_s: float = 2.0
    probe_interval_s: float = 5.0
    probe_timeout_s: float = 5.0
    connect_timeout_s: float = 10.0


@dataclass(frozen=True)
class PluginRef:
    """``module:function`` of one plugin's setup."""

    module: str
    function: str

    def __str__(self) -> str:
        return f"{self.module}:{self.function}"


@dataclass(frozen=True)
class BotConfig:
    name: str
    generation: int
    data_dir: Path
    bus_endpoint: str
    token: str | None  # exactly one of token and session is set
    session: str | None
    plugins: tuple[PluginRef, ...]
    settings: Mapping[str, Any]
    telegram: TelegramConfig
    health: HealthConfig
    subscribe: tuple[str, ...]
    graceful_timeout_s: float = 5.0
    ignored_keys: tuple[str, ...] = ()  # unknown top-level keys, logged at startup


_HEALTH_RANGES: dict[str, tuple[float, float]] = {
    "heartbeat_interval_s": (0.05, 300.0),
    "probe_interval_s": (0.05, 3600.0),
    "probe_timeout_s": (0.05, 300.0),
    "connect_timeout_s": (0.05, 600.0),
}


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> TypeGuard[float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def public_key_problem(pem: str) -> str | None:
    """Why Telethon could not load ``pem`` as a server key (``telethon.crypto.rsa.add_key``
    loads it with the small ``rsa`` package), or None. The controller checks specs
    with it too, so a key it accepts is one the bot can load."""
    import rsa
    from pyasn1.error import PyAsn1Error

    if "-----BEGIN RSA PUBLIC KEY-----" not in pem:
        return "must be a PKCS#1 PEM ('-----BEGIN RSA PUBLIC KEY-----'), as Telethon loads it"
    try:
        rsa.PublicKey.load_pkcs1(pem.encode())
    except (ValueError, IndexError, TypeError):
        return "is not an RSA public key: its markers or its base64 are broken"
    except PyAsn1Error:
        return "is not an RSA public key: its content is not PKCS#1"
    return None


class _Problems:
    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, key: str, why: str) -> None:
        self.items.append(f"{key}: {why}")


def _server(value: object, problems: _Problems) -> ServerOverride | None:
    key = "telegram.server"
    if value is None:
        return None
    if not isinstance(value, dict):
        problems.add(key, "must be an object or null")
        return None
    host, port, dc_id, pem = (value.get(k) for k in ("host", "port", "dc_id", "public_key"))
    before = len(problems.items)
    if not isinstance(host, str) or not re.fullmatch(r"[A-Za-z0-9.:-]{1,253}", host):
        problems.add(f"{key}.host", "must be a host name or IP address")
    if not _is_int(port) or not 1 <= port <= 65535:
        problems.add(f"{key}.port", "must be an integer from 1 to 65535")
    if not _is_int(dc_id) or not 1 <= dc_id <= 1000:
        problems.add(f"{key}.dc_id", "must be an integer from 1 to 1000")
    if not isinstance(pem, str):
        problems.add(f"{key}.public_key", "must be a string (PKCS#1 PEM)")
    elif why := public_key_problem(pem):
        problems.add(f"{key}.public_key", why)
    valid = len(problems.items) == before
    if (
        valid
        and isinstance(host, str)
        and _is_int(port)
        and _is_int(dc_id)
        and isinstance(pem, str)
    ):
        return ServerOverride(host=host, port=port, dc_id=dc_id, public_key=pem)
    return None


def _telegram(value: object, problems: _Problems) -> TelegramConfig | None:
    if not isinstance(value, dict):
        problems.add("telegram", "must be an object with api_id, api_hash and server")
        return None
    api_id = value.get("api_id")
    api_hash = value.get("api_hash")
    before = len(problems.items)
    if not _is_int(api_id) or api_id <= 0:
        problems.add("telegram.api_id", "must be a positive integer")
    if not isinstance(api_hash, str) or not api_hash:
        problems.add("telegram.api_hash", "must be a non-empty string")
    server = _server(value.get("server"), problems)
    if len(problems.items) == before and _is_int(api_id) and isinstance(api_hash, str):
        return TelegramConfig(api_id=api_id, api_hash=api_hash, server=server)
    return None


def _health(value: object, problems: _Problems) -> HealthConfig:
    if value is None:
        return HealthConfig()
    if not isinstance(value, dict):
        problems.add("health", "must be an object")
        return HealthConfig()
    numbers: dict[str, float] = {}
    for key, (low, high) in _HEALTH_RANGES.items():
        if key not in value:
            continue
        number = value[key]
        if not _is_number(number) or not low <= number <= high:
            problems.add(f"health.{key}", f"must be a number of seconds from {low} to {high}")
        else:
            numbers[key] = float(number)
    return HealthConfig(**numbers)


def _plugins(value: object, problems: _Problems) -> tuple[PluginRef, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        problems.add("plugins", "must be a list of 'module:function' strings")
        return ()
    refs = []
    for index, ref in enumerate(value):
        if not isinstance(ref, str) or not PLUGIN_RE.fullmatch(ref):
            problems.add(
                f"plugins[{index}]", "must be 'module:function', e.g. 'mybot.handlers:setup'"
            )
            continue
        module, _, function = ref.partition(":")
        refs.append(PluginRef(module, function))
    return tuple(refs)


def _subscribe(value: object, problems: _Problems) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(
        isinstance(t, str) and TOPIC_RE.fullmatch(t) for t in value
    ):
        problems.add("subscribe", "must be a list of topic names ([A-Za-z0-9_.:-], 1 to 64)")
        return ()
    return tuple(value)


def _credentials(raw: Mapping[str, Any], problems: _Problems) -> tuple[str | None, str | None]:
    token = raw.get("token")
    session = raw.get("session")
    if token is None and session is None:
        problems.add("token", "one of token and session is required")
    elif token is not None and session is not None:
        problems.add("session", "give either token or session, not both")
    if token is not None and (not isinstance(token, str) or not TOKEN_RE.fullmatch(token)):
        # never echo the value: it is a secret
        problems.add("token", "must look like '<bot id>:<secret>'")
        token = None
    if session is not None and (not isinstance(session, str) or not session):
        problems.add("session", "must be a non-empty Telethon string session")
        session = None
    return token, session


def parse_config(raw: object) -> BotConfig:
    """The bot config in ``raw`` (parsed JSON), or ConfigError naming every bad key."""
    if not isinstance(raw, dict):
        raise ConfigError("the config must be a JSON object")
    problems = _Problems()

    name = raw.get("name")
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        problems.add("name", "must match ^[a-z][a-z0-9-]{0,31}$")
    generation = raw.get("generation", 0)
    if not _is_int(generation) or generation < 0:
        problems.add("generation", "must be a non-negative integer")
    data_dir = raw.get("data_dir")
    if not isinstance(data_dir, str) or not os.path.isabs(data_dir):
        problems.add("data_dir", "must be an absolute path")
    endpoint = raw.get("bus_endpoint")
    if not isinstance(endpoint, str) or not ENDPOINT_RE.fullmatch(endpoint):
        problems.add("bus_endpoint", "must be a ZeroMQ endpoint, ipc://… or tcp://…")
    token, session = _credentials(raw, problems)
    plugins = _plugins(raw.get("plugins"), problems)
    settings = raw.get("settings", {})
    if settings is None:
        settings = {}
    if not isinstance(settings, dict):
        problems.add("settings", "must be an object")
    telegram = _telegram(raw.get("telegram"), problems)
    health = _health(raw.get("health"), problems)
    subscribe = _subscribe(raw.get("subscribe"), problems)
    graceful = raw.get("graceful_timeout_s", 5.0)
    if not _is_number(graceful) or not 1 <= graceful <= 600:
        problems.add("graceful_timeout_s", "must be a number of seconds from 1 to 600")

    if problems.items:
        raise ConfigError("; ".join(problems.items))
    assert telegram is not None  # a None telegram always adds a problem
    return BotConfig(
        name=str(name),
        generation=int(generation),
        data_dir=Path(str(data_dir)),
        bus_endpoint=str(endpoint),
        token=token,
        session=session,
        plugins=plugins,
        settings=dict(settings),
        telegram=telegram,
        health=health,
        subscribe=subscribe,
        graceful_timeout_s=float(graceful),
        ignored_keys=tuple(sorted(k for k in raw if k not in KNOWN_KEYS)),
    )


def check_private(path: Path, st: os.stat_result) -> None:
    """Refuse a config file that others may read: it holds the bot's secrets."""
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{path} is not a regular file")
    if st.st_mode & 0o077:
        raise ConfigError(
            f"{path} has mode {stat.S_IMODE(st.st_mode):04o}; it holds secrets, "
            "it must be readable by its owner only (chmod 600)"
        )


def load_config(path: Path) -> BotConfig:
    """Read, check and parse the config file; ConfigError says what is wrong, in one line."""
    try:
        with open(path, "rb") as config_file:
            check_private(path, os.fstat(config_file.fileno()))
            data = config_file.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path} is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        raw = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"{path} is not UTF-8 JSON: {exc}") from exc
    try:
        return parse_config(raw)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
