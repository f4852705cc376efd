"""Who may do what over the API, as a client sees it: the real aiohttp app and its
middlewares over the shipped fakes (InMemoryStore, FakeSupervisor), on a loopback port.

Each refusal must be the right problem+json, change nothing, and be counted in /metrics.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from harness import fleet_in_memory

from controller.access import (
    AuthThrottle,
    allows,
    client_address,
    forwarded_origin,
    parse_duration,
    token_in_query,
    trusted_networks,
)
from controller.api import ROUTES, THROTTLE, build_app, hash_token, openapi_document
from controller.memstore import InMemoryStore
from controller.openapi import problems_of

TOKENS = {
    "admin": "tgf_admin-secret",
    "ops": "tgf_operate-secret",
    "viewer": "tgf_read-secret",
    "old": "tgf_expired-secret",
    "gone": "tgf_revoked-secret",
}


@dataclass
class Api:
    client: TestClient[Any, Any]
    store: InMemoryStore

    async def call(
        self,
        method: str,
        path: str,
        token: str | None,
        body: object = None,
        forwarded_for: str | None = None,
    ) -> tuple[int, dict[str, str], Any]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        if forwarded_for is not None:
            headers["X-Forwarded-For"] = forwarded_for
        kwargs: dict[str, Any] = {"headers": headers}
        if body is not None:
            kwargs["json"] = body
        async with self.client.request(method, path, **kwargs) as answer:
            text = await answer.text()
            parsed: Any = text
            if answer.content_type.endswith("json"):
                parsed = await answer.json(content_type=None)
            return answer.status, dict(answer.headers), parsed

    async def refusals(self) -> dict[str, int]:
        _, _, text = await self.call("GET", "/metrics", TOKENS["admin"])
        found = {}
        for line in text.splitlines():
            if line.startswith("tgfleet_api_refusals_total{"):
                reason = line.split('"')[1]
                found[reason] = int(line.rsplit(" ", 1)[1])
        return found

    async def state(self) -> tuple[object, ...]:
        """Everything a refused request must leave alone (a token's last use aside)."""
        tokens = [replace(t, last_used_at=None) for t in await self.store.list_tokens()]
        return (
            await self.store.list_bots(),
            await self.store.events(None, 0, 1000),
            tokens,
            await self.store.get_defaults(),
        )


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    store, home, fleet = fleet_in_memory(tmp_path)
    await store.ensure_token("admin", hash_token(TOKENS["admin"]))
    await store.add_token("ops", hash_token(TOKENS["ops"]), "operate", None)
    await store.add_token("viewer", hash_token(TOKENS["viewer"]), "read", None)
    past = datetime.now(UTC) - timedelta(minutes=1)
    await store.add_token("old", hash_token(TOKENS["old"]), "admin", past)
    await store.add_token("gone", hash_token(TOKENS["gone"]), "admin", None)
    await store.revoke_token("gone")
    await store.create_bot("echo", {"token": "1:abc"}, "stopped", "tester")
    app = build_app(fleet, store, home, lambda topic, event: None)
    client: TestClient[Any, Any] = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    try:
        yield Api(client, store)
    finally:
        await client.close()
        await fleet.close()


def writes(scope: str) -> list[tuple[str, str]]:
    """(method, path) of every route that needs ``scope`` or more, on the bot 'echo'."""
    return [
        (r.method, r.path.replace("{name}", "echo").replace("{host}", "elsewhere"))
        for r in ROUTES
        if not r.public and allows(r.scope, scope) and r.scope != "read"  # type: ignore[arg-type]
    ]


def assert_problem(answer: tuple[int, dict[str, str], Any], status: int, *words: str) -> None:
    code, headers, body = answer
    assert code == status, body
    assert headers["Content-Type"].startswith("application/problem+json")
    assert body["status"] == status and body["title"] and body["type"].startswith("https://")
    for word in words:
        assert word in body["detail"]


async def test_a_read_token_may_read_but_not_write(api: Api) -> None:
    before = await api.state()
    attempts = writes("operate")
    every_write = {
        (r.method, r.path.replace("{name}", "echo").replace("{host}", "elsewhere"))
        for r in ROUTES
        if r.method != "GET"
    }
    assert every_write <= set(attempts) and len(attempts) == len(every_write) + 1  # GET tokens
    for method, path in attempts:
        answer = await api.call(method, path, TOKENS["viewer"], body={})
        assert_problem(answer, 403, "'viewer' has scope 'read'")
    assert await api.state() == before
    assert (await api.refusals())["scope"] == len(attempts)
    status, _, body = await api.call("GET", "/api/v1/bots/echo", TOKENS["viewer"])
    assert status == 200 and "token" not in body["spec"]


async def test_an_operate_token_may_start_but_not_create_or_destroy(api: Api) -> None:
    before = await api.state()
    attempts = writes("admin")
    assert ("POST", "/api/v1/bots") in attempts and ("DELETE", "/api/v1/bots/echo") in attempts
    for method, path in attempts:
        answer = await api.call(method, path, TOKENS["ops"], body={"name": "x"})
        assert_problem(answer, 403, "needs 'admin'")
    assert await api.state() == before
    assert (await api.refusals())["scope"] == len(attempts)
    # What operate allows passes the access check (the fake circusd then answers it).
    status, _, body = await api.call("POST", "/api/v1/events", TOKENS["ops"], {"topic": "t"})
    assert status == 201 and body["actor"] == "api:ops"


@pytest.mark.parametrize(
    ("token", "status", "reason", "words"),
    [
        ("old", 401, "expired", ("'old' expired at",)),
        ("gone", 401, "revoked", ("'gone' was revoked",)),
        (None, 401, "missing", ("Authorization: Bearer",)),
        ("tgf_never-made", 401, "unknown", ("unknown",)),
    ],
)
async def test_bad_tokens_are_refused_and_counted(
    api: Api, token: str | None, status: int, reason: str, words: tuple[str, ...]
) -> None:
    before = await api.state()
    secret = TOKENS.get(token or "", token)
    answer = await api.call("DELETE", "/api/v1/bots/echo", secret)
    assert_problem(answer, status, *words)
    assert answer[1]["WWW-Authenticate"] == "Bearer"
    assert await api.state() == before
    counted = await api.refusals()
    assert counted[reason] == 1
    assert sum(counted.values()) == 1


async def test_a_token_in_the_query_string_is_refused_even_with_the_header(api: Api) -> None:
    before = await api.state()
    for query in (f"?token={TOKENS['admin']}", f"?x={TOKENS['viewer']}", "?access_token=zzz"):
        answer = await api.call("GET", "/api/v1/bots" + query, TOKENS["admin"])
        assert_problem(answer, 401, "'Authorization: Bearer <token>' header")
    assert await api.state() == before
    assert (await api.refusals())["token_in_query"] == 3


async def test_fifty_wrong_tokens_in_a_second_are_throttled(api: Api) -> None:
    before = await api.state()
    answers = [
        await api.call("POST", "/api/v1/bots/echo/start", f"tgf_guess-{n}") for n in range(50)
    ]
    limit = AuthThrottle().limit
    for answer in answers[:limit]:
        assert_problem(answer, 401, "unknown")
    for answer in answers[limit:]:
        assert_problem(answer, 429, "too many failed authentications")
        assert 1 <= int(answer[1]["Retry-After"]) <= 60
    # Only failed authentication is throttled: the right token from that address still
    # works (every local client shares 127.0.0.1), a wrong one still gets 429.
    assert (await api.call("GET", "/api/v1/bots", TOKENS["admin"]))[0] == 200
    assert_problem(await api.call("GET", "/api/v1/bots", "tgf_guess-again"), 429)
    assert await api.state() == before
    api.client.app[THROTTLE]._failures.clear()
    counted = await api.refusals()
    assert counted["unknown"] == limit and counted["rate_limited"] == 50 - limit + 1


async def test_tokens_are_made_with_a_scope_and_the_last_admin_stays(api: Api) -> None:
    soon = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    status, _, made = await api.call(
        "POST",
        "/api/v1/tokens",
        TOKENS["admin"],
        {"name": "ci", "scope": "read", "expires_at": soon},
    )
    assert status == 201 and made["scope"] == "read" and made["expires_at"] is not None
    assert made["token"].startswith("tgf_") and made["last_used_at"] is None
    status, _, _ = await api.call("GET", "/api/v1/bots", made["token"])
    assert status == 200
    _, _, listing = await api.call("GET", "/api/v1/tokens", TOKENS["admin"])
    ci = next(t for t in listing["tokens"] if t["name"] == "ci")
    assert ci["last_used_at"] is not None and "token" not in ci
    for bad in (
        {"name": "x", "scope": "root"},
        {"name": "x"},
        {"name": "x", "scope": "read", "expires_at": "2001-01-01T00:00:00+00:00"},
        {"name": "x", "scope": "read", "expires_at": "2999-01-01T00:00:00"},
    ):
        status, _, body = await api.call("POST", "/api/v1/tokens", TOKENS["admin"], bad)
        assert status == 422, (bad, body)
    # Every write's event names the token that made it.
    events = await api.store.events(None, 0, 100)
    assert [(e.kind, e.actor, e.reason) for e in events if e.kind == "token"] == [
        ("token", "api:admin", "token 'ci' created with scope 'read'")
    ]
    answer = await api.call("DELETE", "/api/v1/tokens/admin", TOKENS["admin"])
    assert_problem(answer, 409, "'admin' is the last token that can administer")
    status, _, _ = await api.call(
        "POST", "/api/v1/tokens", TOKENS["admin"], {"name": "admin2", "scope": "admin"}
    )
    assert status == 201
    status, _, revoked = await api.call("DELETE", "/api/v1/tokens/admin", TOKENS["admin"])
    assert status == 200 and revoked["revoked_at"] is not None
    assert_problem(await api.call("GET", "/api/v1/bots", TOKENS["admin"]), 401, "revoked")


def test_the_document_says_which_scope_each_operation_needs() -> None:
    for route in ROUTES:
        op = openapi_document()["paths"][route.path][route.method.lower()]
        if route.public:
            assert "x-tgfleet-scope" not in op and "401" not in op["responses"]
            continue
        assert op["x-tgfleet-scope"] == route.scope
        assert ("403" in op["responses"]) == (route.scope != "read")
        assert "Retry-After" in op["responses"]["429"]["headers"]
        assert 403 in problems_of(route) or route.scope == "read"


@pytest.mark.parametrize(
    ("held", "needed", "allowed"),
    [
        ("read", "read", True),
        ("read", "operate", False),
        ("operate", "operate", True),
        ("operate", "admin", False),
        ("admin", "read", True),
        ("admin", "admin", True),
    ],
)
def test_admin_implies_operate_implies_read(held: Any, needed: Any, allowed: bool) -> None:
    assert allows(held, needed) is allowed


def test_throttle_forgets_failures_out_of_its_window() -> None:
    throttle = AuthThrottle(limit=3, window_s=10.0, max_clients=2)
    for at in (0.0, 1.0, 2.0):
        assert throttle.retry_after("a", at) is None
        throttle.failed("a", at)
    assert throttle.retry_after("a", 2.5) == 8
    assert throttle.retry_after("b", 2.5) is None  # per address
    assert throttle.retry_after("a", 10.0) is None  # the first failure left the window
    throttle.failed("b", 11.0)
    throttle.failed("c", 11.0)
    assert set(throttle._failures) == {"b", "c"}  # bounded: the oldest address forgotten


@pytest.mark.parametrize(
    ("text", "seconds"), [("90", 90), ("90s", 90), ("15m", 900), ("12h", 43200), ("30d", 2592000)]
)
def test_durations(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "0", "-5m", "5y", "1.5h", "h"])
def test_not_durations(text: str) -> None:
    with pytest.raises(ValueError, match="no duration"):
        parse_duration(text)


