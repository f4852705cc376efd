"""The dashboard's pages and sessions as a browser meets them: the real aiohttp app
(API and pages) over the shipped fakes (InMemoryStore, FakeSupervisor), on a
loopback port. The browser itself drives them in tests/integration/test_dashboard.py.
"""

from __future__ import annotations

import asyncio
import json
import re
import ssl
import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestClient, TestServer
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from harness import fleet_in_memory

from controller import api
from controller.access import AuthThrottle, trusted_networks
from controller.api import build_app, hash_token
from controller.dashboard import add_dashboard, limits_of, safe_next, script_json
from controller.fleet import Fleet
from controller.memstore import InMemoryStore
from controller.sessions import COOKIE

TOKENS = {"admin": "tgf_admin-secret", "ops": "tgf_operate-secret", "viewer": "tgf_read-secret"}
THROTTLE_LIMIT = 5


@dataclass
class Browser:
    """A client that keeps cookies, as a browser does, and says where it comes from."""

    client: TestClient[Any, Any]
    store: InMemoryStore

    @property
    def origin(self) -> str:
        return str(self.client.make_url("")).rstrip("/")

    async def login(self, token: str, origin: str | None = None) -> ClientResponse:
        return await self.client.post(
            "/login",
            data={"token": token, "next": "/"},
            headers={"Origin": origin or self.origin},
            allow_redirects=False,
        )

    def session_id(self) -> str | None:
        for cookie in self.client.session.cookie_jar:
            if cookie.key == COOKIE:
                return cookie.value
        return None

    async def page(self, path: str) -> tuple[int, str, ClientResponse]:
        answer = await self.client.get(path, allow_redirects=False)
        return answer.status, await answer.text(), answer

    async def csrf(self) -> str:
        _, text, _ = await self.page("/")
        found = re.search(r'<meta name="csrf-token" content="([^"]+)">', text)
        assert found, text
        return found.group(1)

    async def write(
        self, path: str, csrf: str | None, origin: str | None = "self"
    ) -> tuple[int, Any]:
        headers = {}
        if csrf is not None:
            headers["X-CSRF-Token"] = csrf
        if origin is not None:
            headers["Origin"] = self.origin if origin == "self" else origin
        answer = await self.client.post(path, headers=headers)
        return answer.status, await answer.json(content_type=None)

    async def desired(self, name: str = "echo") -> str:
        return (await self.store.get_bot(name)).desired


async def dashboard_app(
    tmp_path: Path, trusted_proxies: tuple[str, ...] = ()
) -> tuple[web.Application, InMemoryStore, Fleet]:
    store, home, fleet = fleet_in_memory(tmp_path)
    await store.ensure_token("admin", hash_token(TOKENS["admin"]))
    await store.add_token("ops", hash_token(TOKENS["ops"]), "operate", None)
    await store.add_token("viewer", hash_token(TOKENS["viewer"]), "read", None)
    spec = {"token": "1:abc", "telegram": {"api_id": 1, "api_hash": "h"}}
    await store.create_bot("echo", spec, "stopped", "tester")
    (home.logs_dir / "bot-echo.err.log").write_text("echo: started\n<b>not markup</b>\n")
    throttle = AuthThrottle(limit=THROTTLE_LIMIT, trusted_proxies=trusted_networks(trusted_proxies))
    app = build_app(fleet, store, home, lambda topic, event: None, throttle)
    add_dashboard(app, sample_every_s=0.05)
    return app, store, fleet


@pytest.fixture
async def browser(tmp_path: Path) -> AsyncIterator[Browser]:
    app, store, fleet = await dashboard_app(tmp_path)
    client: TestClient[Any, Any] = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    try:
        yield Browser(client, store)
    finally:
        await client.close()
        await fleet.close()


def self_signed(tmp_path: Path) -> ssl.SSLContext:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(hours=1))
        .sign(key, hashes.SHA256())
    )
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    return context


async def test_under_tls_the_session_cookie_is_secure(tmp_path: Path) -> None:
    app, _, fleet = await dashboard_app(tmp_path)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server(ssl=self_signed(tmp_path))
    client: TestClient[Any, Any] = TestClient(server)
    try:
        origin = str(client.make_url("")).rstrip("/")
        assert origin.startswith("https://")
        answer = await client.post(
            "/login",
            data={"token": TOKENS["ops"]},
            headers={"Origin": origin},
            allow_redirects=False,
            ssl=False,
        )
        assert answer.status == 303
        cookie = answer.headers["Set-Cookie"]
        assert "Secure" in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie
        # The plain-HTTP origin of the same host is another origin.
        http_origin = origin.replace("https://", "http://")
        refused = await client.post(
            "/login", data={"token": TOKENS["ops"]}, headers={"Origin": http_origin}, ssl=False
        )
        assert refused.status == 403
    finally:
        await client.close()
        await fleet.close()


