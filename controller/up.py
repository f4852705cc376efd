"""`tgfleet up`: prepare the fleet, render circus.ini, then become circusd in the foreground.

circusd runs in this process (``controller.upwait``, after an exec that drops
what preparing imported); every watcher's process is in its own session, so
Ctrl-C reaches circusd only and the shutdown happens in order: the controller
first (so that nothing reacts to bots going away), then circusd's `quit` sends
every bot SIGTERM (each exits within its graceful_timeout) and stops PostgreSQL
and the rest.
"""

from __future__ import annotations

import asyncio
import errno
import grp
import importlib.util
import os
import pwd
import signal
import stat
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from controller.access import trusted_networks
from controller.atomicfile import write_atomic
from controller.botusers import (
    BotAccount,
    BotUsers,
    bot_code_paths,
    fleet_group_name,
    service_user_name,
)
from controller.circus import CircusClient, SupervisorError
from controller.home import Home
from controller.keeper import BOT_NAME
from controller.pg import PgWatcher, prepare_embedded_pg
from controller.render import LogRotation, SandboxWatcher, render_circus_ini
from controller.settings import (
    DEFAULT_AUTH_FAILURE_LIMIT,
    DEFAULT_DATABASE_TIMEOUT_S,
    DEFAULT_EVENT_RETENTION_COUNT,
    DEFAULT_EVENT_RETENTION_DAYS,
    DEFAULT_FORGET_AFTER_S,
    DEFAULT_LISTEN,
    DEFAULT_SANDBOX_ADMIN,
    DEFAULT_SANDBOX_LISTEN,
    ControllerSettings,
    SettingsError,
    default_host,
    env_integer,
    env_number,
    is_loopback,
    parse_hostport,
)
from controller.sysusers import SystemUserError, give_tree, grant_user, private_dir
from controller.watchercheck import WatcherRefused, check_watcher


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
    trusted_proxies: tuple[str, ...] = ()
    tls_cert: str | None = None
    tls_key: str | None = None
    # Serve plain HTTP on a non-loopback address anyway (tokens cross the network in clear).
    insecure_listen: bool = False
    # This controller's host name (None: the machine's, lower-cased).
    host: str | None = None
    forget_after_s: float = DEFAULT_FORGET_AFTER_S


def options_from_env(
    *,
    home: str | None,
    listen: str | None,
    demo: bool,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    insecure_listen: bool = False,
    host: str | None = None,
    environ: dict[str, str] | None = None,
) -> UpOptions:
    """`tgfleet up`'s options from its flags and environment (`tgfleet render circus-ini`
    takes the same)."""
    env = dict(os.environ) if environ is None else environ
    return UpOptions(
        home=Home.resolve(home),
        listen=listen or env.get("TGFLEET_LISTEN", DEFAULT_LISTEN),
        demo=demo,
        database_url=env.get("TGFLEET_DATABASE_URL") or None,
        sandbox_listen=env.get("TGFLEET_SANDBOX_LISTEN", DEFAULT_SANDBOX_LISTEN),
        sandbox_admin=env.get("TGFLEET_SANDBOX_ADMIN", DEFAULT_SANDBOX_ADMIN),
        webhook_url=env.get("TGFLEET_WEBHOOK_URL") or None,
        plugin_path=tuple(
            entry for entry in env.get("TGFLEET_PLUGIN_PATH", "").split(":") if entry
        ),
        database_timeout_s=env_number(
            env, "TGFLEET_DATABASE_TIMEOUT_S", DEFAULT_DATABASE_TIMEOUT_S
        ),
        event_retention_days=env_number(
            env, "TGFLEET_EVENT_RETENTION_DAYS", DEFAULT_EVENT_RETENTION_DAYS
        ),
        event_retention_count=env_integer(
            env, "TGFLEET_EVENT_RETENTION_COUNT", DEFAULT_EVENT_RETENTION_COUNT
        ),
        auth_failure_limit=env_integer(
            env, "TGFLEET_AUTH_FAILURE_LIMIT", DEFAULT_AUTH_FAILURE_LIMIT
        ),
        trusted_proxies=tuple(
            e for e in env.get("TGFLEET_TRUSTED_PROXIES", "").split(",") if e.strip()
        ),
        tls_cert=os.path.abspath(tls_cert) if tls_cert else None,
        tls_key=os.path.abspath(tls_key) if tls_key else None,
        insecure_listen=insecure_listen,
        host=host or env.get("TGFLEET_HOST") or None,
        forget_after_s=env_number(env, "TGFLEET_HOST_FORGET_AFTER_S", DEFAULT_FORGET_AFTER_S),
    )


