"""The fleet's fork server: ``python -m botrunner.forkserver <home>`` (its own Circus watcher).

It imports what every bot needs (Telethon, botrunner, the plugins shipped with
tgfleet), freezes the garbage collector's view of those objects, and forks a bot
for each launcher (``botrunner/launcher.py``) that asks on ``<home>/run/fork.sock``:
a forked bot shares those pages with the fork server and every other bot instead
of importing them again (≈11 MB PSS against ≈47 MB, ~0.15 s fork → connected).

Who may ask for what. The launcher runs as the bot's user (its watcher's uid), the
socket admits the fleet's group only, and a request names the bot: the peer's uid
(SO_PEERCRED) must own ``<home>/bots/<name>``. The child takes exactly the
launcher's credentials (uid, gid, supplementary groups) and resource limits
(read with prlimit: the launcher cannot raise its hard limits, so a bot cannot
ask for more than Circus gave its watcher), so a forked bot runs as its exec'd
twin would. At most one forked process per bot: a new request for a bot whose
previous process still lives kills that one first.

What the fork server holds: no secret (each child reads its own config.json after
dropping to its user), no thread, no event loop, no ZeroMQ context, no database
connection. As root it imports only code that ships with tgfleet: a third-party
plugin is imported by the child, after the privilege drop (docs/internals.md).

In the child, before any bot code: stdio from the launcher, every other inherited
fd closed, its own session, the launcher's limits and credentials, fresh random
state, its own env and working dir; then ``D`` to the launcher, ``G`` back, and
``botrunner.entry.main`` builds a new event loop. The fork server reaps its
children and tells each launcher its bot's wait status; a launcher whose
connection ends (it died) gets its bot killed.

It re-execs itself when a file of the code it preloaded changes (running bots
keep their processes: they stay its children and are reaped by the new image).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes  # here, not in each child: what the fork server imports, its bots share
import fcntl
import gc
import importlib
import mmap
import os
import pkgutil
import random
import re
import resource
import select
import selectors
import signal
import socket
import ssl
import struct
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import NoReturn

import msgspec

from botrunner import entry, launcher
from botspec import forked
from botspec.config import BotConfig
from botspec.spec import NAME_PATTERN

#: The limits a child copies from its launcher, by their names in /proc/PID/limits.
LIMITS = {
    "Max address space": resource.RLIMIT_AS,
    "Max core file size": resource.RLIMIT_CORE,
    "Max cpu time": resource.RLIMIT_CPU,
    "Max data size": resource.RLIMIT_DATA,
    "Max file size": resource.RLIMIT_FSIZE,
    "Max locked memory": resource.RLIMIT_MEMLOCK,
    "Max open files": resource.RLIMIT_NOFILE,
    "Max processes": resource.RLIMIT_NPROC,
    "Max stack size": resource.RLIMIT_STACK,
}
TICK_S = 1.0
#: How long a new request waits for the previous process of the same bot to die.
PREVIOUS_EXIT_WAIT_S = 2.0
_NAME = re.compile(NAME_PATTERN)
_PEERCRED = struct.Struct("3i")


def log(text: str) -> None:
    sys.stderr.write(f"forkserver: {text}\n")
    sys.stderr.flush()


def preload() -> list[str]:
    """Import what every bot imports; the names of the shipped plugin modules."""
    entry.import_telethon_without_aiohttp()
    importlib.import_module("botrunner.runner")
    import botrunner.plugins

    shipped = [
        f"botrunner.plugins.{info.name}"
        for info in pkgutil.iter_modules(botrunner.plugins.__path__)
    ]
    for module in shipped:
        importlib.import_module(module)
    warm_up()
    return shipped


def warm_up() -> None:
    """Do once, here, the first-use work that every child would otherwise do itself.

    What a child writes becomes its own copy of the page (copy on write), so a cache
    or a library set up on first use costs each bot anew. Measured per forked bot
    (its private dirty memory): OpenSSL's random generator set up on first use,
    1.5 MB (each child still gets fresh randomness: OpenSSL reseeds when it sees a
    new pid, and ``_reseed`` mixes in new bytes); msgspec's decoder of the bot's
    config, built from its type annotations, 1.0 MB; a Telegram client's first
    construction, 0.6 MB; the regular expression of Telethon's markdown parser (every
    message a bot sends goes through it), compiled on first use and kept in ``re``'s
    cache, 0.2 MB.
    """
    ssl.RAND_bytes(1)
    msgspec.json.Decoder(BotConfig)
    asyncio.run(_build_a_client())
    from telethon.extensions import markdown

    markdown.parse("warm")


async def _build_a_client() -> None:
    """Build, and drop, a Telegram client as every bot builds one (an in-memory session,
    never connected): its loggers and what Telethon and asyncio set up on first use are
    then made once, here (0.6 MB less per bot). The loop is closed again: the fork
    server runs none."""
    from telethon.sessions import StringSession

    from botrunner.telegram import CountingClient

    CountingClient(StringSession(), 1, "0" * 32, base_logger="telethon")


def preloaded_files() -> tuple[str, ...]:
    """The files of tgfleet's own modules that this image runs its children from
    (Telethon changes with a new install, which restarts the fleet)."""
    found = set()
    for name, module in list(sys.modules.items()):
        if name.split(".")[0] in ("botrunner", "botspec", "__main__"):
            path = getattr(module, "__file__", None)
            if path:
                found.add(path)
    return tuple(sorted(found))


def code_fingerprint(files: tuple[str, ...]) -> list[tuple[str, int, int]]:
    """(file, mtime, size) of each of ``files``; -1 for one that is gone.

    The fork server checks this every second: it stats a list made once, and does
    not walk ``sys.modules`` again. Every object it touches after a fork (a module's
    refcount, its ``__file__``) is a page its earlier children stop sharing with it
    and with each other (walking all modules every second: ~0.6 MB a bot).
    """
    found = []
    for path in files:
        try:
            info = os.stat(path)
        except OSError:
            found.append((path, -1, -1))
            continue
        found.append((path, info.st_mtime_ns, info.st_size))
    return found


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int
    groups: tuple[int, ...]


def peer_of(conn: socket.socket) -> Peer:
    pid, uid, gid = _PEERCRED.unpack(
        conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    )
    groups: tuple[int, ...] = ()
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("Groups:"):
                groups = tuple(int(g) for g in line.split()[1:])
    return Peer(pid, uid, gid, groups)


def limits_of(pid: int) -> list[tuple[int, tuple[int, int]]]:
    """A process's resource limits, from /proc (prlimit on another user's process needs
    CAP_SYS_RESOURCE, which root in a container may lack)."""
    found = []
    with open(f"/proc/{pid}/limits") as limits:
        for line in limits:
            for label, res in LIMITS.items():
                if line.startswith(label + " "):
                    soft, hard = line[len(label) :].split()[:2]
                    found.append((res, (_limit(soft), _limit(hard))))
    return found


def _limit(text: str) -> int:
    return resource.RLIM_INFINITY if text == "unlimited" else int(text)


@dataclass
class Child:
    name: str
    pid: int
    pidfd: int
    conn: socket.socket | None
    launcher_pid: int


class ForkServer:
    def __init__(self, home: Path) -> None:
        self.home = home
        self.run_dir = home / "run"
        self.bots_dir = home / "bots"
        self.socket_path = forked.socket_path(self.run_dir)
        self.selector = selectors.DefaultSelector()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.children: dict[int, Child] = {}  # by pid
        self.by_name: dict[str, Child] = {}
        self.stopping = False
        self.code_files = preloaded_files()
        self.fingerprint = code_fingerprint(self.code_files)
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    # ---------------------------------------------------------------- startup

    def listen(self) -> None:
        registry = forked.registry_dir(self.run_dir)
        registry.mkdir(exist_ok=True)
        # The controller (the service user, as root) reads it: pids are no secret (ps).
        registry.chmod(0o711)
        self.socket_path.unlink(missing_ok=True)
        self.listener.bind(str(self.socket_path))
        # The fleet's group (that of <home>/run) may connect: each bot's launcher is in it.
        os.chown(self.socket_path, -1, os.stat(self.run_dir).st_gid)
        os.chmod(self.socket_path, 0o660)
        self.listener.listen(128)
        self.listener.setblocking(False)
        self.selector.register(self.listener, selectors.EVENT_READ, self.accept)
        self.selector.register(self._wake_r, selectors.EVENT_READ, self.woken)
        signal.set_wakeup_fd(self._wake_w)
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self.request_stop)
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)  # wakes the selector

    def request_stop(self, signum: int, frame: FrameType | None) -> None:
        self.stopping = True

    def woken(self, fd: int) -> None:
        while True:
            try:
                if not os.read(fd, 512):
                    return
            except BlockingIOError:
                return

    # ---------------------------------------------------------------- main loop

    def serve(self) -> None:
        next_tick = time.monotonic()
        while not self.stopping:
            for key, _events in self.selector.select(TICK_S):
                try:
                    key.data(key.fileobj)
                except Exception:  # a bug in one exchange must not take every other down
                    log(f"unexpected error, serving on:\n{traceback.format_exc()}")
                if self.stopping:
                    break
            if time.monotonic() >= next_tick:
                next_tick = time.monotonic() + TICK_S
                self.sweep()
                if code_fingerprint(self.code_files) != self.fingerprint:
                    log("tgfleet's bot code changed on disk: re-executing (bots keep running)")
                    self.reexec()
        log("stopping (the bots keep running: their launchers watch them)")
        self.listener.close()
        self.socket_path.unlink(missing_ok=True)

    def reexec(self) -> NoReturn:
        self.listener.close()
        self.socket_path.unlink(missing_ok=True)
        sys.stderr.flush()
        os.execv(sys.executable, [sys.executable, "-m", "botrunner.forkserver", str(self.home)])

    def sweep(self) -> None:
        """Children of an earlier image (before a re-exec) and bots whose launcher died
        while no fork server watched: reap the former, kill the latter."""
        registry = forked.registry_dir(self.run_dir)
        for entry_path in registry.iterdir():
            name = entry_path.name
            if name.startswith(".") or name in self.by_name:
                continue
            record = forked.read(self.run_dir, name)
            if record is None or record.bot_pid in self.children:  # a stale record, pid reused
                continue
            if record.bot_alive() and forked.start_time(record.launcher_pid) is None:
                log(f"bot {name} (pid {record.bot_pid}) outlived its launcher: killing it")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(record.bot_pid, signal.SIGKILL)
            try:
                reaped, _status = os.waitpid(record.bot_pid, os.WNOHANG)
            except ChildProcessError:
                reaped = record.bot_pid if not record.bot_alive() else 0
            if reaped:
                forked.remove(self.run_dir, name, record.bot_pid)

    # ---------------------------------------------------------------- requests

    def accept(self, listener: socket.socket) -> None:
        try:
            conn, _addr = listener.accept()
        except BlockingIOError:
            return
        conn.settimeout(1.0)
        try:
            self.handle(conn)
        except Exception as exc:  # one launcher's bad request must not stop the server
            log(f"request refused: {type(exc).__name__}: {exc}")
            with contextlib.suppress(OSError):  # it left already
                conn.send(launcher.ERROR_REPLY + str(exc).encode()[:1000])
            conn.close()

    def handle(self, conn: socket.socket) -> None:
        data, ancillary, flags, _addr = conn.recvmsg(launcher.MAX_MESSAGE, socket.CMSG_SPACE(4 * 4))
        fds = launcher.unpack_fds(ancillary)
        try:
            if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):  # an env cut short, say
                raise ValueError(f"request over {launcher.MAX_MESSAGE} bytes or 4 descriptors")
            name, env = launcher.decode_request(data)
            if len(fds) != 4:
                raise ValueError(f"expected 4 file descriptors, got {len(fds)}")
            if not _NAME.fullmatch(name):
                raise ValueError(f"{name!r} is no bot name")
            peer = peer_of(conn)
            owner = os.stat(self.bots_dir / name).st_uid
            if peer.uid != owner or (os.geteuid() != 0 and peer.uid != os.geteuid()):
                raise PermissionError(f"uid {peer.uid} may not start bot {name!r}")
            limits = limits_of(peer.pid)
            self.end_previous(name)
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                self.become_bot(name, env, fds, peer, limits)
            pidfd = os.pidfd_open(pid)
        finally:
            for fd in fds:
                os.close(fd)
        child = Child(name, pid, pidfd, conn, peer.pid)
        self.children[pid] = child
        self.by_name[name] = child
        self.selector.register(pidfd, selectors.EVENT_READ, lambda _fd: self.reap(child))
        record = forked.Forked(peer.pid, pid, forked.start_time(pid) or 0)
        try:
            forked.write(self.run_dir, name, record)
        except OSError as exc:  # the record helps a restarted controller; the bot runs without
            log(f"bot {name}: cannot record process {pid}: {exc}")
        try:
            conn.sendmsg([launcher.PID_REPLY + str(pid).encode()], launcher.pack_fds([pidfd]))
        except OSError:
            # The launcher gave up waiting (it execs the bot itself): this one must not run.
            conn.close()
            child.conn = None
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            return
        conn.setblocking(False)
        self.selector.register(conn, selectors.EVENT_READ, lambda _c: self.launcher_spoke(child))

    def end_previous(self, name: str) -> None:
        """At most one forked process per bot: a previous one still alive is killed."""
        previous = self.by_name.get(name)
        record = forked.read(self.run_dir, name)
        if previous is not None:
            signal.pidfd_send_signal(previous.pidfd, signal.SIGKILL)
            _pid, status = os.waitpid(previous.pid, 0)  # SIGKILL: it ends at once
            self.reap(previous, status)
        elif record is not None and record.bot_alive():
            log(f"bot {name}: killing its previous process {record.bot_pid} first")
            os.kill(record.bot_pid, signal.SIGKILL)
            deadline = time.monotonic() + PREVIOUS_EXIT_WAIT_S
            while record.bot_alive() and time.monotonic() < deadline:
                # not ours when an earlier fork server forked it: its new parent reaps it
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(record.bot_pid, os.WNOHANG)
                time.sleep(0.01)

    def launcher_spoke(self, child: Child) -> None:
        """Launchers say nothing after their request: this is EOF, the launcher is gone."""
        assert child.conn is not None
        try:
            data = child.conn.recv(launcher.MAX_MESSAGE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            return
        self.selector.unregister(child.conn)
        child.conn.close()
        child.conn = None
        if child.pid in self.children:
            log(f"bot {child.name}: its launcher is gone, killing process {child.pid}")
            with contextlib.suppress(ProcessLookupError):  # ended meanwhile
                signal.pidfd_send_signal(child.pidfd, signal.SIGKILL)

    def reap(self, child: Child, status: int | None = None) -> None:
        """The child ended (its pidfd is readable): its launcher gets its wait status."""
        if status is None:
            try:
                reaped, status = os.waitpid(child.pid, os.WNOHANG)
            except ChildProcessError:  # reaped elsewhere: nobody knows how it ended
                reaped, status = child.pid, signal.SIGKILL
            if reaped == 0:
                return
        self.selector.unregister(child.pidfd)
        os.close(child.pidfd)
        self.children.pop(child.pid, None)
        if self.by_name.get(child.name) is child:
            del self.by_name[child.name]
        forked.remove(self.run_dir, child.name, child.pid)
        if child.conn is not None:
            with contextlib.suppress(OSError):  # the launcher is gone too
                child.conn.send(launcher.EXIT_REPLY + str(status).encode())
            with contextlib.suppress(KeyError):  # not watched yet when its answer failed
                self.selector.unregister(child.conn)
            child.conn.close()
            child.conn = None

    # ---------------------------------------------------------------- the child

    def become_bot(
        self,
        name: str,
        env: dict[str, str],
        fds: list[int],
        peer: Peer,
        limits: list[tuple[int, tuple[int, int]]],
    ) -> NoReturn:
        code = 1
        pair = -1
        try:
            pair = self._isolate(name, fds, peer, limits)
            bot_dir = self.bots_dir / name
            os.chdir(bot_dir)
            _take_env(env)
            _reseed()
            signal.signal(signal.SIGTERM, entry.stop_before_serving)
            os.write(pair, launcher.DROPPED)
            if os.read(pair, 1) != launcher.GO:
                os._exit(0)  # the launcher gave up on us (it exec'd the bot itself)
            _watch_launcher(pair)
            code = entry.main([str(bot_dir / "config.json")], time.monotonic())
        except SystemExit as exc:
            code = int(exc.code) if isinstance(exc.code, int) else 1  # sys.exit(True): 1
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            try:
                import logging

                logging.shutdown()
                sys.stdout.flush()
                sys.stderr.flush()
                if pair >= 0:
                    os.write(pair, launcher.EXIT_PREFIX + f"{code}\n".encode())
            finally:
                os._exit(code)

    def _isolate(
        self, name: str, fds: list[int], peer: Peer, limits: list[tuple[int, tuple[int, int]]]
    ) -> int:
        """Everything of the fork server's own is gone; the launcher's stdio, session-less,
        limits and credentials are ours. Returns the pair's fd (3)."""
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
            signal.signal(signum, signal.SIG_DFL)
        signal.set_wakeup_fd(-1)
        for sock in (self.listener, *(c.conn for c in self.children.values() if c.conn)):
            sock.detach()  # the fd is closed below; the object must never close a reused number
        stdin, stdout, stderr, pair = fds
        os.dup2(stdin, 0)
        os.dup2(stdout, 1)
        os.dup2(stderr, 2)
        os.dup2(pair, 3, inheritable=False)
        os.closerange(4, os.sysconf("SC_OPEN_MAX"))
        os.setsid()
        with open("/proc/self/comm", "w") as comm:  # what ps and top show
            comm.write(f"tgf:{name}"[:15])
        for res, (soft, hard) in limits:
            try:
                resource.setrlimit(res, (soft, hard))
            except (ValueError, OSError):
                # above our own hard limit (root without CAP_SYS_RESOURCE): as close as allowed
                _soft, own_hard = resource.getrlimit(res)
                capped = hard if own_hard == resource.RLIM_INFINITY else own_hard
                resource.setrlimit(res, (min(soft, capped), capped))
        if os.geteuid() == 0 and peer.uid != 0:
            os.setgroups(list(peer.groups))
            os.setresgid(peer.gid, peer.gid, peer.gid)
            os.setresuid(peer.uid, peer.uid, peer.uid)
            # A uid change makes a process undumpable: its /proc files root's, its
            # launcher unable to read them. An exec'd bot is dumpable; so is this one
            # (core dumps stay off: RLIMIT_CORE is 0).
            _prctl(PR_SET_DUMPABLE, 1)
        elif os.geteuid() != peer.uid:
            raise PermissionError(f"cannot become uid {peer.uid}")
        return 3


