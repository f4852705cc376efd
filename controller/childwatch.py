"""circusd respawns a dead child at once: on SIGCHLD, not at its next ``check_delay`` poll
(a child that died young: ``RESPAWN_SPACING_S`` after it started).

Circus finds dead processes by polling: every ``check_delay`` its arbiter's
``manage_watchers`` reaps (``waitpid(-1, WNOHANG)``) and spawns what is missing, so a
bot killed -9 waits up to ``check_delay`` (on average half of it) before it is even
noticed. Here circusd's arbiter also runs that same pass as soon as a child of
circusd ends: the kernel's SIGCHLD, handled on circusd's own event loop (asyncio's
signal handling: the C handler only wakes the loop; the pass runs there, in order
with every command).

Coalesced: signals that arrive while a pass is scheduled no later make no second one. Circus
runs one command at a time (its arbiter lock): while another command holds it (a
reloadconfig, a watcher's graceful stop), the pass is tried again every
``BUSY_RETRY_S`` until the lock is free. The poll stays, as the safety net for
anything a signal does not tell (a watcher whose processes circusd must add for
another reason); it can be slow (less CPU at many children) since deaths no longer
wait for it.

Not faster than once per ``RESPAWN_SPACING_S`` a process: a child that lived at least
that long is respawned at once; one that died younger (a crash loop: a controller
whose PostgreSQL is away, a bot that exits at start) is respawned when it would have
been that old, or at circus' own poll if that comes first (as plain circus would).
Which children ended is seen without reaping them (``waitid`` with ``WNOWAIT``, on
the pids circus' watchers hold): the pass reaps, as before. An ended child that no
watcher holds (a tool the keeper runs) asks for no pass: its own parent waits for
it, and the poll reaps what is left. The controller's crash accounting
(``health.assess``: more than ``max_restarts`` exits within ``restart_window_s``,
then failed and its watcher stopped) ends a bot's loop; the spacing bounds every
watcher's, the controller's, PostgreSQL's and the fork server's too.

Used by ``controller.circusd`` (one call before circusd's ``main``); nothing is
imported here at import time beyond the standard library.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from types import ModuleType
from typing import Any

log = logging.getLogger("circus")

#: While another circusd command holds the arbiter lock, the pass is tried this often.
BUSY_RETRY_S = 0.05
#: A process is respawned on SIGCHLD no sooner than this long after it started: a
#: crash-looping watcher is respawned at most this often by SIGCHLD (plus circus'
#: own poll, once per ``check_delay``: 1 s in a fleet, as plain circus).
RESPAWN_SPACING_S = 1.0


class ChildWatch:
    """Runs the arbiter's ``manage_watchers`` on circusd's loop when a child ends."""

    def __init__(self, arbiter: Any, spacing_s: float = RESPAWN_SPACING_S) -> None:
        self.arbiter = arbiter
        self.spacing_s = spacing_s
        self.due: float | None = None  # monotonic time of the pass scheduled, not begun
        self.timeout: object = None  # its handle on the loop

    def install(self) -> None:
        """Handle SIGCHLD on the arbiter's asyncio loop (main thread, before it runs)."""
        self.arbiter.loop.asyncio_loop.add_signal_handler(signal.SIGCHLD, self.child_ended)

    def child_ended(self) -> None:
        """A child of circusd changed state: one pass, once the youngest of the watchers'
        ended processes is ``spacing_s`` old; however many signals came."""
        wait = self.wait_for_ended()
        if wait is not None:
            self.schedule(wait)

    def wait_for_ended(self) -> float | None:
        """Seconds until a pass may respawn what ended (0: now); None: no watcher's
        process ended."""
        now = time.time()  # what circus' Process.started is in
        waits = [
            min(max(self.spacing_s - (now - process.started), 0.0), self.spacing_s)
            for watcher in self.arbiter.iter_watchers()
            for pid, process in list(watcher.processes.items())
            if _ended(pid)
        ]
        return min(waits, default=None)

    def schedule(self, wait: float) -> None:
        """A pass ``wait`` seconds from now, unless one is due no later."""
        due = time.monotonic() + wait
        if self.due is not None:
            if self.due <= due:
                return
            self.arbiter.loop.remove_timeout(self.timeout)
        self.due = due
        self.timeout = self.arbiter.loop.call_later(wait, self.run_pass)

    def run_pass(self) -> None:
        arbiter = self.arbiter
        self.due = self.timeout = None
        if arbiter._stopping:
            return  # circusd stops its watchers itself
        if arbiter._exclusive_running_command is not None or arbiter._restarting:
            self.schedule(BUSY_RETRY_S)
            return
        # A child that ends from here on asks for a pass of its own.
        arbiter.loop.add_future(arbiter.manage_watchers(), _log_failure)


def _ended(pid: int) -> bool:
    """Whether circusd's child ``pid`` has ended, leaving it to be reaped (``WNOWAIT``);
    one reaped already (no longer a child) has ended too."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def release_outputs(arbiter: Any) -> None:
    """Before circus reaps: each ended process's output pipes drained (what it wrote
    reaches its log) and taken off circusd's loop while still open.

    circus' reap closes a dead process's pipes (``Process.stop``) but takes them off
    its event loop only when it has read their end of file. A pipe that another
    process still holds open (a forked bot holds its launcher's stdout and stderr; a
    shell's background job its parent's) has none yet: its fd stayed registered,
    closed, and the next watcher whose new process got that fd number failed to start
    ("fd N added twice": PostgreSQL stayed down after a restart). Reaping at once on
    SIGCHLD made that the common case rather than a rare one."""
    for watcher in arbiter.iter_watchers():
        redirector = getattr(watcher, "stream_redirector", None)
        if redirector is None:
            continue
        for pid, process in list(watcher.processes.items()):
            if getattr(process, "redirected", False) and _ended(pid):
                _drain(redirector, process)
                redirector.remove_redirections(process)


def _drain(redirector: Any, process: Any) -> None:
    """Hand what is buffered in ``process``'s pipes to their streams, without waiting."""
    for name, pipe in redirector.get_process_pipes(process):
        try:
            fd = pipe.fileno()
        except ValueError:  # closed already
            continue
        os.set_blocking(fd, False)  # a holder of the write end may never close it
        while True:
            try:
                data = os.read(fd, 65536)
            except OSError:  # BlockingIOError: nothing more for now
                break
            if not data:
                break
            redirector.redirect[name]({"data": data, "pid": process.pid, "name": name})


def _log_failure(future: Any) -> None:
    """A pass that failed is logged as circusd's own poll would log it; the next goes on."""
    error = future.exception()
    if error is not None:
        log.error("managing watchers after a child ended failed: %r", error)


def respawn_at_once(circusd: ModuleType) -> None:
    """Make circusd's ``main`` (module ``circus.circusd``) build arbiters that reap and
    respawn on SIGCHLD. Call before ``circusd.main()``."""
    base: type[Any] = circusd.Arbiter
    if getattr(base, "child_watch", False) is not False:
        return  # done already

    class PromptArbiter(base):  # type: ignore[misc]  # circus is untyped
        """circus' arbiter, plus a ChildWatch installed once its loop exists."""

        child_watch: ChildWatch | None = None

        def initialize(self) -> None:
            super().initialize()
            self.child_watch = ChildWatch(self)
            self.child_watch.install()

        def reap_processes(self) -> None:  # on SIGCHLD and at circus' own poll alike
            release_outputs(self)
            super().reap_processes()

    setattr(circusd, "Arbiter", PromptArbiter)  # noqa: B010  (the name circusd.main looks up)
