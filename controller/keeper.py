"""The keeper: the few operations on a bot's user and files that need root, done for
a controller that runs as the fleet's service user.

As root, `tgfleet up` (and the deployed unit) runs circusd as root, and the
controller as the fleet's service user. What the controller still needs root for
is done here, in circusd's own process (no resident process of its own: issue #13
caps the manager's memory), from a thread started by ``controller.circusd``:

- ``ensure_user`` / ``remove_user``: a bot's system user (``controller.botusers``);
- ``own_dir``: ``bots/<bot>/`` made (0700) and given, with what is in it, to the
  bot's user (no file with a second name, no symlink followed);
- ``write_config``: ``bots/<bot>/config.json`` written (0600, the bot's user's)
  through a temp file and a rename, never through a symlink the bot planted;
- ``remove_dir``: ``bots/<bot>/`` removed; ``has_config``: whether its config is there;
- ``usage``: open files and PSS of bots' processes (``{"pids": {bot: pid}, "pss"}``),
  which only their own users and root may read, for a pid its bot's user runs;
- ``write_watcher`` / ``remove_watcher``: ``bots.d/<bot>.ini``, which circusd (root)
  loads, written only when it passes ``controller.watchercheck``'s allow-list (the
  bot's own user, the fleet's python, its own logs, nothing else); ``bots.d/`` is
  root's, the service user reads it.

The socket (``run/keeper.sock``) is the service user's, 0600, and the keeper checks
each peer's uid (``SO_PEERCRED``) against it. One JSON request per connection,
``{"op": …, "bot": …}`` (plus ``"text"`` for ``write_config`` and ``write_watcher``), ended by the
client's shutdown of its sending side; one JSON answer, ``{"ok": true, …}`` or
``{"ok": false, "error": "…"}``. A bot is named only by its name, checked against
the bot-name pattern: no request names a path, a uid or a user.

``BotPrivileges`` is the one code path of each operation: the keeper runs it, and
so does a controller that is root itself, or runs a fleet that is not
(``for_fleet``). ``KeeperClient`` is the controller's side, a thin client.

Standard library only (and what ``controller.botusers`` takes): it runs inside circusd.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pwd
import re
import shutil
import socket
import stat
import struct
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from botspec.names import NAME_PATTERN
from botspec.procinfo import count_fds, kb_field, read_text
from controller.atomicfile import write_atomic
from controller.botusers import (
    BotAccount,
    BotUserError,
    BotUsers,
    fleet_group_name,
    is_service_user,
    service_user_name,
)
from controller.home import Home
from controller.sysusers import SystemUserError, give_tree, private_dir
from controller.watchercheck import WatcherRefused, check_watcher

log = logging.getLogger("circus.tgfleet.keeper")

BOT_NAME = re.compile(NAME_PATTERN)
#: A config.json is a few KB; anything near this is no request of ours.
MAX_REQUEST = 1 << 20
#: How long the keeper waits for a peer to send its request (it serves one at a time).
READ_TIMEOUT_S = 5.0
#: How long the controller waits for an answer: removing a user waits for its
#: processes to die (botusers.KILL_WAIT_S) and for userdel (sysusers.TOOL_TIMEOUT_S).
ANSWER_TIMEOUT_S = 60.0
#: How often the keeper checks that circusd's sockets are still the service user's.
SOCKET_CHECK_S = 0.2
OPERATIONS = (
    "ensure_user",
    "remove_user",
    "own_dir",
    "write_config",
    "remove_dir",
    "write_watcher",
    "remove_watcher",
    "has_config",
    "usage",
)
#: What each operation carries beside "op" (and "bot", which all but usage name).
FIELDS = {
    "write_config": {"text"},
    "write_watcher": {"text"},
    "usage": {"pids", "pss"},
}
#: At most this many bots' processes in one usage request.
MAX_USAGE_PIDS = 10_000


class KeeperRefused(BotUserError):
    """The keeper refused a request, or could not do it; the message says why."""


class Privileged(Protocol):
    """What the controller does to a bot's user and private files."""

    def ensure_user(self, name: str) -> BotAccount | None: ...
    def remove_user(self, name: str) -> None: ...
    def own_dir(self, name: str) -> None: ...
    def write_config(self, name: str, text: str) -> None: ...
    def remove_dir(self, name: str) -> None: ...
    def write_watcher(self, name: str, text: str) -> None: ...
    def remove_watcher(self, name: str) -> None: ...
    def has_config(self, name: str) -> bool: ...
    def usage(
        self, pids: dict[str, int], pss: bool
    ) -> dict[str, tuple[int | None, int | None]]: ...


