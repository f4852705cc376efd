"""`tgfleet up`: render circus.ini, run circusd in the foreground, stop it in order.

circusd runs as a child in its own session, so that Ctrl-C reaches this process
only and the shutdown happens in order: the controller first (so that nothing
reacts to bots going away), then circusd's `quit` sends every bot SIGTERM (each
exits within its graceful_timeout) and stops PostgreSQL and the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from controller.atomicfile import write_atomic
from controller.botusers import BotUsers, bot_code_paths
from controller.circus import CircusClient, SupervisorError
from controller.home import Home
from controller.pg import prepare_embedded_pg
from controller.render import SandboxWatcher, render_circus_ini
from controller.settings import (
    DEFAULT_AUTH_FAILURE_LIMIT,
    DEFAULT_DATABASE_TIMEOUT_S,
    DEFAULT_EVENT_RETENTION_COUNT,
    DEFAULT_EVENT_RETENTION_DAYS,
    DEFAULT_FORGET_AFTER_S,
    DEFAULT_SANDBOX_ADMIN,
    DEFAULT_SANDBOX_LISTEN,
    ControllerSettings,
    SettingsError,
    default_host,
    is_loopback,
    parse_hostport,
)
from controller.sysusers import SystemUserError

API_WAIT_S = 90.0
STOP_WAIT_S = 60.0


class UpError(Exception):
    """`tgfleet up` cannot start; the message says why and what to do."""


@dataclass(frozen=True)
class UpOptions:
    home: Home
    listen: str
    demo: bool
    database_url: str | None
    sandbox_listen: str = DEFAULT_SANDBOX_LISTEN
    sandbox_admin: str = DEFAULT_SANDBOX_ADMIN
    webhook_url: str | None = None
    plugin_path: tuple[str, ...] = ()
    database_timeout_s: float = DEFAULT_DATABASE_TIMEOUT_S
    event_retention_days: float = DEFAULT_EVENT_RETENTION_DAYS
    event_retention_count: int = DEFAULT_EVENT_RETENTION_COUNT
    auth_failure_limit: int = DEFAULT_AUTH_FAILURE_LIMIT
    tls_cert: str | None = None
    tls_key: str | None = None
    # Serve plain HTTP on a non-loopback address anyway (tokens cross the network in clear).
    insecure_listen: bool = False
    # This controller's host name (None: the machine's, lower-cased).
    host: str | None = None
    forget_after_s: float = DEFAULT_FORGET_AFTER_S


async def _circus_answers(endpoint: str) -> bool:
    client = CircusClient(endpoint, timeout_s=1.0)
    try:
        await client.status()
    except SupervisorError:
        return False
    finally:
        client.close()
    return True


def insecure_listen_warning(options: UpOptions) -> str | None:
    """The warning `tgfleet up` prints when the API is served in clear beyond loopback."""
    host, _ = parse_hostport(options.listen, "--listen")
    if is_loopback(host) or options.tls_cert:
        return None
    return (
        f"WARNING: the API listens on {options.listen} without TLS (--insecure-listen): "
        "bearer tokens cross the network in clear text"
    )


def check_listen(options: UpOptions) -> None:
    """The API stays on loopback unless it has TLS or is told to be insecure."""
    host, _ = parse_hostport(options.listen, "--listen")
    if (options.tls_cert is None) != (options.tls_key is None):
        raise UpError("--tls-cert and --tls-key go together")
    for path in (options.tls_cert, options.tls_key):
        if path is not None and not os.path.isfile(path):
            raise UpError(f"no such file: {path}")
    if not is_loopback(host) and not options.tls_cert and not options.insecure_listen:
        raise UpError(
            f"--listen {options.listen} is reachable from other machines: give it TLS "
            "(--tls-cert FILE --tls-key FILE), or say --insecure-listen to serve plain HTTP"
        )


def prepare(options: UpOptions) -> ControllerSettings:
    """Everything before circusd starts: dirs, embedded PostgreSQL, circus.ini, settings."""
    home = options.home
    home.check_socket_paths()
    check_listen(options)
    if os.environ.get("TGFLEET_SECRET_KEY", "").strip():
        # Its watchers get no secret in their env (`circusctl options` shows env).
        raise UpError(
            "TGFLEET_SECRET_KEY is read by the controller process, and `tgfleet up` passes "
            f"no secret through a watcher's env: put the key(s) in {home.secret_key} (0600) "
            "instead, or run the controller (`python -m controller serve`) under your own unit"
        )
    if options.webhook_url and not options.webhook_url.startswith(("http://", "https://")):
        raise UpError(f"TGFLEET_WEBHOOK_URL must be an http(s) URL, not {options.webhook_url!r}")
    if options.demo:
        # The sandbox is an optional extra; without it its watcher would crash-loop.
        import tgsandbox  # its package alone: no Telethon, no cryptography

        problem = tgsandbox.requirements_problem()
        if problem is not None:
            raise UpError(f"--demo runs the local Telegram: {problem}")
    home.make_dirs()
    if asyncio.run(_circus_answers(home.circus_endpoint)):
        raise UpError(
            f"a fleet is already running in {home.root} "
            f"(circusctl --endpoint {home.circus_endpoint} status)"
        )
    for stale in (home.circus_socket, home.circus_pubsub_socket, home.bus_socket):
        stale.unlink(missing_ok=True)
    pg = None
    database_url = options.database_url
    if not database_url:
        pg = prepare_embedded_pg(home)
        database_url = pg.dsn
    try:
        # As root: the bots' group, and the code every bot user must read (o+r, never o+w).
        BotUsers(home).prepare(bot_code_paths(sys.executable, options.plugin_path))
    except SystemUserError as exc:
        raise UpError(f"cannot prepare the bots' users: {exc}") from exc
    sandbox = None
    if options.demo:
        parse_hostport(options.sandbox_listen, "--sandbox-listen")
        parse_hostport(options.sandbox_admin, "--sandbox-admin")
        sandbox = SandboxWatcher(options.sandbox_listen, options.sandbox_admin, home.sandbox_dir)
    text = render_circus_ini(
        home,
        python=sys.executable,
        listen=options.listen,
        embedded_pg=pg,
        sandbox=sandbox,
        plugin_path=options.plugin_path,
    )
    write_atomic(home.circus_ini, text, 0o600)
    write_atomic(home.circus_endpoint_file, home.circus_endpoint + "\n", 0o644)
    settings = ControllerSettings(
        listen=options.listen,
        database_url=database_url,
        demo=options.demo,
        sandbox_listen=options.sandbox_listen if options.demo else None,
        sandbox_admin=options.sandbox_admin if options.demo else None,
        webhook_url=options.webhook_url,
        plugin_path=options.plugin_path,
        database_timeout_s=options.database_timeout_s,
        event_retention_days=options.event_retention_days,
        event_retention_count=options.event_retention_count,
        auth_failure_limit=options.auth_failure_limit,
        tls_cert=options.tls_cert,
        tls_key=options.tls_key,
        host=options.host or default_host(),
        forget_after_s=options.forget_after_s,
    )
    try:
        settings.check()
    except SettingsError as exc:
        raise UpError(str(exc)) from exc
    settings.save(home)
    return settings


async def ordered_stop(home: Home, say: Callable[[str], None]) -> None:
    """The controller first, so that nothing reacts to bots going away; then circusd quits,
    which stops every other watcher at once (bots, sandbox, PostgreSQL: bots hold no
    database connection, and one stop command per bot would run one after the other)."""
    client = CircusClient(home.circus_endpoint, timeout_s=10.0)
    try:
        statuses = await client.status()
        if statuses.get("controller") == "active":
            await client.call("stop", name="controller", waiting=True)
        await client.quit()
    except SupervisorError as exc:
        say(f"circusd did not take the ordered stop ({exc}); it stops everything itself")
    finally:
        client.close()


def run(
    options: UpOptions, say: Callable[[str], None], on_ready: Callable[[ControllerSettings], None]
) -> int:
    """Run the fleet in the foreground until Ctrl-C / SIGTERM; the exit code."""
    settings = prepare(options)
    home = options.home
    circusd_log = open(home.logs_dir / "circusd.log", "ab")  # noqa: SIM115 - lives as long as circusd
    circusd = subprocess.Popen(
        # circusd as a module of this interpreter, not the script next to it: a
        # --user or system-wide install puts scripts elsewhere than sys.executable.
        [sys.executable, "-m", "circus.circusd", "--log-output", "-", str(home.circus_ini)],
        stdout=circusd_log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        cwd=home.root,
    )
    stop_requested = False

    def request_stop(signum: int, frame: object) -> None:
        nonlocal stop_requested
        if stop_requested:  # a second Ctrl-C: no more patience
            with contextlib.suppress(ProcessLookupError):
                os.killpg(circusd.pid, signal.SIGKILL)
        stop_requested = True

    previous = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        if _wait_for_api(settings, circusd, lambda: stop_requested):
            on_ready(settings)
            if not stop_requested:
                circusd_log.close()
                _hand_over(circusd.pid, home)  # does not return
        while not stop_requested and circusd.poll() is None:
            time.sleep(0.2)
        if circusd.poll() is None:
            say("stopping: the controller, then every bot, the sandbox and PostgreSQL…")
            asyncio.run(ordered_stop(home, say))
            try:
                circusd.wait(timeout=STOP_WAIT_S)
            except subprocess.TimeoutExpired:
                say("circusd did not exit in time; killing what is left")
                os.killpg(circusd.pid, signal.SIGKILL)
                circusd.wait()
        else:
            say(
                f"circusd exited with code {circusd.returncode}; see {home.logs_dir / 'circusd.log'}"
            )
            return circusd.returncode or 1
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        circusd_log.close()
    say("stopped")
    return 0


def _hand_over(circusd_pid: int, home: Home) -> None:
    """Become ``controller.upwait`` (same pid, circusd still our child): what waits for
    circusd and stops it in order need not keep what preparing imported.

    Ctrl-C and SIGTERM are blocked across the exec: the mask and what is pending
    survive it, and the waiter unblocks them once its handlers are in place, so one
    sent in those milliseconds is delivered then, neither lost nor fatal."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(
        sys.executable,
        [sys.executable, "-m", "controller.upwait", str(circusd_pid), str(home.root)],
    )


def _wait_for_api(
    settings: ControllerSettings, circusd: subprocess.Popen[bytes], stopping: Callable[[], bool]
) -> bool:
    import urllib.error
    import urllib.request

    url = f"{settings.api_url}/healthz"
    # Liveness only (no token is sent): the certificate is checked by real clients.
    context = ssl._create_unverified_context() if settings.tls_cert else None
    deadline = time.monotonic() + API_WAIT_S
    while time.monotonic() < deadline and not stopping() and circusd.poll() is None:
        try:
            with urllib.request.urlopen(url, timeout=1, context=context) as answer:
                if answer.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            time.sleep(0.1)
    return False