def test_token_like_query_strings() -> None:
    assert token_in_query({"Token": "x"}) and token_in_query({"q": "tgf_abc"})
    assert not token_in_query({"limit": "5", "after": "0"})


async def test_rotating_the_key_keeps_every_secret_readable(api: Api, tmp_path: Path) -> None:
    await api.store.set_defaults({"telegram": {"api_hash": "h" * 32}}, "t", [])
    old = api.store.secrets
    status, _, body = await api.call("POST", "/api/v1/secrets/rotate", TOKENS["ops"])
    assert status == 403
    status, _, body = await api.call("POST", "/api/v1/secrets/rotate", TOKENS["admin"])
    assert status == 200 and body["rewritten"] == 2, body
    keys = (tmp_path / "home" / "secret.key").read_text().split()
    assert keys == list(api.store.secrets.keys) and keys[0] not in old.keys
    assert (await api.store.get_bot("echo")).spec["token"] == "1:abc"
    assert (await api.store.get_defaults())["telegram"]["api_hash"] == "h" * 32
    (event,) = [e for e in await api.store.events(None, 0, 100) if e.kind == "secrets"]
    assert event.actor == "api:admin"


PROXIES = trusted_networks(["127.0.0.1", "10.0.0.0/8", "fd00::/8"])


@pytest.mark.parametrize(
    ("remote", "forwarded_for", "proxies", "client"),
    [
        # Off by default: the header is whatever the client wrote.
        ("127.0.0.1", ["203.0.113.7"], (), "127.0.0.1"),
        ("127.0.0.1", [], PROXIES, "127.0.0.1"),
        ("127.0.0.1", ["203.0.113.7"], PROXIES, "203.0.113.7"),
        # The client's own claim is left of the hop our proxy added: not believed.
        ("127.0.0.1", ["198.51.100.1, 203.0.113.7"], PROXIES, "203.0.113.7"),
        # Through two of our proxies; headers repeated are read in order.
        ("127.0.0.1", ["198.51.100.1, 203.0.113.7, 10.1.2.3"], PROXIES, "203.0.113.7"),
        ("127.0.0.1", ["198.51.100.1", "203.0.113.7, 10.1.2.3"], PROXIES, "203.0.113.7"),
        ("fd00::1", ["2001:db8::5"], PROXIES, "2001:db8::5"),
        # A peer we do not trust cannot name another client.
        ("192.0.2.9", ["203.0.113.7"], PROXIES, "192.0.2.9"),
        # A hop that is no address ends the walk at the last proxy we know.
        ("127.0.0.1", ["unknown"], PROXIES, "127.0.0.1"),
        ("127.0.0.1", ["203.0.113.7, junk, 10.1.2.3"], PROXIES, "10.1.2.3"),
        # Every hop a trusted proxy: the left-most one.
        ("127.0.0.1", ["10.0.0.1, 10.0.0.2"], PROXIES, "10.0.0.1"),
        (None, [], PROXIES, "unknown"),
    ],
)
def test_the_client_behind_trusted_proxies(
    remote: str | None, forwarded_for: list[str], proxies: Any, client: str
) -> None:
    assert client_address(remote, forwarded_for, proxies) == client


