"""Starting and stopping the real thing for tests: `tgfleet up`, the sandbox, their clients."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import http.server
import inspect
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import psutil

from controller.botusers import BotUsers
from controller.client import ApiClient, ApiError, ApiUnreachable
from controller.home import Home

ROOT = Path(__file__).resolve().parent.parent
#: When set, fleets use this PostgreSQL server (one fresh database each) instead of
#: the embedded one.
EXTERNAL_DSN = os.environ.get("TGFLEET_DATABASE_URL") or None


def _with_database(dsn: str, database: str) -> str:
    parts = urllib.parse.urlsplit(dsn)
    return urllib.parse.urlunsplit(parts._replace(path="/" + database))


async def _admin_sql(dsn: str, sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def create_database(dsn: str) -> str:
    """A new, empty database on the server of ``dsn``; the DSN that reaches it."""
    name = "tgfleet_test_" + os.urandom(6).hex()
    asyncio.run(_admin_sql(dsn, f'CREATE DATABASE "{name}"'))
    return _with_database(dsn, name)


def drop_database(admin_dsn: str, dsn: str) -> None:
    name = urllib.parse.urlsplit(dsn).path.lstrip("/")
    asyncio.run(_admin_sql(admin_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


BIN = Path(sys.executable).parent
T = TypeVar("T")


#: Where free_port() hands out ports: below the kernel's ephemeral range (32768-60999 on
#: Linux), so a port bound to 0 anywhere (a client's source port, WebhookSink) never takes
#: one of ours between our check and the bind of the process we give it to.
PORT_RANGE = range(20000, 32000)
#: Ports per pytest-xdist worker (gw0, gw1, ...); a run without xdist uses the last block.
PORTS_PER_WORKER = 1000
PORT_LOCKS = Path("/tmp/tgfleet-test-ports")  # one place for every run on the machine
_reserved: dict[int, int] = {}  # port -> the fd of its lock file, held while we live
_next_port: list[int] = []


def _worker_block() -> range:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    blocks = len(PORT_RANGE) // PORTS_PER_WORKER
    index = int(worker[2:]) % (blocks - 1) if worker.startswith("gw") else blocks - 1
    start = PORT_RANGE.start + index * PORTS_PER_WORKER
    return range(start, start + PORTS_PER_WORKER)


def _reserve(port: int) -> bool:
    """Take the lock file of ``port`` (an flock, dropped by the kernel when we exit)."""
    PORT_LOCKS.mkdir(mode=0o777, exist_ok=True)
    fd = os.open(PORT_LOCKS / str(port), os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return False
    _reserved[port] = fd
    return True


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A TCP port on 127.0.0.1 that no other test process is given, and that is free now.

    Binding port 0 and closing is not enough: two xdist workers (or two test runs on
    one machine) can both be told the same port before either binds it. So:

    - each xdist worker draws from its own block of PORT_RANGE (``PYTEST_XDIST_WORKER``
      gwN takes block N; without xdist, the last block), walking it in order, so one
      process never hands out a port twice;
    - a port is handed out only with an exclusive flock on ``PORT_LOCKS/<port>``, held
      for the life of this process: another run whose worker has the same name skips
      it (the kernel drops the lock when we exit, however we exit);
    - and only if it can be bound right now (nothing else listens on it).

    PORT_RANGE lies below the ephemeral range, so the kernel gives none of these ports
    to a socket bound to port 0 while the process we hand it to starts.
    """
    block = _worker_block()
    if not _next_port:
        _next_port.append(block.start)
    for _ in range(len(block)):
        port = _next_port[0]
        _next_port[0] = block.start + (port + 1 - block.start) % len(block)
        if port in _reserved or not _reserve(port):
            continue
        if _bindable(port):
            return port
        os.close(_reserved.pop(port))
    raise AssertionError(f"no free port left in {block}")


