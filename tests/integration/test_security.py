"""What a running fleet exposes: its sockets, and where a bot's credentials can be found."""

from __future__ import annotations

import asyncio
import importlib.util
import ipaddress
import json
import os
import secrets
import signal
import socket
import subprocess
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import psutil
import pytest
from drills import sandbox_name
from harness import BIN, Fleet, Sandbox, WebhookSink, echo_spec, wait_for
from sweep import Place, Secret, environments, files_under, found, process_list
from telethon import TelegramClient
from telethon.crypto import rsa as telethon_rsa
from telethon.sessions import StringSession

pytestmark = pytest.mark.integration


def test_every_socket_of_the_fleet_is_loopback_or_unix(fleet: Fleet, sandbox: Sandbox) -> None:
    token = sandbox.create_bot(sandbox_name("sockets"))
    fleet.api("POST", "/api/v1/bots", echo_spec("sockets", token))
    bot = fleet.wait_state("sockets", "running")
    processes = [fleet.proc and psutil.Process(fleet.proc.pid), *fleet.processes()]
    pids = {p.pid for p in processes if p is not None}
    assert bot["pid"] in pids
    names = {p.name() for p in processes if p is not None}
    held = []
    for pid in pids:
        try:
            held += [(pid, c) for c in psutil.Process(pid).net_connections(kind="inet")]
        except psutil.NoSuchProcess:
            continue  # a short-lived child (a launcher) went away meanwhile
    assert held, f"no inet socket at all among {names}: the check would prove nothing"
    exposed = [
        (pid, psutil.Process(pid).name(), c.type.name, c.laddr, c.status)
        for pid, c in held
        if not ipaddress.ip_address(c.laddr.ip).is_loopback
    ]
    assert exposed == []
    # circusd's multicast discovery (UDP 12027) is off.
    assert not [c for _, c in held if c.laddr.port == 12027]
    fleet.api("DELETE", "/api/v1/bots/sockets")


ECHO = "botrunner.plugins.echo:setup"


class Recorder:
    """The fleet's API as this test calls it, keeping every answer it gets (raw bytes,
    headers included), the refusals too."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.answers: list[Place] = []

    def call(
        self, method: str, path: str, body: object | None = None, *, status: int | None = 200
    ) -> Any:
        """One request; its parsed answer. ``status`` None: any 2xx."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"http://{self.fleet.listen}{path}", data=data, method=method
        )
        token = self.fleet.home.admin_token.read_text().strip()
        request.add_header("Authorization", f"Bearer {token}")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=60) as answer:
                got, headers, raw = answer.status, answer.headers, answer.read()
        except urllib.error.HTTPError as exc:
            got, headers, raw = exc.code, exc.headers, exc.read()
        self.answers.append(Place(f"the answer to {method} {path} ({got})", bytes(headers) + raw))
        assert got == status if status else 200 <= got < 300, f"{method} {path}: {got} {raw!r}"
        return json.loads(raw) if raw and headers.get_content_type().endswith("json") else raw

    def state(self, name: str, *states: str, timeout: float = 60) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            bot: dict[str, Any] = self.call("GET", f"/api/v1/bots/{name}")
            return (
                bot
                if bot["state"] in states and (bot["state"] != "running" or bot["pid"])
                else None
            )

        return wait_for(f"{name} to be {' or '.join(states)}", check, timeout)


class EventStream:
    """GET /api/v1/events (server-sent events) read for as long as the test runs: every
    byte the stream answered, chunked framing included."""

    def __init__(self, fleet: Fleet) -> None:
        host, port = fleet.listen.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        token = fleet.home.admin_token.read_text().strip()
        self.sock.sendall(
            f"GET /api/v1/events HTTP/1.1\r\nHost: {fleet.listen}\r\n"
            f"Authorization: Bearer {token}\r\nAccept: text/event-stream\r\n\r\n".encode()
        )
        self.sock.settimeout(0.5)
        self.received = bytearray()
        self.stopping = threading.Event()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        while not self.stopping.is_set():
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                continue
            if not chunk:
                return
            self.received += chunk

    def close(self) -> Place:
        self.stopping.set()
        self.reader.join()
        self.sock.close()
        return Place("GET /api/v1/events (the event stream)", bytes(self.received))