#: What a TLS-terminating reverse proxy (nginx's `proxy_set_header`, Caddy's defaults)
#: adds when a browser at https://fleet.example reaches it.
PROXIED = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "fleet.example"}
OUTSIDE = "https://fleet.example"


async def proxied_login_and_write(
    tmp_path: Path, trusted_proxies: tuple[str, ...]
) -> tuple[ClientResponse, int, str]:
    """A browser at https://fleet.example, through a proxy on 127.0.0.1 to our plain
    HTTP: its login, then a start from the page; (login answer, start status, detail)."""
    app, store, fleet = await dashboard_app(tmp_path, trusted_proxies)
    client: TestClient[Any, Any] = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    try:
        login = await client.post(
            "/login",
            data={"token": TOKENS["ops"], "next": "/"},
            headers={"Origin": OUTSIDE, **PROXIED},
            allow_redirects=False,
        )
        cookie = login.cookies.get(COOKIE)
        if cookie is None:
            return login, 0, ""
        # The browser sends a Secure cookie only over https, which it speaks to the proxy.
        jar = {"Cookie": f"{COOKIE}={cookie.value}"}
        page = await client.get("/", headers={**jar, **PROXIED})
        found = re.search(r'<meta name="csrf-token" content="([^"]+)">', await page.text())
        assert found
        start = await client.post(
            "/api/v1/bots/echo/start",
            headers={**jar, **PROXIED, "Origin": OUTSIDE, "X-CSRF-Token": found.group(1)},
        )
        detail = (await start.json(content_type=None)).get("detail", "")
        desired = (await store.get_bot("echo")).desired
        assert desired == ("running" if start.status == 200 else "stopped")
        return login, start.status, detail
    finally:
        await client.close()
        await fleet.close()


async def test_behind_a_trusted_tls_proxy_the_outside_origin_is_this_server_s(
    tmp_path: Path,
) -> None:
    login, status, _ = await proxied_login_and_write(tmp_path, ("127.0.0.1",))
    assert login.status == 303
    cookie = login.headers["Set-Cookie"]
    assert "Secure" in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert status == 200


async def test_an_untrusted_peer_cannot_name_the_origin_or_the_scheme(tmp_path: Path) -> None:
    # The same headers from a peer not in TGFLEET_TRUSTED_PROXIES are not believed.
    login, _, _ = await proxied_login_and_write(tmp_path / "none", ())
    assert login.status == 403 and "Set-Cookie" not in login.headers
    login, _, _ = await proxied_login_and_write(tmp_path / "other", ("10.0.0.0/8",))
    assert login.status == 403 and "Set-Cookie" not in login.headers


async def test_behind_a_trusted_proxy_another_site_is_still_refused(browser: Browser) -> None:
    browser.client.app[api.THROTTLE].trusted_proxies = trusted_networks(["127.0.0.1"])
    await browser.login(TOKENS["ops"])
    csrf = await browser.csrf()
    for origin, forwarded in [
        ("https://evil.example", PROXIED),  # the proxy's host, another site's page
        (OUTSIDE, {**PROXIED, "X-Forwarded-Proto": "http"}),  # https page, http origin
        (OUTSIDE, {**PROXIED, "X-Forwarded-Host": "fleet.example/evil"}),  # not a host
        (OUTSIDE, {"X-Forwarded-Proto": "gopher", "X-Forwarded-Host": "fleet.example"}),
    ]:
        answer = await browser.client.post(
            "/api/v1/bots/echo/start",
            headers={"X-CSRF-Token": csrf, "Origin": origin, **forwarded},
        )
        assert answer.status == 403, (origin, forwarded)
    assert await browser.desired() == "stopped"
    # Direct requests to the controller (no forwarded headers) still work as before.
    status, _ = await browser.write("/api/v1/bots/echo/start", csrf)
    assert status == 200


async def test_pages_send_a_stranger_to_the_login_form(browser: Browser) -> None:
    for path in ("/", "/bots/echo"):
        status, _, answer = await browser.page(path)
        assert status == 303
        where = urllib.parse.urlsplit(answer.headers["Location"])
        assert where.path == "/login" and urllib.parse.parse_qs(where.query)["next"] == [path]
    status, text, answer = await browser.page("/login")
    assert status == 200 and 'name="token"' in text and 'type="password"' in text
    assert "frame-ancestors 'none'" in answer.headers["Content-Security-Policy"]
    status, _, _ = await browser.page("/bots/echo/samples")
    assert status == 401


