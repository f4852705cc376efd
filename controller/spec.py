"""Bot specs: validation of API input, fleet defaults, and the effective spec of a bot.

A bot's own spec holds only the fields it was given; the fleet defaults (in the
database) fill the rest; built-in defaults fill what neither sets. Validation is
hand-written so that each refusal names its field and its reason precisely.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, TypeGuard

from botrunner.config import public_key_problem
from controller.errors import FieldError, InvalidSpec

NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,31}$")
TOKEN_RE = re.compile(r"^[0-9]{1,20}:[A-Za-z0-9_-]{1,128}$")
PLUGIN_RE = re.compile(
    r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$"
)
TOPIC_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")

MIN_MEMORY_MB = 128
MAX_MEMORY_MB = 65536
MAX_SETTINGS_BYTES = 64 * 1024

#: What a bot gets when neither it nor the fleet defaults say otherwise.
BUILTIN_DEFAULTS: dict[str, Any] = {
    "plugins": [],
    "settings": {},
    "memory_limit_mb": 512,
    "autostart": True,
    "graceful_timeout_s": 5.0,
    "subscribe": [],
    "telegram": {"api_id": None, "api_hash": None, "server": None},
    "health": {
        # Read by the bot process.
        "heartbeat_interval_s": 2.0,
        "probe_interval_s": 3.0,
        "probe_timeout_s": 3.0,
        "connect_timeout_s": 10.0,
        # Read by the controller's health checker (controller/health.py).
        "heartbeat_timeout_s": 10.0,
        "startup_timeout_s": 30.0,
        "disconnect_grace_s": 10.0,
        "backoff_base_s": 2.0,
        "backoff_cap_s": 120.0,
        "backoff_reset_s": 60.0,
        "max_restarts": 5,
        "restart_window_s": 60.0,
        "memory_soft_limit_mb": None,
    },
}

#: ``health`` keys the bot process reads (the rest are the controller's).
BOT_HEALTH_KEYS = (
    "heartbeat_interval_s",
    "probe_interval_s",
    "probe_timeout_s",
    "connect_timeout_s",
)

SECRET_FIELDS = ("token", "session")
DEFAULTABLE_FIELDS = tuple(BUILTIN_DEFAULTS)
BOT_FIELDS = (*SECRET_FIELDS, *DEFAULTABLE_FIELDS)

_HEALTH_RANGES: dict[str, tuple[float, float]] = {
    "heartbeat_interval_s": (0.2, 60.0),
    "probe_interval_s": (0.5, 300.0),
    "probe_timeout_s": (0.5, 60.0),
    "connect_timeout_s": (1.0, 120.0),
    "heartbeat_timeout_s": (1.0, 600.0),
    "startup_timeout_s": (5.0, 600.0),
    "disconnect_grace_s": (1.0, 600.0),
    "backoff_base_s": (0.1, 600.0),
    "backoff_cap_s": (1.0, 3600.0),
    "backoff_reset_s": (1.0, 86400.0),
    "max_restarts": (1, 1000),
    "restart_window_s": (1.0, 86400.0),
    "memory_soft_limit_mb": (64, 65536),
}
_HEALTH_INTEGERS = ("max_restarts",)


@dataclass(frozen=True)
class TelegramServer:
    host: str
    port: int
    dc_id: int
    public_key: str


@dataclass(frozen=True)
class EffectiveSpec:
    """Everything a bot runs with: its own spec over the fleet defaults over built-ins."""

    token: str | None
    session: str | None
    plugins: tuple[str, ...]
    settings: Mapping[str, Any]
    memory_limit_mb: int
    autostart: bool
    graceful_timeout_s: float
    subscribe: tuple[str, ...]
    api_id: int | None
    api_hash: str | None
    server: TelegramServer | None
    health: Mapping[str, float | None]


class _Errors:
    def __init__(self) -> None:
        self.items: list[FieldError] = []

    def add(self, field: str, message: str) -> None:
        self.items.append(FieldError(field, message))

    def raise_if_any(self, detail: str) -> None:
        if self.items:
            raise InvalidSpec(
                f"{detail}: " + "; ".join(f"{e.field}: {e.message}" for e in self.items), self.items
            )


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> TypeGuard[float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def plugin_problem(ref: str) -> str | None:
    """Why ``module:function`` cannot be loaded, or None if it can.

    The module is located without being executed (it may import Telethon and cost
    the controller memory); its source must define ``function`` at top level.
    """
    module_name, _, function = ref.partition(":")
    try:
        found = importlib.util.find_spec(module_name)
    except (ImportError, ValueError) as exc:  # a parent package is missing or broken
        return f"cannot import {module_name!r}: {exc}"
    if found is None:
        return f"no module named {module_name!r}"
    origin = found.origin
    if origin is None or not origin.endswith(".py"):
        return None  # a namespace or compiled module: trust it, the bot will report failure
    try:
        with open(origin, encoding="utf-8") as source_file:
            tree = ast.parse(source_file.read(), origin)
    except (OSError, SyntaxError, ValueError) as exc:
        return f"module {module_name!r} cannot be read: {exc}"
    for node in tree.body:
        names: list[str] = []
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names = [node.name]
        elif isinstance(node, ast.Assign):
            names = [t.id for t in node.targets if isinstance(t, ast.Name)]
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names = [node.target.id]
        elif isinstance(node, ast.ImportFrom | ast.Import):
            names = [(a.asname or a.name).split(".")[0] for a in node.names]
        if function in names:
            return None
    return f"module {module_name!r} has no top-level {function!r}"


def _check_telegram(value: object, errors: _Errors, prefix: str = "telegram") -> None:
    if not isinstance(value, dict):
        errors.add(prefix, "must be an object")
        return
    for key in value:
        if key not in ("api_id", "api_hash", "server"):
            errors.add(f"{prefix}.{key}", "unknown field (known: api_id, api_hash, server)")
    if (
        "api_id" in value
        and value["api_id"] is not None
        and (not _is_int(value["api_id"]) or value["api_id"] <= 0)
    ):
        errors.add(f"{prefix}.api_id", "must be a positive integer")
    if (
        "api_hash" in value
        and value["api_hash"] is not None
        and (not isinstance(value["api_hash"], str) or not 1 <= len(value["api_hash"]) <= 128)
    ):
        errors.add(f"{prefix}.api_hash", "must be a string of 1 to 128 characters")
    server = value.get("server")
    if server is None:
        return
    if not isinstance(server, dict):
        errors.add(f"{prefix}.server", "must be an object or null")
        return
    known = ("host", "port", "dc_id", "public_key")
    for key in server:
        if key not in known:
            errors.add(f"{prefix}.server.{key}", f"unknown field (known: {', '.join(known)})")
    for key in known:
        if key not in server:
            errors.add(f"{prefix}.server.{key}", "is required")
    host = server.get("host")
    if "host" in server and (
        not isinstance(host, str) or not re.fullmatch(r"[A-Za-z0-9.:-]{1,253}", host)
    ):
        errors.add(f"{prefix}.server.host", "must be a host name or IP address")
    port = server.get("port")
    if "port" in server and (not _is_int(port) or not 1 <= port <= 65535):
        errors.add(f"{prefix}.server.port", "must be an integer from 1 to 65535")
    dc_id = server.get("dc_id")
    if "dc_id" in server and (not _is_int(dc_id) or not 1 <= dc_id <= 1000):
        errors.add(f"{prefix}.server.dc_id", "must be an integer from 1 to 1000")
    pem = server.get("public_key")
    if "public_key" in server:
        problem = public_key_problem(pem) if isinstance(pem, str) else "must be a string"
        if problem:
            errors.add(f"{prefix}.server.public_key", problem)


def _check_field(key: str, value: object, errors: _Errors) -> None:
    """Check one spec field's value (not null)."""
    if key == "token":
        if not isinstance(value, str) or not TOKEN_RE.fullmatch(value):
            errors.add("token", "must look like '<bot id>:<secret>' (digits, a colon, letters)")
    elif key == "session":
        if not isinstance(value, str) or not 1 <= len(value) <= 8192:
            errors.add("session", "must be a Telethon string session of 1 to 8192 characters")
    elif key == "plugins":
        if not isinstance(value, list) or len(value) > 32:
            errors.add("plugins", "must be a list of at most 32 'module:function' strings")
            return
        for index, ref in enumerate(value):
            if not isinstance(ref, str) or not PLUGIN_RE.fullmatch(ref):
                errors.add(
                    f"plugins[{index}]", "must be 'module:function', e.g. 'mybot.handlers:setup'"
                )
                continue
            problem = plugin_problem(ref)
            if problem:
                errors.add(f"plugins[{index}]", problem)
    elif key == "settings":
        if not isinstance(value, dict):
            errors.add("settings", "must be an object")
        elif len(json.dumps(value)) > MAX_SETTINGS_BYTES:
            errors.add("settings", f"must be at most {MAX_SETTINGS_BYTES} bytes as JSON")
    elif key == "memory_limit_mb":
        if not _is_int(value) or not MIN_MEMORY_MB <= value <= MAX_MEMORY_MB:
            errors.add(
                "memory_limit_mb",
                f"must be an integer from {MIN_MEMORY_MB} to {MAX_MEMORY_MB} (MB)",
            )
    elif key == "autostart":
        if not isinstance(value, bool):
            errors.add("autostart", "must be true or false")
    elif key == "graceful_timeout_s":
        if not _is_number(value) or not 1 <= value <= 60:
            errors.add("graceful_timeout_s", "must be a number of seconds from 1 to 60")
    elif key == "subscribe":
        if not isinstance(value, list) or not all(
            isinstance(t, str) and TOPIC_RE.fullmatch(t) for t in value
        ):
            errors.add("subscribe", "must be a list of topic names ([A-Za-z0-9_.:-], 1 to 64)")
    elif key == "telegram":
        _check_telegram(value, errors)
    elif key == "health":
        if not isinstance(value, dict):
            errors.add("health", "must be an object")
            return
        for name, number in value.items():
            if name not in _HEALTH_RANGES:
                errors.add(f"health.{name}", f"unknown field (known: {', '.join(_HEALTH_RANGES)})")
                continue
            low, high = _HEALTH_RANGES[name]
            if number is None and name == "memory_soft_limit_mb":
                continue  # no soft limit
            if name in _HEALTH_INTEGERS and not _is_int(number):
                errors.add(f"health.{name}", f"must be an integer from {low} to {high}")
            elif not _is_number(number) or not low <= number <= high:
                errors.add(f"health.{name}", f"must be a number from {low} to {high}")


