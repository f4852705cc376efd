"""The OpenAPI document of the HTTP API (served at /openapi.json)."""

from __future__ import annotations

from typing import Any

from controller.spec import NAME_RE, PLUGIN_RE, TOKEN_RE

_PROBLEM = {"$ref": "#/components/schemas/Problem"}
_ERRORS = {
    status: {
        "description": text,
        "content": {"application/problem+json": {"schema": _PROBLEM}},
    }
    for status, text in {
        "400": "Unreadable request (malformed JSON, wrong content type)",
        "401": "Missing, unknown or revoked bearer token",
        "404": "No such bot or endpoint",
        "409": "Conflict with the current state (e.g. a taken name)",
        "412": "If-Match names no current ETag of the bot: read it again",
        "422": "Invalid input: `errors` names each field and why",
        "503": "PostgreSQL or circusd unavailable",
    }.items()
}
_NAME = {
    "name": "name",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": NAME_RE.pattern},
}
_BOT = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Bot"}}}}


def _op(summary: str, ok: str = "200", body: str | None = None, **extra: Any) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": summary,
        "responses": {ok: {"description": "OK", **_BOT}, **_ERRORS},
    }
    if body:
        op["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{body}"}}},
        }
    op.update(extra)
    return op


_SPEC_PROPERTIES: dict[str, Any] = {
    "token": {"type": "string", "pattern": TOKEN_RE.pattern, "writeOnly": True},
    "session": {"type": "string", "writeOnly": True, "description": "Telethon string session"},
    "plugins": {"type": "array", "items": {"type": "string", "pattern": PLUGIN_RE.pattern}},
    "settings": {"type": "object"},
    "memory_limit_mb": {"type": "integer", "minimum": 128, "maximum": 65536},
    "autostart": {"type": "boolean"},
    "graceful_timeout_s": {"type": "number", "minimum": 1, "maximum": 60},
    "subscribe": {"type": "array", "items": {"type": "string"}},
    "telegram": {
        "type": "object",
        "properties": {
            "api_id": {"type": "integer", "minimum": 1},
            "api_hash": {"type": "string"},
            "server": {
                "type": ["object", "null"],
                "properties": {
                    "host": {"type": "string"},
                    "port": {"type": "integer"},
                    "dc_id": {"type": "integer"},
                    "public_key": {"type": "string"},
                },
            },
        },
    },
    "health": {"type": "object"},
}

OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "tgfleet", "version": "1"},
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        "schemas": {
            "Problem": {
                "type": "object",
                "properties": {
                    "type": {"type": "string"},
                    "title": {"type": "string"},
                    "status": {"type": "integer"},
                    "detail": {"type": "string"},
                    "errors": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "properties": {
                                "field": {"type": "string"},
                                "message": {"type": "string"},
                            },
                        },
                    },
                },
            },
            "BotCreate": {
                "type": "object",
                "additionalProperties": False,
                "required": ["name"],
                "properties": {
                    "name": {"type": "string", "pattern": NAME_RE.pattern},
                    **_SPEC_PROPERTIES,
                },
            },
            "BotPatch": {
                "type": "object",
                "additionalProperties": False,
                "properties": _SPEC_PROPERTIES,
            },
            "Bot": {
                "type": "object",
                "properties": {
                    "name": {"type": "string"},
                    "state": {
                        "enum": [
                            "configuring",
                            "starting",
                            "running",
                            "stopping",
                            "stopped",
                            "failed",
                            "destroyed",
                        ]
                    },
                    "desired": {"enum": ["running", "stopped"]},
                    "since": {"type": "string", "format": "date-time"},
                    "reason": {"type": "string"},
                    "pid": {"type": ["integer", "null"]},
                    "uptime_s": {"type": ["number", "null"]},
                    "restarts": {"type": "integer"},
                    "rss_mb": {"type": ["number", "null"]},
                    "telegram": {
                        "type": "object",
                        "properties": {
                            "connected": {"type": "boolean"},
                            "last_update_age_s": {"type": ["number", "null"]},
                        },
                    },
                    "spec": {"type": "object"},
                    "version": {"type": "integer", "description": "its ETag is this, quoted"},
                    "stale": {"type": "boolean", "description": "PostgreSQL away: from memory"},
                    "as_of": {"type": "string", "format": "date-time"},
                },
            },
        },
    },
    "security": [{"bearer": []}],
    "paths": {
        "/healthz": {
            "get": {
                "summary": "Liveness (no token needed)",
                "security": [],
                "responses": {"200": {"description": "OK"}},
            }
        },
        "/readyz": {
            "get": {
                "summary": "Readiness: 503 while PostgreSQL is unreachable (since when)",
                "security": [],
                "responses": {"200": {"description": "OK"}, "503": _ERRORS["503"]},
            }
        },
        "/metrics": {
            "get": {"summary": "Prometheus metrics", "responses": {"200": {"description": "text"}}}
        },
        "/api/v1/status": {
            "get": {
                "summary": "Fleet summary; `database`: reachable, unreachable_since, writes queued",
                "responses": {"200": {"description": "OK"}},
            }
        },
        "/api/v1/bots": {
            "get": {"summary": "List bots", "responses": {"200": {"description": "OK"}}},
            "post": _op("Create a bot (starts it unless autostart is false)", "201", "BotCreate"),
        },
        "/api/v1/bots/{name}": {
            "parameters": [_NAME],
            "get": _op("One bot (ETag: the version of its spec)"),
            "patch": _op(
                "Change a bot's spec (restarts that bot alone); null resets a field; "
                "If-Match: one of its ETags, else 412",
                body="BotPatch",
                parameters=[{"name": "If-Match", "in": "header", "schema": {"type": "string"}}],
            ),
            "delete": _op(
                "Destroy a bot: stop it, remove its watcher, files and private dir; keep its events"
            ),
        },
        **{
            f"/api/v1/bots/{{name}}/{op}": {
                "parameters": [_NAME],
                "post": _op(f"{op.capitalize()} a bot"),
            }
            for op in ("start", "stop", "restart")
        },
        "/api/v1/bots/{name}/events": {
            "parameters": [_NAME],
            "get": {
                "summary": "A bot's events (?after=ID&limit=N)",
                "responses": {"200": {"description": "OK"}},
            },
        },
        "/api/v1/bots/{name}/logs": {
            "parameters": [_NAME],
            "get": {
                "summary": "Tail of a bot's log (?stream=out|err&lines=N)",
                "responses": {"200": {"description": "OK"}},
            },
        },
        "/api/v1/events": {
            "get": {
                "summary": "Server-sent events: every event as it happens",
                "responses": {"200": {"description": "text/event-stream"}},
            },
            "post": {
                "summary": "Publish {topic, data} on the bus",
                "responses": {"201": {"description": "Created"}},
            },
        },
        "/api/v1/defaults": {
            "get": {"summary": "Fleet defaults", "responses": {"200": {"description": "OK"}}},
            "put": {
                "summary": "Replace fleet defaults (bots re-render)",
                "responses": {"200": {"description": "OK"}},
            },
        },
        "/api/v1/tokens": {
            "get": {
                "summary": "API tokens (no secrets)",
                "responses": {"200": {"description": "OK"}},
            },
            "post": {
                "summary": "Create a token {name}; the secret is shown once",
                "responses": {"201": {"description": "Created"}},
            },
        },
        "/api/v1/tokens/{name}": {
            "delete": {"summary": "Revoke a token", "responses": {"200": {"description": "OK"}}}
        },
    },
}
