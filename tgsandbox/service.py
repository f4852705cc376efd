"""The whole sandbox as one service: MTProto listener + admin HTTP API, start and stop."""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass

from aiohttp import web

from .admin_api import make_app
from .server import SandboxServer, ServerConfig

log = logging.getLogger("tgfleet.sandbox")


@dataclass(frozen=True)
class Address:
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Address:
        """``HOST:PORT`` (``[v6]:PORT`` too); raises ValueError with a precise message."""
        host, sep, port = text.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError(f"{text!r} is not HOST:PORT")
        return cls(host.strip("[]"), int(port))

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


class Sandbox:
    """MTProto server and admin API together (in-process: tests; foreground: serve)."""

    def __init__(self, config: ServerConfig, admin: Address) -> None:
        self.server = SandboxServer(config)
        self._admin = admin
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def admin_port(self) -> int:
        if self._runner is None or not self._runner.addresses:
            return self._admin.port
        return int(self._runner.addresses[0][1])

    @property
    def admin_url(self) -> str:
        return f"http://{self._admin.host}:{self.admin_port}"

    async def start(self) -> None:
        await self.server.start()
        self._runner = web.AppRunner(make_app(self.server), access_log=None)
        await self._runner.setup()
        self._site = web.TCPSite(self._runner, self._admin.host, self._admin.port)
        try:
            await self._site.start()
        except OSError:
            await self.stop()
            raise
        log.info("sandbox admin API on %s", self.admin_url)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await self.server.stop()

    async def __aenter__(self) -> Sandbox:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


async def serve_forever(config: ServerConfig, admin: Address) -> None:
    """Run until SIGTERM or SIGINT, then stop cleanly."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    sandbox = Sandbox(config, admin)
    await sandbox.start()
    print(sandbox.server.key.public_pem.decode(), end="", flush=True)
    try:
        await stop.wait()
        log.info("sandbox stopping")
    finally:
        await sandbox.stop()
