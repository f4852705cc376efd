from typing import Any

import pytest

from controller.errors import InvalidSpec
from controller.spec import (
    effective,
    plugin_problem,
    public_view,
    validate_create,
    validate_defaults,
    validate_patch,
)

TOKEN = "1000001:abcdefABCDEF_-"


def fields_of(exc: pytest.ExceptionInfo[InvalidSpec]) -> dict[str, str]:
    return {e.field: e.message for e in exc.value.errors}


def test_minimal_bot() -> None:
    name, spec = validate_create({"name": "shop", "token": TOKEN})
    assert name == "shop"
    assert spec == {"token": TOKEN}


@pytest.mark.parametrize(
    ("body", "field", "fragment"),
    [
        ({"name": "Shop", "token": TOKEN}, "name", "must match"),
        ({"name": "1shop", "token": TOKEN}, "name", "must match"),
        ({"name": "a" * 33, "token": TOKEN}, "name", "must match"),
        ({"token": TOKEN}, "name", "is required"),
        ({"name": "shop"}, "token", "is required"),
        ({"name": "shop", "token": "nope"}, "token", "bot id"),
        ({"name": "shop", "token": TOKEN, "colour": "red"}, "colour", "unknown field"),
        ({"name": "shop", "token": TOKEN, "memory_limit_mb": -5}, "memory_limit_mb", "from 128"),
        ({"name": "shop", "token": TOKEN, "memory_limit_mb": True}, "memory_limit_mb", "integer"),
        (
            {"name": "shop", "token": TOKEN, "plugins": ["nosuchmod:setup"]},
            "plugins[0]",
            "no module",
        ),
        (
            {"name": "shop", "token": TOKEN, "plugins": ["no colon"]},
            "plugins[0]",
            "module:function",
        ),
        (
            {"name": "shop", "token": TOKEN, "plugins": ["botrunner.plugins.echo:nosuch"]},
            "plugins[0]",
            "no top-level 'nosuch'",
        ),
        ({"name": "shop", "token": TOKEN, "settings": []}, "settings", "object"),
        ({"name": "shop", "token": TOKEN, "session": "x"}, "session", "not both"),
        (
            {"name": "shop", "token": TOKEN, "telegram": {"api_id": 0}},
            "telegram.api_id",
            "positive",
        ),
        (
            {"name": "shop", "token": TOKEN, "telegram": {"server": {"host": "h"}}},
            "telegram.server.port",
            "required",
        ),
        (
            {"name": "shop", "token": TOKEN, "health": {"probe_timeout_s": 0}},
            "health.probe_timeout_s",
            "from",
        ),
        ({"name": "shop", "token": TOKEN, "autostart": "yes"}, "autostart", "true or false"),
    ],
)
def test_bad_create_names_field_and_reason(body: dict[str, Any], field: str, fragment: str) -> None:
    with pytest.raises(InvalidSpec) as exc:
        validate_create(body)
    found = fields_of(exc)
    assert field in found, found
    assert fragment in found[field]


def test_not_an_object() -> None:
    with pytest.raises(InvalidSpec, match="JSON object"):
        validate_create(["shop"])


def test_every_bad_field_is_reported_at_once() -> None:
    with pytest.raises(InvalidSpec) as exc:
        validate_create({"name": "X", "token": "bad", "memory_limit_mb": 1})
    assert set(fields_of(exc)) == {"name", "token", "memory_limit_mb"}


def test_importable_plugin_passes() -> None:
    assert plugin_problem("controller.spec:validate_create") is None


def test_patch_merges_objects_and_resets_fields() -> None:
    current = {"token": TOKEN, "settings": {"a": 1, "b": 2}, "memory_limit_mb": 256}
    new = validate_patch(
        current, {"settings": {"greeting": "hi", "b": None}, "memory_limit_mb": None}
    )
    assert new == {"token": TOKEN, "settings": {"a": 1, "greeting": "hi"}}


def test_patch_replaces_lists() -> None:
    current = {"token": TOKEN, "plugins": ["controller.spec:effective"]}
    new = validate_patch(current, {"plugins": []})
    assert new["plugins"] == []


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": "other"}, "name"),
        ({}, ""),
        ({"token": None}, "token"),
        ({"memory_limit_mb": 1}, "memory_limit_mb"),
    ],
)
def test_bad_patch(body: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidSpec) as exc:
        validate_patch({"token": TOKEN}, body)
    assert field in fields_of(exc)


def test_token_replaces_session() -> None:
    assert validate_patch({"session": "s"}, {"token": TOKEN}) == {"token": TOKEN}


def test_defaults_refuse_secrets() -> None:
    with pytest.raises(InvalidSpec) as exc:
        validate_defaults({"token": TOKEN})
    assert "token" in fields_of(exc)


def test_effective_merges_bot_over_defaults_over_builtins() -> None:
    defaults = {
        "memory_limit_mb": 300,
        "telegram": {"api_id": 5, "api_hash": "h"},
        "settings": {"a": 1},
    }
    own = {"token": TOKEN, "telegram": {"api_id": 7}, "settings": {"b": 2}}
    spec = effective(own, defaults)
    assert spec.api_id == 7
    assert spec.api_hash == "h"
    assert spec.memory_limit_mb == 300
    assert spec.settings == {"a": 1, "b": 2}
    assert spec.autostart is True


def test_public_view_hides_secrets() -> None:
    view = public_view({"token": TOKEN, "settings": {}})
    assert "token" not in view
    assert view["credential"] == "token"


@pytest.mark.parametrize(
    ("pem", "fragment"),
    [
        ("hello", "must be a PKCS#1 PEM"),
        ("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n", "must be a PKCS#1 PEM"),
        (
            "-----BEGIN RSA PUBLIC KEY-----\nAAAA\n-----END RSA PUBLIC KEY-----\n",
            "content is not PKCS#1",
        ),
        ("-----BEGIN RSA PUBLIC KEY-----\nAAAA\n", "markers or its base64"),
    ],
)
def test_server_public_key_is_checked_as_telethon_loads_it(pem: str, fragment: str) -> None:
    body = {
        "name": "shop",
        "token": TOKEN,
        "telegram": {"server": {"host": "127.0.0.1", "port": 8711, "dc_id": 2, "public_key": pem}},
    }
    with pytest.raises(InvalidSpec) as exc:
        validate_create(body)
    assert fragment in fields_of(exc)["telegram.server.public_key"]


def test_a_real_key_passes() -> None:
    import rsa

    pem = rsa.newkeys(512)[0].save_pkcs1().decode()
    server = {"host": "127.0.0.1", "port": 8711, "dc_id": 2, "public_key": pem}
    validate_create({"name": "shop", "token": TOKEN, "telegram": {"server": server}})