PR_SET_DUMPABLE = 4
#: libc, and its prctl and madvise, looked up here once: a ctypes library and function
#: made in each child would be made on pages that child then stops sharing.
_LIBC = ctypes.CDLL(None, use_errno=True)
_PRCTL = _LIBC.prctl
_LIBC.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def _prctl(option: int, value: int) -> None:
    if _PRCTL(option, value, 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))


#: The fork server's env var (from ``tgfleet up``'s TGFLEET_MERGE_PAGES) that asks for it.
MERGE_PAGES_VAR = "TGFLEET_MERGE_PAGES"
KSM_RUN = Path("/sys/kernel/mm/ksm/run")


def mark_mergeable(maps: str = "/proc/self/maps") -> int:
    """Offer this image's private writable memory to the kernel's same-page merging
    (KSM, ``madvise(MADV_MERGEABLE)``); the bytes offered.

    A forked bot inherits the mark on these mappings (not on memory it maps later):
    a page it copied from this image and that holds the same bytes as the original,
    or as a sibling's copy (a reference count raised and dropped again, bytecode
    specialized alike), is merged back into one, when KSM runs on the host
    (``/sys/kernel/mm/ksm/run`` = 1: the host's choice, not ours). The price: ksmd's
    CPU, and what merging tells a process about another's memory (how long a write
    takes reveals whether that page was merged, so whether another process holds
    the same bytes). README, "Memory": why it is off by default.
    """
    offered = 0
    with open(maps) as lines:
        for line in lines:
            fields = line.split()
            path = fields[5] if len(fields) > 5 else ""
            if fields[1] != "rw-p" or (path.startswith("[") and path != "[heap]"):
                continue  # shared, read-only, the stack, vsyscall pages: not ours to offer
            low, high = (int(bound, 16) for bound in fields[0].split("-"))
            if _LIBC.madvise(low, high - low, mmap.MADV_MERGEABLE) == 0:
                offered += high - low
    return offered


