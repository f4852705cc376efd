"""The OpenAPI 3.1 document, generated from the route table and the declared types.

Each route (controller/api.py's ``ROUTES``) says its method, path, summary,
request body type, answer type and the problems it can answer with; the schemas
come from botspec.spec and controller.schemas through msgspec. Nothing here is
written twice: a field added to a Struct is in the document at once.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
from aiohttp import web

from botspec.hostname import FLEET_HOST_PATTERN, MAX_FLEET_HOST
from botspec.spec import NAME_PATTERN, FleetDefaults, NewBot
from controller.access import Scope
from controller.schemas import BotPatch, Problem

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

PROBLEM_TEXT = {
    400: "The request cannot be read (malformed JSON, a bad query parameter)",
    401: "Missing, unknown or revoked bearer token",
    403: "The token's scope does not allow this",
    404: "No such bot or token",
    409: "Conflicts with the current state (a taken name, the last admin token)",
    412: "If-Match does not match the bot's current ETag",
    413: "The body is over the size limit",
    415: "The body is not application/json",
    422: "Invalid input: `errors` names each field and why",
    429: "Too many failed authentications from this address: wait Retry-After seconds",
    503: "PostgreSQL or circusd unavailable",
}


@dataclass(frozen=True)
class Query:
    """A query parameter: an integer in a range, one of some strings, or a string
    matching a pattern."""

    name: str
    description: str
    minimum: int | None = None
    maximum: int | None = None
    choices: tuple[str, ...] = ()
    pattern: str | None = None

    def schema(self) -> dict[str, Any]:
        if self.choices:
            return {"type": "string", "enum": list(self.choices)}
        if self.pattern is not None:
            return {"type": "string", "pattern": self.pattern}
        return {"type": "integer", "minimum": self.minimum, "maximum": self.maximum}


@dataclass(frozen=True)
class Route:
    """One operation of the API: how aiohttp routes it and how OpenAPI documents it."""

    method: str
    path: str
    handler: Handler
    summary: str
    answer: Any = None  # the 2xx body's type; None: not JSON
    status: int = 200
    body: Any = None  # the request body's type, if it takes one
    problems: tuple[int, ...] = ()  # beyond those every route of its kind can give
    public: bool = False  # no token needed
    scope: Scope = "read"  # what a token must allow (controller/access.py); unused if public
    query: tuple[Query, ...] = ()
    media_type: str = "application/json"  # of the 2xx answer
    etag: bool = False  # the answer carries an ETag; a write honours If-Match (412)


def problems_of(route: Route) -> list[int]:
    """Every problem status a route can answer with."""
    found = set(route.problems)
    if not route.public:
        found |= {401, 429, 503}
        if route.scope != "read":  # every token may read
            found |= {403}
    if route.body is not None:
        found |= {400, 413, 415, 422}
    if route.query:
        found |= {422}
    if "{name}" in route.path or "{host}" in route.path:
        found |= {404}
    if "{host}" in route.path:
        found |= {422}  # a path that is no host name
    if route.etag and route.body is not None:
        found |= {412}
    return sorted(found)


def _ref(tp: Any, components: dict[str, Any]) -> dict[str, Any]:
    (schema,), found = msgspec.json.schema_components(
        [tp], ref_template="#/components/schemas/{name}"
    )
    components.update(found)
    return schema


def _operation_id(route: Route) -> str:
    """``post_api_v1_bots_name_start`` for ``POST /api/v1/bots/{name}/start``."""
    path = route.path.strip("/").replace("/", "_").replace("{", "").replace("}", "")
    return f"{route.method.lower()}_{path or 'root'}"


def _link_created(routes: Sequence[Route], paths: dict[str, dict[str, Any]]) -> None:
    """OpenAPI links from each create (POST, 201, an answer with ``name``) to every
    operation on what it created (``…/{name}…``), for clients and fuzzers to follow."""
    for create in routes:
        if create.method != "POST" or create.status != 201:
            continue
        item = f"{create.path}/{{name}}"
        links = {
            _operation_id(target): {
                "operationId": _operation_id(target),
                "parameters": {"name": "$response.body#/name"},
            }
            for target in routes
            if target.path == item or target.path.startswith(f"{item}/")
        }
        if links:
            paths[create.path]["post"]["responses"]["201"]["links"] = links


def build_openapi(routes: Sequence[Route], version: str) -> dict[str, Any]:
    """The OpenAPI 3.1 document of ``routes``."""
    components: dict[str, Any] = {}
    problem = _ref(Problem, components)
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        op: dict[str, Any] = {
            "operationId": _operation_id(route),
            "summary": route.summary,
            "responses": {},
        }
        ok: dict[str, Any] = {"description": "OK"}
        if route.answer is not None:
            ok["content"] = {route.media_type: {"schema": _ref(route.answer, components)}}
        elif route.media_type != "application/json":
            ok["content"] = {route.media_type: {"schema": {"type": "string"}}}
        if route.etag:
            ok["headers"] = {
                "ETag": {"description": "The bot's version", "schema": {"type": "string"}}
            }
        op["responses"][str(route.status)] = ok
        for status in problems_of(route):
            answer: dict[str, Any] = {
                "description": PROBLEM_TEXT[status],
                "content": {"application/problem+json": {"schema": problem}},
            }
            if status == 401:
                answer["headers"] = {"WWW-Authenticate": {"schema": {"type": "string"}}}
            elif status == 429:
                answer["headers"] = {
                    "Retry-After": {
                        "description": "Seconds until this address may try again",
                        "schema": {"type": "integer"},
                    }
                }
            elif status == 503:
                answer["headers"] = {
                    "Retry-After": {
                        "description": "Seconds worth waiting (circusd busy or away)",
                        "schema": {"type": "integer"},
                    }
                }
            op["responses"][str(status)] = answer
        if route.public:
            op["security"] = []
        else:
            op["x-tgfleet-scope"] = route.scope  # the least scope a token needs
        parameters = []
        if "{name}" in route.path:
            parameters.append(
                {
                    "name": "name",
                    "in": "path",
                    "required": True,
                    "schema": {"type": "string", "pattern": NAME_PATTERN},
                }
            )
        if "{host}" in route.path:
            parameters.append(
                {
                    "name": "host",
                    "in": "path",
                    "required": True,
                    "schema": {
                        "type": "string",
                        "pattern": FLEET_HOST_PATTERN,
                        "maxLength": MAX_FLEET_HOST,
                    },
                }
            )
        if route.etag and route.body is not None:
            parameters.append(
                {
                    "name": "If-Match",
                    "in": "header",
                    "required": False,
                    "description": "Change only if the bot is still at this ETag (412 if not).",
                    "schema": {"type": "string"},
                }
            )
        for query in route.query:
            parameters.append(
                {
                    "name": query.name,
                    "in": "query",
                    "required": False,
                    "description": query.description,
                    "schema": query.schema(),
                }
            )
        if parameters:
            op["parameters"] = parameters
        if route.body is not None:
            op["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": _ref(route.body, components)}},
            }
        paths.setdefault(route.path, {})[route.method.lower()] = op
    _link_created(routes, paths)
    # Named for what they are, whether or not a route refers to them.
    for tp in (NewBot, BotPatch, FleetDefaults):
        _ref(tp, components)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "tgfleet",
            "version": version,
            "description": "Run and keep alive a fleet of Telegram bots.",
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": components,
        },
        "security": [{"bearer": []}],
        "paths": paths,
    }