def check_bot(name: object) -> str:
    """``name`` when it is a bot's name; KeeperRefused otherwise."""
    if not isinstance(name, str) or not BOT_NAME.fullmatch(name):
        raise KeeperRefused(f"'bot' must be a bot name matching {NAME_PATTERN}, not {name!r}")
    return name


class BotPrivileges:
    """Each operation itself, done in this process (root's when the fleet's is)."""

    def __init__(self, users: BotUsers, python: str = sys.executable) -> None:
        self.users = users
        self.home = users.home
        self.python = python  # the only command a watcher file may run

    def ensure_user(self, name: str) -> BotAccount | None:
        return self.users.ensure(check_bot(name))

    def remove_user(self, name: str) -> None:
        self.users.remove(check_bot(name))

    def own_dir(self, name: str) -> None:
        account = self.users.ensure(check_bot(name))
        bot_dir = self.home.bot_dir(name)
        # The bot owns its dir: made, chmodded and given by fd, following no link in it.
        private_dir(bot_dir, self.home.bots_dir)
        if account is not None:
            # A dir written before the bot had a user of its own holds root's files (its
            # session among them); never a hard link: it lives elsewhere too.
            give_tree(bot_dir, account.uid, account.gid)

    def write_config(self, name: str, text: str) -> None:
        check_bot(name)
        try:
            config = json.loads(text)
        except ValueError as exc:
            raise KeeperRefused(f"the config of bot {name!r} is no JSON: {exc}") from None
        if not isinstance(config, dict) or config.get("name") != name:
            raise KeeperRefused(f"the config written for bot {name!r} names another bot")
        account = self.users.ensure(name)
        owner = (account.uid, account.gid) if account is not None else None
        # mkstemp (O_EXCL: no symlink followed) and a rename; the file it replaces is
        # read only through O_NOFOLLOW|O_NONBLOCK (atomicfile).
        write_atomic(self.home.bot_config(name), text, 0o600, owner)

    def remove_dir(self, name: str) -> None:
        path = self.home.bot_dir(check_bot(name))
        if path.is_symlink():
            path.unlink()
        elif path.exists():
            shutil.rmtree(path)  # fd-based: follows no symlink the bot left inside

    def write_watcher(self, name: str, text: str) -> None:
        """``bots.d/<bot>.ini``, once it passed the allow-list (controller.watchercheck):
        circusd loads it as root. 0640 under ``bots.d``'s default ACL: the service
        user reads it back, nobody else."""
        account = self.users.ensure(check_bot(name))
        try:
            check_watcher(
                self.home,
                name,
                text,
                python=self.python,
                account=(account.user, account.group) if account is not None else None,
            )
        except WatcherRefused as exc:
            raise KeeperRefused(f"the watcher file of bot {name!r}: {exc}") from None
        write_atomic(self.home.watcher_file(name), text, 0o640)

    def remove_watcher(self, name: str) -> None:
        self.home.watcher_file(check_bot(name)).unlink(missing_ok=True)

    def has_config(self, name: str) -> bool:
        """Whether the bot's config.json is there (in its 0700 dir: only its user, and
        root, can see)."""
        try:  # not through a link the bot put there: whether it is, not what it points at
            return stat.S_ISREG(self.home.bot_config(check_bot(name)).lstat().st_mode)
        except FileNotFoundError:
            return False

    def usage(self, pids: dict[str, int], pss: bool) -> dict[str, tuple[int | None, int | None]]:
        """Open files and (with ``pss``) PSS of each bot's process, which only its user
        and root may read (``/proc/PID/fd``, ``smaps_rollup``); (None, None) for a pid
        that is not, or no longer, run by that bot's user."""
        found: dict[str, tuple[int | None, int | None]] = {}
        for name, pid in pids.items():
            found[check_bot(name)] = (None, None)
            uid = self.users.existing_uid(name)
            if uid is None or not isinstance(pid, int) or pid <= 0 or _real_uid(pid) != uid:
                continue
            found[name] = (count_fds(pid), _pss_bytes(pid) if pss else None)
        return found