async def _session_string(sandbox: Sandbox, token: str) -> str:
    """A Telethon string session logged in at the sandbox: what a user bot is given."""
    telethon_rsa.add_key(sandbox.public_key, old=False)
    client = TelegramClient(
        StringSession(), api_id=1, api_hash="sandbox", connection_retries=2, timeout=10
    )
    client.session.set_dc(2, "127.0.0.1", sandbox.port)
    try:
        await asyncio.wait_for(client.start(bot_token=token), 30)  # type: ignore[arg-type]
        saved: str = client.session.save()
    finally:
        await client.disconnect()
    return saved


def _fleet_pids(fleet: Fleet) -> list[int]:
    assert fleet.proc is not None
    return [fleet.proc.pid, *(p.pid for p in fleet.processes())]


def _pg_dump(fleet: Fleet) -> Place:
    dsn = json.loads(fleet.home.controller_json.read_text())["database_url"]
    # Located, not imported (importing pgserver warns about XDG_RUNTIME_DIR).
    found_pg = importlib.util.find_spec("pgserver")
    assert found_pg is not None and found_pg.submodule_search_locations
    pg_dump = Path(found_pg.submodule_search_locations[0]) / "pginstall" / "bin" / "pg_dump"
    dump = subprocess.run(
        [str(pg_dump), "--dbname", dsn], capture_output=True, timeout=60, check=True
    ).stdout
    # The dump holds the bots, sealed: looking into it proves something.
    assert b"CREATE TABLE public.bots" in dump and b"tgfleet-sealed:v1:" in dump
    return Place("pg_dump of the database", dump)


