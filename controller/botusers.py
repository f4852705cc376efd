"""A system user per bot, when tgfleet runs as root (in the spirit of systemd's DynamicUser=).

Names. A bot's user is ``tgf-`` + 12 hex digits of SHA-256(home, bot name): it
fits Linux's 32-character limit whatever the bot's name (``tgfleet-`` + a
32-character name would not), it differs between two fleets on one host (two
homes, each with a bot ``shop``), and a restarted controller finds the same user
again without a table to keep. The user's comment (GECOS) says which bot of
which home it is (``getent passwd tgf-…``), and a user of that name whose
comment says otherwise is never taken over. Each user has a group of its own
(its primary group: what it creates is its alone) and belongs to the fleet's
group ``tgfleet-`` + 8 hex digits of SHA-256(home), which may traverse
``<home>/bots`` and ``<home>/run`` and connect to the bus socket, and nothing else.

Uids come from the system range (``useradd --system``). A destroyed bot's user is
removed: its processes are killed, what it owned at the top of the shared
writable dirs (/tmp, /var/tmp, /dev/shm) is deleted, then ``userdel``; its private
dir goes with the bot. A later bot of the same name gets a new user (possibly the
same recycled uid) that finds nothing of the old one there.

The fleet's service user (``tgf-`` + 12 hex digits of SHA-256(home, "/service"),
comment ``tgfleet service of <home>``) runs what needs no privilege and is no bot:
the local Telegram of ``--demo``. It goes with the fleet's bot users.

Not root: no user is created; every bot runs as the fleet's own user.
"""

from __future__ import annotations

import grp
import importlib
import json
import logging
import os
import pwd
import shutil
import signal
import stat
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from botspec import procinfo
from controller.atomicfile import write_atomic
from controller.home import Home
from controller.sysusers import (
    SystemUserError,
    delete_group,
    delete_system_user,
    ensure_group,
    ensure_system_user,
    open_path_prefix,
    open_tree,
)

log = logging.getLogger(__name__)

BOT_USER_PREFIX = "tgf-"
FLEET_GROUP_PREFIX = "tgfleet-"
#: World-writable dirs where a bot may leave files that outlive it.
SHARED_WRITABLE = (Path("/tmp"), Path("/var/tmp"), Path("/dev/shm"))
KILL_WAIT_S = 5.0


class BotUserError(SystemUserError):
    """A bot's user cannot be made or removed (taken by someone else, a tool failed)."""


@dataclass(frozen=True)
class BotAccount:
    """Who a bot's process runs as."""

    user: str
    group: str  # the user's own group, its primary one
    uid: int
    gid: int


def _digest(*parts: str) -> str:
    return _sha256("\0".join(parts).encode())


def _sha256(data: bytes) -> str:
    """SHA-256 from CPython's own module, not hashlib: hashlib loads OpenSSL's libcrypto
    (3.6 MB of RSS), and the keeper runs this in circusd's process (issue #13)."""
    for module in ("_sha2", "_sha256"):  # Python 3.12+, then 3.11
        try:
            builtin: Any = importlib.import_module(module)
        except ImportError:
            continue
        return str(builtin.sha256(data).hexdigest())
    import hashlib  # a Python without the builtin module

    return hashlib.sha256(data).hexdigest()


def bot_user_name(home: Home, name: str) -> str:
    return BOT_USER_PREFIX + _digest(str(home.root), name)[:12]


def fleet_group_name(home: Home) -> str:
    return FLEET_GROUP_PREFIX + _digest(str(home.root))[:8]


_COMMENT_HEAD = "tgfleet bot "


def _comment_tail(home: Home) -> str:
    # ':' separates passwd fields and ',' GECOS subfields: neither may appear.
    return " of " + str(home.root).replace(":", "?").replace(",", "?")


def _comment(home: Home, name: str) -> str:
    return _COMMENT_HEAD + name + _comment_tail(home)


def service_user_name(home: Home) -> str:
    """The fleet's service user: ``tgf-`` like a bot's, from a part no bot name can be."""
    return BOT_USER_PREFIX + _digest(str(home.root), "/service")[:12]


def _service_comment(home: Home) -> str:
    return "tgfleet service" + _comment_tail(home)


def is_service_user(home: Home, uid: int | None = None) -> bool:
    """Whether ``uid`` (default: this process's) is the fleet's service user: then the
    fleet runs as root, and this process (the controller) is not."""
    uid = os.geteuid() if uid is None else uid
    if uid == 0:
        return False
    try:
        entry = pwd.getpwuid(uid)
    except KeyError:
        return False
    return entry.pw_name == service_user_name(home) and entry.pw_gecos == _service_comment(home)


