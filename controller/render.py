"""Renders circusd's configuration: ``circus.ini`` and one watcher file per bot.

Pure text in, text out (plus ``write_atomic`` to put it on disk). Every value
that reaches an ini file passes ``ini_value``, which refuses what would change
the file's meaning rather than escaping it: circus reads these files with its
own ``RawConfigParser`` (``;`` after a space starts a comment, ``$(circus.…)``
and ``((circus.…))`` are substituted, a newline starts a new option).
"""

from __future__ import annotations

import functools
import os
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from botspec.spec import MIN_MEMORY_MB, NAME_PATTERN, FleetDefaults, Limits
from controller.home import Home
from controller.pg import PgWatcher
from controller.watchercheck import launcher_command

if TYPE_CHECKING:
    import jinja2

# Package data (controller/templates/), read through importlib.resources so that
# an installed wheel renders the same files as a checkout.
TEMPLATES = resources.files("controller") / "templates"
CIRCUS_TEMPLATE = "circus.ini.j2"
WATCHER_TEMPLATE = "watcher.ini.j2"

MIB = 1024 * 1024
# RLIMIT_DATA counts private writable mappings: heap, arenas in use and thread
# stacks (8 MiB each). A Telethon + pyzmq + asyncio process measured 65 MB RSS
# and 107-117 MiB of VmData once the default executor had started its threads
# (2 CPUs); at 96 MiB it could not start a thread, at 128 MiB it ran. Its
# VmSize (RLIMIT_AS) was 596 MiB because every thread reserves a 64 MiB malloc
# arena, so RLIMIT_AS would need ~600 MiB and grows with the CPU count.
# That floor is the spec's own minimum of memory_limit_mb (botspec.spec).
MIN_MEMORY_LIMIT_MB = MIN_MEMORY_MB
DEFAULT_GRACEFUL_TIMEOUT_S = FleetDefaults().graceful_timeout_s
DEFAULT_OPEN_FILES = Limits().open_files
BOT_NAME = re.compile(NAME_PATTERN)
_ENV_KEY = re.compile(r"^[A-Z_][A-Z0-9_]*$")
_ACCOUNT = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")  # what useradd accepts, minus oddities
# A newline would start a new option; circus's parser cuts a value at a ";"
# that follows whitespace (inline comment) and substitutes $(circus.x) and
# ((circus.x)) in watcher options; "%" would be interpolated by any stock
# ConfigParser reading the same file. A leading "#" or ";" cannot occur: values
# never start with whitespace and the key comes first.
_FORBIDDEN = ("\n", "\r", "\x00", " ;", "\t;", "%", "$(", "((")


#: The fork server's watcher (botrunner.forkserver): root when the fleet is, since
#: each child it forks becomes its bot's user; it imports only tgfleet's own code.
FORKSERVER_WATCHER = "forkserver"


class InvalidWatcherValue(ValueError):
    """A value cannot be written into a Circus ini file without changing its meaning."""


