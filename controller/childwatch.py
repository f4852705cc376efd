"""circusd respawns a dead child at once: on SIGCHLD, not at its next ``check_delay`` poll.

Circus finds dead processes by polling: every ``check_delay`` its arbiter's
``manage_watchers`` reaps (``waitpid(-1, WNOHANG)``) and spawns what is missing, so a
bot killed -9 waits up to ``check_delay`` (on average half of it) before it is even
noticed. Here circusd's arbiter also runs that same pass as soon as a child of
circusd ends: the kernel's SIGCHLD, handled on circusd's own event loop (asyncio's
signal handling: the C handler only wakes the loop; the pass runs there, in order
with every command).

Coalesced: signals that arrive while a pass is pending make no second one. Circus
runs one command at a time (its arbiter lock): while another command holds it (a
reloadconfig, a watcher's graceful stop), the pass is tried again every
``BUSY_RETRY_S`` until the lock is free. The poll stays, as the safety net for
anything a signal does not tell (a watcher whose processes circusd must add for
another reason); it can be slow (less CPU at many children) since deaths no longer
wait for it.

A crash-looping bot is then respawned as fast as it dies, not once per poll: the
controller's crash accounting (``health.assess``: more than ``max_restarts`` exits
within ``restart_window_s``, then failed and its watcher stopped) bounds the loop.

Used by ``controller.circusd`` (one call before circusd's ``main``); nothing is
imported here at import time beyond the standard library.
"""

from __future__ import annotations

import logging
import signal
from types import ModuleType
from typing import Any

log = logging.getLogger("circus")

#: While another circusd command holds the arbiter lock, the pass is tried this often.
BUSY_RETRY_S = 0.05


class ChildWatch:
    """Runs the arbiter's ``manage_watchers`` on circusd's loop when a child ends."""

    def __init__(self, arbiter: Any) -> None:
        self.arbiter = arbiter
        self.pending = False  # a pass is scheduled and has not begun

    def install(self) -> None:
        """Handle SIGCHLD on the arbiter's asyncio loop (main thread, before it runs)."""
        self.arbiter.loop.asyncio_loop.add_signal_handler(signal.SIGCHLD, self.child_ended)

    def child_ended(self) -> None:
        """A child of circusd changed state: one pass soon, however many signals came."""
        if self.pending:
            return
        self.pending = True
        self.arbiter.loop.add_callback(self.run_pass)

    def run_pass(self) -> None:
        arbiter = self.arbiter
        if arbiter._stopping:
            self.pending = False  # circusd stops its watchers itself
            return
        if arbiter._exclusive_running_command is not None or arbiter._restarting:
            arbiter.loop.call_later(BUSY_RETRY_S, self.run_pass)
            return
        # A child that ends from here on asks for a pass of its own.
        self.pending = False
        arbiter.loop.add_future(arbiter.manage_watchers(), _log_failure)


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

    setattr(circusd, "Arbiter", PromptArbiter)  # noqa: B010  (the name circusd.main looks up)