def bot_code_paths(python: str, plugin_path: Sequence[str] = ()) -> list[Path]:
    """What a bot process reads to run: the interpreter, its standard library, the
    venv's packages, tgfleet's own bot-side packages (an editable install lives
    outside site-packages) and the extra plugin dirs."""
    import sysconfig

    import botrunner
    import botspec

    paths = [Path(python), Path(python).resolve()]
    paths += [
        Path(p) for key, p in sysconfig.get_paths().items() if key.endswith(("lib", "stdlib"))
    ]
    venv_cfg = Path(python).parent.parent / "pyvenv.cfg"
    if venv_cfg.is_file():
        paths.append(venv_cfg)
    if sysconfig.get_config_var("Py_ENABLE_SHARED"):
        libdir, library = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("LDLIBRARY")
        if libdir and library and (Path(libdir) / library).exists():
            paths.append(Path(libdir) / library)
    for package in (botrunner, botspec):
        if package.__file__ is not None:
            paths.append(Path(package.__file__).parent)
    paths += [Path(p) for p in plugin_path]
    unique: list[Path] = []
    for path in paths:
        if path.exists() and not any(path.is_relative_to(kept) for kept in unique):
            unique = [kept for kept in unique if not kept.is_relative_to(path)] + [path]
    return unique


def code_fingerprint(code: Iterable[Path]) -> list[list[object]]:
    """What changes when code is added or replaced under ``code``: each path's mtime and
    those of the dirs right below it (an install or removal touches one of them)."""
    found: list[list[object]] = []
    for root in code:
        entries = [root]
        if root.is_dir():
            entries += sorted(child for child in root.iterdir() if child.is_dir())
        found += [[str(entry), entry.stat().st_mtime_ns] for entry in entries]
    return found