def ini_value(value: object) -> str:
    """Format one value for a Circus ini file, refusing what would break it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str):
        raise InvalidWatcherValue(f"{value!r} is not a str, number, bool or path")
    if value != value.strip() or not value:
        raise InvalidWatcherValue(f"{value!r}: empty, or leading/trailing space (ini strips it)")
    for bad in _FORBIDDEN:
        if bad in value:
            raise InvalidWatcherValue(f"{value!r} contains {bad!r}, which an ini file would alter")
    return value


def _command_line(args: Sequence[str | os.PathLike[str]]) -> str:
    """Arguments as circus will split them again (shlex), each validated."""
    return shlex.join(os.fspath(arg) for arg in args)


@dataclass(frozen=True)
class LogRotation:
    """Rotation of a watcher's stdout/stderr files: each file stays under ``max_bytes``
    (Circus rolls it over before a write would reach it), with at most ``backup_count``
    older files (``.1`` newest), so a watcher's stream never holds more than
    ``(backup_count + 1) * max_bytes``."""

    max_bytes: int = 10 * MIB
    backup_count: int = 3

    #: The ranges ``from_env`` accepts.
    MAX_BYTES_RANGE = (64 * 1024, 1024 * MIB)
    BACKUP_COUNT_RANGE = (1, 100)

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> LogRotation:
        """``TGFLEET_LOG_MAX_BYTES`` and ``TGFLEET_LOG_BACKUP_COUNT`` (defaults when unset);
        ValueError naming the variable when one is not an integer in its range."""
        values = {}
        for key, field_name, (low, high) in (
            ("TGFLEET_LOG_MAX_BYTES", "max_bytes", cls.MAX_BYTES_RANGE),
            ("TGFLEET_LOG_BACKUP_COUNT", "backup_count", cls.BACKUP_COUNT_RANGE),
        ):
            raw = environ.get(key, "").strip()
            if not raw:
                continue
            if not raw.isdigit() or not low <= int(raw) <= high:
                raise ValueError(f"{key} must be an integer from {low} to {high}, not {raw!r}")
            values[field_name] = int(raw)
        return cls(**values)


@dataclass(frozen=True)
class SandboxWatcher:
    """The local Telegram (``python -m tgsandbox serve``) as a watcher."""

    listen: str
    admin_listen: str
    data_dir: Path
    user: str | None = None  # the fleet's service user; None: the fleet's user
    group: str | None = None

    def __post_init__(self) -> None:
        if (self.user is None) != (self.group is None):
            raise InvalidWatcherValue("the sandbox's user and group go together")
        for account in (self.user, self.group):
            if account is not None and not _ACCOUNT.fullmatch(account):
                raise InvalidWatcherValue(f"{account!r} is not a user or group name")


@dataclass(frozen=True)
class BotWatcher:
    """What a bot's watcher file is made of (the bot's spec, minus every secret)."""

    name: str
    autostart: bool
    memory_limit_mb: int
    graceful_timeout_s: float = DEFAULT_GRACEFUL_TIMEOUT_S
    max_retry: int = 5
    # In the env so that a new configuration changes the watcher: reloadconfig
    # then restarts that bot (config.json alone is invisible to circusd).
    generation: int = 0
    # The controller's bus key (a fingerprint): a new one restarts the bot, whose
    # config then names it.
    bus_key_id: str = ""
    open_files: int = DEFAULT_OPEN_FILES
    # RLIMIT_NPROC counts every process of the user: None (not set) when the bot
    # shares the fleet's user, where one bot's threads would starve another.
    processes: int | None = None
    user: str | None = None  # the bot's own system user; None: the fleet's user
    group: str | None = None
    # fork: the watcher runs the launcher, which asks the fork server for the bot
    launch: Literal["fork", "exec"] = "exec"

    def __post_init__(self) -> None:
        if not BOT_NAME.fullmatch(self.name):
            raise InvalidWatcherValue(f"bot name {self.name!r} must match {BOT_NAME.pattern}")
        if (self.user is None) != (self.group is None):
            raise InvalidWatcherValue("a bot's user and group go together")
        for account in (self.user, self.group):
            if account is not None and not _ACCOUNT.fullmatch(account):
                raise InvalidWatcherValue(f"{account!r} is not a user or group name")
        if self.open_files < 1 or (self.processes is not None and self.processes < 1):
            raise InvalidWatcherValue("open_files and processes must be positive")
        if self.memory_limit_mb < MIN_MEMORY_LIMIT_MB:
            raise InvalidWatcherValue(
                f"memory_limit_mb {self.memory_limit_mb} is below {MIN_MEMORY_LIMIT_MB}: "
                "a Telethon bot cannot start its threads in less"
            )
        if not 0 < self.graceful_timeout_s <= 300:
            raise InvalidWatcherValue(
                f"graceful_timeout_s {self.graceful_timeout_s} not in (0, 300]"
            )
        if self.max_retry < -1:
            raise InvalidWatcherValue(f"max_retry {self.max_retry} must be >= -1")
        if not re.fullmatch(r"[0-9a-f]{0,64}", self.bus_key_id):
            raise InvalidWatcherValue(f"bus_key_id {self.bus_key_id!r} must be hex")
        if self.launch not in ("fork", "exec"):
            raise InvalidWatcherValue(f"launch {self.launch!r} must be 'fork' or 'exec'")

    @property
    def watcher_name(self) -> str:
        return f"bot-{self.name}"


@dataclass(frozen=True)
class _Watcher:
    """One [watcher:…] section of circus.ini."""

    name: str
    cmd: str
    args: str
    working_dir: Path
    priority: int
    stop_signal: str
    graceful_timeout: float
    stdout_log: Path
    stderr_log: Path
    env: tuple[tuple[str, str], ...]
    uid: str | None = None
    gid: str | None = None


def _template_source(name: str) -> str | None:
    """A shipped template's text; None (jinja2: TemplateNotFound) when there is none."""
    template = TEMPLATES / name
    return template.read_text(encoding="utf-8") if template.is_file() else None


