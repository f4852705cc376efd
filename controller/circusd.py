"""tgfleet's circusd: circus' own ``main``, run in a process tgfleet prepared.

Every way of running a fleet starts circusd through here: `tgfleet up` (its
process becomes ``controller.upwait``, which calls :func:`run`) and a deployed
unit (``python -m controller.circusd --log-output - CONFIG``, deploy/ansible).
What tgfleet adds to circusd's process is added here, once, for both.

circusd is started without the modules it can do without (``OPTIONAL``): ssl
(asyncio and tornado take it when there, and circusd serves no TLS), PyYAML
(logger configs in YAML), curses (coloured terminal logs) and ctypes (a setgid
fallback for Python 2.6): 5.8 MB of its RSS.
"""

from __future__ import annotations

import logging
import sys
from types import ModuleType
from typing import Any

from controller.appendfile import unbuffered_streams
from controller.childwatch import respawn_at_once

#: Imported by circusd's libraries only if present, and used by none of what we run
#: (no TLS, no YAML logger config, no terminal colours; ctypes: circus.process's
#: fallback for a setgid that Python 2.6 could not do): kept out of its process.
OPTIONAL = ("ssl", "yaml", "curses", "ctypes")

log = logging.getLogger("circus")


def leave_out_optional_modules() -> None:
    """Make ``OPTIONAL`` unimportable here: each importer then takes its fallback."""
    for name in OPTIONAL:
        if name not in sys.modules:
            sys.modules[name] = None  # type: ignore[assignment]  # "not installed"


def keep_in_arbiter(circusd: ModuleType, argv: list[str]) -> None:
    """Start the keeper and the gate (``controller.keeper.start_keeper``) in the process
    that runs circusd's arbiter, once, before its first watcher starts: from the first
    arbiter's ``initialize``. Not before ``circusd.main()``: with ``--daemon`` (the
    Ansible role's ``daemon`` service manager) circus forks twice and closes every file
    descriptor first, which would leave the daemon without their threads and sockets.
    An arbiter built again (circusd's restart) finds them running."""
    base: type[Any] = circusd.Arbiter
    started = False

    class KeepingArbiter(base):  # type: ignore[misc]  # circus is untyped
        """circus' arbiter, plus the keeper started with the first one."""

        def initialize(self) -> None:
            nonlocal started
            super().initialize()
            if not started:
                started = True
                from controller.keeper import start_keeper

                try:
                    start_keeper(argv)
                except Exception:
                    # circusd's main logs an exception from its arbiter's start and
                    # exits 0; a fleet whose controller can reach nothing must not.
                    log.exception("the keeper and the gate could not start: circusd quits")
                    raise SystemExit(1) from None

    setattr(circusd, "Arbiter", KeepingArbiter)  # noqa: B010  (the name circusd.main looks up)


def run(argv: list[str]) -> int:
    """circusd with ``argv`` (its own command line, without the program name), in this
    process; returns its exit code once it quits."""
    leave_out_optional_modules()
    from circus import circusd, process
    from circus.stream import file_stream

    respawn_at_once(circusd)  # a dead child is reaped and respawned on SIGCHLD
    unbuffered_streams(file_stream, process)  # ~17 KB less a watcher
    keep_in_arbiter(circusd, argv)  # as root: the controller's privileged operations

    sys.argv = ["circusd", *argv]
    try:
        circusd.main()  # returns when circusd quits (sys.exit(0))
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    return 0


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