async def _circus_answers(endpoint: str) -> bool:
    client = CircusClient(endpoint, timeout_s=1.0)
    try:
        await client.status()
    except SupervisorError:
        return False
    finally:
        client.close()
    return True


def fleet_running(home: Home) -> bool:
    """Whether a fleet runs in ``home``: its circusd answers (within 1 s)."""
    return asyncio.run(_circus_answers(home.circus_endpoint))


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
        if path is not None:
            _check_controller_reads(options.home, path)
    if not is_loopback(host) and not options.tls_cert and not options.insecure_listen:
        raise UpError(
            f"--listen {options.listen} is reachable from other machines: give it TLS "
            "(--tls-cert FILE --tls-key FILE), or say --insecure-listen to serve plain HTTP"
        )


def _check_controller_reads(home: Home, path: str) -> None:
    """The controller serves HTTPS, so it must read the certificate and key: as root it
    runs as the fleet's service user with the fleet's group as its primary group (what
    circusd gives its watcher), tried by opening the file as them (mode, ACLs, every dir
    on the way). A user or group this `up` has yet to make is tried as ids no user or
    group has: it may read what a stranger may."""
    if os.geteuid() != 0:
        if not os.access(path, os.R_OK):
            raise UpError(f"cannot read {path}: the controller, run as this user, must read it")
        return
    name = service_user_name(home)
    stranger = next(i for i in range(2**31 - 2, 0, -1) if _no_user_nor_group(i))
    try:
        gid = grp.getgrnam(fleet_group_name(home)).gr_gid
    except KeyError:
        gid = stranger
    try:
        uid, groups, exists = pwd.getpwnam(name).pw_uid, os.getgrouplist(name, gid), True
    except KeyError:
        uid, groups, exists = stranger, [gid], False
    cat = subprocess.run(
        ["cat", "--", path], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        user=uid, group=gid, extra_groups=groups, cwd="/", check=False,
    )  # fmt: skip
    if cat.returncode != 0:
        first = "" if exists else (
            f"; {name} does not exist yet: run `tgfleet up` (or `tgfleet render circus-ini "
            "--write`) once without --tls-cert/--tls-key, which makes it"
        )  # fmt: skip
        raise UpError(
            f"{path} is not readable by {name}, the fleet's service user, which runs the "
            f"controller when `tgfleet up` runs as root: grant it read access (setfacl -m "
            f"u:{name}:r {path}, and search (x) on the dirs above){first}"
        )


def _no_user_nor_group(i: int) -> bool:
    try:
        pwd.getpwuid(i)
    except KeyError:
        try:
            grp.getgrgid(i)
        except KeyError:
            return True
    return False


