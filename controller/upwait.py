"""What stays of `tgfleet up` once the fleet runs: wait for circusd, stop it in order.

`tgfleet up` prepares everything (home, circus.ini, PostgreSQL, tokens), starts
circusd, waits for the API, then replaces itself (``os.execv``, same pid, circusd
still its child) with this module, which imports nothing beyond the standard
library while it waits: the resident `tgfleet up` costs a bare interpreter
instead of the ~45 MB of what preparing needed. On Ctrl-C or SIGTERM it stops the
fleet in order (``controller.up.ordered_stop``, imported only then).

Usage (by `tgfleet up` only): python -m controller.upwait CIRCUSD_PID HOME
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time

POLL_S = 0.2
STOP_WAIT_S = 60.0


def say(text: str) -> None:
    print(text, flush=True)


def _exited(pid: int) -> int | None:
    """circusd's exit code once it has exited (it is our child), else None."""
    done, status = os.waitpid(pid, os.WNOHANG)
    if done == 0:
        return None
    return os.waitstatus_to_exitcode(status)


def _wait(pid: int, timeout_s: float) -> int | None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        code = _exited(pid)
        if code is not None:
            return code
        time.sleep(POLL_S)
    return None


def main(argv: list[str]) -> int:
    circusd, home_root = int(argv[0]), argv[1]
    stop_requested = False

    def request_stop(signum: int, frame: object) -> None:
        nonlocal stop_requested
        if stop_requested:  # a second Ctrl-C: no more patience
            with contextlib.suppress(ProcessLookupError):
                os.killpg(circusd, signal.SIGKILL)
        stop_requested = True

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, request_stop)
    # `tgfleet up` blocked them across the exec: one sent meanwhile is delivered now.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    code = _exited(circusd)
    while code is None and not stop_requested:
        time.sleep(POLL_S)
        code = _exited(circusd)
    if code is not None:
        say(f"circusd exited with code {code}; see {home_root}/logs/circusd.log")
        return code or 1

    say("stopping: the controller, then every bot, the sandbox and PostgreSQL…")
    import asyncio

    from controller.home import Home
    from controller.up import ordered_stop

    asyncio.run(ordered_stop(Home.resolve(home_root), say))
    if _wait(circusd, STOP_WAIT_S) is None:
        say("circusd did not exit in time; killing what is left")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(circusd, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(circusd, 0)
    say("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