def short_tmpdir(prefix: str) -> Path:
    """A temp dir with a short path (unix socket paths are limited to 107 bytes) that
    every user may traverse: pytest's tmp_path is root's 0700 when we are root, and
    the fleet's own users (PostgreSQL's, the bots', the service user) must get through."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    path.chmod(0o755)
    return path


#: What a poll may raise while the awaited thing is not there yet: it counts as "not yet".
NOT_YET: tuple[type[BaseException], ...] = (ApiError, ApiUnreachable, OSError)


def _timed_out(what: str, timeout: float, last: object) -> AssertionError:
    return AssertionError(f"timed out after {timeout} s waiting for {what} (last seen: {last!r})")


def wait_for(
    what: str,
    check: Callable[[], T | None],
    timeout: float = 30.0,
    every: float = 0.05,
    *,
    ignoring: tuple[type[BaseException], ...] = NOT_YET,
) -> T:
    """Poll ``check`` until it returns something truthy, and return that: the one way
    tests wait (never ``sleep(n)`` and hope).

    ``check`` runs at once, then every ``every`` s; an exception of ``ignoring`` counts
    as a falsy answer. After ``timeout`` s (keep it generous: a loaded machine is slow,
    and a passing test does not wait it out) it fails with an AssertionError naming
    ``what`` and the last value or exception ``check`` gave.
    """
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            value = check()
        except ignoring as exc:
            value, last = None, exc
        else:
            last = value
        if value:
            return value
        if time.monotonic() >= deadline:
            raise _timed_out(what, timeout, last)
        time.sleep(every)


async def wait_for_async(
    what: str,
    check: Callable[[], T | Awaitable[T | None] | None],
    timeout: float = 30.0,
    every: float = 0.05,
    *,
    ignoring: tuple[type[BaseException], ...] = NOT_YET,
) -> T:
    """``wait_for`` for async tests, with the same semantics; ``check`` may be a plain
    function or return an awaitable (an async function), and the loop keeps running
    between polls."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            value = check()
            if inspect.isawaitable(value):
                value = await value
        except ignoring as exc:
            value, last = None, exc
        else:
            last = value
        if value:
            return value
        if time.monotonic() >= deadline:
            raise _timed_out(what, timeout, last)
        await asyncio.sleep(every)