def check_options(options: UpOptions) -> None:
    """What `tgfleet up` refuses before it touches anything (also `tgfleet render circus-ini`)."""
    options.home.check_socket_paths()
    check_listen(options)
    try:
        trusted_networks(options.trusted_proxies)
    except ValueError as exc:
        raise UpError(f"TGFLEET_TRUSTED_PROXIES: {exc}") from None
    if os.environ.get("TGFLEET_SECRET_KEY", "").strip():
        # Its watchers get no secret in their env (`circusctl options` shows env).
        raise UpError(
            "TGFLEET_SECRET_KEY is read by the controller process, and `tgfleet up` passes "
            f"no secret through a watcher's env: put the key(s) in {options.home.secret_key} "
            "(0600) instead, or run the controller (`python -m controller serve`) under your "
            "own unit"
        )
    if options.webhook_url and not options.webhook_url.startswith(("http://", "https://")):
        raise UpError(f"TGFLEET_WEBHOOK_URL must be an http(s) URL, not {options.webhook_url!r}")
    if options.demo:
        # The sandbox is an optional extra; without it its watcher would crash-loop.
        import tgsandbox  # its package alone: no Telethon, no cryptography

        problem = tgsandbox.requirements_problem()
        if problem is not None:
            raise UpError(f"--demo runs the local Telegram: {problem}")
        parse_hostport(options.sandbox_listen, "--sandbox-listen")
        parse_hostport(options.sandbox_admin, "--sandbox-admin")
    log_rotation()
    merge_pages()
    # The settings' own ranges, before anything is written (the DSN is not checked here).
    controller_settings(options, options.database_url or "postgresql://")


def log_rotation() -> LogRotation:
    """Every watcher's log rotation (TGFLEET_LOG_MAX_BYTES, TGFLEET_LOG_BACKUP_COUNT)."""
    try:
        return LogRotation.from_env(os.environ)
    except ValueError as exc:
        raise UpError(str(exc)) from exc


def merge_pages() -> bool:
    """TGFLEET_MERGE_PAGES: 1 has the fork server offer its memory to the kernel's
    same-page merging (KSM); 0 or unset, not."""
    raw = os.environ.get("TGFLEET_MERGE_PAGES", "").strip()
    if raw not in ("", "0", "1"):
        raise UpError(f"TGFLEET_MERGE_PAGES must be 0 or 1, not {raw!r}")
    return raw == "1"


def circus_ini_text(
    options: UpOptions, pg: PgWatcher | None, service: BotAccount | None = None
) -> str:
    """The circus.ini of these options, with ``pg`` as the embedded PostgreSQL (or none)
    and ``service`` as the sandbox's user (None: the name it has or will have as root,
    for a render that prepares nothing)."""
    home = options.home
    sandbox = None
    user = group = None
    if service is not None:
        user, group = service.user, service.group
    elif os.geteuid() == 0:  # useradd --user-group names its group after it
        user = group = service_user_name(home)
    if options.demo:
        sandbox = SandboxWatcher(
            options.sandbox_listen, options.sandbox_admin, home.sandbox_dir, user, group
        )
    return render_circus_ini(
        home,
        python=sys.executable,
        listen=options.listen,
        embedded_pg=pg,
        sandbox=sandbox,
        plugin_path=options.plugin_path,
        log=log_rotation(),
        controller_account=(user, fleet_group_name(home)) if user is not None else None,
        merge_pages=merge_pages(),
    )


def controller_settings(options: UpOptions, database_url: str) -> ControllerSettings:
    """The controller's settings (``controller.json``) for these options, checked."""
    log = log_rotation()
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
        trusted_proxies=options.trusted_proxies,
        tls_cert=options.tls_cert,
        tls_key=options.tls_key,
        log_max_bytes=log.max_bytes,
        log_backup_count=log.backup_count,
        host=options.host or default_host(),
        forget_after_s=options.forget_after_s,
    )
    try:
        settings.check()
    except SettingsError as exc:
        raise UpError(str(exc)) from exc
    return settings


