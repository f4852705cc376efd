"""The dashboard in a real browser: headless Chromium (Debian's package, driven by
Playwright for Python) against `tgfleet up --demo` with its sandbox and demo bots.

What a user checks: logging in with a token, the demo bots in the table, a bot
stopped through the API turning `stopped` on the page without a reload, the restart
button restarting a bot (its pid changes), a read-only token seeing no buttons, and
a forged cross-site POST refused without changing anything; and all of that working
at https://… through nginx terminating TLS in front of the controller's plain HTTP
(Debian's nginx-light, which scripts/test installs beside chromium). A screenshot of the
fleet page is written to $TGFLEET_DASHBOARD_SCREENSHOT (else the test's tmp dir), and
one of a bot's page beside it (``-bot`` added to its name).
"""

from __future__ import annotations

import contextlib
import http.server
import os
import re
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import Fleet, free_port, self_signed_certificate, short_tmpdir, wait_for

CHROMIUM = Path("/usr/bin/chromium")
# Headless, as root, on a machine with no route out: nothing in the background.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
DEMO = {"echo", "greeter", "parrot"}
#: How long the page may take to show what the API already says (live, no reload).
PAGE_WAIT_MS = 30_000

playwright_api = pytest.importorskip("playwright.sync_api")
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason="Debian's chromium is not installed (scripts/test does)"
    ),
]


NGINX = Path("/usr/sbin/nginx")


@pytest.fixture
def demo() -> Iterator[Fleet]:
    with demo_fleet() as fleet:
        yield fleet


@contextlib.contextmanager
def demo_fleet(**env: str) -> Iterator[Fleet]:
    """`tgfleet up --demo` on free ports (and this environment), its three demo bots
    connected; stopped, and nothing of it left, on the way out."""
    root = short_tmpdir("tgfd")
    fleet = Fleet.create(root)
    fleet.env = {
        "TGFLEET_SANDBOX_LISTEN": f"127.0.0.1:{free_port()}",
        "TGFLEET_SANDBOX_ADMIN": f"127.0.0.1:{free_port()}",
        **env,
    }
    try:
        fleet.start("--demo")
        wait_for(
            "three demo bots connected",
            lambda: (
                len(bots := fleet.api("GET", "/api/v1/bots")["bots"]) == 3
                and all(b["telegram"]["connected"] and b["pid"] for b in bots)
            ),
            timeout=90,
        )
        yield fleet
    finally:
        try:
            if fleet.proc is not None:
                assert fleet.stop() == 0, fleet.log_text()
                assert fleet.leftovers() == []
        finally:
            fleet.kill_leftovers()
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def browser() -> Iterator[Any]:
    with playwright_api.sync_playwright() as driver:
        # launch() starts Chromium on a fresh, empty profile of its own (a new
        # --user-data-dir) and removes it on close.
        chromium = driver.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield chromium
        finally:
            chromium.close()


class EvilSite:
    """Another origin on this machine (another port of 127.0.0.1: same site, so the
    SameSite=Strict cookie still goes along) whose page posts a form at the fleet."""

    def __init__(self, target: str) -> None:
        page = (
            "<!doctype html><title>win a prize</title>"
            f'<form id="f" method="post" action="{target}"></form>'
            "<script>document.getElementById('f').submit()</script>"
        ).encode()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(page)))
                self.end_headers()
                self.wfile.write(page)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


@contextlib.contextmanager
def nginx_in_front(upstream: str, directory: Path) -> Iterator[str]:
    """nginx serving https://127.0.0.1:PORT with a certificate of its own and passing
    every request on to ``upstream`` in plain HTTP, as a site's reverse proxy would
    (its Host header is the upstream's; the browser's scheme and host go in
    X-Forwarded-Proto and X-Forwarded-Host). Yields its URL; stopped on the way out."""
    cert, key = self_signed_certificate(directory)
    port = free_port()
    conf = directory / "nginx.conf"
    conf.write_text(
        f"""
daemon off;
{"user root root;" if os.geteuid() == 0 else ""}
worker_processes 1;
pid {directory}/nginx.pid;
error_log {directory}/error.log;
events {{ worker_connections 64; }}
http {{
    access_log {directory}/access.log;
    client_body_temp_path {directory}/body;
    proxy_temp_path {directory}/proxy;
    fastcgi_temp_path {directory}/fastcgi;
    uwsgi_temp_path {directory}/uwsgi;
    scgi_temp_path {directory}/scgi;
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        location / {{
            proxy_pass http://{upstream};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Forwarded-Host $http_host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_buffering off;
            proxy_read_timeout 1h;
        }}
    }}
}}
"""
    )
    log = directory / "nginx.out"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                str(NGINX),
                "-p",
                f"{directory}/",
                "-e",
                str(directory / "error.log"),
                "-c",
                str(conf),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:

        def listening() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"nginx exited with {proc.returncode}: {log.read_text()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                return True
            return False

        wait_for("nginx listening", listening, timeout=30)
        yield f"https://127.0.0.1:{port}"
    finally:
        proc.terminate()  # nginx's fast shutdown: the master stops its workers
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def log_in(browser: Any, fleet: Fleet, token: str) -> Any:
    context = browser.new_context(viewport={"width": 1360, "height": 300})
    page = context.new_page()
    page.set_default_timeout(PAGE_WAIT_MS)
    page.goto(f"http://{fleet.listen}/")
    assert "/login" in page.url  # a stranger is sent to log in
    page.fill("#token", token)
    page.click("form.login button[type=submit]")
    page.wait_for_url(f"http://{fleet.listen}/")
    return page