def _check_object(body: object, allowed: tuple[str, ...], errors: _Errors) -> dict[str, Any]:
    if not isinstance(body, dict):
        errors.add("", "the body must be a JSON object")
        return {}
    for key in body:
        if key not in allowed:
            errors.add(key, f"unknown field (known: {', '.join(allowed)})")
    return body


def validate_create(body: object) -> tuple[str, dict[str, Any]]:
    """The name and own spec of a bot to create, or InvalidSpec naming every bad field."""
    errors = _Errors()
    fields = _check_object(body, ("name", *BOT_FIELDS), errors)
    name = fields.get("name")
    if name is None:
        errors.add("name", "is required")
    elif not isinstance(name, str) or not NAME_RE.fullmatch(name):
        errors.add("name", "must match ^[a-z][a-z0-9-]{0,31}$ (lower-case letter first)")
    spec = {k: v for k, v in fields.items() if k in BOT_FIELDS and v is not None}
    for key, value in spec.items():
        _check_field(key, value, errors)
    if "token" not in spec and "session" not in spec:
        errors.add("token", "is required: a bot token (or 'session' for a user account)")
    if "token" in spec and "session" in spec:
        errors.add("session", "give either 'token' or 'session', not both")
    errors.raise_if_any("invalid bot")
    return str(name), spec


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7396 JSON merge patch: objects merge key by key, null removes, the rest replaces."""
    if not isinstance(patch, dict):
        return patch
    merged = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = merge_patch(merged.get(key), value)
    return merged


def validate_patch(current: Mapping[str, Any], body: object) -> dict[str, Any]:
    """The bot's new own spec after the JSON merge patch ``body`` (RFC 7396).

    Objects (``settings``, ``telegram``, ``health``) merge key by key; null removes
    a key, and a top-level null resets the field to the fleet default.
    """
    errors = _Errors()
    fields = _check_object(body, BOT_FIELDS, errors)
    if isinstance(body, dict) and "name" in body:
        errors.items = [e for e in errors.items if e.field != "name"]
        errors.add("name", "cannot be changed; create a new bot instead")
    if isinstance(body, dict) and not body:
        errors.add("", "nothing to change: give at least one field")
    patch = {k: v for k, v in fields.items() if k in BOT_FIELDS}
    for key in SECRET_FIELDS:
        if key in patch and patch[key] is None:
            errors.add(key, "cannot be null; set the other credential to replace it")
    if patch.get("token") is not None and patch.get("session") is not None:
        errors.add("session", "give either 'token' or 'session', not both")
    new: dict[str, Any] = merge_patch(dict(current), patch)
    if patch.get("token") is not None:
        new.pop("session", None)
    elif patch.get("session") is not None:
        new.pop("token", None)
    for key in patch:
        if key in new:
            _check_field(key, new[key], errors)
    errors.raise_if_any("invalid change")
    return new


def validate_defaults(body: object) -> dict[str, Any]:
    """Fleet defaults: any defaultable field (no secrets, no name)."""
    errors = _Errors()
    fields = _check_object(body, DEFAULTABLE_FIELDS, errors)
    clean = {k: v for k, v in fields.items() if k in DEFAULTABLE_FIELDS and v is not None}
    for key, value in clean.items():
        _check_field(key, value, errors)
    errors.raise_if_any("invalid defaults")
    return clean


def _merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def effective(own: Mapping[str, Any], fleet_defaults: Mapping[str, Any]) -> EffectiveSpec:
    """A bot's effective spec: its own fields over the fleet defaults over the built-ins."""
    spec = _merge(_merge(BUILTIN_DEFAULTS, fleet_defaults), own)
    telegram = spec["telegram"]
    server = telegram.get("server")
    return EffectiveSpec(
        token=spec.get("token"),
        session=spec.get("session"),
        plugins=tuple(spec["plugins"]),
        settings=spec["settings"],
        memory_limit_mb=int(spec["memory_limit_mb"]),
        autostart=bool(spec["autostart"]),
        graceful_timeout_s=float(spec["graceful_timeout_s"]),
        subscribe=tuple(spec["subscribe"]),
        api_id=telegram.get("api_id"),
        api_hash=telegram.get("api_hash"),
        server=TelegramServer(**server) if server else None,
        health={k: None if v is None else float(v) for k, v in spec["health"].items()},
    )


