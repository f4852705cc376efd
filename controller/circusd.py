"""tgfleet's circusd: circus' own ``main``, run in a process tgfleet prepared.

Every way of running a fleet starts circusd through here: `tgfleet up` (its
process becomes ``controller.upwait``, which calls :func:`run`) and a deployed
unit (``python -m controller.circusd --log-output - CONFIG``, deploy/ansible).
What tgfleet adds to circusd's process is added here, once, for both.

circusd is started without the modules it can do without (``OPTIONAL``): ssl
(asyncio and tornado take it when there, and circusd serves no TLS), PyYAML
(logger configs in YAML) and curses (coloured terminal logs): 5.5 MB of its RSS.
"""

from __future__ import annotations

import sys

from controller.childwatch import respawn_at_once

#: Imported by circusd's libraries only if present, and used by none of what we run
#: (no TLS, no YAML logger config, no terminal colours): kept out of its process.
OPTIONAL = ("ssl", "yaml", "curses")


def leave_out_optional_modules() -> None:
    """Make ``OPTIONAL`` unimportable here: each importer then takes its fallback."""
    for name in OPTIONAL:
        if name not in sys.modules:
            sys.modules[name] = None  # type: ignore[assignment]  # "not installed"


def run(argv: list[str]) -> int:
    """circusd with ``argv`` (its own command line, without the program name), in this
    process; returns its exit code once it quits."""
    leave_out_optional_modules()
    from circus import circusd

    respawn_at_once(circusd)  # a dead child is reaped and respawned on SIGCHLD
    from controller.keeper import start_keeper

    start_keeper(argv)  # as root: the controller's privileged operations, from a thread

    sys.argv = ["circusd", *argv]
    try:
        circusd.main()  # returns when circusd quits (sys.exit(0))
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    return 0


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
