"""HTTP: the REST API under /api/v1, problem+json errors, bearer tokens."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import os
import re
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from botspec import procinfo, protocol
from botspec.spec import NAME_PATTERN, FleetDefaults
from controller import schemas
from controller.access import (
    AuthThrottle,
    RefusalReason,
    Refusals,
    allows,
    client_address,
    forwarded_origin,
    token_in_query,
)
from controller.circus import SupervisorError
from controller.errors import (
    BadRequest,
    FieldError,
    Forbidden,
    InvalidSpec,
    NotFound,
    PreconditionFailed,
    Problem,
    StoreUnavailable,
    SupervisorUnavailable,
    TgfleetError,
    TooLarge,
    TooManyRequests,
    Unauthorized,
    UnsupportedMediaType,
)
from controller.fleet import Fleet, etag
from controller.home import Home
from controller.metrics import Family, Histogram, render
from controller.openapi import Query, Route, build_openapi
from controller.sessions import (
    COOKIE,
    CSRF_HEADER,
    SAFE_METHODS,
    Session,
    Sessions,
    csrf_matches,
    same_origin,
)
from controller.settings import host_problem
from controller.spec import NewBotBody, public_defaults, validate_body
from controller.store import BotRow, EventRow, Store, TokenRow, patience
from controller.views import bot_families

log = logging.getLogger("tgfleet.api")

FLEET: web.AppKey[Fleet] = web.AppKey("fleet", Fleet)
STORE: web.AppKey[Store] = web.AppKey("store")
HOME: web.AppKey[Home] = web.AppKey("home", Home)
TOKENS: web.AppKey[dict[str, TokenRow]] = web.AppKey("tokens", dict)
THROTTLE: web.AppKey[AuthThrottle] = web.AppKey("throttle", AuthThrottle)
REFUSALS: web.AppKey[Refusals] = web.AppKey("refusals", Refusals)
ROUTE_OF: web.AppKey[dict[tuple[str, str], Route]] = web.AppKey("route_of", dict)
#: Who made a request: ``api:<token name>``, the actor of every event it writes.
ACTOR: web.RequestKey[str] = web.RequestKey("actor", str)
#: The dashboard session a request came with (its cookie's value), if it came with one.
SESSION_ID: web.RequestKey[str] = web.RequestKey("session_id", str)
PUBLISH: web.AppKey[Callable[[str, protocol.Event], None]] = web.AppKey("publish")
LATENCY: web.AppKey[Histogram] = web.AppKey("latency", Histogram)
#: The bus's counters for /metrics: messages dropped (in, out) and peers refused.
BUS_STATS: web.AppKey[Callable[[], BusStats]] = web.AppKey("bus_stats")
#: Dashboard sessions (controller/sessions.py): a browser's cookie instead of a bearer token.
SESSIONS: web.AppKey[Sessions] = web.AppKey("sessions", Sessions)
#: Resources that check who asks themselves (the dashboard's pages: controller/dashboard.py).
PAGES: web.AppKey[set[str]] = web.AppKey("pages", set)

OPEN_PATHS = frozenset({"/healthz", "/readyz"})
MAX_BODY_BYTES = 256 * 1024
#: How often a quiet event stream says it is alive (and checks its session).
STREAM_KEEPALIVE_S = 15.0
#: What a 503 for circusd asks to wait: about one bot's graceful stop.
SUPERVISOR_RETRY_AFTER_S = 5
MAX_LOG_LINES = 5000
NAME_RE = re.compile(NAME_PATTERN)
#: The share of the database timeout a request gives PostgreSQL; the rest is for
#: answering, so that every request answers within the timeout.
DATABASE_SHARE = 0.75
ENTITY_TAG_RE = re.compile(r'^"(\d{1,18})"$')

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def wall_now() -> float:
    return datetime.now(UTC).timestamp()


@dataclass(frozen=True)
class BusStats:
    dropped_in: int = 0  # invalid messages from bots
    dropped_out: int = 0  # events that could not be queued to a bot
    refused: int = 0  # peers whose key is no bot's


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return "tgf_" + secrets.token_urlsafe(32)


def problem_response(problem: Problem, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=problem.status,
        text=json.dumps(problem.to_json()),
        content_type="application/problem+json",
        headers=headers,
    )


@web.middleware
async def problems(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error leaves as application/problem+json."""
    try:
        return await handler(request)
    except TgfleetError as exc:
        headers = None
        if isinstance(exc, Unauthorized):
            headers = {"WWW-Authenticate": "Bearer"}
        elif isinstance(exc, TooManyRequests):
            headers = {"Retry-After": str(exc.retry_after_s)}
        elif isinstance(exc, SupervisorUnavailable):
            headers = {"Retry-After": str(SUPERVISOR_RETRY_AFTER_S)}
        return problem_response(
            Problem(exc.status, exc.title, exc.detail, exc.type_, exc.errors), headers
        )
    except SupervisorError as exc:
        # An operation's own circusd command (restart, destroy) failed: circusd is busy
        # (one bot's graceful stop holds its lock) or away. Not ours to hide; retry.
        unavailable = SupervisorUnavailable(f"circusd did not take the command: {exc}")
        return problem_response(
            Problem(unavailable.status, unavailable.title, unavailable.detail, unavailable.type_),
            {"Retry-After": str(SUPERVISOR_RETRY_AFTER_S)},
        )
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        detail = exc.text or exc.reason
        headers = None
        if exc.status == 404:
            detail = f"no such endpoint: {request.method} {request.path}"
        elif isinstance(exc, web.HTTPMethodNotAllowed):
            detail = f"{request.method} is not allowed on {request.path}"
            headers = {"Allow": ", ".join(sorted(exc.allowed_methods))}
        elif exc.status == 413:
            detail = f"the body is over {MAX_BODY_BYTES} bytes"
        return problem_response(Problem(exc.status, exc.reason, detail or exc.reason), headers)