def process_view(spec: EffectiveSpec) -> EffectiveSpec:
    """What of a spec the bot's process sees (its config file and watcher): a change
    here restarts it; the controller's own health settings do not."""
    return replace(spec, health={k: v for k, v in spec.health.items() if k in BOT_HEALTH_KEYS})


def check_runnable(spec: EffectiveSpec) -> None:
    """Refuse a spec that validates field by field but could not run (no api id anywhere)."""
    errors = _Errors()
    if spec.api_id is None:
        errors.add("telegram.api_id", "is required: set it on the bot or in the fleet defaults")
    if spec.api_hash is None:
        errors.add("telegram.api_hash", "is required: set it on the bot or in the fleet defaults")
    soft = spec.health.get("memory_soft_limit_mb")
    if soft is not None and soft >= spec.memory_limit_mb:
        errors.add(
            "health.memory_soft_limit_mb",
            f"must be below memory_limit_mb ({spec.memory_limit_mb}) to restart before the hard limit",
        )
    if (spec.health.get("backoff_cap_s") or 0) < (spec.health.get("backoff_base_s") or 0):
        errors.add("health.backoff_cap_s", "must not be below health.backoff_base_s")
    errors.raise_if_any("bot cannot run")


def public_view(own: Mapping[str, Any]) -> dict[str, Any]:
    """A bot's own spec without its secrets, for API answers."""
    view = {k: v for k, v in own.items() if k not in SECRET_FIELDS}
    view["credential"] = "token" if "token" in own else "session" if "session" in own else None
    return view