async def test_login_sets_an_httponly_strict_cookie_that_is_not_the_token(
    browser: Browser,
) -> None:
    answer = await browser.login(TOKENS["ops"])
    assert answer.status == 303 and answer.headers["Location"] == "/"
    cookie = answer.headers["Set-Cookie"]
    assert cookie.startswith(f"{COOKIE}=")
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
    assert "Secure" not in cookie  # plain HTTP on loopback; under TLS it is Secure
    session_id = browser.session_id()
    assert session_id and TOKENS["ops"] not in cookie and len(session_id) >= 40
    # Logging in again gives a new session and ends the one the browser held.
    assert (await browser.login(TOKENS["ops"])).status == 303
    assert browser.session_id() != session_id
    replayed = await browser.client.get("/api/v1/bots", cookies={COOKIE: session_id})
    assert replayed.status == 401
    status, text, answer = await browser.page("/")
    assert status == 200 and 'data-can-operate="true"' in text
    assert answer.headers["Cache-Control"] == "no-store"
    boot = json.loads(re.search(r'id="boot">(.*?)</script>', text, re.S).group(1))  # type: ignore[union-attr]
    assert [b["name"] for b in boot["bots"]] == ["echo"]
    assert boot["limits"] == {"echo": {"memory_limit_mb": 512, "open_files": 1024}}
    assert TOKENS["ops"] not in text
    # The API reads with the same cookie (the page's live updates do).
    bots = await browser.client.get("/api/v1/bots")
    assert bots.status == 200 and (await bots.json())["bots"][0]["name"] == "echo"


async def test_a_bad_token_gets_the_form_again_and_is_throttled(browser: Browser) -> None:
    answers = [await browser.login("tgf_wrong") for _ in range(THROTTLE_LIMIT + 1)]
    assert [a.status for a in answers] == [401] * THROTTLE_LIMIT + [429]
    assert "the bearer token is unknown" in await answers[0].text()
    assert int(answers[-1].headers["Retry-After"]) >= 1
    assert browser.session_id() is None
    # A valid token from the same address still gets in (as with bearer tokens).
    assert (await browser.login(TOKENS["viewer"])).status == 303
    empty = await browser.client.post(
        "/login", data={"token": " "}, headers={"Origin": browser.origin}, allow_redirects=False
    )
    assert empty.status == 400


async def test_a_login_posted_from_another_site_is_refused(browser: Browser) -> None:
    answer = await browser.login(TOKENS["admin"], origin="http://evil.example")
    assert answer.status == 403 and "Set-Cookie" not in answer.headers
    assert browser.session_id() is None


async def test_a_read_token_sees_no_buttons_and_cannot_write(browser: Browser) -> None:
    await browser.login(TOKENS["viewer"])
    status, text, _ = await browser.page("/")
    assert status == 200 and 'data-can-operate="false"' in text
    status, text, _ = await browser.page("/bots/echo")
    assert status == 200 and 'data-can-operate="false"' in text
    csrf = await browser.csrf()
    status, problem = await browser.write("/api/v1/bots/echo/start", csrf)
    assert status == 403 and "needs 'operate'" in problem["detail"]
    assert await browser.desired() == "stopped"


async def test_cookie_writes_need_the_csrf_token_and_this_origin(browser: Browser) -> None:
    await browser.login(TOKENS["ops"])
    csrf = await browser.csrf()
    refused = [
        await browser.write("/api/v1/bots/echo/start", None),
        await browser.write("/api/v1/bots/echo/start", "forged"),
        await browser.write("/api/v1/bots/echo/start", csrf, origin="http://evil.example"),
        await browser.write("/api/v1/bots/echo/start", csrf, origin=None),
    ]
    assert [status for status, _ in refused] == [403] * 4
    assert "X-CSRF-Token" in refused[0][1]["detail"]
    assert "this server's pages" in refused[2][1]["detail"]
    assert await browser.desired() == "stopped"
    metrics = await browser.client.get(
        "/metrics", headers={"Authorization": f"Bearer {TOKENS['admin']}"}
    )
    assert 'tgfleet_api_refusals_total{reason="csrf"} 4' in await metrics.text()
    status, bot = await browser.write("/api/v1/bots/echo/start", csrf)
    assert status == 200 and bot["desired"] == "running"
    assert await browser.desired() == "running"
    # The bearer API is as it was: no cookie, no CSRF token, no Origin needed.
    browser.client.session.cookie_jar.clear()
    answer = await browser.client.post(
        "/api/v1/bots/echo/stop", headers={"Authorization": f"Bearer {TOKENS['ops']}"}
    )
    assert answer.status == 200 and await browser.desired() == "stopped"


