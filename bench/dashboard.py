"""What a browser downloads for the dashboard: bytes of HTML, JS and CSS.

Run: .venv/bin/python bench/dashboard.py [--bots 3 10 100]

The controller's real aiohttp app (API and pages) over the shipped fakes
(InMemoryStore, FakeSupervisor), with N bots; a client logs in as a browser does
and fetches the fleet page, a bot's page and the static files they load. Printed
per page: its HTML (which carries the bots' JSON) plus the JS and CSS, raw and
gzip-compressed (the controller itself sends them uncompressed).
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import sys
import tempfile
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient, TestServer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from controller.api import build_app, hash_token
from controller.botfiles import BotFiles
from controller.buskeys import BusKeys
from controller.circus import FakeSupervisor
from controller.dashboard import add_dashboard
from controller.fleet import Fleet
from controller.home import Home
from controller.memstore import InMemoryStore

TOKEN = "tgf_bench-secret"


async def weigh(bots: int) -> dict[str, tuple[int, int]]:
    with tempfile.TemporaryDirectory() as tmp:
        home = Home(Path(tmp) / "home")
        for directory in (home.root, home.bots_d, home.bots_dir, home.logs_dir):
            directory.mkdir(parents=True, exist_ok=True)
        store = InMemoryStore()
        fleet = Fleet(
            store,
            FakeSupervisor(bots_d=home.bots_d),
            BotFiles(home, sys.executable, BusKeys.open(home)),
        )
        await store.ensure_token("admin", hash_token(TOKEN))
        spec = {"token": "1:abc", "plugins": ["botrunner.plugins.echo:setup"]}
        for n in range(bots):
            await store.create_bot(f"bot-{n:03d}", spec, "stopped", "bench")
            for e in range(40):
                await store.add_event(f"bot-{n:03d}", "note", "bench", f"event {e}", {})
        log = "\n".join(f"2026-11-25 21:00:{s:02d} INFO bot-000: line {s}" for s in range(60))
        (home.logs_dir / "bot-bot-000.err.log").write_text(log + "\n")
        app = build_app(fleet, store, home, lambda topic, event: None)
        add_dashboard(app)
        client: TestClient[Any, Any] = TestClient(TestServer(app, host="127.0.0.1"))
        await client.start_server()
        try:
            origin = str(client.make_url("")).rstrip("/")
            login = await client.post(
                "/login", data={"token": TOKEN}, headers={"Origin": origin}, allow_redirects=False
            )
            assert login.status == 303, await login.text()
            sizes = {}
            for path in ("/", "/bots/bot-000", "/static/dashboard.js", "/static/dashboard.css"):
                answer = await client.get(path)
                assert answer.status == 200, path
                body = await answer.read()
                sizes[path] = (len(body), len(gzip.compress(body)))
            return sizes
        finally:
            await client.close()
            await fleet.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bots", type=int, nargs="+", default=[3, 10, 100])
    args = parser.parse_args()
    for bots in args.bots:
        sizes = asyncio.run(weigh(bots))
        static = [sizes["/static/dashboard.js"], sizes["/static/dashboard.css"]]
        print(f"{bots} bots:")
        for path, (raw, packed) in sizes.items():
            print(f"  {path:24} {raw:8,d} B  (gzip {packed:7,d} B)")
        for page in ("/", "/bots/bot-000"):
            raw = sizes[page][0] + sum(s[0] for s in static)
            packed = sizes[page][1] + sum(s[1] for s in static)
            print(f"  page {page:19} {raw:8,d} B  (gzip {packed:7,d} B) HTML+JS+CSS")


if __name__ == "__main__":
    main()