def holds_for(what: str, check: Callable[[], T | None], duration: float, every: float = 0.1) -> T:
    """Poll ``check`` for ``duration`` s; it must be truthy every time (the last value is
    returned). For "this does not happen": it fails at the first falsy value or error,
    naming ``what`` and the value, instead of sleeping and looking once."""
    deadline = time.monotonic() + duration
    polls = 0
    while True:
        value = check()
        polls += 1
        if not value:
            raise AssertionError(f"{what} stopped holding after {polls} polls: {value!r}")
        if time.monotonic() >= deadline:
            return value
        time.sleep(every)


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def kill_tree(proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
    for child in descendants(proc.pid):
        with contextlib.suppress(psutil.Error):
            child.send_signal(sig)
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(sig)


class WebhookSink:
    """An HTTP endpoint that keeps every JSON body POSTed to it (the admin webhook)."""

    def __init__(self) -> None:
        bodies: list[dict[str, Any]] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                bodies.append(json.loads(self.rfile.read(length)))
                self.send_response(204)
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.bodies = bodies
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


@dataclass
class Sandbox:
    """The local Telegram, as a process of its own."""

    data: Path
    port: int
    admin_port: int
    proc: subprocess.Popen[bytes]

    @classmethod
    def start(cls, data: Path) -> Sandbox:
        port, admin_port = free_port(), free_port()
        log = open(data.parent / "sandbox.log", "ab")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tgsandbox",
                "serve",
                "--listen",
                f"127.0.0.1:{port}",
                "--admin-listen",
                f"127.0.0.1:{admin_port}",
                "--data",
                str(data),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        sandbox = cls(data, port, admin_port, proc)
        wait_for(
            "the sandbox's public key",
            lambda: (data / "public.pem").exists() and sandbox.admin_ready(),
        )
        return sandbox

    def admin_ready(self) -> bool:
        with (
            contextlib.suppress(OSError),
            socket.create_connection(("127.0.0.1", self.admin_port), 0.5),
        ):
            return True
        return False

    @property
    def admin(self) -> str:
        return f"127.0.0.1:{self.admin_port}"

    @property
    def public_key(self) -> str:
        return (self.data / "public.pem").read_text()

    def telegram_defaults(self) -> dict[str, Any]:
        return {
            "api_id": 1,
            "api_hash": "sandbox",
            "server": {
                "host": "127.0.0.1",
                "port": self.port,
                "dc_id": 2,
                "public_key": self.public_key,
            },
        }

    def cli(self, *args: str) -> str:
        done = subprocess.run(
            [str(BIN / "tgfleet"), "sandbox", *args, "--admin", self.admin],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return done.stdout.strip()

    def create_bot(self, name: str) -> str:
        """A new sandbox bot; its token."""
        return self.cli("bot", "create", name)

    def admin_request(
        self, method: str, path: str, body: object | None = None, timeout: float = 30
    ) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"http://{self.admin}{path}",
            data=data,
            method=method,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return json.loads(answer.read())

    def say(self, user: str, to: str, text: str) -> int:
        """Send as a simulated user; the id of the sent message."""
        sent = self.admin_request(
            "POST", f"/api/v1/users/{user}/messages", {"to": to, "text": text}
        )
        return int(sent["id"])

    def replies(self, user: str, to: str, after_id: int, wait: float = 30) -> list[tuple[int, str]]:
        """The bot's answers after ``after_id`` as (id, text), waiting up to ``wait`` s for one."""
        query = urllib.parse.urlencode(
            {
                "peer": to,
                "after_id": after_id,
                "direction": "in",
                "wait": min(wait, 60),
                "limit": 100,
            }
        )
        found = self.admin_request(
            "GET", f"/api/v1/users/{user}/messages?{query}", timeout=wait + 10
        )
        return [(int(m["id"]), str(m["text"])) for m in found["messages"]]

    def reply(self, user: str, to: str, after_id: int, wait: float = 30) -> str | None:
        """The bot's first answer after ``after_id``, waiting up to ``wait`` seconds."""
        query = urllib.parse.urlencode(
            {"peer": to, "after_id": after_id, "direction": "in", "wait": min(wait, 60), "limit": 1}
        )
        found = self.admin_request(
            "GET", f"/api/v1/users/{user}/messages?{query}", timeout=wait + 10
        )
        return str(found["messages"][0]["text"]) if found["messages"] else None

    def fault(self, target: str, kind: str, **options: object) -> None:
        self.admin_request("POST", "/api/v1/faults", {"target": target, "kind": kind, **options})

    def clear(self, target: str) -> None:
        self.admin_request("DELETE", f"/api/v1/faults/{target}")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@contextlib.contextmanager
def sandbox_in_tmp(prefix: str) -> Iterator[Sandbox]:
    """A sandbox of its own in a short temp dir, stopped and removed on the way out."""
    root = short_tmpdir(prefix)
    box = Sandbox.start(root / "sandbox")
    try:
        yield box
    finally:
        box.stop()
        shutil.rmtree(root, ignore_errors=True)


@dataclass
class Fleet:
    """`tgfleet up` in a temp home on free ports, and clients to drive it."""

    home: Home
    listen: str
    proc: subprocess.Popen[bytes] | None = None
    output: Path | None = None
    env: dict[str, str] = field(default_factory=dict)
    database: str | None = None  # its own database on an external server, if any

    @classmethod
    def create(cls, root: Path) -> Fleet:
        return cls(Home(root / "home"), f"127.0.0.1:{free_port()}")

    @property
    def embedded_postgres(self) -> bool:
        return EXTERNAL_DSN is None

    def start(self, *extra: str) -> Fleet:
        self.output = self.home.root.parent / "up.log"
        env = {**os.environ, **self.env}
        env.pop("TGFLEET_HOME", None)
        if EXTERNAL_DSN is not None:
            if self.database is None:
                self.database = create_database(EXTERNAL_DSN)
            env["TGFLEET_DATABASE_URL"] = self.database
        with open(self.output, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    str(BIN / "tgfleet"),
                    "up",
                    "--home",
                    str(self.home.root),
                    "--listen",
                    self.listen,
                    *extra,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        wait_for("the API", self.healthy, timeout=90)
        return self

    def healthy(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(
                f"tgfleet up exited with {self.proc.returncode}: {self.log_text()}"
            )
        try:
            self.client().request("GET", "/healthz")
        except OSError:
            return False
        except Exception:  # ApiUnreachable while the controller starts
            return False
        return True

    def log_text(self) -> str:
        return self.output.read_text(errors="replace") if self.output else ""

    def client(self, token: str | None = None) -> ApiClient:
        if token is None and self.home.admin_token.exists():
            token = self.home.admin_token.read_text().strip()
        return ApiClient(f"http://{self.listen}", token, timeout_s=60)

    def api(self, method: str, path: str, body: object | None = None) -> Any:
        return self.client().request(method, path, body)

    def bot(self, name: str) -> dict[str, Any]:
        result: dict[str, Any] = self.api("GET", f"/api/v1/bots/{name}")
        return result

    def wait_state(self, name: str, state: str, timeout: float = 30.0) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            bot = self.bot(name)
            return bot if bot["state"] == state and (state != "running" or bot["pid"]) else None

        return wait_for(f"{name} to be {state}", check, timeout)

    def circusctl(self, *args: str) -> str:
        done = subprocess.run(
            [
                str(BIN / "circusctl"),
                "--endpoint",
                self.home.circus_endpoint,
                "--timeout",
                "10",
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        return done.stdout

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "TGFLEET_HOME": str(self.home.root)}
        done = subprocess.run(
            [str(BIN / "tgfleet"), *args], capture_output=True, text=True, timeout=60, env=env
        )
        if check and done.returncode != 0:
            raise AssertionError(
                f"tgfleet {' '.join(args)} exited {done.returncode}: {done.stderr}"
            )
        return done

    def processes(self) -> list[psutil.Process]:
        return descendants(self.proc.pid) if self.proc else []

    def stop(self, timeout: float = 60.0) -> int:
        """Ctrl-C, as a user would; the exit code. Kills what is left if it hangs."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                kill_tree(self.proc)
                self.proc.wait()
                raise AssertionError(
                    f"tgfleet up did not stop in {timeout} s: {self.log_text()}"
                ) from None
        return self.proc.returncode

    def leftovers(self) -> list[str]:
        """Processes of this fleet still alive (matched by the home path on their command line)."""
        found = []
        for proc in psutil.process_iter(["pid", "cmdline"]):
            cmdline = " ".join(proc.info["cmdline"] or [])
            if str(self.home.root) in cmdline:
                found.append(f"{proc.info['pid']}: {cmdline}")
        return found

    def kill_leftovers(self) -> None:
        """Kill whatever of this fleet still runs, remove its bots' users (as root) and
        drop its external database."""
        for proc in psutil.process_iter(["cmdline"]):
            if str(self.home.root) in " ".join(proc.info["cmdline"] or []):
                with contextlib.suppress(psutil.Error):
                    proc.kill()
        BotUsers(self.home).remove_all()
        if self.database is not None and EXTERNAL_DSN is not None:
            drop_database(EXTERNAL_DSN, self.database)
            self.database = None


@dataclass(frozen=True)
class Answer:
    method: str
    path: str
    status: int
    took_s: float
    body: Any
    content_type: str


def timed(fleet: Fleet, method: str, path: str, body: object | None = None) -> Answer:
    """One request as a user makes it; its status, body and how long it took to answer."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"http://{fleet.listen}{path}", data=data, method=method)
    request.add_header("Authorization", f"Bearer {fleet.home.admin_token.read_text().strip()}")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    started = time.monotonic()
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            status, raw, kind = answer.status, answer.read(), answer.headers.get_content_type()
    except urllib.error.HTTPError as exc:
        status, raw, kind = exc.code, exc.read(), exc.headers.get_content_type()
    took = time.monotonic() - started
    parsed = json.loads(raw) if kind.endswith("json") and raw else raw.decode()
    return Answer(method, path, status, took, parsed, kind)


def postgres_processes(fleet: Fleet) -> list[psutil.Process]:
    """The embedded PostgreSQL of ``fleet``: its postmaster and every backend (waiting
    for circusd to list one: an earlier test of the same fleet may have just started it)."""
    listed = wait_for(
        "circusd to list PostgreSQL's postmaster",
        lambda: fleet.circusctl("list", "postgres").replace(",", " ").split(),
        timeout=30,
    )
    pid = int(listed[0])
    master = psutil.Process(pid)
    return [master, *master.children(recursive=True)]


@contextlib.contextmanager
def stalled_postgres(fleet: Fleet) -> Iterator[list[psutil.Process]]:
    """The embedded PostgreSQL stopped (SIGSTOP), postmaster and backends: a database
    host that stops answering. Every process is continued on the way out, whatever happens."""
    stopped: list[psutil.Process] = []
    try:
        master, *_ = postgres_processes(fleet)
        # The postmaster first: stopped, it forks no backend we would miss.
        master.send_signal(signal.SIGSTOP)
        stopped.append(master)
        for backend in master.children(recursive=True):
            backend.send_signal(signal.SIGSTOP)
            stopped.append(backend)
        assert len(stopped) > 1, "no backend to stop: the controller holds no connection?"
        yield stopped
    finally:
        for proc in reversed(stopped):
            with contextlib.suppress(psutil.Error):
                proc.send_signal(signal.SIGCONT)


@contextlib.contextmanager
def running_fleet(
    root: Path, sandbox: Sandbox | None, *extra: str, env: dict[str, str] | None = None
) -> Iterator[Fleet]:
    fleet = Fleet.create(root)
    fleet.env = dict(env or {})
    try:
        fleet.start(*extra)
        if sandbox is not None:
            fleet.api("PUT", "/api/v1/defaults", {"telegram": sandbox.telegram_defaults()})
        yield fleet
    finally:
        if fleet.proc is not None:
            try:
                fleet.stop()
            finally:
                fleet.kill_leftovers()


def echo_spec(name: str, token: str, **settings: Any) -> dict[str, Any]:
    return {
        "name": name,
        "token": token,
        "plugins": ["botrunner.plugins.echo:setup"],
        "settings": settings,
    }


def dump(obj: object) -> str:
    return json.dumps(obj, indent=2, default=str)


def self_signed_certificate(directory: Path, ip: str = "127.0.0.1") -> tuple[Path, Path]:
    """A certificate (its own authority) for ``ip`` as an IP address, which TLS clients
    check, and its key: ``directory``/cert.pem and key.pem."""
    import ipaddress
    from datetime import UTC, datetime, timedelta

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, ip)])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(hours=2))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return write_pem(directory, cert, key)


def write_pem(directory: Path, cert: Any, key: Any) -> tuple[Path, Path]:
    """``cert.pem`` and ``key.pem`` (PKCS#8, unencrypted) in ``directory``."""
    from cryptography.hazmat.primitives import serialization

    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def fleet_in_memory(tmp_path: Path, **options: Any) -> tuple[Any, Home, Any]:
    """A controller's Fleet over an in-memory store and circusd's stand-in, in a home
    made under ``tmp_path`` (its store, home and fleet): for tests of the API alone."""
    from controller.botfiles import BotFiles
    from controller.buskeys import BusKeys
    from controller.circus import FakeSupervisor
    from controller.fleet import Fleet
    from controller.memstore import InMemoryStore

    store = InMemoryStore()
    home = Home(tmp_path / "home")
    for directory in (home.root, home.bots_d, home.bots_dir, home.logs_dir):
        directory.mkdir(parents=True, exist_ok=True)
    fleet = Fleet(
        store,
        FakeSupervisor(bots_d=home.bots_d),
        BotFiles(home, sys.executable, BusKeys.open(home)),
        **options,
    )
    return store, home, fleet
