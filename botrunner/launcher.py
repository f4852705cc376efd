"""A fork-mode bot's watcher process: ``python -S -I launcher.py SOCKET NAME CONFIG``
(its watcher runs it through ``launch.py``, from its compiled bytecode), where its twin
in C, ``tgf-launcher`` (``launcher.c``: the same protocol, ~0.1 MB instead of ~3 MB),
was not built or does not run on this machine (controller/watchercheck.py).

Circus supervises it as it would the bot (respawn, stop, signals, exit codes); it
asks the fleet's fork server (``botrunner.forkserver``) for the bot, hands it its
own stdin/stdout/stderr (the watcher's log files), forwards the signals it gets to
the bot, and exits as the bot did. When the fork server cannot be reached within
``FORK_WAIT_S`` it becomes the bot itself: ``exec python -m botrunner CONFIG``,
exactly what an exec-mode watcher runs.

It imports nothing beyond the interpreter's built-in modules (``-S``: no site,
``-I``: no user dirs, no PYTHON* variables), so that it stays at ~3 MB PSS. The
wire format below is this file's own; ``botrunner.forkserver`` imports it, and
``launcher.c`` speaks it too (tests/unit/test_forked.py compares their constants).

The bot and this launcher share a socket pair. The bot writes ``D`` once it runs
as its own user (signals may be forwarded from then on) and waits for ``G``
before it reads its config: a bot whose launcher gave up and exec'd (the pair's
end closes on exec) never runs. After ``G`` the pair's end of file (this launcher
died) ends the bot: its end is ``O_ASYNC``, so the kernel sends it SIGIO (no orphans). The bot's exit code
comes from the fork server (its parent, which reaps it); when the fork server is
gone, from the ``X<code>`` line the bot writes on the pair as it exits.
"""

from __future__ import annotations

import os
import select
import sys

TYPE_CHECKING = False  # not typing's: importing typing costs this process ~1 MB (re, ...)
if TYPE_CHECKING:
    import signal as _signal
    import socket as _socket
else:  # the C modules: `signal` and `socket` would import enum and selectors (~1 MB)
    import _signal
    import _socket

PROTOCOL = b"tgfleet-fork 1"
#: How long a launcher waits for the fork server before it execs the bot itself.
FORK_WAIT_S = 1.0
#: How long, once the bot is gone, it waits for the fork server's word on its status
#: (a busy fork server; a dead one closed the connection, and nobody waits for it).
STATUS_WAIT_S = 3.0
MAX_MESSAGE = 65536
FORWARDED = (
    _signal.SIGTERM,
    _signal.SIGINT,
    _signal.SIGHUP,
    _signal.SIGQUIT,
    _signal.SIGUSR1,
    _signal.SIGUSR2,
    _signal.SIGWINCH,
)
DROPPED = b"D"  # bot -> launcher: it runs as its own user now
GO = b"G"  # launcher -> bot: supervised, go on
EXIT_PREFIX = b"X"  # bot -> launcher: "X<exit code>" as it exits
# fork server -> launcher replies
PID_REPLY = b"pid "
EXIT_REPLY = b"exit "
ERROR_REPLY = b"error "


def encode_request(name: str, env: dict[str, str]) -> bytes:
    """The launcher's request: the protocol line, the bot's name, then its env."""
    lines = [PROTOCOL, name.encode()]
    lines += [f"{key}={value}".encode() for key, value in env.items()]
    return b"\0".join(lines)


def decode_request(data: bytes) -> tuple[str, dict[str, str]]:
    """(name, env) of a request; ValueError when it is not one."""
    parts = data.split(b"\0")
    if len(parts) < 2 or parts[0] != PROTOCOL:
        raise ValueError("not a tgfleet-fork 1 request")
    env: dict[str, str] = {}
    for item in parts[2:]:
        key, sep, value = item.decode().partition("=")
        if not sep or not key:
            raise ValueError(f"bad env entry {item[:40]!r}")
        env[key] = value
    return parts[1].decode(), env