class BotUsers:
    """Makes, finds and removes the bots' users of one fleet; inert when not root."""

    def __init__(
        self,
        home: Home,
        *,
        enabled: bool | None = None,
        shared_writable: Iterable[Path] = SHARED_WRITABLE,
    ) -> None:
        self.home = home
        if enabled is None:  # root, or the service user of a fleet run as root
            enabled = os.geteuid() == 0 or is_service_user(home)
        self.enabled = enabled
        self.shared_writable = tuple(shared_writable)

    @property
    def fleet_group(self) -> str:
        return fleet_group_name(self.home)

    @property
    def service_comment(self) -> str:
        """The comment (GECOS) the fleet's service user has: whose it is."""
        return _service_comment(self.home)

    def user_name(self, name: str) -> str | None:
        """The user bot ``name`` runs as; None: the fleet's own."""
        return bot_user_name(self.home, name) if self.enabled else None

    # ------------------------------------------------------------ fleet-wide

    def prepare(self, code: Iterable[Path]) -> None:
        """Before any bot runs: the fleet group, the code readable by every user, and
        ``<home>/bots`` and ``<home>/run`` traversable (not listable) by the group only."""
        if not self.enabled:
            return
        group = ensure_group(self.fleet_group)
        code = list(code)
        stamp = self.home.root / "code-opened.json"
        seen = code_fingerprint(code)
        try:
            unchanged = json.loads(stamp.read_text()) == seen
        except (OSError, ValueError):
            unchanged = False
        if not unchanged:  # walking the stdlib and site-packages takes seconds
            opened = sum(len(open_tree(path)) for path in code)
            if opened:
                log.info("opened %d paths of the bots' code to other users (read only)", opened)
            write_atomic(stamp, json.dumps(seen) + "\n", 0o600)
        open_path_prefix(self.home.bots_dir)
        for shared in (self.home.bots_dir, self.home.run_dir):
            os.chown(shared, 0, group.gr_gid)
            shared.chmod(0o710)

    def share_socket(self, path: Path) -> None:
        """Let the fleet's bots connect to the unix socket ``path`` (0660, the fleet group)."""
        if not self.enabled:
            return
        if os.geteuid() == 0:
            # ensure: a controller started on its own (no `tgfleet up` before it) works too
            os.chown(path, 0, ensure_group(self.fleet_group).gr_gid)
        else:  # the service user, whose primary group the fleet's is (circus.ini)
            os.chown(path, -1, grp.getgrnam(self.fleet_group).gr_gid)
        path.chmod(0o660)

    def ensure_service(self) -> BotAccount | None:
        """The fleet's service user, created when missing; None when not root. It runs
        the fleet's own parts that need no privilege (the local Telegram), in no group
        but its own: it cannot reach the bus nor any bot's dir."""
        if not self.enabled:
            return None
        name, comment = service_user_name(self.home), _service_comment(self.home)
        user, created = ensure_system_user(name, comment=comment)
        if user.pw_gecos != comment:
            raise BotUserError(
                f"user {name} exists but is not the service user of {self.home.root} "
                f"(its comment: {user.pw_gecos!r}); refusing to run anything as it"
            )
        if created:
            log.info("the fleet's service user is the new user %s (uid %d)", name, user.pw_uid)
        return BotAccount(name, grp.getgrgid(user.pw_gid).gr_name, user.pw_uid, user.pw_gid)

    def remove_service(self) -> None:
        """Remove the service user and whatever it left running or in the shared dirs."""
        if not self.enabled:
            return
        name = service_user_name(self.home)
        try:
            user = pwd.getpwnam(name)
        except KeyError:
            return
        if user.pw_gecos != _service_comment(self.home):
            raise BotUserError(f"user {name} is not the service user of {self.home.root}")
        kill_processes_of(user.pw_uid)
        self._sweep(user.pw_uid)
        delete_system_user(name)

    # --------------------------------------------------------------- per bot

    def ensure(self, name: str) -> BotAccount | None:
        """The bot's user, created when missing; None when not root."""
        user_name = self.user_name(name)
        if user_name is None:
            return None
        comment = _comment(self.home, name)
        ensure_group(self.fleet_group)
        user, created = ensure_system_user(user_name, comment=comment, groups=[self.fleet_group])
        if user.pw_gecos != comment:
            raise BotUserError(
                f"user {user_name} exists but is not bot {name!r} of {self.home.root} "
                f"(its comment: {user.pw_gecos!r}); refusing to run the bot as it"
            )
        if created:
            log.info("bot %s runs as the new user %s (uid %d)", name, user_name, user.pw_uid)
        return BotAccount(user_name, grp.getgrgid(user.pw_gid).gr_name, user.pw_uid, user.pw_gid)

    def existing_uid(self, name: str) -> int | None:
        """The uid of bot ``name``'s user when it exists and is that bot's; else None."""
        user_name = self.user_name(name)
        if user_name is None:
            return None
        try:
            user = pwd.getpwnam(user_name)
        except KeyError:
            return None
        return user.pw_uid if user.pw_gecos == _comment(self.home, name) else None

    def remove(self, name: str) -> None:
        """Remove the bot's user and whatever it left running or in the shared dirs."""
        user_name = self.user_name(name)
        if user_name is None:
            return
        try:
            user = pwd.getpwnam(user_name)
        except KeyError:
            return
        if user.pw_gecos != _comment(self.home, name):
            raise BotUserError(f"user {user_name} is not bot {name!r}'s: not removing it")
        kill_processes_of(user.pw_uid)
        self._sweep(user.pw_uid)
        delete_system_user(user_name)

    def remove_all(self) -> list[str]:
        """Remove every bot user of this fleet and its group (the home is going away)."""
        if not self.enabled:
            return []
        tail = _comment_tail(self.home)
        removed = []
        for entry in pwd.getpwall():
            gecos = entry.pw_gecos
            if gecos.startswith(_COMMENT_HEAD) and gecos.endswith(tail):
                name = gecos.removeprefix(_COMMENT_HEAD).removesuffix(tail)
                if bot_user_name(self.home, name) == entry.pw_name:
                    self.remove(name)
                    removed.append(entry.pw_name)
            elif gecos == _service_comment(self.home):
                self.remove_service()
                removed.append(entry.pw_name)
        delete_group(self.fleet_group)
        return removed

    def _sweep(self, uid: int) -> None:
        for shared in self.shared_writable:
            try:
                entries = list(shared.iterdir())
            except FileNotFoundError:
                continue
            for entry in entries:
                try:
                    info = entry.lstat()
                except FileNotFoundError:
                    continue
                if info.st_uid != uid:
                    continue
                log.info("removing %s, left by a removed bot's user (uid %d)", entry, uid)
                if stat.S_ISDIR(info.st_mode):
                    shutil.rmtree(entry)
                else:
                    entry.unlink(missing_ok=True)


def kill_processes_of(uid: int) -> None:
    """SIGKILL every process of ``uid`` and wait until none lives: no process of a
    removed user may live on (userdel refuses, and a later bot that got the recycled
    uid would share it)."""
    deadline = time.monotonic() + KILL_WAIT_S
    while True:
        left = procinfo.processes_of(uid)  # the ended ones are dead: circusd reaps them
        if not left:
            return
        if time.monotonic() > deadline:
            raise BotUserError(f"processes of uid {uid} outlived SIGKILL: pids {left}")
        for pid in left:
            _kill_if_run_by(pid, uid)
        time.sleep(0.05)


def _kill_if_run_by(pid: int, uid: int) -> None:
    """SIGKILL ``pid`` if it still runs as ``uid``. The pidfd holds on to the process
    whose owner is read after it is opened: a pid reused since the listing is spared."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return  # gone already
    try:
        if procinfo.runs_as(pid, uid):
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except ProcessLookupError:
        pass  # ended between the check and the signal
    finally:
        os.close(pidfd)