def for_fleet(users: BotUsers, python: str = sys.executable) -> Privileged:
    """The keeper's client when this controller is the service user of a fleet run as
    root (its bots' users and files are the keeper's to make); else each operation
    done here (root itself, or a fleet that is not root's)."""
    if users.enabled and is_service_user(users.home):
        return KeeperClient(users.home)
    return BotPrivileges(users, python)


# ---------------------------------------------------------------- the client


class KeeperClient:
    """The controller's side: one connection per operation to ``run/keeper.sock``."""

    def __init__(self, home: Home, timeout_s: float = ANSWER_TIMEOUT_S) -> None:
        self.home = home
        self.timeout_s = timeout_s

    def call(self, op: str, name: str | None, **fields: object) -> dict[str, Any]:
        request = json.dumps({"op": op, **({"bot": name} if name else {}), **fields}).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
                conn.settimeout(self.timeout_s)
                conn.connect(str(self.home.keeper_socket))
                conn.sendall(request)
                conn.shutdown(socket.SHUT_WR)
                raw = _read_all(conn, MAX_REQUEST)
        except OSError as exc:
            raise KeeperRefused(
                f"the keeper ({self.home.keeper_socket}, in circusd) did not answer {op}: {exc}"
            ) from exc
        try:
            answer = json.loads(raw)
        except ValueError:
            raise KeeperRefused(f"the keeper's answer to {op} is no JSON: {raw[:200]!r}") from None
        if not isinstance(answer, dict) or answer.get("ok") is not True:
            error = answer.get("error") if isinstance(answer, dict) else answer
            raise KeeperRefused(f"the keeper refused {op} of bot {name!r}: {error}")
        return answer

    def ensure_user(self, name: str) -> BotAccount | None:
        found = self.call("ensure_user", name)
        return BotAccount(
            str(found["user"]), str(found["group"]), int(found["uid"]), int(found["gid"])
        )

    def remove_user(self, name: str) -> None:
        self.call("remove_user", name)

    def own_dir(self, name: str) -> None:
        self.call("own_dir", name)

    def write_config(self, name: str, text: str) -> None:
        self.call("write_config", name, text=text)

    def remove_dir(self, name: str) -> None:
        self.call("remove_dir", name)

    def write_watcher(self, name: str, text: str) -> None:
        self.call("write_watcher", name, text=text)

    def remove_watcher(self, name: str) -> None:
        self.call("remove_watcher", name)

    def has_config(self, name: str) -> bool:
        return self.call("has_config", name).get("exists") is True

    def usage(self, pids: dict[str, int], pss: bool) -> dict[str, tuple[int | None, int | None]]:
        answer = self.call("usage", None, pids=pids, pss=pss)
        found = answer.get("usage", {})
        return {
            name: (_int_or_none(pair[0]), _int_or_none(pair[1]))
            for name, pair in found.items()
            if name in pids and isinstance(pair, list) and len(pair) == 2
        }