def prepare_home(options: UpOptions) -> ControllerSettings:
    """The home as circusd needs it: dirs, embedded PostgreSQL (initdb once), the bots'
    group and readable code (as root), the sandbox's service user, ``circus.ini`` and
    ``controller.json``. Safe to repeat, also while the fleet runs: what is already
    right stays."""
    home = options.home
    _refuse_planted_links(home)
    _make_dirs(home)
    users = BotUsers(home)
    # The service user runs the controller, the embedded PostgreSQL and the sandbox.
    code = [*bot_code_paths(sys.executable, options.plugin_path), _package_dir("controller")]
    if options.demo:
        code.append(_package_dir("tgsandbox"))
    try:
        # As root: the bots' group, and the code every bot user must read (o+r, never o+w).
        users.prepare(code)
        service = users.ensure_service()
    except SystemUserError as exc:
        raise UpError(f"cannot prepare the bots' users: {exc}") from exc
    pg = None
    database_url = options.database_url
    if not database_url:
        run_as = pwd.getpwuid(service.uid) if service is not None else None
        pg = prepare_embedded_pg(home, run_as)
        database_url = pg.dsn
    if options.demo:
        _open_sandbox_dir(home, service)
    settings = controller_settings(options, database_url)
    write_atomic(home.circus_ini, circus_ini_text(options, pg, service), 0o600)
    write_atomic(home.circus_endpoint_file, home.circus_endpoint + "\n", 0o644)
    settings.save(home)
    if service is not None:
        try:
            _share_home(home, service, users.fleet_group)
        except OSError as exc:
            if exc.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP):
                raise
            raise UpError(
                f"{home.root} is on a file system without POSIX ACLs ({exc.strerror}): as "
                "root, the controller runs as the fleet's service user, which reads the logs "
                "and writes its files in the home through ACL entries; choose a home on "
                "ext4, XFS or Btrfs"
            ) from exc
    return settings


def _refuse_planted_links(home: Home) -> None:
    """As root, `up` creates, chmods and chowns the home's entries: none may be a
    symlink another user made (the service user may create entries in the home, and
    own ``pg/``, ``sandbox/``, ``bus-keys/``), or root would follow it elsewhere. An
    operator's own link (root's) is left alone."""
    if os.geteuid() != 0 or not home.root.is_dir():
        return
    for entry in (*home.root.iterdir(), home.pg_run, home.pg_data):
        try:
            info = entry.lstat()
        except FileNotFoundError:
            continue
        if stat.S_ISLNK(info.st_mode) and info.st_uid != 0:
            raise UpError(
                f"{entry} is a symlink made by uid {info.st_uid}, not root: remove it "
                "(`tgfleet up`, as root, follows no link another user planted in the home)"
            )


def _make_dirs(home: Home) -> None:
    """``home.make_dirs()``; a symlink where one of its dirs goes stops `up` (as root,
    bus-keys/ is the service user's, which may have swapped it for a link)."""
    try:
        home.make_dirs()
    except SystemUserError as exc:
        raise UpError(str(exc)) from exc


def _keep_watcher_files(home: Home, service: BotAccount) -> None:
    """``bots.d/`` root's (0700, the service user may read: an ACL), and in it only
    watcher files the keeper would have written."""
    os.chown(home.bots_d, 0, 0)
    home.bots_d.chmod(0o700)
    grant_user(home.bots_d, service.uid, 0o5, default=0o4)
    users = BotUsers(home, enabled=True)
    for entry in sorted(home.bots_d.iterdir()):
        name = entry.name.removesuffix(".ini")
        problem = None
        if not stat.S_ISREG(entry.lstat().st_mode) or not BOT_NAME.fullmatch(name):
            problem = "no bot's watcher file"
        else:
            try:
                user = pwd.getpwnam(users.user_name(name) or "")
                account = (user.pw_name, grp.getgrgid(user.pw_gid).gr_name)
                check_watcher(home, name, entry.read_text(), python=sys.executable, account=account)
            except (KeyError, WatcherRefused, UnicodeDecodeError) as exc:
                problem = str(exc)
        if problem is not None:
            print(f"removing {entry}: {problem} (the controller writes it again)")
            entry.unlink()
            continue
        os.chown(entry, 0, 0)
        entry.chmod(0o640)
        grant_user(entry, service.uid, 0o4)


def _package_dir(name: str) -> Path:
    """Where package ``name`` lives, found without importing it."""
    spec = importlib.util.find_spec(name)
    assert spec is not None and spec.origin is not None, f"{name} ships with tgfleet"
    return Path(spec.origin).parent


