"""Bot specs at the API's edge: checking input, fleet defaults, a bot's effective spec.

The declaration is ``botspec.spec`` (types, defaults, ranges, descriptions);
``botspec.validate`` checks values against it and words the refusals. What is
here is what the declaration cannot say: the name and credential rules of a new
bot, JSON merge patches, plugins that must be importable, and the cross-field
checks that decide whether a bot can run at all.
"""

from __future__ import annotations

import ast
import importlib.util
import json
from collections.abc import Iterable, Mapping
from typing import Annotated, Any

import msgspec

from botspec.spec import (
    BOT_FIELDS,
    CREDENTIALS,
    DEFAULTABLE_FIELDS,
    MAX_SETTINGS_BYTES,
    SECRET_PATHS,
    BotSpec,
    FleetDefaults,
    Health,
    NewBot,
    process_health,
)
from botspec.validate import FieldError, check_struct, public_key_problem
from controller.errors import InvalidSpec

#: A bot's effective spec: its own fields over the fleet defaults over the built-ins.
EffectiveSpec = BotSpec

#: The body of a create, as OpenAPI states it: NewBot with exactly one credential
#: (a string token, or a string session), which validate_create enforces.
NewBotBody = Annotated[
    NewBot,
    msgspec.Meta(
        extra_json_schema={
            "oneOf": [
                {
                    "required": [given],
                    "properties": {given: {"type": "string"}, other: {"type": "null"}},
                }
                for given, other in (CREDENTIALS, CREDENTIALS[::-1])
            ]
        }
    ),
]


def _raise_if_any(errors: list[FieldError], detail: str) -> None:
    if errors:
        raise InvalidSpec(
            f"{detail}: " + "; ".join(f"{e.field}: {e.message}" for e in errors), errors
        )


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


def _beyond_types(spec: Mapping[str, Any], errors: list[FieldError]) -> None:
    """Checks of fields that passed their type: importable plugins, settings size, server key."""
    plugins = spec.get("plugins")
    if isinstance(plugins, list) and not any(e.field.startswith("plugins") for e in errors):
        for index, ref in enumerate(plugins):
            if problem := plugin_problem(ref):
                errors.append(FieldError(f"plugins[{index}]", problem))
    settings = spec.get("settings")
    if (
        isinstance(settings, dict)
        and not any(e.field.startswith("settings") for e in errors)
        and len(json.dumps(settings)) > MAX_SETTINGS_BYTES
    ):
        errors.append(FieldError("settings", f"must be at most {MAX_SETTINGS_BYTES} bytes as JSON"))
    telegram = spec.get("telegram")
    server = telegram.get("server") if isinstance(telegram, dict) else None
    pem = server.get("public_key") if isinstance(server, dict) else None
    field = "telegram.server.public_key"
    problem = public_key_problem(pem) if isinstance(pem, str) else None
    if problem and not any(e.field == field for e in errors):
        errors.append(FieldError(field, problem))


def storable_problems(value: object, path: str = "") -> list[FieldError]:
    """Strings PostgreSQL cannot store in JSONB or text: NUL characters, and unpaired
    surrogates (JSON allows "\\ud800"; UTF-8 has no encoding for it)."""
    found: list[FieldError] = []
    if isinstance(value, str):
        if "\x00" in value:
            found.append(FieldError(path, "must not contain the NUL character (\\u0000)"))
        else:
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                found.append(FieldError(path, "must not contain an unpaired surrogate"))
    elif isinstance(value, dict):
        for key, item in value.items():
            where = f"{path}.{key}" if path else str(key)
            if storable_problems(key):
                found.append(
                    FieldError(where, "a key must not contain NUL or an unpaired surrogate")
                )
            found.extend(storable_problems(item, where))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found.extend(storable_problems(item, f"{path}[{index}]"))
    return found


def _check_spec(
    struct: type[msgspec.Struct], body: Mapping[str, Any], errors: list[FieldError]
) -> None:
    check_struct(struct, body, errors)
    _beyond_types(body, errors)
    errors.extend(e for e in storable_problems(body) if e not in errors)