def _read_all(conn: socket.socket, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = conn.recv(65536)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > limit:
            raise KeeperRefused(f"more than {limit} bytes")
        chunks.append(chunk)


# ---------------------------------------------------------------- the server


def peer_uid(conn: socket.socket) -> int:
    """The uid of the process at the other end of a unix socket (SO_PEERCRED)."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


class Keeper:
    """The server: a listening socket the service user may connect to, served one
    request at a time from a thread of its own."""

    def __init__(self, home: Home, service_uid: int, privileges: BotPrivileges) -> None:
        self.home = home
        self.service_uid = service_uid
        self.privileges = privileges
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        simple: dict[str, Callable[[str], None]] = {
            "remove_user": privileges.remove_user,
            "own_dir": privileges.own_dir,
            "remove_dir": privileges.remove_dir,
            "remove_watcher": privileges.remove_watcher,
        }
        self.handlers: dict[str, Callable[[str, dict[str, Any]], dict[str, Any]]] = {
            "ensure_user": self._ensure_user,
            "write_config": self._with_text(privileges.write_config),
            "write_watcher": self._with_text(privileges.write_watcher),
            "has_config": lambda bot, _: {"exists": privileges.has_config(bot)},
            "usage": self._usage,
            **{op: _no_answer(call) for op, call in simple.items()},
        }

    def listen(self) -> None:
        path = self.home.keeper_socket
        path.unlink(missing_ok=True)
        old = os.umask(0o177)  # no moment where another user could connect
        try:
            self.listener.bind(str(path))
        finally:
            os.umask(old)
        os.chown(path, self.service_uid, -1)
        self.listener.listen(16)

    def serve_forever(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError as exc:  # the listener closed: circusd is going away
                log.info("the keeper stops: %s", exc)
                return
            with conn:
                try:
                    self.serve(conn)
                except OSError as exc:  # the peer went away or timed out: its loss only
                    log.warning("keeper: a request failed: %s", exc)
                except Exception:  # a bug in one operation must not end the keeper: the
                    # controller could make no bot until circusd restarts (the fork server's rule)
                    log.exception("keeper: a request failed unexpectedly; serving on")

    def serve(self, conn: socket.socket) -> None:
        conn.settimeout(READ_TIMEOUT_S)
        uid = peer_uid(conn)
        try:
            # Read whole even from a peer to refuse: closing on unread bytes resets the
            # connection, and the peer would never see why.
            raw = _read_all(conn, MAX_REQUEST)
        except KeeperRefused as exc:
            conn.sendall(_answer_error(f"request too long: {exc}"))
            return
        if uid != self.service_uid:
            log.warning("keeper: refused a peer of uid %d", uid)
            conn.sendall(_answer_error(f"uid {uid} is not the fleet's service user"))
            return
        conn.sendall(self.answer(raw))

    def answer(self, raw: bytes) -> bytes:
        """The answer to one request (never raises for what a peer sends)."""
        try:
            request = json.loads(raw)
        except ValueError as exc:
            return _answer_error(f"the request is no JSON: {exc}")
        if not isinstance(request, dict):
            return _answer_error("the request must be a JSON object")
        op = request.get("op")
        if not isinstance(op, str) or op not in self.handlers:
            return _answer_error(f"'op' must be one of {', '.join(OPERATIONS)}, not {op!r}")
        handler = self.handlers[op]
        allowed = {"op", *(() if op == "usage" else ("bot",)), *FIELDS.get(op, ())}
        extra = sorted(set(request) - allowed)
        if extra:
            return _answer_error(f"{op} takes no {', '.join(map(repr, extra))}")
        try:
            bot = "" if op == "usage" else check_bot(request.get("bot"))
            result = handler(bot, request)
        except (SystemUserError, OSError, ValueError, KeyError) as exc:
            # A refusal, a tool that failed, a file that could not be written.
            log.warning("keeper: %s of %r failed: %s", op, request.get("bot"), exc)
            return _answer_error(str(exc) or repr(exc))
        if op not in ("usage", "has_config"):  # those two only read, and often
            log.info("keeper: %s %s", op, bot)
        return json.dumps({"ok": True, **result}).encode()

    def _usage(self, _: str, request: dict[str, Any]) -> dict[str, Any]:
        pids, pss = request.get("pids"), request.get("pss", False)
        if not isinstance(pids, dict) or len(pids) > MAX_USAGE_PIDS:
            raise KeeperRefused("usage needs 'pids', an object of bot names and their pids")
        if not all(isinstance(p, int) and not isinstance(p, bool) for p in pids.values()):
            raise KeeperRefused("usage: each pid must be an integer")
        if not isinstance(pss, bool):
            raise KeeperRefused("usage: 'pss' must be true or false")
        return {"usage": self.privileges.usage(pids, pss)}

    def _ensure_user(self, bot: str, _: dict[str, Any]) -> dict[str, Any]:
        account = self.privileges.ensure_user(bot)
        if account is None:
            raise KeeperRefused("the fleet does not run as root: bots have no users")
        return {"user": account.user, "group": account.group, "uid": account.uid,
                "gid": account.gid}  # fmt: skip

    @staticmethod
    def _with_text(
        call: Callable[[str, str], None],
    ) -> Callable[[str, dict[str, Any]], dict[str, Any]]:
        def handler(bot: str, request: dict[str, Any]) -> dict[str, Any]:
            text = request.get("text")
            if not isinstance(text, str):
                raise KeeperRefused(f"{request['op']} needs 'text', what to write")
            call(bot, text)
            return {}

        return handler

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()


def _real_uid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("Uid:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _pss_bytes(pid: int) -> int | None:
    rollup = read_text(f"/proc/{pid}/smaps_rollup")
    return None if rollup is None else kb_field(rollup, "Pss")


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _no_answer(call: Callable[[str], None]) -> Callable[[str, dict[str, Any]], dict[str, Any]]:
    def handler(bot: str, _: dict[str, Any]) -> dict[str, Any]:
        call(bot)
        return {}

    return handler


def _answer_error(message: str) -> bytes:
    return json.dumps({"ok": False, "error": message}).encode()


def share_sockets(uid: int, paths: tuple[Path, ...]) -> None:
    """Keep circusd's sockets ``paths`` (0600, bound by circusd as root, again after a
    restart of the arbiter) owned by ``uid``, the service user that runs the
    controller: its pub/sub socket, whose subscribers can only read. A stat of each
    every ``SOCKET_CHECK_S``."""
    while True:
        for path in paths:
            try:
                info = path.lstat()
                if stat.S_ISSOCK(info.st_mode) and info.st_uid != uid:
                    os.lchown(path, uid, -1)
            except FileNotFoundError:  # not bound yet, or circusd is restarting
                continue
        time.sleep(SOCKET_CHECK_S)


def home_of(circusd_argv: list[str]) -> Home | None:
    """The home of the circus.ini on circusd's command line (``<home>/circus.ini``)."""
    configs = [arg for arg in circusd_argv if arg.endswith(".ini") and not arg.startswith("-")]
    if not configs:
        return None
    return Home(Path(configs[-1]).resolve().parent)


