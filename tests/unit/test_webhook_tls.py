"""The controller imports aiohttp without the CA bundle in its default client contexts
(controller.__main__), and its webhook still verifies the server it posts to, with the
CAs of ``SSL_CERT_FILE`` at the time of its first post."""

from __future__ import annotations

import json
import logging
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from harness import self_signed_certificate

from controller.app import webhook_poster
from controller.settings import ControllerSettings


async def post_to_tls_hook(tmp_path: Path, *, via_http: bool = False) -> list[dict[str, Any]]:
    """Serve a hook over TLS with a self-signed certificate; post to it once (``via_http``:
    to an http URL that redirects there)."""
    cert_file, key_file = self_signed_certificate(tmp_path)
    received: list[dict[str, Any]] = []

    async def hook(request: web.Request) -> web.Response:
        received.append(await request.json())
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert_file, key_file)
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_tls)
    await site.start()
    url = secure = f"https://127.0.0.1:{runner.addresses[0][1]}/hook"

    async def moved(request: web.Request) -> web.Response:
        raise web.HTTPTemporaryRedirect(secure)  # 307: the POST and its body go on

    plain = web.Application()
    plain.router.add_post("/hook", moved)
    plain_runner = web.AppRunner(plain)
    await plain_runner.setup()
    await web.TCPSite(plain_runner, "127.0.0.1", 0).start()
    if via_http:
        url = f"http://127.0.0.1:{plain_runner.addresses[0][1]}/hook"
    try:
        settings = ControllerSettings(
            listen="127.0.0.1:9", database_url="postgresql://x@h/d", webhook_url=url
        )
        post = webhook_poster(settings)
        assert post is not None
        await post({"bot": "shop", "state": "failed"})
    finally:
        await plain_runner.cleanup()
        await runner.cleanup()
    return received


async def test_the_webhook_trusts_the_cas_of_ssl_cert_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "cert.pem"))
    assert await post_to_tls_hook(tmp_path) == [{"bot": "shop", "state": "failed"}]


async def test_an_http_webhook_redirected_to_https_verifies_with_the_same_cas(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "cert.pem"))
    assert await post_to_tls_hook(tmp_path, via_http=True) == [{"bot": "shop", "state": "failed"}]


async def test_the_webhook_refuses_a_server_no_ca_vouches_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    with caplog.at_level(logging.WARNING, logger="tgfleet.controller"):
        assert await post_to_tls_hook(tmp_path) == []
    assert "ClientConnectorCertificateError" in caplog.text


@pytest.mark.parametrize("preset", [None, "/etc/custom-ca.pem"])
def test_the_controller_s_import_leaves_the_ca_bundle_out(preset: str | None) -> None:
    code = (
        "import json, os\n"
        "import controller.__main__\n"
        "from aiohttp import connector\n"
        "stats = connector._SSL_CONTEXT_VERIFIED.cert_store_stats()\n"
        "print(json.dumps([stats['x509_ca'], os.environ.get('SSL_CERT_FILE')]))"
    )
    env = {"PATH": "/usr/bin:/bin", **({"SSL_CERT_FILE": preset} if preset else {})}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    # No CA loaded for aiohttp's defaults; the variable as it was, for what comes after.
    assert json.loads(done.stdout) == [0, preset]
