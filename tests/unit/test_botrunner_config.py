"""The bot's config.json: what it accepts, and a precise refusal for each bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from botrunner.config import BotConfig, ConfigError, load_config
from botspec.config import parse


def parse_config(raw: object) -> BotConfig:
    return parse(json.dumps(raw).encode())


@pytest.fixture(scope="module")
def public_key() -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.PKCS1)
        .decode()
    )


def good(public_key: str = "") -> dict[str, Any]:
    return {
        "name": "shop",
        "generation": 3,
        "data_dir": "/abs/home/bots/shop",
        "bus_endpoint": "ipc:///abs/home/run/bus.sock",
        "bus_secret_key": "7:OCF@KH7PLv1M$d[5Owsyfkip51r]eyEKM3]gd[",
        "bus_server_key": "T:MSaAnV&im)8CVG^[f%*12h4016pQ]1&-@Vpu@z",
        "token": "1000001:secret",
        "session": None,
        "plugins": ["botrunner.plugins.echo:setup"],
        "settings": {"prefix": "echo: "},
        "telegram": {
            "api_id": 1,
            "api_hash": "sandbox",
            "server": None
            if not public_key
            else {"host": "127.0.0.1", "port": 8711, "dc_id": 2, "public_key": public_key},
        },
        "health": {
            "heartbeat_interval_s": 2.0,
            "probe_interval_s": 5.0,
            "probe_timeout_s": 5.0,
            "connect_timeout_s": 10.0,
        },
        "subscribe": ["orders"],
    }


def test_the_documented_example_parses(public_key: str) -> None:
    config = parse_config(good(public_key))
    assert isinstance(config, BotConfig)
    assert config.name == "shop"
    assert config.generation == 3
    assert config.data_dir == "/abs/home/bots/shop"
    assert config.token == "1000001:secret"
    assert config.session is None
    assert config.plugins == ("botrunner.plugins.echo:setup",)
    assert config.settings == {"prefix": "echo: "}
    assert config.telegram.server is not None
    assert config.telegram.server.port == 8711
    assert config.health.probe_timeout_s == 5.0
    assert config.subscribe == ("orders",)
    assert config.graceful_timeout_s == 5.0


def test_optional_keys_take_defaults() -> None:
    raw = good()
    for key in ("generation", "plugins", "settings", "health", "subscribe", "session"):
        del raw[key]
    config = parse_config(raw)
    assert config.generation == 0
    assert config.plugins == ()
    assert config.settings == {}
    assert config.health.heartbeat_interval_s == 2.0
    assert config.subscribe == ()


def test_unknown_keys_are_ignored_not_refused() -> None:
    raw = good()
    raw["memory_limit_mb"] = 256  # a newer controller may write keys this bot does not know
    assert parse_config(raw).name == "shop"


def test_a_session_instead_of_a_token() -> None:
    raw = good()
    raw["token"] = None
    raw["session"] = "1AbCdEf"
    config = parse_config(raw)
    assert (config.token, config.session) == (None, "1AbCdEf")


def _set(raw: dict[str, Any], path: str, value: Any) -> None:
    *parents, last = path.split(".")
    for key in parents:
        raw = raw[key]
    if value is _DELETE:
        del raw[last]
    else:
        raw[last] = value


class _Delete:
    """Marks a key to remove from the config (its repr names it in test ids)."""

    def __repr__(self) -> str:
        return "<deleted>"


_DELETE = _Delete()

BAD: list[tuple[str, Any, str]] = [
    ("name", "Shop", "name: must match"),
    ("name", _DELETE, "name: is required"),
    ("generation", -1, "generation: must be an integer of at least 0"),
    ("generation", True, "generation: must be an integer of at least 0"),
    ("data_dir", "relative/dir", "data_dir: must be an absolute path"),
    ("bus_endpoint", "http://x", "bus_endpoint: must be a ZeroMQ endpoint"),
    ("bus_secret_key", "x" * 39, "bus_secret_key: must be a CURVE key"),
    ("bus_server_key", _DELETE, "bus_server_key: is required"),
    ("token", None, "token: one of token and session is required"),
    ("token", "not a token", "token: must look like '<bot id>:<secret>'"),
    ("session", "1AbC", "session: give either token or session, not both"),
    ("plugins", "botrunner.plugins.echo:setup", "plugins: must be a list"),
    ("plugins", ["echo"], "plugins[0]: must be 'module:function'"),
    ("settings", [], "settings: must be an object"),
    ("telegram", None, "telegram: must be an object"),
    ("telegram.api_id", 0, "telegram.api_id: must be a positive integer"),
    ("telegram.api_id", "1", "telegram.api_id: must be a positive integer"),
    ("telegram.api_hash", "", "telegram.api_hash: must be a string of 1 to 128 characters"),
    ("telegram.server", "127.0.0.1:8711", "telegram.server: must be an object or null"),
    ("telegram.server.port", 70000, "telegram.server.port: must be an integer from 1 to 65535"),
    ("telegram.server.dc_id", 0, "telegram.server.dc_id: must be an integer from 1 to 1000"),
    ("telegram.server.host", "", "telegram.server.host: must be a host name"),
    ("telegram.server.public_key", 1, "telegram.server.public_key: must be a string"),
    ("telegram.server.public_key", "xyz", "telegram.server.public_key: must be a PKCS#1 PEM"),
    (
        "telegram.server.public_key",
        "-----BEGIN RSA PUBLIC KEY-----\nAAAA\n-----END RSA PUBLIC KEY-----\n",
        "telegram.server.public_key: is not an RSA public key: its content is not PKCS#1",
    ),
    ("health", 5, "health: must be an object"),
    ("health.probe_timeout_s", 0, "health.probe_timeout_s: must be a number from 0.5 to 60"),
    ("health.connect_timeout_s", "10", "health.connect_timeout_s: must be a number from 1 to 120"),
    ("health.heartbeat_interval_s", False, "health.heartbeat_interval_s: must be a number"),
    ("subscribe", ["has space"], "subscribe[0]: must be a topic name"),
    ("graceful_timeout_s", 0.5, "graceful_timeout_s: must be a number from 1 to 60"),
]


@pytest.mark.parametrize(("path", "value", "message"), BAD, ids=[f"{p}={v!r}" for p, v, _ in BAD])
def test_bad_configs_are_refused_precisely(
    public_key: str, path: str, value: Any, message: str
) -> None:
    raw = good(public_key)
    _set(raw, path, value)
    with pytest.raises(ConfigError) as refused:
        parse_config(raw)
    assert message in str(refused.value)


def test_every_problem_is_named_at_once() -> None:
    raw = good()
    raw["name"] = "Bad Name"
    raw["telegram"]["api_id"] = -1
    raw["health"]["probe_timeout_s"] = -1
    with pytest.raises(ConfigError) as refused:
        parse_config(raw)
    text = str(refused.value)
    assert "name:" in text and "telegram.api_id:" in text and "health.probe_timeout_s:" in text


def test_the_token_never_appears_in_the_error() -> None:
    raw = good()
    raw["token"] = "12345:has spaces and secrets"
    with pytest.raises(ConfigError) as refused:
        parse_config(raw)
    assert "secrets" not in str(refused.value)


def test_not_an_object() -> None:
    with pytest.raises(ConfigError, match="must be a JSON object"):
        parse_config([1, 2])


def _write(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def test_load_reads_a_private_file(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path / "config.json", json.dumps(good())))
    assert config.name == "shop"


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: d / "missing.json", "cannot read"),
        (lambda d: _write(d / "c.json", json.dumps(good()), 0o644), "has mode 0644"),
        (lambda d: _write(d / "c.json", "{not json"), "is not UTF-8 JSON"),
        (lambda d: _write(d / "c.json", '{"name": 1}'), "c.json: name: must match"),
        (lambda d: d, "Is a directory"),
    ],
    ids=["missing", "group-readable", "not-json", "invalid", "a-directory"],
)
def test_load_refuses_with_the_path_and_the_reason(tmp_path: Path, make: Any, message: str) -> None:
    path = make(tmp_path)
    with pytest.raises(ConfigError) as refused:
        load_config(path)
    assert message in str(refused.value)
    assert "\n" not in str(refused.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_load_refuses_an_unreadable_file(tmp_path: Path) -> None:
    path = _write(tmp_path / "c.json", json.dumps(good()), 0o000)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(path)
