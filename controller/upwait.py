"""What stays of `tgfleet up` once the fleet is prepared: circusd, in this very process.

`tgfleet up` prepares everything (home, circus.ini, PostgreSQL, tokens), then
replaces itself (``os.execv``, same pid) with this module, which runs circusd's
own ``main`` here. No second process stays resident to wait for circusd (that
waiter cost a bare interpreter: 11 MB), nothing of what preparing imported stays
either, and Ctrl-C still stops the fleet in order: the controller first (so that
nothing reacts to bots going away), then circusd's ``quit`` stops every other
watcher at once (``ordered_stop``, from a thread: it speaks to circusd's control
socket like any client). A second Ctrl-C leaves it to circusd to stop everything
at once.

circusd itself runs through ``controller.circusd`` (as in a deployed unit), which
leaves out the modules it can do without.

circusd installs its own SIGINT/SIGTERM handlers (stop everything at once) when it
starts; ours take them back on its event loop's first turn. (After a `circusctl
restart` of the whole arbiter, circusd's are back: a stop then stops everything
at once, which still leaves nothing running.) SIGHUP from a closed terminal is
ignored (circusd would reload every watcher): the fleet runs on.

Once the API answers, the banner `tgfleet up` wrote is printed; with ``--demo``
the demo conversation follows, from a process of its own (``controller.demo``
imports what the controller does).

Usage (by `tgfleet up` only): python -m controller.upwait HOME HEALTHZ_URL BANNER [--demo]
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING, Any

from controller.circusd import leave_out_optional_modules
from controller.circusd import run as run_circusd

if TYPE_CHECKING:
    from controller.home import Home

API_WAIT_S = 90.0
POLL_S = 0.1
STOP_WAIT_S = 60.0
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def say(text: str) -> None:
    # OSError: the terminal is gone (SIGHUP is ignored), and stopping must go on.
    with contextlib.suppress(OSError):
        print(text, flush=True)


async def ordered_stop(home: Home, say: Callable[[str], None]) -> bool:
    """The controller first, so that nothing reacts to bots going away; then circusd quits,
    which stops every other watcher at once (bots, sandbox, PostgreSQL: bots hold no
    database connection, and one stop command per bot would run one after the other).
    False when circusd did not take it."""
    from controller.circus import CircusClient, SupervisorError

    client = CircusClient(home.circus_endpoint, timeout_s=10.0)
    try:
        statuses = await client.status()
        if statuses.get("controller") == "active":
            await client.call("stop", name="controller", waiting=True)
        await client.quit()
    except SupervisorError as exc:
        say(f"circusd did not take the ordered stop ({exc}); it stops everything at once")
        return False
    finally:
        client.close()
    return True


def api_answers(healthz_url: str) -> bool:
    """Whether the controller answers (liveness only: no token is sent). An https API
    is only connected to: this process has no ssl (``controller.circusd.OPTIONAL``), and real clients
    check its certificate anyway."""
    from controller import http1

    try:
        if healthz_url.startswith("https://"):
            _, host, port, _ = http1.split_url(healthz_url)
            with socket.create_connection((host, port), timeout=1.0):
                return True
        return http1.request("GET", healthz_url, timeout_s=1.0).status == 200
    except OSError:
        return False


class Resident:
    """circusd's process, plus the ordered stop and the banner."""

    def __init__(self, home_root: str, healthz_url: str, banner: str, demo: bool) -> None:
        self.home_root = home_root
        self.healthz_url = healthz_url
        self.banner = banner
        self.demo = demo
        self.stop_requested = threading.Event()
        self.finished = threading.Event()
        self.loop_running = False
        self.circus_handlers: dict[int, Any] = {}
        self.demo_proc: subprocess.Popen[bytes] | None = None

    # -- signals (main thread; flag and thread start only)

    def on_stop_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.stop_requested.is_set():  # a second Ctrl-C: no more patience
            circus = self.circus_handlers.get(signum)
            if callable(circus):
                circus(signum, frame)
            return
        self.stop_requested.set()
        if self.loop_running:
            self.start_ordered_stop()

    def take_signals_back(self) -> None:
        """On circusd's loop, once its own handlers are in place: ours again."""
        for signum in STOP_SIGNALS:
            self.circus_handlers[signum] = signal.signal(signum, self.on_stop_signal)
        signal.signal(signal.SIGHUP, lambda signum, frame: None)  # not SIG_IGN: bots inherit that
        self.loop_running = True
        if self.stop_requested.is_set():  # asked before circusd could take commands
            self.start_ordered_stop()

    def start_ordered_stop(self) -> None:
        threading.Thread(target=self.ordered_stop, name="ordered stop", daemon=True).start()

    def ordered_stop(self) -> None:
        say("stopping: the controller, then every bot, the sandbox and PostgreSQL…")
        import asyncio

        from controller.home import Home

        try:
            taken = asyncio.run(ordered_stop(Home.resolve(self.home_root), say))
        except Exception as exc:  # whatever it was, the fleet must still stop
            say(f"the ordered stop failed ({exc!r}); circusd stops everything at once")
            taken = False
        if not taken:
            circus = self.circus_handlers.get(signal.SIGTERM)
            if callable(circus):  # its own quit, thread-safe (tornado's add_callback_from_signal)
                circus(signal.SIGTERM, None)
        if not self.finished.wait(STOP_WAIT_S):
            say("circusd did not stop in time; killing it (its watchers' processes stay)")
            os.kill(os.getpid(), signal.SIGKILL)

    # -- the banner (its own thread)

    def announce(self) -> None:
        deadline = time.monotonic() + API_WAIT_S
        while time.monotonic() < deadline and not self.stop_requested.is_set():
            if api_answers(self.healthz_url):
                say(self.banner)
                if self.demo and not self.stop_requested.is_set():
                    self.demo_proc = subprocess.Popen(
                        [sys.executable, "-m", "controller.demo", self.home_root],
                        start_new_session=True,  # Ctrl-C is ours to handle, not its
                    )
                    self.demo_proc.wait()
                return
            time.sleep(POLL_S)

    # -- the whole life

    def run(self) -> int:
        for signum in STOP_SIGNALS:
            signal.signal(signum, self.on_stop_signal)
        # `tgfleet up` blocked them across the exec: one sent meanwhile is delivered now.
        # (Unblocked before circusd starts a watcher: children inherit the mask.)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, set(STOP_SIGNALS))
        leave_out_optional_modules()
        from circus import logger
        from circus.util import configure_logger
        from tornado.ioloop import IOLoop

        from controller.home import Home

        home = Home.resolve(self.home_root)
        os.chdir(home.root)
        IOLoop.current().add_callback(self.take_signals_back)
        threading.Thread(target=self.announce, name="banner", daemon=True).start()
        log = home.logs_dir / "circusd.log"
        configure_logger(logger, "info", str(log))  # what circusd says before its own set-up
        code: int = 0
        try:
            code = run_circusd(["--log-output", str(log), str(home.circus_ini)])
        except Exception as exc:  # circusd stopped its watchers at once and gave up
            say(f"circusd failed: {exc!r}; see {log}")
            code = 1
        finally:
            self.finished.set()
            demo = self.demo_proc
            if demo is not None and demo.poll() is None:
                demo.terminate()
                demo.wait()
        say("stopped")
        return code


def main(argv: list[str]) -> int:
    home_root, healthz_url, banner, *flags = argv
    return Resident(home_root, healthz_url, banner, demo="--demo" in flags).run()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