def pack_fds(fds: list[int]) -> list[tuple[int, int, bytes]]:
    data = b"".join(fd.to_bytes(4, sys.byteorder, signed=True) for fd in fds)
    return [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, data)]


def unpack_fds(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancillary:
        if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
            usable = len(data) - len(data) % 4
            fds += [
                int.from_bytes(data[i : i + 4], sys.byteorder, signed=True)
                for i in range(0, usable, 4)
            ]
    return fds


def exit_like(status: int) -> None:
    """End this process the way a child with wait ``status`` ended (code or signal)."""
    sys.stdout.flush()
    sys.stderr.flush()
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig not in (_signal.SIGKILL, _signal.SIGSTOP):  # those have no handler to reset
            _signal.signal(sig, _signal.SIG_DFL)
        _signal.pthread_sigmask(_signal.SIG_UNBLOCK, {sig})
        os.kill(os.getpid(), sig)
    os._exit(os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 1)


class Launcher:
    def __init__(self, socket_path: str, name: str, config: str) -> None:
        self.socket_path = socket_path
        self.name = name
        self.config = config
        self.pending: list[int] = []  # signals received before the bot could take them
        self.pidfd = -1
        self.dropped = False

    def say(self, text: str) -> None:
        sys.stderr.write(f"launcher bot={self.name}: {text}\n")
        sys.stderr.flush()

    def on_signal(self, signum: int, frame: object) -> None:
        if self.pidfd >= 0 and self.dropped:
            self.forward(signum)
        else:
            self.pending.append(signum)

    def forward(self, signum: int) -> None:
        try:  # noqa: SIM105 - contextlib would cost this process its lightness
            _signal.pidfd_send_signal(self.pidfd, signum)
        except ProcessLookupError:
            pass  # already gone: its status is on its way

    def exec_bot(self, why: str) -> None:
        """Become the bot: what an exec-mode watcher runs (same env, limits, user)."""
        self.say(f"{why}; starting the bot by exec")
        # Held from here to the exec, so that none slips past the last look.
        _signal.pthread_sigmask(_signal.SIG_BLOCK, FORWARDED)
        _let_handlers_run()  # those of signals caught before the block (self.pending)
        stop = {_signal.SIGTERM, _signal.SIGINT}
        for signum in FORWARDED:
            if signum not in stop:
                _signal.signal(signum, _signal.SIG_IGN)  # drops one held: no bot for it
            _signal.signal(signum, _signal.SIG_DFL)  # TERM and INT stay held, if they were
        if stop & set(self.pending) or stop & _signal.sigpending():
            os._exit(0)  # asked to stop before the bot existed
        sys.stdout.flush()
        sys.stderr.flush()
        # One arriving from here on ends this process as it would the bot's.
        _signal.pthread_sigmask(_signal.SIG_UNBLOCK, FORWARDED)
        os.execv(sys.executable, [sys.executable, "-m", "botrunner", self.config])

    def ask(self, pair_end: int) -> tuple[_socket.socket, int, int]:
        """(connection, bot pid, pidfd) from the fork server; OSError/ValueError if not."""
        conn = _socket.socket(_socket.AF_UNIX, _socket.SOCK_SEQPACKET)
        try:
            conn.settimeout(FORK_WAIT_S)
            conn.connect(self.socket_path)
            request = encode_request(self.name, dict(os.environ))
            conn.sendmsg([request], pack_fds([0, 1, 2, pair_end]))
            data, ancillary, _flags, _addr = conn.recvmsg(MAX_MESSAGE, _socket.CMSG_SPACE(16))
            fds = unpack_fds(ancillary)
            if data.startswith(PID_REPLY) and len(fds) == 1:
                conn.settimeout(None)
                return conn, int(data[len(PID_REPLY) :]), fds[0]
            for fd in fds:
                os.close(fd)
            if data.startswith(ERROR_REPLY):
                raise ValueError(data[len(ERROR_REPLY) :].decode(errors="replace"))
            raise ValueError(f"unexpected answer {data[:60]!r}")
        except BaseException:
            conn.close()
            raise

    def run(self) -> None:
        for signum in FORWARDED:
            _signal.signal(signum, self.on_signal)
        mine, theirs = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_STREAM)
        try:
            conn, pid, self.pidfd = self.ask(theirs.fileno())
        except (OSError, ValueError) as exc:
            mine.close()
            theirs.close()
            self.exec_bot(f"no fork server ({exc})")
            return
        theirs.close()
        self.supervise(conn, mine, pid)

    def supervise(self, conn: _socket.socket, pair: _socket.socket, pid: int) -> None:
        """Until the bot ends: forward signals, then exit with its status."""
        poller = select.poll()
        poller.register(pair.fileno(), select.POLLIN)
        poller.register(conn.fileno(), select.POLLIN)
        poller.register(self.pidfd, select.POLLIN)
        status: int | None = None
        own_code: int | None = None
        conn_open = True
        dead_at: float | None = None
        pair_buffer = b""
        while True:
            timeout = None
            if dead_at is not None:
                left = dead_at + STATUS_WAIT_S - _monotonic()
                if status is not None or not conn_open or left <= 0:
                    break
                timeout = int(left * 1000) + 1
            for fd, _event in poller.poll(timeout):
                if fd == pair.fileno():
                    chunk = pair.recv(64)
                    if not chunk:
                        poller.unregister(fd)
                        continue
                    pair_buffer += chunk
                    if not self.dropped and pair_buffer.startswith(DROPPED):
                        pair_buffer = pair_buffer[1:]
                        self.dropped = True
                        pair.sendall(GO)
                        for signum in self.pending:
                            self.forward(signum)
                        self.pending.clear()
                    if pair_buffer.startswith(EXIT_PREFIX) and pair_buffer.endswith(b"\n"):
                        own_code = int(pair_buffer[1:])
                elif fd == conn.fileno():
                    data = conn.recv(MAX_MESSAGE)
                    if data.startswith(EXIT_REPLY):
                        status = int(data[len(EXIT_REPLY) :])
                    if not data:
                        conn_open = False
                        poller.unregister(fd)
                elif fd == self.pidfd:
                    poller.unregister(fd)
                    dead_at = _monotonic()
            if status is not None and dead_at is not None:
                break
        if status is None and own_code is None:
            own_code = _last_word(pair, pair_buffer)
        if status is None:
            if own_code is not None:
                status = (own_code & 0xFF) << 8
            else:
                # Neither its parent nor the bot told: it was killed (SIGKILL is the
                # only death that leaves no word, short of a crash of the interpreter).
                self.say(f"bot process {pid} ended and nobody knows how: reporting SIGKILL")
                status = _signal.SIGKILL
        exit_like(status)


def _last_word(pair: _socket.socket, buffer: bytes) -> int | None:
    """The bot's ``X<code>`` line, if it wrote one before it ended."""
    pair.setblocking(False)
    try:
        while chunk := pair.recv(64):
            buffer += chunk
    except OSError:
        pass  # nothing more to read
    head, _, tail = buffer.partition(EXIT_PREFIX)
    if head not in (b"", DROPPED) or not tail.endswith(b"\n"):
        return None
    return int(tail)


def _let_handlers_run() -> None:
    """Nothing: entering a Python function is where the interpreter runs the handlers
    of signals it caught meanwhile (3.11's RESUME checks the eval breaker)."""


def _monotonic() -> float:
    import time  # built in

    return time.monotonic()


def main(argv: list[str]) -> None:
    if len(argv) != 3:
        sys.stderr.write("usage: launcher.py SOCKET NAME CONFIG\n")
        os._exit(64)
    Launcher(*argv).run()


if __name__ == "__main__":
    main(sys.argv[1:])
