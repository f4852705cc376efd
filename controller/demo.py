"""`tgfleet up --demo`: demo bots on the local Telegram, and a first conversation with them.

The controller seeds (``seed_demo``): it points the fleet's default Telegram at
the sandbox and creates the demo bots once. The `up` process then shows them
answering (``show_demo``), so a newcomer sees real bots work with no credentials.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from controller.client import ApiClient, ApiError, ApiUnreachable
from controller.errors import Conflict
from controller.fleet import Fleet
from controller.home import Home
from controller.settings import ControllerSettings, parse_hostport

log = logging.getLogger("tgfleet.demo")

#: name → settings of the echo plugin; each answers private messages in its own way.
DEMO_BOTS: dict[str, dict[str, Any]] = {
    "echo": {"prefix": "echo: "},
    "greeter": {"greeting": "Hello! You said:"},
    "parrot": {"prefix": "🦜 "},
}
ECHO_PLUGIN = "botrunner.plugins.echo:setup"
SANDBOX_WAIT_S = 60.0


def sandbox_username(name: str) -> str:
    return f"{name}_bot"


def sandbox_telegram(home: Home, settings: ControllerSettings) -> dict[str, Any]:
    assert settings.sandbox_listen is not None
    host, port = parse_hostport(settings.sandbox_listen, "sandbox listen")
    return {
        "api_id": 1,
        "api_hash": "sandbox",
        "server": {
            "host": host,
            "port": port,
            "dc_id": 2,
            "public_key": (home.sandbox_dir / "public.pem").read_text(encoding="utf-8"),
        },
    }


async def _sandbox_token(session: aiohttp.ClientSession, admin: str, name: str) -> str:
    async with session.get(f"http://{admin}/api/v1/bots/{name}") as answer:
        if answer.status == 200:
            return str((await answer.json())["token"])
    async with session.post(f"http://{admin}/api/v1/bots", json={"name": name}) as answer:
        answer.raise_for_status()
        return str((await answer.json())["token"])


async def _wait_for_sandbox(session: aiohttp.ClientSession, home: Home, admin: str) -> None:
    deadline = time.monotonic() + SANDBOX_WAIT_S
    while True:
        try:
            async with session.get(f"http://{admin}/healthz") as answer:
                if answer.status == 200 and (home.sandbox_dir / "public.pem").exists():
                    return
        except aiohttp.ClientError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"the sandbox's admin API at {admin} did not answer")
        await asyncio.sleep(0.2)


async def seed_demo(home: Home, settings: ControllerSettings, fleet: Fleet) -> None:
    """Point the fleet at the sandbox; create the demo bots the first time."""
    assert settings.sandbox_admin is not None
    admin = settings.sandbox_admin
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await _wait_for_sandbox(session, home, admin)
        defaults = await fleet.store.get_defaults()
        telegram = sandbox_telegram(home, settings)
        if defaults.get("telegram") != telegram:
            await fleet.set_defaults({**defaults, "telegram": telegram}, "demo")
            log.info("fleet default Telegram is now the sandbox at %s", settings.sandbox_listen)
        marker = home.root / "demo.seeded"
        if marker.exists():
            return
        for name, plugin_settings in DEMO_BOTS.items():
            token = await _sandbox_token(session, admin, name)
            body = {
                "name": name,
                "token": token,
                "plugins": [ECHO_PLUGIN],
                "settings": plugin_settings,
            }
            try:
                await fleet.create(body, "demo")
            except Conflict:
                log.info("demo bot %s exists already", name)
        marker.write_text(
            "the demo bots were created once; destroy them freely\n", encoding="utf-8"
        )
    await fleet.reconcile()


def _sandbox_say(admin: str, user: str, to: str, text: str, wait_s: float) -> str | None:
    """Send as a simulated user; the bot's first reply, or None."""
    base = f"http://{admin}/api/v1/users/{urllib.parse.quote(user)}/messages"
    request = urllib.request.Request(
        base,
        data=json.dumps({"to": to, "text": text}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        sent = json.loads(answer.read())
    query = urllib.parse.urlencode(
        {"peer": to, "after_id": sent["id"], "direction": "in", "wait": wait_s, "limit": 1}
    )
    with urllib.request.urlopen(f"{base}?{query}", timeout=wait_s + 10) as answer:
        messages = json.loads(answer.read())["messages"]
    return str(messages[0]["text"]) if messages else None


def show_demo(home: Home, settings: ControllerSettings, say: Callable[[str], None]) -> None:
    """Wait for the demo bots, then have a simulated user talk to each (printed)."""
    assert settings.sandbox_admin is not None
    client = ApiClient.discover(home)
    deadline = time.monotonic() + 60
    bots: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        try:
            bots = [
                b for b in client.request("GET", "/api/v1/bots")["bots"] if b["name"] in DEMO_BOTS
            ]
        except (ApiError, ApiUnreachable):
            bots = []
        # A pid and a live Telegram connection: the state alone may be last run's.
        if bots and all(b["state"] == "running" and b["telegram"]["connected"] for b in bots):
            break
        time.sleep(0.2)
    else:
        say("demo: the demo bots are not all running yet; see `tgfleet bots list`")
        return
    say(
        f"demo: {len(bots)} bots running on the local Telegram sandbox (127.0.0.1, no credentials):"
    )
    for bot in bots:
        to = sandbox_username(bot["name"])
        try:
            reply = _sandbox_say(settings.sandbox_admin, "alice", to, "hi there", 15)
        except (urllib.error.URLError, OSError, KeyError) as exc:
            say(f"  alice → @{to}: could not talk to it ({exc})")
            continue
        say(f"  alice → @{to}: hi there    @{to} → alice: {reply or '(no answer within 15 s)'}")
    tgfleet = Path(sys.executable).parent / "tgfleet"
    say(f'  talk to them yourself: {tgfleet} sandbox send echo_bot "hello"')


if __name__ == "__main__":
    # `tgfleet up --demo` runs this once the API answers (controller/upwait.py):
    # python -m controller.demo HOME
    _home = Home.resolve(sys.argv[1])
    show_demo(_home, ControllerSettings.load(_home), lambda text: print(text, flush=True))
