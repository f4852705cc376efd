"""The allow-list a bot's watcher file must pass before circusd may load it.

circusd (root) loads every ``bots.d/*.ini`` at ``reloadconfig`` and runs each
watcher as whatever ``uid`` it names (none: root), with whatever ``cmd``, whatever
``stdout_stream.class`` (a Python class: code run inside circusd) and whatever log
``filename`` (root writes there). So the keeper writes a watcher file for the
controller only when it is exactly what ``controller/templates/watcher.ini.j2``
renders for that bot: the sections ``[watcher:bot-NAME]`` and ``[env:bot-NAME]``,
the keys that template writes, the fleet's python running the bot (or a launcher
of tgfleet's, which asks the fork server for it) on this bot's config, as this bot's
own user, in its own dir, logging to ``logs/bot-NAME.std{out,err}.log`` through
circus' ``FileStream``.

The file is read line by line in a grammar narrower than circus' parser (no
continuation lines, no ``rem`` lines, no inline comments, no substitutions), over
printable ASCII, tabs and ``"\n"`` only: circus reads its files with universal
newlines, so a ``"\r"`` (even in a comment) would end a line for circus and not for
this grammar. Then the text is read again by circus' own parser, which must find the
very sections, keys and values this grammar found. Standard library and circus
(circusd's process).
"""

from __future__ import annotations

import errno
import importlib.util
import io
import logging
import os
import re
import shlex
import subprocess
from pathlib import Path

from controller.home import Home

_log = logging.getLogger(__name__)


class WatcherRefused(ValueError):
    """A watcher file outside the allow-list; the message names the line or key."""


_KEY = re.compile(r"^([A-Za-z_][A-Za-z0-9_.]*) = (\S(?:.*\S)?)$")
_ENV_KEY = re.compile(r"^[A-Z_][A-Z0-9_]*$")
_INT = re.compile(r"^[0-9]{1,19}$")
#: A non-negative number as the renderer writes a float (Python's repr: up to 17
#: significant digits, no exponent from 1e-4 to 1e16).
_NUMBER = re.compile(r"^[0-9]{1,6}(\.[0-9]{1,20})?$")
_SIGNAL = re.compile(r"^[A-Z0-9]{2,8}$")
_BOOL = ("true", "false")
# Circus substitutes $(circus.…) and ((circus.…)) in options, and cuts a value at a
# ';' after whitespace; '%' interpolates in stock parsers.
_FORBIDDEN = ("$(", "((", " ;", "\t;", "%")
# Anywhere in the file, comments included: one meaning for every reader and locale.
_ALLOWED_CHAR = re.compile(r"[\x20-\x7e\t\n]*")

# key -> what its value must look like (a pattern, or None: checked by name below)
_WATCHER_KEYS: dict[str, re.Pattern[str] | tuple[str, ...] | None] = {
    "cmd": None,
    "args": None,
    "working_dir": None,
    "uid": None,
    "gid": None,
    "numprocesses": ("1",),
    "copy_env": ("false",),
    "autostart": _BOOL,
    "respawn": ("true",),
    "max_retry": re.compile(r"^-?[0-9]{1,9}$"),
    "stop_signal": _SIGNAL,
    "graceful_timeout": _NUMBER,
    "rlimit_data": _INT,
    "rlimit_nofile": _INT,
    "rlimit_nproc": _INT,
    "rlimit_core": ("0",),
    **{
        f"{stream}_stream.{key}": value
        for stream in ("stdout", "stderr")
        for key, value in (
            ("class", ("FileStream",)),
            ("filename", None),
            ("max_bytes", _INT),
            ("backup_count", _INT),
        )
    },
}
_REQUIRED = {
    "cmd",
    "args",
    "working_dir",
    "copy_env",
    "rlimit_core",
    "stdout_stream.class",
    "stdout_stream.filename",
    "stderr_stream.class",
    "stderr_stream.filename",
}


def _botrunner_dir() -> Path:
    """Where botrunner is installed, found without importing it: neither the controller
    nor circusd loads bots' code."""
    spec = importlib.util.find_spec("botrunner")
    if spec is None or spec.origin is None:
        raise WatcherRefused("botrunner is not installed beside tgfleet's controller")
    return Path(spec.origin).parent


