"""One bot's life in three phases: startup, main loop, shutdown.

- startup: bus up (heartbeats flow from the first second), plugins imported
  and set up (before connecting, so that their handlers see the first
  update), Telegram logged in (retrying with back-off, reported in
  heartbeats), ``ready`` sent.
- main loop: wait for a signal, or for a side task (heartbeat, bus receiver,
  probe, Telegram keeper) to die, which is a bug: the bot then stops cleanly
  with exit code 1 instead of limping on.
- shutdown: stop taking updates, let running handlers finish (bounded), send
  ``stopping``, disconnect Telegram (bounded), close the bus.

Rejected credentials and broken plugins are not crashes but config errors:
the bot sends ``fatal``, drops its Telegram connection, and idles until
SIGTERM so that Circus does not respawn it in a loop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sqlite3
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from telethon import TelegramClient

from botrunner import ExitCode
from botrunner.alive import alive_record, write_alive
from botrunner.bus import BusClient
from botrunner.config import BotConfig
from botrunner.health import Clock, Counters, TelegramStatus
from botrunner.plugin_host import PluginFailed, PluginHost
from botrunner.probe import RECONNECT_AFTER_FAILURES, run_probe
from botrunner.telegram import (
    AuthRejected,
    CountingClient,
    Login,
    build_client,
    describe,
    ensure_data_dir,
    open_session,
    pending_flood_wait_until,
    save_update_state,
    update_state,
)
from botspec import procinfo, protocol

log = logging.getLogger(__name__)

# What the shutdown keeps back from graceful_timeout_s for sending ``stopping``,
# disconnecting and closing the bus after the handlers have drained.
SHUTDOWN_RESERVE_S = 1.0
BUS_LINGER_S = 0.3
DISCONNECT_TIMEOUT_S = 3.0
# How long ready, fatal and stopping wait for a controller that is not connected yet.
DELIVER_TIMEOUT_S = 1.0


class SideTasks:
    """The runner's background tasks. Each has a name; any that ends on its own is a failure."""

    def __init__(self, on_failure: Callable[[], None]) -> None:
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._on_failure = on_failure
        self.failure: str | None = None

    def start(self, name: str, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks[name] = task
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or self.failure is not None:
            return
        exc = task.exception()
        what = "returned" if exc is None else f"died: {describe(exc)}"
        self.failure = f"side task {task.get_name()} {what}"
        log.error("%s", self.failure, exc_info=exc)
        self._on_failure()

    async def cancel(self, *names: str) -> None:
        """Cancel the named tasks (all when no name is given) and wait for them to end."""
        chosen = [
            task
            for name, task in self._tasks.items()
            if (not names or name in names) and task is not asyncio.current_task()
        ]
        for task in chosen:
            task.remove_done_callback(self._done)
            task.cancel()
        if chosen:
            await asyncio.wait(chosen)
        for task in chosen:
            if not task.cancelled() and task.exception() is not None:
                log.error("side task %s failed while stopping", task.get_name())


class Runner:
    """Runs one bot from its config until a signal; ``run()`` returns the exit code."""

    def __init__(
        self,
        config: BotConfig,
        started_monotonic: float,
        clock: Clock | None = None,
        alive_file: Path | None = None,
    ):
        self.config = config
        # Rewritten at every heartbeat for a supervisor's probe (botrunner/alive.py).
        self.alive_file = alive_file
        self.clock = clock or Clock()
        self.started_monotonic = started_monotonic
        self.status = TelegramStatus(self.clock)
        self.counters = Counters()
        self.sender = protocol.Sender(config.name, os.getpid(), config.generation, self.clock.wall)
        self.fatal: protocol.FatalInfo | None = None
        self.client: TelegramClient | None = None
        self.login: Login | None = None
        self._attention = asyncio.Event()
        self._relogin = asyncio.Event()  # the probe's credentials were refused
        self._reconnect = asyncio.Event()  # the probe got no answer, repeatedly
        self._stop_reason: str | None = None
        self._side = SideTasks(self._attention.set)
        self._bus: BusClient | None = None
        self._host: PluginHost | None = None
        self._seq = 0

    # ---------------------------------------------------------------- the whole life

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.request_stop, signal.Signals(signum).name)
        try:
            return await self._run()
        finally:
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)

    def request_stop(self, reason: str) -> None:
        """Ask for a graceful stop (what the signal handlers do; nothing else)."""
        if self._stop_reason is None:
            self._stop_reason = reason
        self._attention.set()

    async def _run(self) -> int:
        config = self.config
        ensure_data_dir(Path(config.data_dir))
        self._bus = BusClient(
            config.bus_endpoint, config.name, config.bus_secret_key, config.bus_server_key
        )
        self._host = PluginHost(config, self.counters, self.status, self._send_event)
        self._side.start("heartbeat", self._heartbeat_loop(self._bus))
        self._side.start("bus-receiver", self._receive_loop(self._bus, self._host))
        startup = asyncio.create_task(self._startup(self._host), name="startup")
        startup.add_done_callback(lambda _: self._attention.set())
        exit_code: ExitCode = ExitCode.OK
        while True:
            await self._attention.wait()
            self._attention.clear()
            if self._stop_reason is not None:
                reason = self._stop_reason
                break
            if self._side.failure is not None:
                reason, exit_code = self._side.failure, ExitCode.FAILURE
                break
            crash = startup.exception() if startup.done() and not startup.cancelled() else None
            if crash is not None:
                log.error("startup failed: %s", describe(crash), exc_info=crash)
                reason, exit_code = f"startup failed: {describe(crash)}", ExitCode.FAILURE
                break
        await self._shutdown(startup, reason)
        return exit_code

    # ---------------------------------------------------------------- startup

    async def _startup(self, host: PluginHost) -> None:
        config = self.config
        self.client = build_client(config, open_session(config))
        # Plugins first, before the client connects: their handlers are in place
        # before the first update (and the catch-up of what came while we were
        # down) is dispatched, and a broken plugin never costs a Telegram login.
        try:
            host.import_all()
            await host.setup_all(self.client)
        except PluginFailed as failed:
            await self._go_fatal(protocol.FatalInfo("plugin", failed.error, failed.detail))
            return
        host.track_updates(self.client)
        self.login = Login(config, self.client, self.status)
        try:
            me = await self.login.until_logged_in()
        except AuthRejected as rejected:
            await self._go_fatal(protocol.FatalInfo("auth", rejected.error, rejected.detail))
            return
        log.info("telegram: logged in as %s (id %s)", me.me_username, me.me_id)
        health = config.health
        self._side.start(
            "probe",
            run_probe(
                self.client,
                self.status,
                health.probe_interval_s,
                health.probe_timeout_s,
                on_rejected=lambda _: self._relogin.set(),
                on_unreachable=self._reconnect.set,
            ),
        )
        self._side.start("telegram-keeper", self._keep_logged_in(self.login))
        self._side.start("checkpoint", self._checkpoint_loop(self.client))
        startup_s = round(procinfo.process_age_s(self.started_monotonic), 3)
        await self._deliver(
            protocol.Ready(**self.sender.envelope(), telegram=me, startup_s=startup_s),
            DELIVER_TIMEOUT_S,
        )
        log.info("ready in %.2f s with plugins %s", startup_s, list(config.plugins))

    async def _go_fatal(self, info: protocol.FatalInfo) -> None:
        """Report a config error, drop Telegram, and idle (heartbeats go on) until SIGTERM."""
        self.fatal = info
        log.error("fatal (%s): %s: %s; waiting for SIGTERM", info.kind, info.error, info.detail)
        await self._deliver(
            protocol.Fatal(
                **self.sender.envelope(), kind=info.kind, error=info.error, detail=info.detail
            ),
            DELIVER_TIMEOUT_S,
        )
        await self._side.cancel("probe", "checkpoint")
        self.status.mark_disconnected(f"fatal: {info.error}")
        await self._disconnect_telegram(DISCONNECT_TIMEOUT_S)

    # ---------------------------------------------------------------- side tasks

    async def _heartbeat_loop(self, bus: BusClient) -> None:
        interval = self.config.health.heartbeat_interval_s
        # The first heartbeat waits (briefly) for the connection to the controller.
        await bus.wait_connected(min(1.0, interval))
        while True:
            heartbeat = self._heartbeat()
            self._send(heartbeat)
            if self.alive_file is not None:
                self._write_alive(self.alive_file, heartbeat)
            await asyncio.sleep(interval)

    def _write_alive(self, path: Path, heartbeat: protocol.Heartbeat) -> None:
        record = alive_record(heartbeat.telegram, self.fatal is not None, self.clock.wall())
        try:
            write_alive(path, record)
        except OSError as exc:  # a full or read-only disk: the probe reports it, we go on
            log.warning("cannot write the alive file %s: %s", path, exc)

    def _heartbeat(self) -> protocol.Heartbeat:
        self._seq += 1
        telegram = self.status.snapshot()
        if self.client is not None:
            flood_until = pending_flood_wait_until(self.client)
            if flood_until is not None and flood_until > self.clock.wall():
                current = telegram.flood_wait_until or 0.0
                telegram = protocol.TelegramHealth(
                    connected=telegram.connected,
                    disconnected_since=telegram.disconnected_since,
                    last_error=telegram.last_error,
                    last_update_age_s=telegram.last_update_age_s,
                    flood_wait_until=max(current, flood_until),
                )
        return protocol.Heartbeat(
            **self.sender.envelope(),
            seq=self._seq,
            uptime_s=round(self.clock.monotonic() - self.started_monotonic, 3),
            rss_mb=procinfo.rss_mb() or 0.0,
            telegram=telegram,
            handled=self.counters.handled,
            handler_errors=self.counters.handler_errors,
            fatal=self.fatal,
            messages_in=self.counters.messages_in,
            messages_out=self.client.messages_sent
            if isinstance(self.client, CountingClient)
            else 0,
        )

    async def _checkpoint_loop(self, client: TelegramClient) -> None:
        """Save how far updates were handled, every heartbeat interval, when no handler
        runs: a bot restarted after a crash then catches up on exactly what it had not
        handled (a handler that was running when it died gets its update again)."""
        saved: Any = None  # the first pass saves at once: a new session has none on disk
        while True:
            state = update_state(client)
            if state != saved and not self.counters.running:
                try:
                    await save_update_state(client)
                    saved = state
                except sqlite3.Error as exc:  # the session file: retried next time, not fatal
                    log.warning("telegram: could not save the update state: %s", exc)
            await asyncio.sleep(self.config.health.heartbeat_interval_s)

    async def _receive_loop(self, bus: BusClient, host: PluginHost) -> None:
        while True:
            event = await bus.receive()
            if host.dispatch(event) == 0:
                log.debug("bus: no handler for topic %r", event.topic)

    async def _keep_logged_in(self, login: Login) -> None:
        """Connect and log in again when Telethon gives up reconnecting, when the
        probe gets no answer several times in a row (a silent peer: Telethon would
        wait minutes), or when the probe is refused (a token bot signs in again)."""
        client = login.client
        while True:
            lost = asyncio.ensure_future(client.disconnected)
            refused = asyncio.create_task(self._relogin.wait())
            unanswered = asyncio.create_task(self._reconnect.wait())
            waiters = {lost, refused, unanswered}
            try:
                await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in waiters:
                    waiter.cancel()
                await asyncio.wait(waiters)
                for waiter in waiters:  # mark outcomes as seen; the one that matters is read below
                    if not waiter.cancelled():
                        waiter.exception()
            self._relogin.clear()
            self._reconnect.clear()
            if lost.done() and not lost.cancelled():
                error = lost.exception()
                why = "Telethon gave up reconnecting" + (f": {describe(error)}" if error else "")
                self.status.mark_disconnected(why)
                await login.reset()
            elif unanswered.done() and not unanswered.cancelled():
                why = f"the probe got no answer {RECONNECT_AFTER_FAILURES} times in a row"
                await login.reset()
            else:
                why = f"credentials refused ({self.status.last_error})"
            log.warning("telegram: %s; logging in again", why)
            try:
                await login.until_logged_in()
            except AuthRejected as rejected:
                await self._go_fatal(protocol.FatalInfo("auth", rejected.error, rejected.detail))
                await asyncio.Event().wait()  # idle until cancelled by the shutdown
            log.info("telegram: logged in again")

    # ---------------------------------------------------------------- the bus

    def _send(self, message: protocol.Message) -> bool:
        assert self._bus is not None
        return self._bus.send(message)

    async def _deliver(self, message: protocol.Message, timeout_s: float) -> None:
        assert self._bus is not None
        if not await self._bus.deliver(message, timeout_s):
            log.warning("bus: %s not delivered: the controller is not connected", message.TYPE)

    def _send_event(self, topic: str, data: Any) -> bool:
        event = protocol.Event(**self.sender.envelope(), topic=topic, data=data)
        try:
            return self._send(event)
        except protocol.ProtocolError as exc:
            raise ValueError(str(exc)) from exc

    # ---------------------------------------------------------------- shutdown

    async def _shutdown(self, startup: asyncio.Task[None], reason: str) -> None:
        loop = asyncio.get_running_loop()
        graceful = self.config.graceful_timeout_s
        deadline = loop.time() + graceful - 0.2
        log.info("stopping: %s", reason)
        startup.cancel()
        await asyncio.wait({startup})  # its outcome, if it crashed, was read by _run
        await self._side.cancel("probe", "telegram-keeper", "bus-receiver")
        host = self._host
        assert host is not None
        if self.client is not None:
            host.stop_taking_updates(self.client)
        await host.drain(min(graceful - SHUTDOWN_RESERVE_S, deadline - loop.time()))
        await self._deliver(
            protocol.Stopping(**self.sender.envelope(), reason=reason),
            max(0.0, min(DELIVER_TIMEOUT_S, deadline - loop.time() - 0.5)),
        )
        await self._side.cancel()
        await self._disconnect_telegram(max(0.2, min(DISCONNECT_TIMEOUT_S, deadline - loop.time())))
        assert self._bus is not None
        self._bus.close(linger_s=max(0.0, min(BUS_LINGER_S, deadline - loop.time())))
        log.info("stopped")

    async def _disconnect_telegram(self, timeout_s: float) -> None:
        if self.client is None:
            return
        try:
            await asyncio.wait_for(self.client.disconnect(), timeout_s)
        except TimeoutError:
            log.warning("telegram: disconnect did not finish within %.1f s", timeout_s)
        except (ConnectionError, OSError) as exc:
            log.warning("telegram: disconnect failed: %s", describe(exc))
