"""The bot's runtime config, ``<home>/bots/<name>/config.json``: one dump, one parse.

The controller builds a ``BotConfig`` from a bot's effective spec and writes it
with ``dump``; the bot reads it with ``parse``. The field types are those of
``botspec.spec``, so the two sides cannot disagree on a range or a default.
Keys the bot does not know are ignored (a newer controller may add some).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Annotated, Any, NoReturn

import msgspec
from msgspec import Meta, Struct

from botspec.spec import (
    ApiHash,
    ApiId,
    GracefulTimeout,
    Name,
    Plugins,
    ProcessHealth,
    Server,
    Session,
    Settings,
    Token,
    Topics,
)
from botspec.validate import FieldError, check_struct, public_key_problem

MAX_CONFIG_BYTES = 1024 * 1024
ENDPOINT_PATTERN = r"^(ipc|tcp)://\S+$"
#: A CURVE key as ZeroMQ writes it: 32 bytes in Z85, 40 characters.
CURVE_KEY_PATTERN = r"^[0-9a-zA-Z.:+=^!/*?&<>()\[\]{}@%$#-]{40}$"

CurveKey = Annotated[
    str,
    Meta(
        pattern=CURVE_KEY_PATTERN,
        extra={"must": "must be a CURVE key: 40 characters of Z85"},
    ),
]


class ConfigError(Exception):
    """The config does not describe a bot; the text names every bad key."""


class RuntimeTelegram(Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """The bot's Telegram settings, complete (the controller refuses a bot without them)."""

    api_id: ApiId
    api_hash: ApiHash
    server: Server | None = None


class BotConfig(Struct, frozen=True, kw_only=True):
    """What one bot process runs with."""

    name: Name
    generation: Annotated[int, Meta(ge=0)] = 0
    data_dir: Annotated[str, Meta(min_length=1, extra={"must": "must be an absolute path"})]
    bus_endpoint: Annotated[
        str,
        Meta(
            pattern=ENDPOINT_PATTERN,
            extra={"must": "must be a ZeroMQ endpoint, ipc://… or tcp://…"},
        ),
    ]
    # The bus is CURVE: this bot's own secret key (its public key derives from it)
    # and the controller's public key. A new pair each time the file is written.
    bus_secret_key: CurveKey
    bus_server_key: CurveKey
    token: Token | None = None
    session: Session | None = None
    plugins: Plugins = ()
    settings: Settings = {}
    telegram: RuntimeTelegram
    health: ProcessHealth = ProcessHealth()
    subscribe: Topics = ()
    graceful_timeout_s: GracefulTimeout = 5.0


@dataclass(frozen=True)
class PluginRef:
    """``module:function`` of one plugin's setup."""

    module: str
    function: str

    @classmethod
    def parse(cls, ref: str) -> PluginRef:
        module, _, function = ref.partition(":")
        return cls(module, function)

    def __str__(self) -> str:
        return f"{self.module}:{self.function}"


def dump(config: BotConfig) -> bytes:
    """The file's bytes (indented: operators read it when a bot will not start)."""
    return msgspec.json.format(msgspec.json.encode(config), indent=2) + b"\n"


def _semantic_errors(config: BotConfig) -> list[FieldError]:
    """What the types cannot say: credentials, an absolute dir, a loadable server key."""
    errors = []
    if config.token is None and config.session is None:
        errors.append(FieldError("token", "one of token and session is required"))
    elif config.token is not None and config.session is not None:
        errors.append(FieldError("session", "give either token or session, not both"))
    if not os.path.isabs(config.data_dir):
        errors.append(FieldError("data_dir", "must be an absolute path"))
    server = config.telegram.server
    if server is not None and (problem := public_key_problem(server.public_key)):
        errors.append(FieldError("telegram.server.public_key", problem))
    return errors


def _raise(errors: list[FieldError]) -> NoReturn:
    # Values are never echoed: some are secrets.
    raise ConfigError("; ".join(f"{e.field}: {e.message}" for e in errors))


def parse(data: bytes) -> BotConfig:
    """The config in ``data`` (UTF-8 JSON), or ConfigError naming every bad key."""
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        config = msgspec.json.decode(data, type=BotConfig)
    except msgspec.ValidationError:
        raw: Any = msgspec.json.decode(data)
        if not isinstance(raw, dict):
            raise ConfigError("the config must be a JSON object") from None
        errors: list[FieldError] = []
        known = {f.encode_name for f in msgspec.structs.fields(BotConfig)}
        check_struct(BotConfig, {k: v for k, v in raw.items() if k in known}, errors)
        _raise(errors or [FieldError("", "is not a bot config")])
    except msgspec.DecodeError as exc:
        raise ConfigError(f"is not UTF-8 JSON: {exc}") from None
    if errors := _semantic_errors(config):
        _raise(errors)
    return config
