"""`python -m controller serve`: the controller's life in three phases.

startup (database, migrations, admin token, bus, circusd client, HTTP), the main
loop (reconcile until SIGTERM), shutdown (in reverse). Signal handlers only set
an event. Bots never notice the controller going or coming back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import ssl
import sys
import urllib.parse
from typing import Any

import aiohttp
from aiohttp import web

from botspec import jsonlog, protocol
from controller.access import AuthThrottle, trusted_networks
from controller.api import BusStats, build_app, hash_token, new_token
from controller.atomicfile import write_atomic
from controller.botfiles import BotFiles
from controller.botusers import BotUsers, is_service_user
from controller.bus import BusServer
from controller.buskeys import BusKeys
from controller.circus import CircusClient, watch_events
from controller.dashboard import add_dashboard
from controller.errors import StoreUnavailable
from controller.fleet import Fleet, Webhook
from controller.heap import keep_heap_trimmed
from controller.home import Home
from controller.render import LogRotation
from controller.secretbox import SecretBox
from controller.settings import (
    DEFAULT_DATABASE_TIMEOUT_S,
    ControllerSettings,
    is_loopback,
    parse_hostport,
)
from controller.store import PgStore

log = logging.getLogger("tgfleet.controller")

DATABASE_WAIT_S = 60.0


async def connect_store(
    dsn: str,
    secrets: SecretBox,
    stopping: asyncio.Event,
    query_timeout: float = DEFAULT_DATABASE_TIMEOUT_S,
) -> PgStore:
    """Connect, retrying while PostgreSQL is starting (it is a sibling watcher)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DATABASE_WAIT_S
    while True:
        try:
            return await PgStore.connect(dsn, secrets, timeout=5, query_timeout=query_timeout)
        except StoreUnavailable as exc:
            if loop.time() > deadline or stopping.is_set():
                raise
            log.info("waiting for PostgreSQL: %s", exc)
            await asyncio.sleep(0.2)


async def ensure_admin_token(home: Home, store: PgStore) -> None:
    """The first admin token lives in <home>/admin.token (0600) and in the database."""
    path = home.admin_token
    if path.exists():
        token = path.read_text(encoding="utf-8").strip()
    else:
        token = new_token()
        await asyncio.to_thread(write_atomic, path, token + "\n", 0o600)
    await store.ensure_token("admin", hash_token(token))


def tls_context(settings: ControllerSettings) -> ssl.SSLContext | None:
    """The API's TLS, when it has a certificate (required beyond loopback)."""
    if not settings.tls_cert or not settings.tls_key:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(settings.tls_cert, settings.tls_key)
    return context


async def pump(bus: BusServer, fleet: Fleet) -> None:
    """Hand every valid bus message to the fleet (the bus drops bad ones itself)."""
    async for message in bus:
        fleet.on_message(message)


async def watch_circus(home: Home, fleet: Fleet) -> None:
    """Hand circusd's spawn/reap events of bot watchers to the fleet (exact exit times)."""
    async for event in watch_events(home.circus_pubsub_endpoint, prefix="watcher.bot-"):
        fleet.on_circus_event(event)