def ksm_state() -> str:
    """What the host's KSM does: '1' runs, '0' stopped, '2' unmerging; '?' unknown."""
    try:
        return KSM_RUN.read_text().strip()
    except OSError:
        return "?"


def _take_env(env: dict[str, str]) -> None:
    os.environ.clear()
    os.environ.update(env)
    extra = [p for p in env.get("PYTHONPATH", "").split(":") if p and p not in sys.path]
    sys.path[1:1] = extra
    # The import system's caches of directory listings, from the fork server's start,
    # are dropped by PluginHost.import_all before it imports a plugin: only then can
    # they be stale (dropping them here cost every bot 0.6 MB, plugins preloaded or not).


def _reseed() -> None:
    """Nothing random may be shared with the fork server or a sibling."""
    random.seed()
    ssl.RAND_add(os.urandom(32), 32.0)


def _watch_launcher(pair: int) -> None:
    """This bot dies when its launcher's end of the pair closes: no thread, the kernel.

    With ``O_ASYNC`` the kernel sends this process ``SIGIO`` when the pair's peer
    closes (or writes, which a launcher does not do after ``G``), and SIGIO's default
    action ends the process. Nothing in a bot sets a handler for it (asyncio,
    Telethon and ZeroMQ use none); a plugin must neither handle nor block it (the fork
    server, while it runs, still ends a bot whose launcher is gone). SIGIO is set to
    its default and unblocked here, whatever mask came down through circusd. A thread
    blocked on the pair did this before; one Python thread made ~0.3 MB of the fork
    server's pages the bot's own.
    """
    signal.signal(signal.SIGIO, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGIO})
    fcntl.fcntl(pair, fcntl.F_SETOWN, os.getpid())
    fcntl.fcntl(pair, fcntl.F_SETFL, fcntl.fcntl(pair, fcntl.F_GETFL) | os.O_ASYNC)
    # Closed before O_ASYNC was on: no signal comes for that. (The launcher writes
    # nothing after G, so a readable pair is one at its end of file.)
    readable, _, _ = select.select([pair], [], [], 0)
    if readable and os.read(pair, 64) == b"":
        os.kill(os.getpid(), signal.SIGKILL)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m botrunner.forkserver <home>", file=sys.stderr)
        return 64
    started = time.monotonic()
    shipped = preload()
    gc.collect()
    gc.freeze()  # what is imported now is shared with every child: keep GC off those pages
    if os.environ.get(MERGE_PAGES_VAR) == "1":
        offered, ksm = mark_mergeable(), ksm_state()
        log(
            f"{offered / 2**20:.1f} MB offered to the kernel's same-page merging "
            f"(KSM run = {ksm}{'' if ksm == '1' else ': nothing is merged'})"
        )
    server = ForkServer(Path(argv[0]))
    server.listen()
    log(
        f"ready in {time.monotonic() - started:.2f} s on {server.socket_path} "
        f"(preloaded Telethon, botrunner, {', '.join(shipped)})"
    )
    server.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