@web.middleware
async def timing(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every answer's latency, by route of ROUTES (a bounded label: no raw paths); the
    event stream is left out (its duration is the client's stay)."""
    started = asyncio.get_running_loop().time()
    try:
        return await handler(request)
    finally:
        resource = request.match_info.route.resource
        route = (
            None
            if resource is None
            else request.app[ROUTE_OF].get((request.method, resource.canonical))
        )
        if route is None or route.media_type != "text/event-stream":
            request.app[LATENCY].observe(
                asyncio.get_running_loop().time() - started,
                route="other" if route is None else f"{route.method} {route.path}",
            )


@web.middleware
async def database_patience(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A request waits for PostgreSQL a share of the timeout, then answers from memory or 503."""
    with patience(request.app[STORE].timeout_s * DATABASE_SHARE):
        return await handler(request)


@web.middleware
async def access(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Who is asking, and may they: the bearer token (or a dashboard session's cookie),
    its scope against the route's (from ROUTES), the throttle on failed attempts.
    Every refusal is counted."""
    app = request.app
    resource = request.match_info.route.resource  # None when no route matched (404, 405)
    route = None if resource is None else app[ROUTE_OF].get((request.method, resource.canonical))
    if (
        request.path in OPEN_PATHS
        or (route is not None and route.public)
        or (resource is not None and resource.canonical in app[PAGES])
    ):
        return await handler(request)
    refusals = app[REFUSALS]
    if token_in_query(dict(request.query)):
        refusals.count("token_in_query")
        raise Unauthorized(
            "a token in the query string leaks into logs, proxies and history: send it in "
            "the 'Authorization: Bearer <token>' header (and revoke one sent this way)",
            "token_in_query",
        )
    header = request.headers.get("Authorization")
    if header is None and COOKIE in request.cookies:
        session = cookie_session(request)
        row = await authenticate(request, session.token_sha256, session)
        request[SESSION_ID] = request.cookies[COOKIE]
    else:
        scheme, _, presented = (header or "").partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            refusals.count("missing")
            raise Unauthorized("send 'Authorization: Bearer <token>' (see <home>/admin.token)")
        row = await authenticate(request, hash_token(presented.strip()))
    needed = route.scope if route is not None else "read"
    if not allows(row.scope, needed):
        refusals.count("scope")
        raise Forbidden(
            f"the token {row.name!r} has scope {row.scope!r}; "
            f"{request.method} {request.path} needs {needed!r}"
        )
    request[ACTOR] = f"api:{row.name}"
    return await handler(request)


def cookie_session(request: web.Request) -> Session:
    """The live dashboard session of the request's cookie; a write made with it must
    carry the session's CSRF token and come from a page of this server."""
    app = request.app
    session = app[SESSIONS].get(request.cookies[COOKIE], wall_now())
    if session is None:
        app[REFUSALS].count("unknown")
        raise Unauthorized("the dashboard session ended (logout, expiry or a restart): log in")
    if request.method not in SAFE_METHODS:
        if not csrf_matches(session, request.headers.get(CSRF_HEADER)):
            app[REFUSALS].count("csrf")
            raise Forbidden(f"a write with the session cookie needs the {CSRF_HEADER} header")
        if not same_origin(
            request.headers.get("Origin"), request.headers.get("Referer"), *public_origin(request)
        ):
            app[REFUSALS].count("csrf")
            raise Forbidden("a write with the session cookie must come from this server's pages")
    return session


def public_origin(request: web.Request) -> tuple[str, str]:
    """The scheme and host the browser used: the request's own, or what a trusted
    reverse proxy (TGFLEET_TRUSTED_PROXIES) says in X-Forwarded-Proto and -Host."""
    return forwarded_origin(
        request.remote,
        request.scheme,
        request.host,
        request.headers.getall("X-Forwarded-Proto", []),
        request.headers.getall("X-Forwarded-Host", []),
        request.app[THROTTLE].trusted_proxies,
    )


async def authenticate(
    request: web.Request, digest: str, session: Session | None = None
) -> TokenRow:
    """The live token of this hash, or Unauthorized (TooManyRequests past the throttle).
    A session whose token is gone, revoked or expired ends with it."""
    app = request.app
    client = client_address(
        request.remote,
        request.headers.getall("X-Forwarded-For", []),
        app[THROTTLE].trusted_proxies,
    )
    now = datetime.now(UTC)
    row = await _token_of(app, digest)
    refused: tuple[RefusalReason, str] | None = None
    if row is None:
        refused = ("unknown", "the bearer token is unknown")
    elif row.revoked_at is not None:
        refused = ("revoked", f"the token {row.name!r} was revoked")
    elif row.expired(now):
        assert row.expires_at is not None
        refused = ("expired", f"the token {row.name!r} expired at {row.expires_at.isoformat()}")
    if refused is None:
        assert row is not None
        return row
    if session is not None:
        app[SESSIONS].end_token(token_sha256=digest)
    # Failed authentication is what is throttled: past the limit, an address's wrong
    # tokens get 429 instead of 401, while a valid token from it still works (every
    # local client shares 127.0.0.1; tokens hold 256 random bits, guessing is moot).
    wait_s = app[THROTTLE].retry_after(client, now.timestamp())
    app[THROTTLE].failed(client, now.timestamp())
    if wait_s is not None:
        app[REFUSALS].count("rate_limited")
        raise TooManyRequests(
            f"too many failed authentications from {client}: try again in {wait_s} s",
            wait_s,
        )
    app[REFUSALS].count(refused[0])
    raise Unauthorized(refused[1], refused[0])


async def session_live(request: web.Request, session_id: str) -> bool:
    """Whether a dashboard session and its token still hold (a long request, such as
    the event stream, asks again now and then)."""
    session = request.app[SESSIONS].get(session_id, wall_now())
    if session is None:
        return False
    try:
        await authenticate(request, session.token_sha256, session)
    except (Unauthorized, TooManyRequests):
        return False
    except StoreUnavailable:
        return True  # not known to be revoked: PostgreSQL is away and the token not cached
    return True


async def _token_of(app: web.Application, digest: str) -> TokenRow | None:
    """The token with this hash; from memory while PostgreSQL is away (tokens seen
    valid still open reads: writes get 503 anyway)."""
    known = app[TOKENS]
    try:
        row = await app[STORE].use_token(digest)
    except StoreUnavailable:
        row = known.get(digest)
        if row is None:
            raise
        return row
    if row is None or row.revoked_at is not None:
        known.pop(digest, None)
    else:
        known[digest] = row
    return row


async def read_json(request: web.Request) -> Any:
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise TooLarge(f"the body is over {MAX_BODY_BYTES} bytes")
    if request.content_type not in ("application/json", "application/merge-patch+json"):
        raise UnsupportedMediaType(
            f"the body must be application/json (got {request.content_type or 'none'})"
        )
    raw = await request.read()
    if len(raw) > MAX_BODY_BYTES:
        raise TooLarge(f"the body is over {MAX_BODY_BYTES} bytes")
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequest(f"the body is not valid JSON: {exc}") from exc


def bot_name(request: web.Request) -> str:
    name = request.match_info["name"]
    if not NAME_RE.fullmatch(name):
        raise NotFound(f"no bot named {name!r} (names match {NAME_RE.pattern})")
    return name


def int_param(request: web.Request, key: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(key)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        raise InvalidSpec(
            f"query parameter {key!r} must be an integer from {low} to {high}",
            [FieldError(key, f"must be an integer from {low} to {high}")],
        )
    return value


def ok(body: object, status: int = 200) -> web.Response:
    return web.json_response(body, status=status)


# --------------------------------------------------------------------- bots


async def list_bots(request: web.Request) -> web.Response:
    return ok({"bots": await request.app[FLEET].list()})


async def create_bot(request: web.Request) -> web.Response:
    body = await read_json(request)
    fleet = request.app[FLEET]
    row = await fleet.create(body, request[ACTOR])
    response = bot_response(fleet, row, status=201)
    response.headers["Location"] = f"/api/v1/bots/{row.name}"
    return response


def bot_response(
    fleet: Fleet, row: BotRow, status: int = 200, *, stale: bool = False
) -> web.Response:
    """A bot, with its ETag (the version of its spec); marked stale when read from memory."""
    view = fleet.view(row)
    response = ok({**view, **fleet.stale_marks()} if stale else view, status=status)
    response.headers["ETag"] = etag(row)
    return response


async def get_bot(request: web.Request) -> web.Response:
    fleet = request.app[FLEET]
    row, stale = await fleet.get_row(bot_name(request))
    return bot_response(fleet, row, stale=stale)


def if_match(request: web.Request) -> frozenset[int] | None:
    """The versions an If-Match header accepts; None without one (or with ``*``)."""
    header = request.headers.get("If-Match")
    if header is None or header.strip() == "*":
        return None
    versions = set()
    for tag in header.split(","):
        found = ENTITY_TAG_RE.fullmatch(tag.strip())
        if found is None:  # a weak or foreign tag never matches (RFC 9110 13.1.1)
            raise PreconditionFailed(f"If-Match {tag.strip()} is no ETag of this bot")
        versions.add(int(found.group(1)))
    return frozenset(versions)


async def patch_bot(request: web.Request) -> web.Response:
    name = bot_name(request)
    expected = if_match(request)
    body = await read_json(request)
    fleet = request.app[FLEET]
    return bot_response(fleet, await fleet.update(name, body, request[ACTOR], expected))


async def delete_bot(request: web.Request) -> web.Response:
    name = bot_name(request)
    await request.app[FLEET].destroy(name, request[ACTOR])
    return ok({"name": name, "state": "destroyed"})


def lifecycle(op: str) -> Handler:
    async def handler(request: web.Request) -> web.Response:
        name = bot_name(request)
        fleet = request.app[FLEET]
        action = {"start": fleet.start, "stop": fleet.stop, "restart": fleet.restart}[op]
        return bot_response(fleet, await action(name, request[ACTOR]))

    return handler


async def bot_events(request: web.Request) -> web.Response:
    """A bot's events while it exists (its whole trail, destroyed or not: /history)."""
    name = bot_name(request)
    await request.app[FLEET].get_row(name)  # 404 for unknown and destroyed bots
    return await _events(request, name)


async def history(request: web.Request) -> web.Response:
    """The audit trail: every event, or one bot's (``?bot=``), destroyed bots included."""
    bot = request.query.get("bot")
    if bot is not None and not NAME_RE.fullmatch(bot):
        raise InvalidSpec(
            f"query parameter 'bot' must match {NAME_PATTERN}",
            [FieldError("bot", f"must match {NAME_PATTERN}")],
        )
    return await _events(request, bot)


async def _events(request: web.Request, bot: str | None) -> web.Response:
    after = int_param(request, "after", 0, 0, 2**62)
    limit = int_param(request, "limit", 100, 1, 1000)
    rows = await request.app[STORE].events(bot, after, limit)
    return ok({"events": [r.to_json() for r in rows]})


async def bot_logs(request: web.Request) -> web.Response:
    name = bot_name(request)
    await request.app[FLEET].get_row(name)  # 404 for unknown names (from memory if need be)
    stream = request.query.get("stream", "err")
    if stream not in ("out", "err"):
        raise InvalidSpec(
            "query parameter 'stream' must be 'out' or 'err'",
            [FieldError("stream", "must be 'out' or 'err'")],
        )
    lines = int_param(request, "lines", 100, 1, MAX_LOG_LINES)
    path = request.app[HOME].logs_dir / f"bot-{name}.{stream}.log"
    text = await asyncio.to_thread(tail, path, lines)
    return ok({"name": name, "stream": stream, "path": str(path), "lines": text})


def tail(path: Any, lines: int) -> list[str]:
    try:
        with open(path, "rb") as handle:
            handle.seek(0, 2)
            size = handle.tell()
            block = min(size, 256 * 1024)
            handle.seek(size - block)
            data = handle.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return []
    if block < size:  # the block starts inside a line: leave that piece out
        data = data.partition("\n")[2]
    return data.splitlines()[-lines:]


# ------------------------------------------------------------------- events


async def event_stream(request: web.Request) -> web.StreamResponse:
    """Server-sent events: every event row as it is written."""
    queue: asyncio.Queue[EventRow] = asyncio.Queue(maxsize=1000)

    def push(row: EventRow) -> None:
        with contextlib.suppress(asyncio.QueueFull):
            queue.put_nowait(row)

    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)
    unsubscribe = request.app[FLEET].subscribe(push)
    try:
        await response.write(b": tgfleet events\n\n")
        while True:
            try:
                row = await asyncio.wait_for(queue.get(), timeout=STREAM_KEEPALIVE_S)
            except TimeoutError:
                session_id = request.get(SESSION_ID)
                if session_id is not None and not await session_live(request, session_id):
                    break  # logged out, or its token revoked: the stream ends with it
                await response.write(b": keepalive\n\n")
                continue
            payload = json.dumps(row.to_json())
            await response.write(f"id: {row.id}\nevent: {row.kind}\ndata: {payload}\n\n".encode())
    except ConnectionResetError:
        pass  # the client went away: the stream is over (a cancellation goes on up)
    finally:
        unsubscribe()
    return response


async def publish_event(request: web.Request) -> web.Response:
    body = await read_json(request)
    fields = validate_body(schemas.Publish, body, "invalid event")
    topic, data = fields["topic"], fields.get("data")
    fleet = request.app[FLEET]
    row = await fleet.record(None, "bus", request[ACTOR], str(topic), {"data": data})
    request.app[PUBLISH](
        str(topic),
        protocol.Event(
            bot="controller",
            pid=0,
            generation=0,
            ts=row.at.timestamp(),
            topic=str(topic),
            data=data,
        ),
    )
    return ok(row.to_json(), status=201)


# ---------------------------------------------------------- defaults, tokens


async def get_defaults(request: web.Request) -> web.Response:
    return ok(public_defaults(await request.app[STORE].get_defaults()))


async def put_defaults(request: web.Request) -> web.Response:
    body = await read_json(request)
    return ok(public_defaults(await request.app[FLEET].set_defaults(body, request[ACTOR])))


def _stamp(at: datetime | None) -> str | None:
    return at.isoformat() if at is not None else None


def token_json(row: TokenRow) -> dict[str, Any]:
    return {
        "name": row.name,
        "scope": row.scope,
        "created_at": row.created_at.isoformat(),
        "expires_at": _stamp(row.expires_at),
        "last_used_at": _stamp(row.last_used_at),
        "revoked_at": _stamp(row.revoked_at),
    }


async def list_tokens(request: web.Request) -> web.Response:
    return ok({"tokens": [token_json(r) for r in await request.app[STORE].list_tokens()]})


def expiry(value: object) -> datetime | None:
    """A new token's ``expires_at``: a future ISO 8601 time with a zone, or None."""
    if value is None:
        return None
    problem = "must be an ISO 8601 date-time with a time zone, in the future"
    try:
        at = datetime.fromisoformat(str(value))
    except ValueError:
        at = None
    if at is None or at.tzinfo is None or at <= datetime.now(UTC):
        raise InvalidSpec(
            f"invalid token: expires_at: {problem}", [FieldError("expires_at", problem)]
        )
    return at


async def create_token(request: web.Request) -> web.Response:
    body = await read_json(request)
    fields = validate_body(schemas.NewToken, body, "invalid token")
    name, scope = fields["name"], fields["scope"]
    expires_at = expiry(fields.get("expires_at"))
    token = new_token()
    row = await request.app[STORE].add_token(name, hash_token(token), scope, expires_at)
    await request.app[FLEET].record(
        None,
        "token",
        request[ACTOR],
        f"token {name!r} created with scope {scope!r}",
        {"token": name, "scope": scope, "expires_at": _stamp(expires_at)},
    )
    return ok({**token_json(row), "token": token}, status=201)


async def revoke_token(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if not NAME_RE.fullmatch(name):
        raise NotFound(f"no token named {name!r}")
    row = await request.app[STORE].revoke_token(name)
    known = request.app[TOKENS]
    for digest in [d for d, held in known.items() if held.name == name]:
        del known[digest]
    request.app[SESSIONS].end_token(token_name=name)
    await request.app[FLEET].record(
        None, "token", request[ACTOR], f"token {name!r} revoked", {"token": name}
    )
    return ok(token_json(row))


async def rotate_secrets(request: web.Request) -> web.Response:
    """Seal every stored secret with a new key (a key file) or with the first key of
    TGFLEET_SECRET_KEY (the operator put a new one first), then drop the old ones."""
    store, home = request.app[STORE], request.app[HOME]
    box = store.secrets
    if box.from_file:
        # The file holds the new key and the old until every row is sealed again:
        # a crash in between leaves a controller that still opens every row.
        box = box.with_new_key()
        await asyncio.to_thread(box.write, home)
    rewritten = await store.seal_secrets(box, rotate=True)
    store.secrets = box.newest_only()
    if box.from_file:
        await asyncio.to_thread(store.secrets.write, home)
    await request.app[FLEET].record(
        None,
        "secrets",
        request[ACTOR],
        f"secrets sealed again with a new key ({rewritten} rows)",
        {"rewritten": rewritten, "key_source": box.source},
    )
    return ok({"rewritten": rewritten, "key_source": box.source})


# ---------------------------------------------------------------- the rest


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the controller answers (whatever the database does)."""
    return ok({"status": "ok"})


def database_view(fleet: Fleet, store: Store) -> dict[str, Any]:
    since = store.unreachable_since
    return {
        "reachable": since is None,
        "unreachable_since": None
        if since is None
        else datetime.fromtimestamp(since, UTC).isoformat(),
        "error": store.unreachable_error,
        "timeout_s": store.timeout_s,
        "writes_queued": len(fleet.outbox),
        "writes_dropped": fleet.outbox.dropped,
    }


async def readyz(request: web.Request) -> web.Response:
    """Readiness: 200 while PostgreSQL answers; 503 saying since when it does not."""
    store = request.app[STORE]
    database = database_view(request.app[FLEET], store)
    if database["reachable"]:
        return ok({"status": "ready", "database": database})
    problem = Problem(503, "Not ready", store.unreachable_detail(), StoreUnavailable.type_)
    return web.Response(
        status=503,
        text=json.dumps({**problem.to_json(), "database": database}),
        content_type="application/problem+json",
    )


async def status(request: web.Request) -> web.Response:
    fleet = request.app[FLEET]
    bots = await fleet.list()
    counts: dict[str, int] = {}
    for bot in bots:
        counts[bot["state"]] = counts.get(bot["state"], 0) + 1
    return ok(
        {
            "bots": len(bots),
            "states": counts,
            "telegram_connected": sum(1 for b in bots if b["telegram"]["connected"]),
            "controller": {"pid": os.getpid(), "rss_mb": procinfo.rss_mb(), "host": fleet.host},
            "database": database_view(fleet, request.app[STORE]),
            "reconcile_error": fleet.last_pass_error,
        }
    )


# -------------------------------------------------------------------- hosts


async def list_hosts(request: web.Request) -> web.Response:
    """Every controller sharing the database: when it was last seen, what it holds."""
    return ok({"hosts": await request.app[FLEET].hosts()})


async def forget_host(request: web.Request) -> web.Response:
    """The operator says a host is gone for good: the bots it held may start elsewhere."""
    name = request.match_info["host"]
    if problem := host_problem(name):
        raise InvalidSpec(problem, [FieldError("host", problem)])
    released = await request.app[FLEET].forget_host(name, request[ACTOR])
    return ok({"host": name, "released": released})


async def openapi(request: web.Request) -> web.Response:
    return ok(openapi_document())


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text: every bot this host holds (as GET /api/v1/bots shows it), then
    the controller. Another host's bots are that host's to export: with every host
    scraped, each bot is counted once."""
    app = request.app
    fleet = app[FLEET]
    bots = [bot for bot in await fleet.list() if bot.get("local", True)]
    text = render([*bot_families(bots, fleet.healer.failures), *controller_families(app)])
    return web.Response(body=text.encode(), headers=METRICS_CONTENT_TYPE)


# The version parameter tells Prometheus which text format this is.
METRICS_CONTENT_TYPE = {"Content-Type": "text/plain; version=0.0.4; charset=utf-8"}


def controller_families(app: web.Application) -> list[Family]:
    """The controller's own metrics: API latency and refusals, reconcile passes, the
    database, the outbox, the bus and the cost of sampling the bots."""
    fleet, store = app[FLEET], app[STORE]
    refusals = Family("tgfleet_api_refusals_total", "counter", "API requests refused, by reason.")
    for reason, count in app[REFUSALS].counts.items():
        refusals.add(count, reason=reason)
    database = Family(
        "tgfleet_database_up", "gauge", "1 while PostgreSQL answers, 0 while it is away."
    )
    database.add(int(store.unreachable_since is None))
    queued = Family("tgfleet_outbox_writes", "gauge", "Event writes waiting for PostgreSQL.")
    queued.add(len(fleet.outbox))
    dropped = Family(
        "tgfleet_outbox_dropped_total",
        "counter",
        "Event writes dropped because the outbox was full while PostgreSQL was away.",
    )
    dropped.add(fleet.outbox.dropped)
    bus = app[BUS_STATS]()
    bus_dropped = Family(
        "tgfleet_bus_dropped_total",
        "counter",
        "Bus messages dropped: invalid ones from bots (in), events a bot could not take (out).",
    )
    bus_dropped.add(bus.dropped_in, direction="in")
    bus_dropped.add(bus.dropped_out, direction="out")
    bus_refused = Family(
        "tgfleet_bus_refused_total", "counter", "Bus peers refused: their key is no bot's."
    )
    bus_refused.add(bus.refused)
    sampling = Family(
        "tgfleet_resource_sample_cpu_seconds",
        "gauge",
        "CPU time the controller spent on its last look at every bot's /proc.",
    )
    sampling.add(fleet.resources.last_pass_s)
    return [
        app[LATENCY].family(),
        refusals,
        fleet.pass_seconds.family(),
        database,
        queued,
        dropped,
        bus_dropped,
        bus_refused,
        sampling,
    ]


_NAME_OPS = {"start": "Start", "stop": "Stop", "restart": "Restart"}

ROUTES: tuple[Route, ...] = (
    Route(
        "GET",
        "/healthz",
        healthz,
        "Liveness: the controller answers",
        schemas.Liveness,
        public=True,
    ),
    Route(
        "GET",
        "/readyz",
        readyz,
        "Readiness: 200 while PostgreSQL answers, else 503 saying since when",
        schemas.Readiness,
        public=True,
        problems=(503,),
    ),
    Route("GET", "/openapi.json", openapi, "This document", dict[str, Any], public=True),
    Route("GET", "/metrics", metrics, "Prometheus metrics", media_type="text/plain"),
    Route("GET", "/api/v1/openapi.json", openapi, "This document", dict[str, Any], public=True),
    Route("GET", "/api/v1/status", status, "Fleet summary", schemas.Status),
    Route("GET", "/api/v1/bots", list_bots, "Every bot", schemas.BotList),
    Route(
        "POST",
        "/api/v1/bots",
        create_bot,
        "Create a bot (started unless autostart is false)",
        schemas.BotView,
        status=201,
        body=NewBotBody,
        problems=(409,),
        scope="admin",
    ),
    Route("GET", "/api/v1/bots/{name}", get_bot, "One bot", schemas.BotView, etag=True),
    Route(
        "PATCH",
        "/api/v1/bots/{name}",
        patch_bot,
        "Change a bot's spec (JSON merge patch: null resets a field to the fleet default); "
        "its process restarts only if what it sees changed",
        schemas.BotView,
        body=schemas.BotPatch,
        etag=True,
        scope="admin",
    ),
    Route(
        "DELETE",
        "/api/v1/bots/{name}",
        delete_bot,
        "Destroy a bot: stop it, remove its watcher, files and private dir; its events stay "
        "(GET /api/v1/history?bot=NAME). Refused (409) while another host runs it",
        schemas.Destroyed,
        problems=(409,),
        scope="admin",
    ),
    *(
        Route(
            "POST",
            f"/api/v1/bots/{{name}}/{op}",
            lifecycle(op),
            f"{verb} a bot",
            schemas.BotView,
            problems=(409,),
            scope="operate",
        )
        for op, verb in _NAME_OPS.items()
    ),
    Route(
        "GET",
        "/api/v1/bots/{name}/events",
        bot_events,
        "A bot's events, oldest first (a destroyed bot's: GET /api/v1/history)",
        schemas.EventList,
        query=(
            Query("after", "Only events after this id", 0, 2**62),
            Query("limit", "At most this many", 1, 1000),
        ),
    ),
    Route(
        "GET",
        "/api/v1/history",
        history,
        "The audit trail, oldest first: every event, or one bot's, destroyed bots included",
        schemas.EventList,
        query=(
            Query("bot", "Only this bot's events", pattern=NAME_PATTERN),
            Query("after", "Only events after this id", 0, 2**62),
            Query("limit", "At most this many", 1, 1000),
        ),
    ),
    Route(
        "GET",
        "/api/v1/bots/{name}/logs",
        bot_logs,
        "The tail of a bot's log",
        schemas.LogTail,
        query=(
            Query("stream", "stdout or stderr", choices=("out", "err")),
            Query("lines", "How many lines", 1, MAX_LOG_LINES),
        ),
    ),
    Route(
        "GET",
        "/api/v1/events",
        event_stream,
        "Server-sent events: every event as written",
        media_type="text/event-stream",
    ),
    Route(
        "POST",
        "/api/v1/events",
        publish_event,
        "Publish {topic, data} on the bus",
        schemas.EventView,
        status=201,
        body=schemas.Publish,
        scope="operate",
    ),
    Route(
        "GET",
        "/api/v1/defaults",
        get_defaults,
        "The fleet defaults (secrets left out)",
        schemas.Defaults,
    ),
    Route(
        "PUT",
        "/api/v1/defaults",
        put_defaults,
        "Replace the fleet defaults; refused if a bot could no longer run",
        schemas.Defaults,
        body=FleetDefaults,
        scope="admin",
    ),
    Route(
        "GET",
        "/api/v1/hosts",
        list_hosts,
        "The hosts whose controllers share this database: last seen, bots held",
        schemas.HostList,
    ),
    Route(
        "DELETE",
        "/api/v1/hosts/{host}",
        forget_host,
        "Forget a host that is gone for good: the bots it held may start on their hosts. "
        "Refused (409) while it was seen lately (TGFLEET_HOST_FORGET_AFTER_S, default 60 s)",
        schemas.ForgottenHost,
        problems=(409,),
        scope="admin",
    ),
    Route(
        "GET",
        "/api/v1/tokens",
        list_tokens,
        "API tokens (no secrets)",
        schemas.TokenList,
        scope="admin",
    ),
    Route(
        "POST",
        "/api/v1/tokens",
        create_token,
        "Create a token; its secret is shown once",
        schemas.CreatedToken,
        status=201,
        body=schemas.NewToken,
        problems=(409,),
        scope="admin",
    ),
    Route(
        "DELETE",
        "/api/v1/tokens/{name}",
        revoke_token,
        "Revoke a token (not the last one that can administer the fleet)",
        schemas.TokenView,
        problems=(409,),
        scope="admin",
    ),
    Route(
        "POST",
        "/api/v1/secrets/rotate",
        rotate_secrets,
        "Seal every stored secret (bot tokens, sessions, api_hash) with a new key",
        schemas.Resealed,
        scope="admin",
    ),
)


@functools.cache
def openapi_document() -> dict[str, Any]:
    """The OpenAPI document, built on first request: it and importlib.metadata (which
    reads the version) are ~1.5 MB that a fleet nobody asks for it never needs."""
    import importlib.metadata

    return build_openapi(ROUTES, importlib.metadata.version("tgfleet"))


def build_app(
    fleet: Fleet,
    store: Store,
    home: Home,
    publish: Callable[[str, protocol.Event], None],
    throttle: AuthThrottle | None = None,
    bus_stats: Callable[[], BusStats] = BusStats,
) -> web.Application:
    app = web.Application(
        middlewares=[timing, problems, database_patience, access], client_max_size=MAX_BODY_BYTES
    )
    app[FLEET] = fleet
    app[STORE] = store
    app[HOME] = home
    app[TOKENS] = {}
    app[THROTTLE] = throttle or AuthThrottle()
    app[REFUSALS] = Refusals()
    app[PUBLISH] = publish
    app[BUS_STATS] = bus_stats
    app[LATENCY] = Histogram(
        "tgfleet_http_request_duration_seconds", "API answers' latency, by route."
    )
    app[ROUTE_OF] = {}
    app[SESSIONS] = Sessions()
    app[PAGES] = set()
    for route in ROUTES:
        added = app.router.add_route(route.method, route.path, route.handler)
        app[ROUTE_OF][(route.method, added.resource.canonical)] = route  # type: ignore[union-attr]
    return app
