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
        validate_defaults({"token": TOKEN}, {})
    assert "token" in fields_of(exc)


def test_effective_merges_bot_over_defaults_over_builtins() -> None:
    defaults = {
        "memory_limit_mb": 300,
        "telegram": {"api_id": 5, "api_hash": "h"},
        "settings": {"a": 1},
    }
    own = {"token": TOKEN, "telegram": {"api_id": 7}, "settings": {"b": 2}}
    spec = effective(own, defaults)
    assert spec.telegram.api_id == 7
    assert spec.telegram.api_hash == "h"
    assert spec.memory_limit_mb == 300
    assert spec.settings == {"a": 1, "b": 2}
    assert spec.autostart is True


def test_public_view_hides_secrets() -> None:
    view = public_view({"token": TOKEN, "settings": {}, "telegram": {"api_id": 5, "api_hash": "h"}})
    assert "token" not in view
    assert view["credential"] == "token"
    assert view["telegram"] == {"api_id": 5}


@pytest.mark.parametrize(
    ("pem", "fragment"),
    [
        ("hello", "must be a PKCS#1 PEM"),
        ("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n", "must be a PKCS#1 PEM"),
        (
            "-----BEGIN RSA PUBLIC KEY-----\nAAAA\n-----END RSA PUBLIC KEY-----\n",
            "content is not PKCS#1",
        ),
        ("-----BEGIN RSA PUBLIC KEY-----\nAAAA\n", "end marker"),
        ("-----BEGIN RSA PUBLIC KEY-----\n!!\n-----END RSA PUBLIC KEY-----\n", "base64"),
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


def test_defaults_keep_the_write_only_api_hash_unless_it_is_removed() -> None:
    current = {"telegram": {"api_id": 5, "api_hash": "h"}}
    assert validate_defaults({"telegram": {"api_id": 6}}, current) == {
        "telegram": {"api_id": 6, "api_hash": "h"}
    }
    assert validate_defaults({"telegram": {"api_id": 6, "api_hash": None}}, current) == {
        "telegram": {"api_id": 6, "api_hash": None}
    }


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"health": None}, "health"),
        ({"memory_limit_mb": None}, "memory_limit_mb"),
        ({"health": {"bogus": 1}}, "health.bogus"),
        ({"health": {"probe_interval_s": 0.49}}, "health.probe_interval_s"),
        ({"health": {"probe_interval_s": 300.01}}, "health.probe_interval_s"),
        ({"memory_limit_mb": 127}, "memory_limit_mb"),
        ({"memory_limit_mb": 65537}, "memory_limit_mb"),
        ({"memory_limit_mb": 256.5}, "memory_limit_mb"),
        ({"graceful_timeout_s": 60.001}, "graceful_timeout_s"),
        ({"subscribe": ["ok", "not ok"]}, "subscribe[1]"),
        ({"plugins": ["a:b"] * 33}, "plugins"),
        (
            {"telegram": {"server": {"host": "h", "port": 1, "dc_id": 1001, "public_key": "x"}}},
            "telegram.server.dc_id",
        ),
    ],
)
def test_defaults_refuse_each_wrong_field_by_name(body: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidSpec) as exc:
        validate_defaults(body, {})
    assert field in fields_of(exc), fields_of(exc)


def test_every_wrong_field_is_named_at_once() -> None:
    with pytest.raises(InvalidSpec) as exc:
        validate_create(
            {
                "name": "Bad Name",
                "token": "nope",
                "memory_limit_mb": "lots",
                "health": {"bogus": 1, "max_restarts": 0.5, "probe_timeout_s": -1},
                "telegram": {"api_id": "x"},
            }
        )
    assert set(fields_of(exc)) >= {
        "name",
        "token",
        "memory_limit_mb",
        "health.bogus",
        "health.max_restarts",
        "health.probe_timeout_s",
        "telegram.api_id",
    }


@pytest.mark.parametrize(
    "name", ["bot\u00e9", "bot\x00", "bot\n", "b\u200bot", "\uff22\uff2f\uff34", "bot\t"]
)
def test_unicode_and_control_characters_in_names_are_refused(name: str) -> None:
    with pytest.raises(InvalidSpec) as exc:
        validate_create({"name": name, "token": TOKEN})
    assert "name" in fields_of(exc)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": "shop", "token": TOKEN, "settings": {"a": "x\x00y"}}, "settings.a"),
        ({"name": "shop", "token": TOKEN, "settings": {"k\x00": 1}}, "settings.k\x00"),
        ({"name": "shop", "token": TOKEN, "settings": {"a": ["\ud800"]}}, "settings.a[0]"),
        ({"name": "shop", "session": "abc\x00"}, "session"),
    ],
)
def test_what_postgresql_cannot_store_is_refused(body: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidSpec) as exc:
        validate_create(body)
    assert field in fields_of(exc), fields_of(exc)