def cell(page: Any, bot: str, field: str) -> Any:
    return page.locator(f'#fleet tr[data-bot="{bot}"] td[data-field="{field}"]')


def restart_from_page(page: Any, fleet: Fleet, name: str) -> int:
    """The bot's restart button, clicked: it runs in a new process, which the page shows;
    that process's pid."""
    before = fleet.bot(name)["pid"]
    page.click(f'#fleet tr[data-bot="{name}"] button[data-op="restart"]')
    after = wait_for(
        f"{name} running in a new process",
        lambda: (
            (b := fleet.bot(name))["state"] == "running"
            and b["pid"] not in (None, before)
            and b["pid"]
        ),
        timeout=60,
    )
    playwright_api.expect(cell(page, name, "pid")).to_have_text(str(after))
    return int(after)


def test_the_dashboard_in_a_browser(demo: Fleet, browser: Any, tmp_path: Path) -> None:
    expect = playwright_api.expect
    fleet = demo
    ops = fleet.api("POST", "/api/v1/tokens", {"name": "ops", "scope": "operate"})["token"]
    viewer = fleet.api("POST", "/api/v1/tokens", {"name": "viewer", "scope": "read"})["token"]

    page = log_in(browser, fleet, ops)
    cookies = page.context.cookies()
    assert [c["name"] for c in cookies] == ["tgfleet_session"]
    assert cookies[0]["httpOnly"] and cookies[0]["sameSite"] == "Strict"
    assert ops not in cookies[0]["value"]
    assert page.evaluate("document.cookie") == ""  # scripts cannot read the session
    for name in DEMO:
        expect(cell(page, name, "state")).to_have_text("running")
        expect(cell(page, name, "telegram")).to_have_text("connected")
    rows = page.locator("#fleet tbody tr")
    assert sorted(rows.evaluate_all("rs => rs.map(r => r.dataset.bot)")) == sorted(DEMO)
    expect(page.locator("#live")).to_have_class("live on")  # the event stream is open
    # The per-bot readings show where the API gives them, "-" where it does not.
    for bot in fleet.api("GET", "/api/v1/bots")["bots"]:
        resources, messages = bot.get("resources"), bot.get("messages")
        counted = re.compile(r"^\d+$")
        expect(cell(page, bot["name"], "threads")).to_have_text(counted if resources else "-")
        files = resources and resources.get("open_files") is not None
        expect(cell(page, bot["name"], "fds")).to_have_text(
            re.compile(r"^\d+( / \d+)?$") if files else "-"
        )
        received = messages and messages.get("received") is not None
        expect(cell(page, bot["name"], "messages")).to_have_text(
            re.compile(r"^\d+ / \d+$") if received else "-"
        )

    # Stopped through the API: the page shows it without being reloaded.
    page.evaluate("window.notReloaded = true")
    fleet.api("POST", "/api/v1/bots/greeter/stop")
    expect(cell(page, "greeter", "state")).to_have_text("stopped")
    assert page.evaluate("window.notReloaded") is True

    # The restart button restarts the bot: a new process.
    after = restart_from_page(page, fleet, "echo")
    assert page.evaluate("window.notReloaded") is True
    restarted = fleet.api("GET", "/api/v1/bots/echo/events?limit=1000")["events"]
    assert any(e["actor"] == "api:ops" and e["reason"] == "restart requested" for e in restarted)
    expect(cell(page, "echo", "telegram")).to_have_text("connected")
    expect(cell(page, "echo", "memory")).to_contain_text("/ 512 MB")
    if "resources" in fleet.bot("echo"):  # the per-bot readings are in the API
        wait_for("echo's new process sampled", lambda: fleet.bot("echo")["resources"])
        expect(cell(page, "echo", "threads")).to_have_text(re.compile(r"^\d+$"))
    shot = Path(os.environ.get("TGFLEET_DASHBOARD_SCREENSHOT") or tmp_path / "dashboard.png")
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000

    # A forged cross-site POST (another origin's form, the cookie goes along): refused.
    parrot = fleet.bot("parrot")
    evil = EvilSite(f"http://{fleet.listen}/api/v1/bots/parrot/stop")
    try:
        with page.expect_response(lambda r: r.url.endswith("/bots/parrot/stop")) as forged:
            page.goto(evil.url)
        assert forged.value.status == 403
        assert "X-CSRF-Token" in forged.value.json()["detail"]
    finally:
        evil.close()
    # With the session's CSRF token but sent from elsewhere (a wrong Origin): refused.
    page.goto(f"http://{fleet.listen}/")
    csrf = page.locator('meta[name="csrf-token"]').get_attribute("content")
    wrong_origin = page.context.request.post(
        f"http://{fleet.listen}/api/v1/bots/parrot/stop",
        headers={"X-CSRF-Token": csrf, "Origin": evil.url.rstrip("/")},
    )
    assert wrong_origin.status == 403
    now = fleet.bot("parrot")
    assert (now["state"], now["desired"], now["pid"]) == ("running", "running", parrot["pid"])
    assert 'tgfleet_api_refusals_total{reason="csrf"} 2' in fleet.api("GET", "/metrics")

    # A bot's page: its facts, chart, events and log.
    page.click('#fleet a[href="/bots/echo"]')
    page.wait_for_url(f"http://{fleet.listen}/bots/echo")
    expect(page.locator('#facts dd[data-field="pid"]')).to_have_text(str(after))
    expect(page.locator("#events tbody")).to_contain_text("restart requested")
    # The chart draws the controller's samples (one every 10 s): a line of two or more.
    expect(page.locator("#chart polyline.mem")).to_have_attribute(
        "points", re.compile(r"^\S+ \S+"), timeout=60_000
    )
    assert page.locator("#log").inner_text().strip()
    expect(page.locator("#actions button")).to_have_count(3)
    page.screenshot(path=str(shot.with_name(shot.stem + "-bot.png")), full_page=True)
    page.context.close()

    # A read-only token: the same fleet, no buttons anywhere.
    page = log_in(browser, fleet, viewer)
    for name in DEMO:
        expect(cell(page, name, "state")).to_have_text(
            "stopped" if name == "greeter" else "running"
        )
    assert page.locator("body").get_attribute("data-can-operate") == "false"
    assert page.locator("button[data-op]").count() == 0
    page.goto(f"http://{fleet.listen}/bots/parrot")
    expect(page.locator('#facts dd[data-field="state"]')).to_have_text("running")
    assert page.locator("button[data-op]").count() == 0
    page.context.close()