def start_keeper(circusd_argv: list[str]) -> Keeper | None:
    """In circusd's process, before it starts a watcher: serve the keeper when circusd
    runs as root for a fleet with a service user (which runs the controller). None:
    nothing to keep (not root, or a home without a service user yet)."""
    home = home_of(circusd_argv)
    if os.geteuid() != 0 or home is None:
        return None
    users = BotUsers(home, enabled=True)
    try:
        service = pwd.getpwnam(service_user_name(home))
    except KeyError:
        log.warning("no service user for %s: the keeper does not run", home.root)
        return None
    if service.pw_uid == 0 or service.pw_gecos != users.service_comment:
        log.error("user %s is not %s's service user: no keeper", service.pw_name, home.root)
        return None
    keeper = Keeper(home, service.pw_uid, BotPrivileges(users))
    keeper.listen()
    threading.Thread(target=keeper.serve_forever, name="keeper", daemon=True).start()
    # circusd's control channel through the gate's allow-list; its events (read only)
    # straight from its pub/sub socket.
    from controller.gate import Gate

    gate = Gate(home, service.pw_uid)
    gate.listen()
    threading.Thread(target=gate.serve_forever, name="gate", daemon=True).start()
    threading.Thread(
        target=share_sockets,
        args=(service.pw_uid, (home.circus_pubsub_socket,)),
        name="keeper: circusd's pub/sub socket",
        daemon=True,
    ).start()
    log.info(
        "keeper serving %s for uid %d (group %s)",
        home.keeper_socket,
        service.pw_uid,
        fleet_group_name(home),
    )
    return keeper