async def test_a_revoked_token_ends_its_sessions(browser: Browser) -> None:
    await browser.login(TOKENS["ops"])
    assert (await browser.client.get("/api/v1/bots")).status == 200
    # Revoked behind the API's back (another controller, psql): the next request sees it.
    await browser.store.revoke_token("ops")
    answer = await browser.client.get("/api/v1/bots")
    assert answer.status == 401 and "revoked" in (await answer.json())["detail"]
    status, _, _ = await browser.page("/")
    assert status == 303
    # Revoked through the API: its sessions end at once.
    browser.client.session.cookie_jar.clear()
    await browser.login(TOKENS["viewer"])
    assert (await browser.client.get("/api/v1/bots")).status == 200
    revoke = await browser.client.delete(
        "/api/v1/tokens/viewer", headers={"Authorization": f"Bearer {TOKENS['admin']}"}
    )
    assert revoke.status == 200
    assert (await browser.client.get("/api/v1/bots")).status == 401


async def test_logout_needs_the_form_and_ends_the_session(browser: Browser) -> None:
    await browser.login(TOKENS["ops"])
    session_id = browser.session_id()
    forged = await browser.client.post(
        "/logout", data={}, headers={"Origin": browser.origin}, allow_redirects=False
    )
    assert forged.status == 403
    csrf = await browser.csrf()
    answer = await browser.client.post(
        "/logout",
        data={"csrf_token": csrf},
        headers={"Origin": browser.origin},
        allow_redirects=False,
    )
    assert answer.status == 303 and answer.headers["Location"] == "/login"
    assert browser.session_id() is None
    # The old cookie, replayed, opens nothing.
    replayed = await browser.client.get("/api/v1/bots", cookies={COOKIE: str(session_id)})
    assert replayed.status == 401


async def test_the_bot_page_shows_events_health_and_the_log_escaped(browser: Browser) -> None:
    await browser.store.add_event(
        "echo", "health", "health", "no heartbeat for 9 s", {"failure": "hung"}
    )
    await browser.login(TOKENS["admin"])
    status, text, _ = await browser.page("/bots/echo")
    assert status == 200
    assert "no heartbeat for 9 s" in text and "<b>hung</b>" in text  # health history
    assert "→ configuring" in text  # the created event
    assert "&lt;b&gt;not markup&lt;/b&gt;" in text and "<b>not markup</b>" not in text
    status, text, _ = await browser.page("/bots/ghost")
    assert status == 404 and "no bot named" in text
    status, _, _ = await browser.page("/bots/Bad_Name")
    assert status == 404
    samples = await browser.client.get("/bots/echo/samples")
    assert samples.status == 200 and isinstance((await samples.json())["points"], list)


async def test_static_files_are_served_and_nothing_else(browser: Browser) -> None:
    js = await browser.client.get("/static/dashboard.js")
    assert js.status == 200 and js.content_type == "text/javascript"
    assert (await browser.client.get("/static/dashboard.css")).status == 200
    assert (await browser.client.get("/static/..%2Fbase.html")).status == 404
    assert (await browser.client.get("/static/base.html")).status == 404


@pytest.mark.parametrize(
    ("defaults", "spec", "expected"),
    [
        ({}, {}, (512, 1024)),
        ({"memory_limit_mb": 300}, {}, (300, 1024)),
        ({"memory_limit_mb": 300}, {"memory_limit_mb": 200}, (200, 1024)),
        (
            {"limits": {"open_files": 4096}},
            {"credential": "token", "plugins": ["a:b"]},
            (512, 4096),
        ),
        (None, {"limits": {"open_files": 100}}, (512, 100)),
    ],
)
def test_limits_shown_are_the_bots_own_over_the_defaults(
    defaults: dict[str, Any] | None, spec: dict[str, Any], expected: tuple[int, int]
) -> None:
    found = limits_of(defaults, spec)
    assert (found["memory_limit_mb"], found["open_files"]) == expected


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        (None, "/"),
        ("", "/"),
        ("/bots/echo", "/bots/echo"),
        ("//evil.example/x", "/"),
        ("https://evil.example/", "/"),
        ("/\\evil.example", "/"),
        ("bots", "/"),
    ],
)
def test_after_login_only_paths_on_this_server(target: str | None, expected: str) -> None:
    assert safe_next(target) == expected


def test_boot_json_cannot_close_its_script_element() -> None:
    value = {"reason": "</script><script>alert(1)</script><!-- & -->"}
    text = str(script_json(value))
    assert "<" not in text and ">" not in text and "&" not in text
    assert json.loads(text) == value


async def test_an_open_event_stream_ends_with_its_session(
    browser: Browser, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(api, "STREAM_KEEPALIVE_S", 0.05)
    await browser.login(TOKENS["ops"])
    async with browser.client.get("/api/v1/events") as stream:
        assert stream.status == 200
        await asyncio.wait_for(stream.content.readuntil(b": keepalive\n\n"), 10)
        # Revoked behind the API's back: the stream notices at its next keepalive.
        await browser.store.revoke_token("ops")
        rest = await asyncio.wait_for(stream.content.read(), 10)
        assert stream.content.at_eof()
    assert rest.count(b": keepalive") <= 1
    assert (await browser.client.get("/api/v1/bots")).status == 401