@pytest.mark.skipif(
    not NGINX.exists(), reason="Debian's nginx-light is not installed (scripts/test does)"
)
def test_the_dashboard_behind_nginx_terminating_tls(browser: Any, tmp_path: Path) -> None:
    expect = playwright_api.expect
    with (
        demo_fleet(TGFLEET_TRUSTED_PROXIES="127.0.0.1") as fleet,
        nginx_in_front(fleet.listen, tmp_path) as outside,
    ):
        ops = fleet.api("POST", "/api/v1/tokens", {"name": "ops", "scope": "operate"})["token"]
        context = browser.new_context(ignore_https_errors=True)  # nginx's own certificate
        page = context.new_page()
        page.set_default_timeout(PAGE_WAIT_MS)
        page.goto(f"{outside}/")
        assert page.url.startswith(f"{outside}/login")
        page.fill("#token", ops)
        page.click("form.login button[type=submit]")
        page.wait_for_url(f"{outside}/")  # the login was taken: it came from this origin
        (cookie,) = context.cookies()
        assert cookie["name"] == "tgfleet_session" and cookie["secure"] and cookie["httpOnly"]
        expect(cell(page, "echo", "state")).to_have_text("running")
        expect(page.locator("#live")).to_have_class("live on")  # the stream, through nginx

        # A write from the page (the restart button) is accepted and done.
        restart_from_page(page, fleet, "echo")
        events = fleet.api("GET", "/api/v1/bots/echo/events?limit=1000")["events"]
        assert any(e["actor"] == "api:ops" and e["reason"] == "restart requested" for e in events)

        # Through the same proxy, a write from another origin is still refused.
        csrf = page.locator('meta[name="csrf-token"]').get_attribute("content")
        parrot = fleet.bot("parrot")
        forged = context.request.post(
            f"{outside}/api/v1/bots/parrot/stop",
            headers={"X-CSRF-Token": csrf, "Origin": "https://evil.example"},
        )
        assert forged.status == 403
        now = fleet.bot("parrot")
        assert (now["state"], now["desired"], now["pid"]) == ("running", "running", parrot["pid"])
        context.close()