def _object(body: object, errors: list[FieldError]) -> dict[str, Any]:
    if not isinstance(body, dict):
        errors.append(FieldError("", "the body must be a JSON object"))
        return {}
    return body


def validate_body(struct: type[msgspec.Struct], body: object, detail: str) -> dict[str, Any]:
    """``body`` as a JSON object that matches ``struct`` and PostgreSQL can store, or
    InvalidSpec naming every bad field (the API's small bodies: tokens, events)."""
    errors: list[FieldError] = []
    fields = _object(body, errors)
    check_struct(struct, fields, errors)
    errors.extend(storable_problems(fields))
    _raise_if_any(errors, detail)
    return fields


def validate_create(body: object) -> tuple[str, dict[str, Any]]:
    """The name and own spec of a bot to create, or InvalidSpec naming every bad field.

    Null is accepted where the declaration allows it (a credential not given)."""
    errors: list[FieldError] = []
    fields = _object(body, errors)
    _check_spec(NewBot, fields, errors)
    given = {k: v for k, v in fields.items() if v is not None}
    if "token" not in given and "session" not in given:
        errors.append(
            FieldError("token", "is required: a bot token (or 'session' for a user account)")
        )
    if "token" in given and "session" in given:
        errors.append(FieldError("session", "give either 'token' or 'session', not both"))
    _raise_if_any(errors, "invalid bot")
    return str(fields["name"]), {k: v for k, v in given.items() if k != "name"}


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
    errors: list[FieldError] = []
    patch = _object(body, errors)
    if "name" in patch:
        errors.append(FieldError("name", "cannot be changed; create a new bot instead"))
    elif isinstance(body, dict) and not body:
        errors.append(FieldError("", "nothing to change: give at least one field"))
    for key in CREDENTIALS:
        if key in patch and patch[key] is None:
            errors.append(FieldError(key, "cannot be null; set the other credential to replace it"))
    if patch.get("token") is not None and patch.get("session") is not None:
        errors.append(FieldError("session", "give either 'token' or 'session', not both"))
    new: dict[str, Any] = merge_patch(
        dict(current), {k: v for k, v in patch.items() if k != "name"}
    )
    if patch.get("token") is not None:
        new.pop("session", None)
    elif patch.get("session") is not None:
        new.pop("token", None)
    for key in patch:
        if key not in BOT_FIELDS and key != "name":
            errors.append(FieldError(key, f"unknown field (known: {', '.join(BOT_FIELDS)})"))
    # What the patch touched is checked as it will be stored (nested objects merged).
    _check_spec(BotSpec, {k: new[k] for k in patch if k in BOT_FIELDS and k in new}, errors)
    _raise_if_any(errors, "invalid change")
    return new


def validate_defaults(body: object, current: Mapping[str, Any]) -> dict[str, Any]:
    """New fleet defaults (any defaultable field: no credentials, no name).

    ``telegram.api_hash`` is write-only: never shown, so a body that leaves it out
    of its ``telegram`` keeps the current one (null removes it)."""
    errors: list[FieldError] = []
    fields = dict(_object(body, errors))
    _check_spec(FleetDefaults, fields, errors)
    _raise_if_any(errors, "invalid defaults")
    for path in SECRET_PATHS:
        fields = _keep_left_out(fields, current, path.split("."))
    return fields


