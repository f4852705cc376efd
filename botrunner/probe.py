"""The probe: ask Telegram something cheap, on a schedule, under a timeout.

Its answer (or silence) is what heartbeats report as ``telegram.connected``;
Telethon's own ``is_connected()`` stays True during its reconnects and while
the peer is silent, and its keepalive takes minutes to notice a blackhole.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from telethon import TelegramClient, errors, functions

from botrunner.health import TelegramStatus
from botrunner.telegram import AuthRejected, FloodWait, call_reporting_flood, classify, describe

log = logging.getLogger(__name__)

#: Unanswered probes in a row after which the connection is dropped and made again.
RECONNECT_AFTER_FAILURES = 2

ProbeResult = AuthRejected | bool  # True: Telegram answered; False: it could not be reached


async def probe_once(
    client: TelegramClient, status: TelegramStatus, timeout_s: float
) -> ProbeResult:
    """Send ``updates.getState`` and record the outcome in ``status``."""
    try:
        await asyncio.wait_for(
            call_reporting_flood(client, functions.updates.GetStateRequest()), timeout_s
        )
    except TimeoutError:
        status.mark_disconnected(f"probe: no answer to updates.getState within {timeout_s:g} s")
        return False
    except errors.RPCError as exc:
        # Telegram answered, so the connection works; say what it answered.
        outcome = classify(exc)
        if isinstance(outcome, AuthRejected):
            status.mark_disconnected(f"probe: {outcome.error}")
            return outcome
        status.mark_connected()
        if isinstance(outcome, FloodWait):
            status.note_flood_wait(outcome.seconds)
        else:
            status.last_error = f"probe: {outcome.error}"
        return True
    # Anything else (ConnectionError, OSError, Telethon's buffer and security
    # errors) means we could not talk to Telegram; report it, never crash on it.
    except Exception as exc:
        status.mark_disconnected(f"probe: {describe(exc)}")
        return False
    status.mark_connected()
    return True


async def run_probe(
    client: TelegramClient,
    status: TelegramStatus,
    interval_s: float,
    timeout_s: float,
    on_rejected: Callable[[AuthRejected], None],
    on_unreachable: Callable[[], None],
) -> None:
    """Probe every ``interval_s`` until cancelled.

    Rejected credentials go to ``on_rejected``; after RECONNECT_AFTER_FAILURES
    unanswered probes in a row, ``on_unreachable`` is called (once per streak).
    """
    failures = 0
    while True:
        await asyncio.sleep(interval_s)
        was_connected = status.connected
        result = await probe_once(client, status, timeout_s)
        if was_connected and not status.connected:
            log.warning("telegram: disconnected (%s)", status.last_error)
        elif status.connected and not was_connected:
            log.info("telegram: connected again")
        if isinstance(result, AuthRejected):
            on_rejected(result)
        failures = 0 if result is not False else failures + 1
        if failures == RECONNECT_AFTER_FAILURES:
            on_unreachable()