def test_a_bots_credentials_appear_nowhere_after_a_lifecycle_with_failures(
    fleet: Fleet, sandbox: Sandbox, webhook: WebhookSink
) -> None:
    """A token bot and a user (session) bot live through create, kill -9, a refused
    token, update, restart, stop and destroy; their credentials, the refused token and
    a malformed one sent in a bad request are then nowhere a user or another process can
    look: ps, environments, circusctl, rendered files, logs, API answers, the database."""
    api = Recorder(fleet)
    token = sandbox.create_bot(sandbox_name("swept"))
    session = asyncio.run(_session_string(sandbox, sandbox.create_bot(sandbox_name("swept_user"))))
    refused = f"{secrets.randbelow(10**9) + 10**9}:AAR{secrets.token_hex(16)}"
    malformed = f"no token at all {secrets.token_hex(16)}"
    credentials = [
        Secret("the bot's token", token),
        Secret("the user bot's session", session),
        Secret("the refused token", refused),
        Secret("the malformed token", malformed),
    ]
    stream = EventStream(fleet)
    try:
        # Bad requests that carry secrets: refused, and not echoed.
        api.call(
            "POST", "/api/v1/bots", {**echo_spec("swept", token), "memory_limit_mb": 1}, status=422
        )
        api.call("POST", "/api/v1/bots", echo_spec("swept", malformed), status=422)
        user_spec = {**echo_spec("swept-user", token), "session": session}
        api.call("POST", "/api/v1/bots", user_spec, status=422)  # both credentials
        # The CLI reads the token from stdin ('-'): on its command line, ps would show it.
        created = subprocess.run(
            [str(BIN / "tgfleet"), "bots", "create", "swept", "--token", "-", "--plugin", ECHO],
            input=(token + "\n").encode(),
            env={**os.environ, "TGFLEET_HOME": str(fleet.home.root)},
            capture_output=True,
            timeout=60,
            check=True,
        )
        api.answers.append(Place("tgfleet bots create", created.stdout + created.stderr))
        del user_spec["token"]
        api.call("POST", "/api/v1/bots", user_spec, status=201)
        first = api.state("swept", "running")
        api.state("swept-user", "running")
        api.call("POST", "/api/v1/bots", echo_spec("swept", token), status=409)
        os.kill(first["pid"], signal.SIGKILL)
        wait_for(
            "swept back after kill -9", lambda: api.state("swept", "running")["pid"] != first["pid"]
        )
        # A token Telegram refuses: the bot fails for auth and stays down.
        api.call("PATCH", "/api/v1/bots/swept", {"token": refused})
        api.state("swept", "failed")
        api.call("PATCH", "/api/v1/bots/swept", {"token": malformed}, status=422)
        api.call("PATCH", "/api/v1/bots/swept", {"token": token, "settings": {"note": "fixed"}})
        api.call("POST", "/api/v1/bots/swept/start", status=None)
        api.state("swept", "running")
        api.call("POST", "/api/v1/bots/swept/restart")
        api.call("POST", "/api/v1/bots/swept-user/restart")
        api.state("swept", "running")
        api.state("swept-user", "running")
        for name in ("swept", "swept-user"):
            api.call("GET", f"/api/v1/bots/{name}")
            api.call("GET", f"/api/v1/bots/{name}/events?limit=1000")
            api.call("GET", f"/api/v1/bots/{name}/logs?stream=out&lines=1000")
            api.call("GET", f"/api/v1/bots/{name}/logs?stream=err&lines=1000")
        api.call("GET", "/api/v1/bots")
        # While they run: everything but each bot's own config file, which holds its
        # credential for its process alone.
        own_configs = [fleet.home.bot_config("swept"), fleet.home.bot_config("swept-user")]
        assert all(path.exists() for path in own_configs)
        places = [
            process_list(),
            *environments(_fleet_pids(fleet)),
            *files_under(fleet.home.root, except_for=own_configs),
            *(
                fleet_command(fleet, "options", w)
                for w in ("bot-swept", "bot-swept-user", "controller")
            ),
            fleet_command(fleet, "get", "bot-swept", "env"),
            fleet_command(fleet, "stats"),
            _pg_dump(fleet),  # their rows are there, sealed
        ]
        assert fleet.home.watcher_file("swept").exists()
        # Where they must be, they are found: the sweep would see them anywhere else.
        assert found(credentials, files_under(fleet.home.bots_dir)) == [
            f"the bot's token in {own_configs[0]}",
            f"the user bot's session in {own_configs[1]}",
        ]
        assert found(credentials, places) == []
        api.call("POST", "/api/v1/bots/swept/stop")
        api.call("POST", "/api/v1/bots/swept-user/stop")
        api.state("swept", "stopped")
        api.state("swept-user", "stopped")
        api.call("DELETE", "/api/v1/bots/swept")
        api.call("DELETE", "/api/v1/bots/swept-user")
        api.call("GET", "/api/v1/bots/swept", status=404)
        api.call("GET", "/api/v1/history?bot=swept&limit=1000")
        api.call("GET", "/api/v1/history?bot=swept-user&limit=1000")
        api.call("GET", "/api/v1/history?limit=1000")
        api.call("GET", "/api/v1/status")
        api.call("GET", "/metrics")
    finally:
        events = stream.close()
    assert b"swept" in events.content, (
        "the event stream saw nothing: the sweep of it proves nothing"
    )
    # After destroy: nothing anywhere, not even under the home.
    places = [
        process_list(),
        *environments(_fleet_pids(fleet)),
        *files_under(fleet.home.root),
        fleet_command(fleet, "options", "controller"),
        _pg_dump(fleet),
        events,
        Place("the admin webhook's bodies", json.dumps(webhook.bodies).encode()),
        Place("what tgfleet up printed", fleet.log_text().encode()),
        *api.answers,
    ]
    assert any(b"swept-user" in place.content for place in api.answers)
    assert found(credentials, places) == []


def fleet_command(fleet: Fleet, *args: str) -> Place:
    return Place(f"circusctl {' '.join(args)}", fleet.circusctl(*args).encode())