def launcher_path() -> Path:
    """botrunner/launch.py, the launcher in Python (stdlib only, with ``python -S -I``:
    it runs botrunner/launcher.py from its compiled bytecode)."""
    return _botrunner_dir() / "launch.py"


def launcher_binary() -> Path:
    """botrunner/tgf-launcher, the launcher in C (botrunner/launcher.c, libc only; built
    by setup.py and scripts/_venv.sh), whether it was built or not."""
    return _botrunner_dir() / "tgf-launcher"


#: What each launcher binary was found to do, by the file it was: asked again only
#: once the file changed (built, replaced, removed), so a fleet without it logs once.
_PROBED: dict[str, tuple[tuple[int, int, int] | None, bool]] = {}


def _file_state(path: str) -> tuple[int, int, int] | None:
    try:
        found = os.stat(path)
    except OSError:
        return None
    return (found.st_ino, found.st_mtime_ns, found.st_size)


def c_launcher_runs(binary: str) -> bool:
    """Whether ``binary`` runs here: built, and for this machine (a wheel built on
    another libc would not). Without arguments it exits 64 (EX_USAGE). When it does
    not, the controller says so in its log, and the watcher runs launcher.py."""
    state = _file_state(binary)
    known = _PROBED.get(binary)
    if known is not None and known[0] == state:
        return known[1]
    try:
        done = subprocess.run([binary], capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        why = f"{type(exc).__name__}: {exc}"
        transient = isinstance(exc, subprocess.TimeoutExpired) or (
            isinstance(exc, OSError) and exc.errno in (errno.EAGAIN, errno.ENOMEM)
        )
        if not transient:  # a spawn that may work next time is asked again
            _PROBED[binary] = (state, False)
    else:
        if done.returncode == 64:
            _PROBED[binary] = (state, True)
            return True
        why = f"exit code {done.returncode}: {done.stderr[-200:]!r}"
        _PROBED[binary] = (state, False)
    _log.warning(
        "fork-mode bots run launcher.py (~3 MB more each): %s cannot run (%s)", binary, why
    )
    return False


def launcher_command(
    python: str, socket: str | os.PathLike[str], name: str, config: str | os.PathLike[str]
) -> tuple[str, list[str]]:
    """(cmd, args) of a fork-mode bot's watcher: tgf-launcher where it was built (~0.2 MB
    a bot), else launcher.py under ``python`` (~3 MB). Either execs ``python -m
    botrunner config`` when the fork server does not answer."""
    binary = launcher_binary()
    if c_launcher_runs(str(binary)):
        return str(binary), [python, str(socket), name, str(config)]
    return python, ["-S", "-I", str(launcher_path()), str(socket), name, str(config)]


def parse(text: str, name: str) -> tuple[dict[str, str], dict[str, str]]:
    """The watcher and env options of bot ``name``'s file; WatcherRefused for any line
    outside the grammar, any other section, and any key given twice."""
    watcher_section, env_section = f"[watcher:bot-{name}]", f"[env:bot-{name}]"
    allowed = _ALLOWED_CHAR.match(text)
    assert allowed is not None  # "*": matches at least the empty prefix
    if allowed.end() != len(text):
        at = text.count("\n", 0, allowed.end()) + 1
        raise WatcherRefused(
            f"line {at}: character {text[allowed.end()]!r}; a watcher file holds "
            'printable ASCII, tabs and "\\n" line ends only'
        )
    sections: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    for number, line in enumerate(text.split("\n"), start=1):
        if line == "" or line.startswith("#"):
            continue
        where = f"line {number} ({line[:60]!r})"
        if line.startswith("["):
            if line not in (watcher_section, env_section):
                raise WatcherRefused(
                    f"{where}: the only sections are {watcher_section} and {env_section}"
                )
            if line in sections:
                raise WatcherRefused(f"{where}: section given twice")
            current = sections[line] = {}
            continue
        found = _KEY.fullmatch(line)
        if found is None or current is None:
            raise WatcherRefused(f"{where}: not 'key = value' inside a section")
        key, value = found.groups()
        if any(bad in value for bad in _FORBIDDEN):
            raise WatcherRefused(f"{where}: the value holds what circus would alter")
        if key in current:
            raise WatcherRefused(f"{where}: {key} given twice")
        current[key] = value
    if watcher_section not in sections:
        raise WatcherRefused(f"no {watcher_section} section")
    return sections[watcher_section], sections.get(env_section, {})


def _as_circus_reads(text: str) -> dict[str, dict[str, str]]:
    """Sections and options of ``text`` as circusd reads a file of ``bots.d``
    (circus.config.read_config: its StrictConfigParser on a file opened with universal
    newlines); WatcherRefused where that parser fails."""
    from circus.util import StrictConfigParser  # circusd's own; the keeper runs in it

    parser = StrictConfigParser()
    try:
        parser.read_file(io.StringIO(text, newline=None), "watcher file")
    except Exception as exc:  # configparser.Error and what a parser of 2012 may raise
        raise WatcherRefused(f"circus' own parser refuses it: {exc}") from None
    return {
        section: {key: value for key, value in parser.items(section) if key != "__name__"}
        for section in parser.sections()
    }


def check_watcher(
    home: Home, name: str, text: str, *, python: str, account: tuple[str, str] | None
) -> None:
    """WatcherRefused unless ``text`` is a watcher file the controller may have rendered
    for bot ``name``: run by ``python``, as ``account`` (user, group; None: the fleet's
    own user, when it is not root)."""
    watcher, env = parse(text, name)
    for key in sorted(set(watcher) - set(_WATCHER_KEYS)):
        raise WatcherRefused(f"key {key!r} is not one a bot's watcher has")
    for key in sorted(_REQUIRED - set(watcher)):
        raise WatcherRefused(f"key {key!r} is missing")
    for key, value in watcher.items():
        shape = _WATCHER_KEYS[key]
        if isinstance(shape, tuple) and value not in shape:
            raise WatcherRefused(f"{key} must be {' or '.join(shape)}, not {value!r}")
        if isinstance(shape, re.Pattern) and not shape.fullmatch(value):
            raise WatcherRefused(f"{key} {value!r} must match {shape.pattern}")
    for key in env:
        if not _ENV_KEY.fullmatch(key):
            raise WatcherRefused(f"environment variable {key!r} is not [A-Z_][A-Z0-9_]*")

    # The very paths, not what they resolve to now: a link elsewhere that points at the
    # fleet's python today may be pointed at something else once circusd loaded it.
    config = str(home.bot_config(name))
    socket = str(home.fork_socket)
    allowed = (
        ([python], ["-m", "botrunner", config]),
        ([python], ["-S", "-I", str(launcher_path()), socket, name, config]),
        ([str(launcher_binary())], [python, socket, name, config]),
    )
    command = (shlex.split(watcher["cmd"]), shlex.split(watcher["args"]))
    if command[0] not in [cmd for cmd, _args in allowed]:
        raise WatcherRefused(
            f"cmd must be the fleet's python {python} or tgfleet's launcher "
            f"{launcher_binary()}, not {watcher['cmd']!r}"
        )
    if command not in allowed:
        raise WatcherRefused(
            f"args must run botrunner or its launcher on {config}, not {watcher['args']!r}"
        )
    if watcher["working_dir"] != str(home.bot_dir(name)):
        raise WatcherRefused(f"working_dir must be {home.bot_dir(name)}")
    given = (watcher.get("uid"), watcher.get("gid"))
    if account is None and given != (None, None):
        raise WatcherRefused("uid/gid: the fleet is not root's, its bots run as its user")
    if account is not None and given != account:
        raise WatcherRefused(
            f"uid/gid must be the own user and group of bot {name!r}, "
            f"{account[0]}/{account[1]}, not {given[0]}/{given[1]}"
        )
    for stream, suffix in (("stdout", "out"), ("stderr", "err")):
        wanted = str(home.watcher_log(f"bot-{name}", "out" if suffix == "out" else "err"))
        if watcher[f"{stream}_stream.filename"] != wanted:
            raise WatcherRefused(f"{stream}_stream.filename must be {wanted}")
    # Last, the file as circusd itself will read it: the same sections, keys, values.
    circus_read = _as_circus_reads(text)
    if (
        set(circus_read) - {f"watcher:bot-{name}", f"env:bot-{name}"}
        or circus_read.get(f"watcher:bot-{name}") != watcher
        or circus_read.get(f"env:bot-{name}", {}) != env
    ):
        raise WatcherRefused("circus' own parser reads this file otherwise")