@pytest.mark.parametrize("entry", ["10.0.0.0/33", "proxy.local", "", "10.0.0.1:80"])
def test_a_trusted_proxy_must_be_an_address_or_network(entry: str) -> None:
    with pytest.raises(ValueError, match="is not an IP address or network"):
        trusted_networks([entry])


async def test_behind_a_trusted_proxy_each_client_has_its_own_throttle(api: Api) -> None:
    throttle = api.client.app[THROTTLE]
    throttle.trusted_proxies = trusted_networks(["127.0.0.1"])
    guesser, bystander = "203.0.113.7", "198.51.100.1"
    answers = [
        await api.call("GET", "/api/v1/bots", f"tgf_guess-{n}", forwarded_for=guesser)
        for n in range(throttle.limit + 1)
    ]
    assert [a[0] for a in answers] == [401] * throttle.limit + [429]
    assert_problem(answers[-1], 429, guesser)
    # Another client of the same proxy is not shut out by the guesser.
    assert_problem(
        await api.call("GET", "/api/v1/bots", "tgf_typo", forwarded_for=bystander), 401, "unknown"
    )
    # The guesser cannot step out of its throttle by naming someone else before it.
    spoofed = f"{bystander}, {guesser}"
    assert_problem(await api.call("GET", "/api/v1/bots", "tgf_x", forwarded_for=spoofed), 429)