def _keep_left_out(
    new: dict[str, Any], current: Mapping[str, Any], path: list[str]
) -> dict[str, Any]:
    """``new`` with the secret at ``path`` taken from ``current`` where ``new`` has its
    parent object but leaves the secret out (secrets are never shown, so a client
    that read, edited and wrote back an object cannot have sent them)."""
    key, *rest = path
    if not rest:
        if key not in new and current.get(key) is not None:
            return {**new, key: current[key]}
        return new
    inner, kept = new.get(key), current.get(key)
    if isinstance(inner, dict) and isinstance(kept, dict):
        return {**new, key: _keep_left_out(inner, kept, rest)}
    return new


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``over``'s fields over ``base``'s, nested objects merged field by field."""
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def effective(own: Mapping[str, Any], fleet_defaults: Mapping[str, Any]) -> BotSpec:
    """A bot's effective spec: its own fields over the fleet defaults over the built-ins.

    Both were validated when they were stored; the declared defaults fill the rest."""
    return msgspec.convert(deep_merge(fleet_defaults, own), BotSpec)


def process_view(spec: BotSpec) -> BotSpec:
    """What of a spec the bot's process sees (its config file and watcher): a change
    here restarts it; the controller's own health settings do not."""
    seen = msgspec.structs.asdict(process_health(spec.health))
    return msgspec.structs.replace(spec, health=Health(**seen))


def runnable_errors(spec: BotSpec) -> list[FieldError]:
    """Why a spec that validates field by field could not run (no api id anywhere, …)."""
    errors = []
    if spec.telegram.api_id is None:
        errors.append(
            FieldError(
                "telegram.api_id",
                "is required: set it on the bot or in the fleet defaults",
            )
        )
    if spec.telegram.api_hash is None:
        errors.append(
            FieldError(
                "telegram.api_hash",
                "is required: set it on the bot or in the fleet defaults",
            )
        )
    soft = spec.health.memory_soft_limit_mb
    if soft is not None and soft >= spec.memory_limit_mb:
        errors.append(
            FieldError(
                "health.memory_soft_limit_mb",
                f"must be below memory_limit_mb ({spec.memory_limit_mb}) to restart before the hard limit",
            )
        )
    if spec.health.backoff_cap_s < spec.health.backoff_base_s:
        errors.append(FieldError("health.backoff_cap_s", "must not be below health.backoff_base_s"))
    return errors


def check_runnable(spec: BotSpec) -> None:
    """Refuse a spec that validates field by field but could not run."""
    _raise_if_any(runnable_errors(spec), "bot cannot run")


def check_defaults_keep_bots_runnable(
    defaults: Mapping[str, Any], bots: Iterable[tuple[str, Mapping[str, Any]]]
) -> None:
    """Refuse fleet defaults under which a bot (name, own spec) could no longer run."""
    errors: list[FieldError] = []
    for name, own in bots:
        for error in runnable_errors(effective(own, defaults)):
            errors.append(FieldError(error.field, f"bot {name!r} relies on it: {error.message}"))
    _raise_if_any(errors, "these defaults would leave bots unable to run")


def _without_secrets(
    value: Mapping[str, Any], paths: list[list[str]] | None = None
) -> dict[str, Any]:
    """``value`` without any of the declared ``SECRET_PATHS``, at any depth."""
    if paths is None:
        paths = [path.split(".") for path in SECRET_PATHS]
    view: dict[str, Any] = {}
    for key, item in value.items():
        below = [path[1:] for path in paths if path[0] == key]
        if [] in below:
            continue  # the key itself is a secret
        view[key] = _without_secrets(item, below) if below and isinstance(item, dict) else item
    return view


def public_view(own: Mapping[str, Any]) -> dict[str, Any]:
    """A bot's own spec without its secrets, for API answers."""
    view = _without_secrets(own)
    view["credential"] = "token" if "token" in own else "session" if "session" in own else None
    return view


def public_defaults(defaults: Mapping[str, Any]) -> dict[str, Any]:
    """The fleet defaults without secrets (``telegram.api_hash``), for API answers."""
    return _without_secrets(defaults)


__all__ = [
    "DEFAULTABLE_FIELDS",
    "EffectiveSpec",
    "check_defaults_keep_bots_runnable",
    "check_runnable",
    "effective",
    "merge_patch",
    "plugin_problem",
    "process_view",
    "public_defaults",
    "public_view",
    "validate_create",
    "validate_defaults",
    "validate_patch",
]
