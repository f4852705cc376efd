"""Plugins: import them, call their ``setup(client, ctx)``, and account for their handlers.

A plugin is ``module:function``; the function is called as ``setup(client,
ctx)`` and may be sync or async. Setups run before the client connects (as in
any Telethon program, handlers are registered before ``start``): register
handlers there; call Telegram from handlers, not from setup. Every Telethon handler the client has after
the setups is re-registered wrapped, so that it is counted (``handled``,
``handler_errors``), its exceptions are logged and never kill the bot, and a
graceful stop can wait for the running ones to finish.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import inspect
import logging
import re
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from telethon import TelegramClient, errors, events, types

from botrunner.config import BotConfig, PluginRef
from botrunner.health import Counters, TelegramStatus
from botspec import protocol
from botspec.spec import TOPIC_PATTERN

log = logging.getLogger(__name__)

EventHandler = Callable[[protocol.Event], Awaitable[None] | None]
H = TypeVar("H", bound=EventHandler)
Setup = Callable[[TelegramClient, "PluginContext"], Awaitable[None] | None]

_WRAPPED = "__tgfleet_counted__"


class PluginFailed(Exception):
    """A plugin could not be imported or its setup raised: a config error, not a crash."""

    def __init__(self, ref: PluginRef, stage: str, cause: BaseException) -> None:
        self.ref = ref
        self.error = type(cause).__name__
        self.detail = f"{ref}: {stage} failed: {type(cause).__name__}: {cause}"
        super().__init__(self.detail)


class PluginContext:
    """What a plugin gets besides the client: its settings, a data dir, a logger, the bus."""

    def __init__(
        self,
        *,
        name: str,
        settings: dict[str, Any],
        data_dir: Path,
        log: logging.Logger,
        host: PluginHost,
    ) -> None:
        self.name = name
        self.settings = settings
        self.data_dir = data_dir
        self.log = log
        self._host = host

    async def publish(self, topic: str, data: Any) -> bool:
        """Publish ``data`` (any JSON) on the bus under ``topic``.

        Never waits: False when the controller is unreachable and the event was
        dropped. ValueError when the topic is not a valid name or data is not JSON.
        """
        return self._host.publish(topic, data)

    def on_event(self, topic: str) -> Callable[[H], H]:
        """Decorator: call the handler (sync or async) with each bus ``Event`` of ``topic``.

        Only topics in the bot's ``subscribe`` list are delivered.
        """

        def register(handler: H) -> H:
            self._host.add_event_handler(topic, handler)
            return handler

        return register


class PluginHost:
    """Owns the plugins' setups, their handlers' accounting, and bus event dispatch."""

    def __init__(
        self,
        config: BotConfig,
        counters: Counters,
        status: TelegramStatus,
        send_event: Callable[[str, Any], bool],
    ) -> None:
        self.config = config
        self.counters = counters
        self.status = status
        self._send_event = send_event
        self._setups: list[tuple[PluginRef, Setup]] = []
        self._event_handlers: dict[str, list[EventHandler]] = {}
        self._bus_tasks: set[asyncio.Task[None]] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._accepting = True

    # ---------------------------------------------------------------- loading

    def import_all(self) -> None:
        """Import every plugin's setup function; PluginFailed on the first that fails."""
        refs = [PluginRef.parse(plugin) for plugin in self.config.plugins]
        if any(ref.module not in sys.modules for ref in refs):
            # A bot forked from the fork server inherits its directory listings: a plugin
            # added on disk since must be found (importlib's own advice for new files).
            importlib.invalidate_caches()
        for ref in refs:
            try:
                module = importlib.import_module(ref.module)
                setup = getattr(module, ref.function)
            # Importing runs arbitrary plugin code: any exception is that plugin's failure.
            except Exception as exc:
                raise PluginFailed(ref, "import", exc) from exc
            if not callable(setup):
                raise PluginFailed(ref, "import", TypeError(f"{ref.function} is not callable"))
            self._setups.append((ref, setup))

    async def setup_all(self, client: TelegramClient) -> None:
        """Call every setup in order, then wrap the handlers they registered."""
        for ref, setup in self._setups:
            ctx = PluginContext(
                name=self.config.name,
                settings=dict(self.config.settings),
                data_dir=Path(self.config.data_dir),
                log=logging.getLogger(f"plugin.{ref.module}"),
                host=self,
            )
            try:
                result = setup(client, ctx)
                if inspect.isawaitable(result):
                    await result
            # A setup is plugin code: whatever it raises is that plugin's failure.
            except Exception as exc:
                raise PluginFailed(ref, "setup", exc) from exc
        self.wrap_handlers(client)

    # ---------------------------------------------------------------- Telethon handlers

    def wrap_handlers(self, client: TelegramClient) -> int:
        """Re-register every not yet wrapped handler, in order, wrapped. Returns how many."""
        registered = list(client.list_event_handlers())
        if all(getattr(cb, _WRAPPED, False) for cb, _ in registered):
            return 0
        wrappers: dict[Any, Any] = {}
        for callback, _ in registered:
            client.remove_event_handler(callback)
        for callback, builder in registered:
            if getattr(callback, _WRAPPED, False):
                client.add_event_handler(callback, builder)
                continue
            if callback not in wrappers:
                wrappers[callback] = self._wrap(callback)
            client.add_event_handler(wrappers[callback], builder)
        return len(wrappers)

    def _wrap(self, callback: Callable[[Any], Any]) -> Callable[[Any], Awaitable[None]]:
        # updated=(): do not copy the callback's __dict__ (Telethon's own markers).
        @functools.wraps(callback, updated=())
        async def counted(event: Any) -> None:
            await self._run_handler(callback, event)

        setattr(counted, _WRAPPED, True)
        return counted

    async def _run_handler(self, callback: Callable[[Any], Any], event: Any) -> None:
        self._enter()
        try:
            result = callback(event)
            if inspect.isawaitable(result):
                await result
        except (events.StopPropagation, errors.AlreadyInConversationError):
            self.counters.handled += 1
            raise  # Telethon's own control flow
        except errors.FloodWaitError as exc:
            self.counters.handler_errors += 1
            self.status.note_flood_wait(float(exc.seconds))
            log.warning("handler %s: %s", _name(callback), exc)
        # A handler's failure is logged and counted; it must never stop the bot.
        except Exception:
            self.counters.handler_errors += 1
            log.exception("handler %s failed", _name(callback))
        else:
            self.counters.handled += 1
        finally:
            self._exit()

    def track_updates(self, client: TelegramClient) -> None:
        """Note the time of every update (for ``last_update_age_s``), and count the new
        messages among them that are not the bot's own (``messages_in``)."""

        async def note_update(update: Any) -> None:
            self.status.note_update()
            if is_incoming_message(update):
                self.counters.messages_in += 1

        setattr(note_update, _WRAPPED, True)
        client.add_event_handler(note_update, events.Raw)

    def stop_taking_updates(self, client: TelegramClient) -> None:
        """Unregister every handler and refuse new bus events (the first step of a stop)."""
        self._accepting = False
        for callback, _ in list(client.list_event_handlers()):
            client.remove_event_handler(callback)

    # ---------------------------------------------------------------- the bus

    def publish(self, topic: str, data: Any) -> bool:
        if not isinstance(topic, str) or not re.fullmatch(TOPIC_PATTERN, topic):
            raise ValueError(f"topic {topic!r} is not a valid name ([A-Za-z0-9_.:-], 1 to 64)")
        return self._send_event(topic, data)

    def add_event_handler(self, topic: str, handler: EventHandler) -> None:
        if topic not in self.config.subscribe:
            log.warning(
                "a handler for bus topic %r is registered, but the bot does not subscribe to it "
                "(subscribe: %s); it will not be called",
                topic,
                list(self.config.subscribe),
            )
        self._event_handlers.setdefault(topic, []).append(handler)

    def dispatch(self, event: protocol.Event) -> int:
        """Start the handlers of ``event.topic``, each in its own owned task; returns how many."""
        if not self._accepting:
            return 0
        handlers = self._event_handlers.get(event.topic, [])
        for handler in handlers:
            task = asyncio.create_task(self._run_handler(handler, event))
            self._bus_tasks.add(task)
            task.add_done_callback(self._bus_tasks.discard)
        return len(handlers)

    # ---------------------------------------------------------------- draining

    def _enter(self) -> None:
        self.counters.running += 1
        self._idle.clear()

    def _exit(self) -> None:
        self.counters.running -= 1
        if self.counters.running == 0:
            self._idle.set()

    async def drain(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for running handlers; True if all finished in time.

        Bus event handlers still running after that are cancelled (Telethon's
        are cancelled by its disconnect).
        """
        try:
            await asyncio.wait_for(self._idle.wait(), max(0.0, timeout_s))
            finished = True
        except TimeoutError:
            finished = False
            log.warning(
                "stop: %d handler(s) still running after %.1f s; they will be cancelled",
                self.counters.running,
                timeout_s,
            )
        leftovers = list(self._bus_tasks)
        for task in leftovers:
            task.cancel()
        if leftovers:
            await asyncio.wait(leftovers)
        return finished


_NEW_MESSAGE_UPDATES = (types.UpdateNewMessage, types.UpdateNewChannelMessage)


def is_incoming_message(update: Any) -> bool:
    """A new message someone else sent (Telethon hands short updates over in this form)."""
    return (
        isinstance(update, _NEW_MESSAGE_UPDATES)
        and isinstance(update.message, types.Message)
        and not update.message.out
    )


def _name(callback: Any) -> str:
    module = getattr(callback, "__module__", "?")
    return f"{module}.{getattr(callback, '__qualname__', repr(callback))}"