def _share_home(home: Home, service: BotAccount, fleet_group: str) -> None:
    """What the controller, run as the service user, must reach in a home made by root
    (at each start: a home made by an older tgfleet holds it all as root's).

    The home itself: the service user may create files in it (an ACL entry), and the
    sticky bit lets it rename or remove only its own, never root's dirs and files.
    Its own files (keys, admin token, the bots' public keys) are its;
    ``controller.json`` it reads; ``bots.d/`` (watcher files: circusd loads them as
    root) stays root's, written by the keeper, read by it, and a file there that
    fails the keeper's allow-list (one written by an older controller) is removed
    (the controller renders it again); ``run/bus/`` (where it binds the bus) is its,
    with the fleet's group; ``logs/`` and what circusd writes there it reads (a
    default ACL: rotation makes new files). Never a symlink or a file with a second
    name (give_tree)."""
    home.root.chmod(stat.S_IMODE(home.root.stat().st_mode) | stat.S_ISVTX)
    grant_user(home.root, service.uid, 0o7)
    for own in (home.secret_key, home.bus_key, home.admin_token, home.bus_keys_dir):
        give_tree(own, service.uid, service.gid)  # by fd: a link there is left alone
    _keep_watcher_files(home, service)
    grant_user(home.controller_json, service.uid, 0o4)
    os.chown(home.bus_dir, service.uid, grp.getgrnam(fleet_group).gr_gid)
    home.bus_dir.chmod(0o710)
    grant_user(home.logs_dir, service.uid, 0o5, default=0o4)
    for entry in home.logs_dir.iterdir():
        if stat.S_ISREG(entry.lstat().st_mode):
            grant_user(entry, service.uid, 0o4)


def prepare(options: UpOptions) -> ControllerSettings:
    """Everything before circusd starts: dirs, embedded PostgreSQL, circus.ini, settings."""
    home = options.home
    check_options(options)
    _make_dirs(home)
    if fleet_running(home):
        raise UpError(
            f"a fleet is already running in {home.root} "
            f"(circusctl --endpoint {home.circus_endpoint} status)"
        )
    for stale in (home.circus_socket, home.circus_pubsub_socket, home.bus_socket):
        stale.unlink(missing_ok=True)
    return prepare_home(options)


def _open_sandbox_dir(home: Home, service: BotAccount | None) -> None:
    """The local Telegram's data dir (0700: its key and the tokens of its bots); as root
    it belongs to the fleet's service user, which runs the sandbox (and may have swapped
    it for a link since `up` looked: made, chmodded and given by fd, following none)."""
    data = home.sandbox_dir
    try:
        private_dir(data, home.root)
        if service is not None:
            # What an earlier run wrote as root (or as a service user since removed) is its.
            give_tree(data, service.uid, service.gid)
    except SystemUserError as exc:
        raise UpError(str(exc)) from exc


def run(options: UpOptions, banner: Callable[[ControllerSettings], str]) -> NoReturn:
    """Prepare the fleet, then become circusd in the foreground (``controller.upwait``),
    which prints ``banner(settings)`` once the API answers and runs until Ctrl-C /
    SIGTERM. Returns only by raising (UpError and the like: nothing was started)."""
    settings = prepare(options)
    _hand_over(options.home, settings, banner(settings), options.demo)


def _hand_over(home: Home, settings: ControllerSettings, banner: str, demo: bool) -> NoReturn:
    """Become ``controller.upwait`` (same pid), which runs circusd in this process:
    neither a waiter beside circusd nor what preparing imported stays resident.

    Ctrl-C and SIGTERM are blocked across the exec: the mask and what is pending
    survive it, and upwait unblocks them once its handlers are in place, so one
    sent in those milliseconds is delivered then, neither lost nor fatal."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    sys.stdout.flush()
    sys.stderr.flush()
    argv = [sys.executable, "-m", "controller.upwait", str(home.root)]
    argv += [f"{settings.api_url}/healthz", banner, *(["--demo"] if demo else [])]
    os.execv(sys.executable, argv)