@pytest.mark.parametrize(
    ("remote", "proto", "host", "proxies", "origin"),
    [
        # A trusted TLS-terminating proxy: the browser's scheme and host.
        ("127.0.0.1", ["https"], ["fleet.example"], PROXIES, ("https", "fleet.example")),
        ("10.1.2.3", ["HTTPS"], ["Fleet.Example:8443"], PROXIES, ("https", "Fleet.Example:8443")),
        ("fd00::1", ["https"], ["[2001:db8::1]:443"], PROXIES, ("https", "[2001:db8::1]:443")),
        # Only one of them sent: the other stays the request's own.
        ("127.0.0.1", ["https"], [], PROXIES, ("https", "127.0.0.1:8710")),
        ("127.0.0.1", [], ["fleet.example"], PROXIES, ("http", "fleet.example")),
        # Several values: the last is what the trusted peer itself wrote; the ones
        # before it came from further away, the client among them (a proxy that
        # appends, or passes the client's header through).
        (
            "127.0.0.1",
            ["http, https"],
            ["evil.example, fleet.example"],
            PROXIES,
            ("https", "fleet.example"),
        ),
        (
            "127.0.0.1",
            ["http", "https"],
            ["evil.example", "fleet.example:8443"],
            PROXIES,
            ("https", "fleet.example:8443"),
        ),
        # The trusted peer's own value is no host: the client's before it is not taken.
        ("127.0.0.1", ["https"], ["fleet.example, a b"], PROXIES, ("https", "127.0.0.1:8710")),
        ("127.0.0.1", ["https, "], ["fleet.example"], PROXIES, ("http", "fleet.example")),
        # Not believed: an untrusted peer, or no proxies named.
        ("192.0.2.9", ["https"], ["fleet.example"], PROXIES, ("http", "127.0.0.1:8710")),
        ("127.0.0.1", ["https"], ["fleet.example"], (), ("http", "127.0.0.1:8710")),
        (None, ["https"], ["fleet.example"], PROXIES, ("http", "127.0.0.1:8710")),
        # Not a scheme or a host: ignored.
        ("127.0.0.1", ["javascript"], ["fleet.example/x"], PROXIES, ("http", "127.0.0.1:8710")),
        ("127.0.0.1", [""], ["user@fleet.example"], PROXIES, ("http", "127.0.0.1:8710")),
        ("127.0.0.1", ["https"], ["fleet.example:99999"], PROXIES, ("https", "127.0.0.1:8710")),
        ("127.0.0.1", ["https"], ["[not:v6:zz]"], PROXIES, ("https", "127.0.0.1:8710")),
        ("127.0.0.1", ["https"], ["a b"], PROXIES, ("https", "127.0.0.1:8710")),
        ("127.0.0.1", ["https"], ["-bad.example"], PROXIES, ("https", "127.0.0.1:8710")),
        ("127.0.0.1", ["https"], [".".join(["a" * 60] * 5)], PROXIES, ("https", "127.0.0.1:8710")),
    ],
)
def test_the_origin_a_browser_used_behind_trusted_proxies(
    remote: str | None, proto: list[str], host: list[str], proxies: Any, origin: tuple[str, str]
) -> None:
    assert forwarded_origin(remote, "http", "127.0.0.1:8710", proto, host, proxies) == origin
