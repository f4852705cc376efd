"""The dashboard: HTML pages over the fleet, for people, beside the JSON API.

A browser logs in once with an API token (``POST /login``); it then holds a session
cookie (controller/sessions.py) that the pages and the API both accept. The pages
are rendered here with Jinja2 and kept live by plain JS (templates/static/) that
reads the API with that cookie: the event stream for changes, the bot list for
gauges. Writes from the page carry the session's CSRF token. None of this is in the
OpenAPI document: these are pages, not API operations.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import urllib.parse
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime
from functools import cache
from importlib import resources
from typing import TYPE_CHECKING, Any

from aiohttp import web

if TYPE_CHECKING:
    import jinja2
    import markupsafe

from controller.access import allows
from controller.api import (
    FLEET,
    HOME,
    NAME_RE,
    PAGES,
    SESSIONS,
    STORE,
    authenticate,
    hash_token,
    public_origin,
    tail,
)
from controller.errors import NotFound, StoreUnavailable, TooManyRequests, Unauthorized
from controller.samples import Sample, Samples, series
from controller.sessions import (
    COOKIE,
    CSRF_FIELD,
    Session,
    csrf_matches,
    same_origin,
)
from controller.spec import effective, public_defaults
from controller.store import EventRow, TokenRow

log = logging.getLogger("tgfleet.dashboard")

TEMPLATES = resources.files("controller") / "templates"
SAMPLES: web.AppKey[Samples] = web.AppKey("samples", Samples)
#: Static files the pages load, by name: their media types.
STATIC = {"dashboard.js": "text/javascript", "dashboard.css": "text/css"}
#: Pages run no inline script and load nothing from elsewhere; nobody may frame them.
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
RECENT_EVENTS = 40
HEALTH_WINDOW = 500  # a bot's newest events searched for its health history
HEALTH_HISTORY = 20
LOG_LINES = 60
SAMPLE_EVERY_S = 10.0


def _source(name: str) -> str | None:
    template = TEMPLATES / name
    return template.read_text(encoding="utf-8") if template.is_file() else None


@cache
def _environment() -> jinja2.Environment:
    """Jinja2 is imported at the first page served: a controller nobody browses to
    does not keep it (tests/unit/test_imports.py)."""
    import jinja2

    return jinja2.Environment(
        loader=jinja2.FunctionLoader(_source),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def render(name: str, status: int = 200, **context: Any) -> web.Response:
    body = _environment().get_template(name).render(**context)
    return web.Response(
        text=body, status=status, content_type="text/html", charset="utf-8", headers=PAGE_HEADERS
    )


def script_json(value: object) -> markupsafe.Markup:
    """JSON to put inside a <script type="application/json"> element: its text is not
    HTML-unescaped there, so nothing may close the element or open a comment."""
    text = json.dumps(value)
    for char, escaped in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026")):
        text = text.replace(char, escaped)
    import markupsafe

    return markupsafe.Markup(text)  # escaped for this context above


def _now() -> float:
    return datetime.now(UTC).timestamp()


def safe_next(target: str | None) -> str:
    """Where to go after logging in: a path on this server only (no ``//host``)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


def _to_login(request: web.Request) -> web.HTTPSeeOther:
    query = urllib.parse.urlencode({"next": request.path_qs})
    answer = web.HTTPSeeOther(f"/login?{query}")
    answer.del_cookie(COOKIE, path="/")
    return answer


async def viewer(request: web.Request) -> tuple[Session, TokenRow] | None:
    """The session and live token of the request's cookie, or None."""
    session_id = request.cookies.get(COOKIE)
    if session_id is None:
        return None
    session = request.app[SESSIONS].get(session_id, _now())
    if session is None:
        return None
    try:
        row = await authenticate(request, session.token_sha256, session)
    except (Unauthorized, TooManyRequests):
        return None
    return session, row


def _from_here(request: web.Request) -> bool:
    return same_origin(
        request.headers.get("Origin"), request.headers.get("Referer"), *public_origin(request)
    )


# ------------------------------------------------------------------ log in/out


async def login_form(request: web.Request) -> web.Response:
    return render("login.html", next=safe_next(request.query.get("next")), error=None)


async def login(request: web.Request) -> web.StreamResponse:
    form = await request.post()
    target = safe_next(str(form.get("next", "/")))
    if not _from_here(request):
        # A login forced from another site would sign the victim in as the attacker.
        return render("login.html", 403, next=target, error="log in from this server's own page")
    token = str(form.get("token", "")).strip()
    if not token:
        return render("login.html", 400, next=target, error="give an API token")
    digest = hash_token(token)
    try:
        row = await authenticate(request, digest)
    except TooManyRequests as exc:
        answer = render("login.html", 429, next=target, error=exc.detail)
        answer.headers["Retry-After"] = str(exc.retry_after_s)
        return answer
    except Unauthorized as exc:
        return render("login.html", 401, next=target, error=exc.detail)
    previous = request.cookies.get(COOKIE)
    if previous is not None:
        request.app[SESSIONS].close(previous)  # a new login never keeps the old id
    session_id, _ = request.app[SESSIONS].open(digest, row.name, _now())
    log.info("dashboard login with token %r from %s", row.name, request.remote)
    answer = web.HTTPSeeOther(target)
    # Not readable by scripts, never sent with another site's request, Secure under TLS
    # (ours, or a trusted proxy's that terminates it).
    secure = public_origin(request)[0] == "https"
    answer.set_cookie(COOKIE, session_id, httponly=True, samesite="Strict", secure=secure, path="/")
    raise answer


async def logout(request: web.Request) -> web.StreamResponse:
    session_id = request.cookies.get(COOKIE)
    session = None if session_id is None else request.app[SESSIONS].get(session_id, _now())
    if session_id is None or session is None:
        raise _to_login(request)
    form = await request.post()
    presented = form.get(CSRF_FIELD)
    if not _from_here(request) or not csrf_matches(
        session, presented if isinstance(presented, str) else None
    ):
        return render("error.html", 403, message="logout needs this page's form")
    request.app[SESSIONS].close(session_id)
    answer = web.HTTPSeeOther("/login")
    answer.del_cookie(COOKIE, path="/")
    raise answer


# ----------------------------------------------------------------------- pages


LIMIT_FIELDS = ("memory_limit_mb", "limits")


def limits_of(fleet_defaults: Mapping[str, Any] | None, spec: Mapping[str, Any]) -> dict[str, int]:
    """A bot's effective memory and open-files limits (its own over the defaults)."""
    own = {key: spec[key] for key in LIMIT_FIELDS if key in spec}
    defaults = {
        key: (fleet_defaults or {})[key] for key in LIMIT_FIELDS if key in (fleet_defaults or {})
    }
    merged = effective(own, defaults)
    return {"memory_limit_mb": merged.memory_limit_mb, "open_files": merged.limits.open_files}


def _page_context(session: Session, row: TokenRow) -> dict[str, Any]:
    return {
        "token_name": row.name,
        "scope": row.scope,
        "can_operate": allows(row.scope, "operate"),
        "csrf": session.csrf,
    }


async def fleet_page(request: web.Request) -> web.StreamResponse:
    who = await viewer(request)
    if who is None:
        raise _to_login(request)
    fleet = request.app[FLEET]
    bots = await fleet.list()
    defaults = public_defaults(fleet.defaults or {})
    limits = {bot["name"]: limits_of(fleet.defaults, bot["spec"]) for bot in bots}
    return render(
        "fleet.html",
        bots=bots,
        boot=script_json({"bots": bots, "limits": limits, "defaults": defaults}),
        **_page_context(*who),
    )


def health_history(events: list[EventRow]) -> list[EventRow]:
    """A bot's health detections, backoffs, failures and recoveries, newest first."""
    found = [e for e in events if e.kind == "health" or "failure" in e.data]
    return found[::-1][:HEALTH_HISTORY]


async def bot_page(request: web.Request) -> web.StreamResponse:
    who = await viewer(request)
    if who is None:
        raise _to_login(request)
    name = request.match_info["name"]
    fleet, store = request.app[FLEET], request.app[STORE]
    try:
        bot = await fleet.get(name) if NAME_RE.fullmatch(name) else None
    except NotFound:
        bot = None
    if bot is None:
        return render("error.html", 404, message=f"no bot named {name!r}")
    events_error = None
    window: list[EventRow] = []
    try:
        window = await store.recent_events(name, HEALTH_WINDOW)
    except StoreUnavailable as exc:
        events_error = exc.detail
    path = request.app[HOME].logs_dir / f"bot-{name}.err.log"
    lines = await asyncio.to_thread(tail, path, LOG_LINES)
    points = series(request.app[SAMPLES].of(name, _now()))
    limits = limits_of(fleet.defaults, bot["spec"])
    return render(
        "bot.html",
        bot=bot,
        events=window[-RECENT_EVENTS:][::-1],
        health=health_history(window),
        events_error=events_error,
        log_lines=lines,
        sample_every_s=request.app[SAMPLES].every_s,
        boot=script_json(
            {
                "bot": bot,
                "limits": {name: limits},
                "points": points,
                "sample_every_s": request.app[SAMPLES].every_s,
                "log_lines": LOG_LINES,
            }
        ),
        **_page_context(*who),
    )


async def bot_samples(request: web.Request) -> web.Response:
    """The chart's points of one bot (the last hour), for its page to redraw."""
    if await viewer(request) is None:
        raise Unauthorized("log in on /login")
    name = request.match_info["name"]
    return web.json_response(
        {"points": series(request.app[SAMPLES].of(name, _now()))},
        headers={"Cache-Control": "no-store"},
    )


async def static(request: web.Request) -> web.Response:
    name = request.match_info["file"]
    media = STATIC.get(name)
    if media is None:
        raise web.HTTPNotFound()
    body = (TEMPLATES / "static" / name).read_bytes()
    return web.Response(
        body=body,
        content_type=media,
        charset="utf-8",
        headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"},
    )


# --------------------------------------------------------------------- samples


async def _sample_forever(app: web.Application) -> None:
    """Every SAMPLE_EVERY_S, each bot's memory and message counters into the ring,
    from memory (the last rows read, the last heartbeats): no database query."""
    fleet, samples = app[FLEET], app[SAMPLES]
    while True:
        rows = fleet.rows or []
        now = fleet.clock.wall()
        for row in rows:
            try:
                samples.add(row.name, Sample.of(now, fleet.view(row)))
            except OSError as exc:  # /proc of a process that just went away
                log.debug("no sample of %s: %s", row.name, exc)
        samples.keep_only(row.name for row in rows)
        await asyncio.sleep(samples.every_s)


async def _sampling(app: web.Application) -> AsyncIterator[None]:
    task = asyncio.create_task(_sample_forever(app), name="dashboard samples")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def add_dashboard(app: web.Application, sample_every_s: float = SAMPLE_EVERY_S) -> None:
    """Add the pages to the API's app; they check their sessions themselves."""
    app[SAMPLES] = Samples(every_s=sample_every_s)
    pages = [
        ("GET", "/", fleet_page),
        ("GET", "/login", login_form),
        ("POST", "/login", login),
        ("POST", "/logout", logout),
        ("GET", "/bots/{name}", bot_page),
        ("GET", "/bots/{name}/samples", bot_samples),
        ("GET", "/static/{file}", static),
    ]
    for method, path, handler in pages:
        added = app.router.add_route(method, path, handler)
        app[PAGES].add(added.resource.canonical)  # type: ignore[union-attr]
    app.cleanup_ctx.append(_sampling)