@functools.cache
def _environment() -> jinja2.Environment:
    # Imported at the first rendering, not with this module: a controller that
    # renders nothing since it started (every bot's watcher up to date) keeps
    # its ~2 MB; `import controller.app` stays free of it (tests/unit/test_imports.py).
    import jinja2

    return jinja2.Environment(
        loader=jinja2.FunctionLoader(_template_source),
        autoescape=False,
        undefined=jinja2.StrictUndefined,
        finalize=ini_value,  # every {{ … }} is checked: no way to forget it
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


def _env_pairs(env: dict[str, str]) -> tuple[tuple[str, str], ...]:
    for key in env:
        if not _ENV_KEY.match(key):
            raise InvalidWatcherValue(f"environment variable name {key!r} is not [A-Z_][A-Z0-9_]*")
    return tuple(sorted(env.items()))


def _base_env(home: Home, *, home_env: Path) -> dict[str, str]:
    return {
        "PYTHONUNBUFFERED": "1",
        "LANG": "C.UTF-8",
        "HOME": str(home_env),
        "TGFLEET_HOME": str(home.root),
    }


def _pythonpath(dirs: Sequence[str]) -> str:
    for entry in dirs:
        if not os.path.isabs(entry) or ":" in entry:
            raise InvalidWatcherValue(f"plugin dir {entry!r} must be absolute, without ':'")
    return ":".join(dirs)


def _logs(home: Home, watcher: str) -> tuple[Path, Path]:
    return home.watcher_log(watcher, "out"), home.watcher_log(watcher, "err")


def render_circus_ini(
    home: Home,
    *,
    python: str,
    listen: str,
    embedded_pg: PgWatcher | None,
    sandbox: SandboxWatcher | None,
    check_delay: float = 1.0,
    controller_argv: Sequence[str] | None = None,
    plugin_path: Sequence[str] = (),
    log: LogRotation = LogRotation(),
    controller_account: tuple[str, str] | None = None,
    merge_pages: bool = False,
) -> str:
    """The text of ``<home>/circus.ini``: circusd's endpoints and the fleet's own watchers.

    ``controller_account`` (user, group) runs the controller: as root, the fleet's
    service user with the fleet's group as its primary one (it traverses ``run/`` and
    ``bots/`` and shares the bus socket with the bots); None: circusd's own user.

    ``controller_argv`` replaces the controller's command line (tests run a
    stand-in); by default it is ``<python> -m controller serve --home <home>``.
    Bots are not here: circusd reads them from ``include_dir = <home>/bots.d``.
    ``plugin_path`` goes on the controller's PYTHONPATH too: it checks that a
    bot's plugins can be imported where the bot will look for them.
    ``merge_pages`` (TGFLEET_MERGE_PAGES): the fork server offers its memory to the
    kernel's same-page merging (``botrunner.forkserver.mark_mergeable``).
    """
    if not os.path.isabs(python):
        raise InvalidWatcherValue(f"python {python!r} must be absolute (watchers get no PATH)")
    if not 0 < check_delay <= 1:
        raise InvalidWatcherValue(f"check_delay {check_delay} must be in (0, 1] seconds")
    argv = list(controller_argv or [python, "-m", "controller", "serve", "--home", str(home.root)])
    watchers: list[_Watcher] = []
    if embedded_pg is not None:
        out, err = _logs(home, "postgres")
        watchers.append(
            _Watcher(
                name="postgres",
                cmd=_command_line([embedded_pg.postgres]),
                args=_command_line(embedded_pg.args),
                working_dir=embedded_pg.working_dir,
                priority=30,  # started first
                # SIGTERM is PostgreSQL's "smart" shutdown, which waits for
                # every client to leave; SIGINT is "fast": roll back, stop.
                stop_signal="INT",
                graceful_timeout=10.0,
                stdout_log=out,
                stderr_log=err,
                env=_env_pairs({"LANG": "C.UTF-8", "PGDATA": str(embedded_pg.data_dir)}),
                uid=embedded_pg.user,
                gid=embedded_pg.group,
            )
        )
    if sandbox is not None:
        out, err = _logs(home, "sandbox")
        sandbox_argv = [
            *("-m", "tgsandbox", "serve"),
            *("--listen", sandbox.listen, "--admin-listen", sandbox.admin_listen),
            *("--data", str(sandbox.data_dir)),
        ]
        watchers.append(
            _Watcher(
                name="sandbox",
                cmd=_command_line([python]),
                args=_command_line(sandbox_argv),
                working_dir=sandbox.data_dir,
                priority=20,
                stop_signal="TERM",
                graceful_timeout=3.0,
                stdout_log=out,
                stderr_log=err,
                env=_env_pairs(_base_env(home, home_env=sandbox.data_dir)),
                uid=sandbox.user,
                gid=sandbox.group,
            )
        )
    out, err = _logs(home, FORKSERVER_WATCHER)
    # No PYTHONPATH, and -I (no cwd, no PYTHON* variables on its path; -u for what
    # PYTHONUNBUFFERED did): as root it imports only what ships with tgfleet; a bot's
    # plugin dirs reach its own child, after the drop to the bot's user.
    forkserver_env = _base_env(home, home_env=home.root) | {"MALLOC_ARENA_MAX": "2"}
    if merge_pages:
        forkserver_env["TGFLEET_MERGE_PAGES"] = "1"
    watchers.append(
        _Watcher(
            name=FORKSERVER_WATCHER,
            cmd=_command_line([python]),
            args=_command_line(["-I", "-u", "-m", "botrunner.forkserver", str(home.root)]),
            working_dir=home.root,
            priority=15,  # before the controller, which starts the bots
            stop_signal="TERM",
            graceful_timeout=3.0,
            stdout_log=out,
            stderr_log=err,
            env=_env_pairs(forkserver_env),
        )
    )
    if controller_account is not None:
        for account in controller_account:
            if not _ACCOUNT.fullmatch(account):
                raise InvalidWatcherValue(f"{account!r} is not a user or group name")
    out, err = _logs(home, "controller")
    controller_env = _base_env(home, home_env=home.root) | {"TGFLEET_LISTEN": listen}
    if plugin_path:
        controller_env["PYTHONPATH"] = _pythonpath(plugin_path)
    watchers.append(
        _Watcher(
            name="controller",
            cmd=_command_line(argv[:1]),
            args=_command_line(argv[1:]),
            working_dir=home.root,
            priority=10,  # after postgres and the sandbox
            stop_signal="TERM",
            graceful_timeout=5.0,
            stdout_log=out,
            stderr_log=err,
            env=_env_pairs(controller_env),
            uid=controller_account[0] if controller_account else None,
            gid=controller_account[1] if controller_account else None,
        )
    )
    return (
        _environment()
        .get_template(CIRCUS_TEMPLATE)
        .render(
            endpoint=home.circus_endpoint,
            pubsub_endpoint=home.circus_pubsub_endpoint,
            pidfile=home.circusd_pidfile,
            check_delay=float(check_delay),
            include_dir=home.bots_d,
            watchers=watchers,
            log=log,
        )
    )


def _bot_command(home: Home, bot: BotWatcher, python: str) -> tuple[str, list[str]]:
    """(cmd, args) of the bot's watcher. A fork-mode one runs a launcher, which asks the
    fork server for the bot and execs exactly the exec-mode command line when it does
    not answer."""
    config = str(home.bot_config(bot.name))
    if bot.launch == "exec":
        return python, ["-m", "botrunner", config]
    return launcher_command(python, home.fork_socket, bot.name, config)


def render_watcher(
    home: Home,
    bot: BotWatcher,
    *,
    python: str,
    pythonpath: Sequence[str] = (),
    log: LogRotation = LogRotation(),
) -> str:
    """The text of ``<home>/bots.d/<name>.ini``: the Circus watcher ``bot-<name>``.

    Its env is a fixed minimal set (no secrets: ``circusctl options`` shows
    env), plus ``PYTHONPATH`` when ``pythonpath`` names plugin dirs; the bot
    reads its token/session from ``config.json``.
    """
    if not os.path.isabs(python):
        raise InvalidWatcherValue(f"python {python!r} must be absolute (watchers get no PATH)")
    out, err = _logs(home, bot.watcher_name)
    cmd, args = _bot_command(home, bot, python)
    env = _base_env(home, home_env=home.bot_dir(bot.name))
    # Fewer malloc arenas: less address space and fragmentation per bot thread.
    env["MALLOC_ARENA_MAX"] = "2"
    env["TGFLEET_GENERATION"] = str(bot.generation)
    if bot.bus_key_id:
        env["TGFLEET_BUS_KEY_ID"] = bot.bus_key_id
    del env["TGFLEET_HOME"]  # a bot knows only its own config file
    if pythonpath:
        env["PYTHONPATH"] = _pythonpath(pythonpath)
    return (
        _environment()
        .get_template(WATCHER_TEMPLATE)
        .render(
            name=bot.name,
            watcher=bot.watcher_name,
            cmd=_command_line([cmd]),
            args=_command_line(args),
            working_dir=home.bot_dir(bot.name),
            autostart=bot.autostart,
            max_retry=bot.max_retry,
            graceful_timeout=float(bot.graceful_timeout_s),
            rlimit_data=bot.memory_limit_mb * MIB,
            rlimit_nofile=bot.open_files,
            rlimit_nproc=bot.processes,
            user=bot.user,
            group=bot.group,
            stdout_log=out,
            stderr_log=err,
            log=log,
            env=_env_pairs(env),
        )
    )