def redact_url(url: str) -> str:
    """A URL fit for a log: scheme, host and port; path, query and credentials often
    hold the webhook's secret."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or "?"
    port = f":{parts.port}" if parts.port else ""
    hidden = "/…" if parts.path not in ("", "/") or parts.query else ""
    return f"{parts.scheme}://{host}{port}{hidden}"


def webhook_poster(settings: ControllerSettings) -> Webhook | None:
    """POST a JSON body to the admin webhook, if one is configured."""
    url = settings.webhook_url
    if not url:
        return None
    shown = redact_url(url)

    # Made at the first post, with the system's CA bundle: aiohttp's default context
    # has none in the controller (controller.__main__.ca_bundle_left_out). An http URL
    # gets it too: a redirect to https must verify against the bundle as well.
    tls: list[ssl.SSLContext] = []

    async def post(body: dict[str, Any]) -> None:
        timeout = aiohttp.ClientTimeout(total=10)
        if not tls:
            tls.append(await asyncio.to_thread(ssl.create_default_context))
        try:
            async with (
                aiohttp.ClientSession(timeout=timeout) as session,
                session.post(url, json=body, ssl=tls[0]) as answer,
            ):
                if answer.status >= 400:
                    log.warning("webhook %s answered %d", shown, answer.status)
        except (aiohttp.ClientError, TimeoutError) as exc:
            # aiohttp's messages may quote the whole URL: name the kind of failure only.
            log.warning("webhook %s failed: %s", shown, type(exc).__name__)

    return post


def log_failure(task: asyncio.Task[None]) -> None:
    """A side task (not worth dying for) failed: say so once, with the traceback."""
    if not task.cancelled() and task.exception() is not None:
        log.error("the %s task failed", task.get_name(), exc_info=task.exception())


async def serve(home: Home) -> int:
    settings = ControllerSettings.load(home)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)

    # -- startup
    secrets = await asyncio.to_thread(SecretBox.load, home)
    store = await connect_store(
        settings.database_url, secrets, stopping, settings.database_timeout_s
    )
    applied = await store.migrate()
    if applied:
        log.info("applied migrations: %s", ", ".join(applied))
    # Secrets stored in clear by an older tgfleet are sealed now; sealed ones must open
    # (SecretKeyError, saying which key, stops the start: better than bots without tokens).
    sealed = await store.seal_secrets(secrets, rotate=False)
    if sealed:
        log.info(
            "sealed the clear-text secrets of %d rows with the key from %s", sealed, secrets.source
        )
    await ensure_admin_token(home, store)
    # As the service user of a fleet run as root: circusd only through the gate.
    supervisor = CircusClient(
        home.circus_gate_endpoint if is_service_user(home) else home.circus_endpoint
    )
    bus_keys = BusKeys.open(home)
    bus = BusServer(home.bus_endpoint, bus_keys)
    users = BotUsers(home)
    users.share_socket(home.bus_socket)  # every bot's user connects to it; nobody else
    files = BotFiles(
        home,
        sys.executable,
        bus_keys,
        users=users,
        plugin_path=settings.plugin_path,
        log=LogRotation(settings.log_max_bytes, settings.log_backup_count),
    )

    def fan_out(topic: str, event: protocol.Event) -> None:
        for name in fleet.subscribers(topic):
            if name != event.bot:
                bus.send(name, event)

    fleet = Fleet(
        store,
        supervisor,
        files,
        publish=fan_out,
        webhook=webhook_poster(settings),
        outbox_limit=settings.outbox_limit,
        event_retention_s=settings.event_retention_days * 86400.0,
        event_retention_count=settings.event_retention_count,
        host=settings.host,
        api_url=settings.api_url,
        forget_after_s=settings.forget_after_s,
    )
    await fleet.load()

    throttle = AuthThrottle(
        limit=settings.auth_failure_limit,
        trusted_proxies=trusted_networks(settings.trusted_proxies),
    )
    app = build_app(
        fleet,
        store,
        home,
        fan_out,
        throttle,
        lambda: BusStats(bus.dropped_in, bus.dropped_out, bus.refused),
    )
    add_dashboard(app)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    host, port = parse_hostport(settings.listen, "listen")
    site = web.TCPSite(runner, host, port, reuse_address=True, ssl_context=tls_context(settings))
    await site.start()
    log.info("controller %d listening on %s", os.getpid(), settings.api_url)
    if not is_loopback(host) and not settings.tls_cert:
        log.warning("the API is served in clear on %s (--insecure-listen)", settings.listen)

    watched = [
        asyncio.create_task(pump(bus, fleet), name="bus"),
        asyncio.create_task(watch_circus(home, fleet), name="circus events"),
        asyncio.create_task(fleet.run(stopping), name="reconcile"),
    ]
    # Not watched: were it to end, the heap would only stay as big as its last peak.
    trim = asyncio.create_task(keep_heap_trimmed(stopping), name="heap trim")
    trim.add_done_callback(log_failure)
    side: list[asyncio.Task[None]] = [trim]
    if settings.demo:
        from controller.demo import seed_demo

        demo = asyncio.create_task(seed_demo(home, settings, fleet), name="demo")
        demo.add_done_callback(log_failure)
        side.append(demo)

    # -- main loop: until a signal, or until a watched task dies (exit 1: Circus respawns us)
    stop_wait = asyncio.create_task(stopping.wait())
    done, _ = await asyncio.wait([stop_wait, *watched], return_when=asyncio.FIRST_COMPLETED)
    code = 0
    for task in done:
        if task is not stop_wait:
            log.error("the %s task ended unexpectedly", task.get_name(), exc_info=task.exception())
            code = 1

    # -- shutdown
    stop_wait.cancel()
    tasks = [*watched, *side]
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
    await runner.cleanup()
    await fleet.close()
    bus.close()
    supervisor.close()
    await store.close()
    log.info("controller stopped")
    return code


def main(home_dir: str | None) -> int:
    jsonlog.configure()
    home = Home.resolve(home_dir)
    return asyncio.run(serve(home))
