"""The sandbox's admin HTTP API (JSON; errors are application/problem+json).

    GET    /healthz                         liveness and counts
    GET    /api/v1/bots                     bots with their tokens
    POST   /api/v1/bots          {name}     create a bot → {id, name, username, token}
    GET    /api/v1/bots/{name}              one bot
    POST   /api/v1/users/{user}/messages    {to, text[, reply_to]} a simulated user sends
    GET    /api/v1/users/{user}/messages    ?peer=&after_id=&direction=in|out|all&wait=&limit=
    GET    /api/v1/faults                   standing faults
    POST   /api/v1/faults        {target, kind[, ms][, seconds][, scope]}
    DELETE /api/v1/faults/{target}          clear a target's faults

A fault target is ``all``, a bot's name (or username), or ``user:<name or phone>``.
A blackhole's ``scope`` is ``all`` (standing: new connections too) or ``live`` (only the
connections open now, until they close or a clear; not listed as standing).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from .faults import ALL, Fault, InvalidFault
from .server import SandboxServer
from .store import MessageRow
from .world import (
    Account,
    AccountNotFound,
    InvalidName,
    MessageRejected,
    NameTaken,
    check_text,
)

MAX_WAIT_S = 60.0
MAX_LIMIT = 1000
SERVER_KEY: web.AppKey[SandboxServer] = web.AppKey("sandbox", SandboxServer)


class Problem(Exception):
    """An HTTP error to answer as problem+json."""

    def __init__(
        self, status: int, title: str, detail: str, errors: dict[str, str] | None = None
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.title = title
        self.detail = detail
        self.errors = errors


def _problem_response(problem: Problem) -> web.Response:
    body: dict[str, Any] = {
        "type": f"https://tgfleet.invalid/problems/{problem.title.lower().replace(' ', '-')}",
        "title": problem.title,
        "status": problem.status,
        "detail": problem.detail,
    }
    if problem.errors:
        # The same shape as tgfleet's own API: a list of {field, message}.
        body["errors"] = [{"field": k, "message": v} for k, v in problem.errors.items()]
    return web.json_response(body, status=problem.status, content_type="application/problem+json")


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def problems(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except Problem as problem:
        return _problem_response(problem)
    except InvalidName as exc:
        return _problem_response(Problem(422, "Invalid input", str(exc), {exc.field: str(exc)}))
    except InvalidFault as exc:
        return _problem_response(Problem(422, "Invalid input", str(exc), exc.errors))
    except NameTaken as exc:
        return _problem_response(Problem(409, "Conflict", str(exc)))
    except AccountNotFound as exc:
        return _problem_response(Problem(404, "Not found", str(exc)))
    except MessageRejected as exc:
        return _problem_response(
            Problem(422, "Invalid input", exc.rpc_error, {"text": exc.rpc_error})
        )
    except web.HTTPException as exc:
        if exc.status >= 400:
            return _problem_response(Problem(exc.status, exc.reason, exc.text or exc.reason))
        raise


async def _json_object(request: web.Request, allowed: set[str]) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        raise Problem(400, "Bad request", "the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise Problem(400, "Bad request", "the body must be a JSON object")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise Problem(
            422,
            "Invalid input",
            "unknown fields",
            {field: "unknown field" for field in unknown},
        )
    return body


def _string_field(body: dict[str, Any], name: str, errors: dict[str, str]) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value:
        errors[name] = "required, a non-empty string"
        return ""
    return value


def bot_json(bot: Account) -> dict[str, Any]:
    return {"id": bot.id, "name": bot.name, "username": bot.username, "token": bot.token}


def message_json(server: SandboxServer, row: MessageRow) -> dict[str, Any]:
    peer = server.world.find_account(row.peer_id)
    return {
        "id": row.id,
        "peer_id": row.peer_id,
        "peer": (peer.username or peer.name) if peer else None,
        "out": row.out,
        "text": row.text,
        "date": row.date,
        "edit_date": row.edit_date,
        "reply_to": row.reply_to,
    }


def _server(request: web.Request) -> SandboxServer:
    return request.app[SERVER_KEY]


async def healthz(request: web.Request) -> web.Response:
    server = _server(request)
    return web.json_response(
        {
            "status": "ok",
            "port": server.port,
            "connections": len(server.connections),
            "bots": len(server.world.bots()),
        }
    )


async def list_bots(request: web.Request) -> web.Response:
    return web.json_response({"bots": [bot_json(b) for b in _server(request).world.bots()]})


async def create_bot(request: web.Request) -> web.Response:
    body = await _json_object(request, {"name"})
    errors: dict[str, str] = {}
    name = _string_field(body, "name", errors)
    if errors:
        raise Problem(422, "Invalid input", "the bot needs a name", errors)
    bot = _server(request).world.create_bot(name)
    return web.json_response(bot_json(bot), status=201)


async def get_bot(request: web.Request) -> web.Response:
    return web.json_response(bot_json(_server(request).world.bot(request.match_info["name"])))


async def send_as_user(request: web.Request) -> web.Response:
    server = _server(request)
    body = await _json_object(request, {"to", "text", "reply_to"})
    errors: dict[str, str] = {}
    to = _string_field(body, "to", errors)
    text = _string_field(body, "text", errors)
    reply_to = body.get("reply_to")
    if reply_to is not None and (not isinstance(reply_to, int) or isinstance(reply_to, bool)):
        errors["reply_to"] = "an integer message id"
    if errors:
        raise Problem(422, "Invalid input", "the message is incomplete", errors)
    try:
        target = server.world.by_username(to)
    except AccountNotFound:
        raise Problem(
            422, "Invalid input", f"no account @{to}", {"to": "no account with that username"}
        ) from None
    check_text(text)
    user = server.world.user(request.match_info["user"], create=True)
    if server.faults.effect(user.id).revoked:
        raise Problem(403, "Forbidden", "the user is banned (fault revoke)")
    row, _ = server.world.send(user.id, target.id, text, reply_to)
    return web.json_response(message_json(server, row), status=201)


def _int_query(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        raise Problem(
            422, "Invalid input", f"bad {name}", {name: f"an integer from {low} to {high}"}
        )
    return value


async def list_messages(request: web.Request) -> web.Response:
    server = _server(request)
    user = server.world.user(request.match_info["user"], create=True)
    errors: dict[str, str] = {}
    peer_id: int | None = None
    if "peer" in request.query:
        try:
            peer_id = server.world.by_username(request.query["peer"]).id
        except AccountNotFound:
            errors["peer"] = "no account with that username"
    direction = request.query.get("direction", "all")
    if direction not in ("in", "out", "all"):
        errors["direction"] = "one of in, out, all"
    wait_raw = request.query.get("wait", "0")
    try:
        wait = float(wait_raw)
        if not 0 <= wait <= MAX_WAIT_S:
            raise ValueError
    except ValueError:
        errors["wait"] = f"seconds from 0 to {MAX_WAIT_S:g}"
        wait = 0.0
    if errors:
        raise Problem(422, "Invalid input", "bad query parameters", errors)
    after_id = _int_query(request, "after_id", 0, 0, 2**31 - 1)
    limit = _int_query(request, "limit", 100, 1, MAX_LIMIT)
    deadline = time.monotonic() + wait
    while True:
        rows = [
            r
            for r in server.world.messages(
                user.id, peer_id=peer_id, after_id=after_id, limit=MAX_LIMIT
            )
            if direction == "all" or r.out == (direction == "out")
        ][:limit]
        remaining = deadline - time.monotonic()
        if rows or remaining <= 0:
            break
        await server.wait_changed(user.id, remaining)
    return web.json_response({"messages": [message_json(server, r) for r in rows]})


def _fault_target(server: SandboxServer, target: str) -> str | int:
    if target == ALL:
        return ALL
    if target.startswith("user:"):
        name = target.removeprefix("user:")
        try:
            return server.world.user(name, create=False).id
        except (AccountNotFound, InvalidName):
            pass
        if name.isdigit():
            return server.world.user_by_phone_if_known(name).id
        raise AccountNotFound(f"no user {name!r}")
    return server.world.bot(target).id


def _faults_json(server: SandboxServer) -> dict[str, Any]:
    out: list[dict[str, Any]] = []
    for target, faults in server.faults.listing().items():
        name = target if isinstance(target, str) else _target_name(server, target)
        for fault in faults:
            out.append({"target": name, **_fault_fields(fault)})
    return {"faults": out}


def _fault_fields(fault: Fault) -> dict[str, Any]:
    scope = fault.scope.value if fault.scope is not None else None
    return {"kind": fault.kind.value, "ms": fault.ms, "seconds": fault.seconds, "scope": scope}


def _target_name(server: SandboxServer, account_id: int) -> str:
    account = server.world.account(account_id)
    return account.name if account.is_bot else f"user:{account.name}"


async def list_faults(request: web.Request) -> web.Response:
    return web.json_response(_faults_json(_server(request)))


async def set_fault(request: web.Request) -> web.Response:
    server = _server(request)
    body = await _json_object(request, {"target", "kind", "ms", "seconds", "scope"})
    errors: dict[str, str] = {}
    target_name = _string_field(body, "target", errors)
    kind = _string_field(body, "kind", errors)
    if errors:
        raise Problem(422, "Invalid input", "a fault needs a target and a kind", errors)
    fault = Fault.parse(kind, body.get("ms"), body.get("seconds"), body.get("scope"))
    try:
        target = _fault_target(server, target_name)
    except AccountNotFound as exc:
        raise Problem(
            422, "Invalid input", str(exc), {"target": "all, a bot name, or user:<name>"}
        ) from None
    hit = await server.apply_fault(target, fault)
    return web.json_response({"target": target_name, **_fault_fields(fault), "connections": hit})


async def clear_fault(request: web.Request) -> web.Response:
    server = _server(request)
    target = _fault_target(server, request.match_info["target"])
    await server.clear_faults(target)
    return web.json_response(_faults_json(server))


def make_app(server: SandboxServer) -> web.Application:
    app = web.Application(middlewares=[problems], client_max_size=1 << 20)
    app[SERVER_KEY] = server
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/api/v1/bots", list_bots)
    app.router.add_post("/api/v1/bots", create_bot)
    app.router.add_get("/api/v1/bots/{name}", get_bot)
    app.router.add_post("/api/v1/users/{user}/messages", send_as_user)
    app.router.add_get("/api/v1/users/{user}/messages", list_messages)
    app.router.add_get("/api/v1/faults", list_faults)
    app.router.add_post("/api/v1/faults", set_fault)
    app.router.add_delete("/api/v1/faults/{target}", clear_fault)
    return app
