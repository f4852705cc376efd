"""Moving a bot between two hosts on one PostgreSQL: how long it takes, and how long it is down.

Run: .venv/bin/python bench/move.py [--moves N]
Two `tgfleet up` (alpha with the embedded PostgreSQL, beta on alpha's database), one
sandbox, one echo bot moved back and forth N times with `PATCH {"host": …}` sent to
the host it leaves. Prints, per move (median and max):
- PATCH → the old host records `stopping` (PostgreSQL's clock: how fast the owner hears
  of a change made through the API, LISTEN/NOTIFY);
- the old host records it stopped → the new host holds it (the handover itself);
- PATCH → running on the new host, as an API client polling sees it;
- the bot's downtime as the sandbox saw it: its old session's close → its new login;
- and the most sessions the bot had at once (must be 1).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import time
from datetime import datetime
from pathlib import Path

from _fleet import Fleet, Sandbox, echo_spec, median_max, short_tmpdir, wait_for

_LINE = re.compile(
    r"^(\S+ \S+) sandbox INFO conn (\d+) from \S+ account (\d+): (logged in|closed)", re.M
)


def sandbox_sessions(sandbox: Sandbox, account: int) -> list[tuple[datetime, str, str]]:
    """(when, conn, 'logged in'|'closed') of ``account``, from the sandbox's log."""
    text = (sandbox.data.parent / "sandbox.log").read_text(errors="replace")
    found = []
    for at, conn, who, what in _LINE.findall(text):
        if int(who) == account:
            found.append((datetime.strptime(at, "%Y-%m-%d %H:%M:%S,%f"), conn, what))
    return found


def start_pair(root: Path, sandbox: Sandbox, fleets: list[Fleet]) -> tuple[Fleet, Fleet]:
    """alpha (the embedded PostgreSQL), then beta on alpha's database; ``fleets`` gets
    each as it starts, in the order to stop them (beta first: alpha runs the database)."""
    for name in ("alpha", "beta"):
        (root / name).mkdir(mode=0o755)
    alpha, beta = Fleet.create(root / "alpha"), Fleet.create(root / "beta")
    alpha.env = {"TGFLEET_HOST": "alpha"}
    fleets.append(alpha)
    alpha.start()
    dsn = json.loads(alpha.home.controller_json.read_text())["database_url"]
    beta.env = {"TGFLEET_HOST": "beta", "TGFLEET_DATABASE_URL": dsn}
    beta.home.root.mkdir(mode=0o700)
    for path in ("secret_key", "admin_token"):
        shutil.copy2(getattr(alpha.home, path), getattr(beta.home, path))
    fleets.insert(0, beta)
    beta.start()
    alpha.api("PUT", "/api/v1/defaults", {"telegram": sandbox.telegram_defaults()})
    return alpha, beta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--moves", type=int, default=6)
    args = parser.parse_args()
    root = short_tmpdir("tgfv")
    sandbox = Sandbox.start(root / "sandbox")
    fleets: list[Fleet] = []
    heard, handover, running, down = [], [], [], []
    most = 0
    try:
        alpha, beta = start_pair(root, sandbox, fleets)
        token = sandbox.create_bot("mover")
        alpha.api("POST", "/api/v1/bots", echo_spec("mover", token))
        wait_for("mover on alpha", lambda: alpha.bot("mover")["state"] == "running", 60)
        account = int(token.split(":")[0])
        here, there = alpha, beta
        for _ in range(args.moves):
            target = "beta" if there is beta else "alpha"
            before = len(sandbox_sessions(sandbox, account))
            started = time.monotonic()
            patched = here.api("PATCH", "/api/v1/bots/mover", {"host": target})
            wait_for(
                f"mover running on {target}",
                lambda there=there: (
                    (bot := there.bot("mover"))["local"] and bot["state"] == "running"
                ),
                timeout=60,
                every=0.02,
            )
            running.append(time.monotonic() - started)
            events = here.api("GET", "/api/v1/bots/mover/events?limit=1000")["events"]
            moved = next(
                e for e in reversed(events) if e["kind"] == "updated" and "moved" in e["data"]
            )
            stopping = next(
                e for e in events if e["id"] > moved["id"] and e["to_state"] == "stopping"
            )
            heard.append(
                (
                    datetime.fromisoformat(stopping["at"]) - datetime.fromisoformat(moved["at"])
                ).total_seconds()
            )
            stopped = next(
                e for e in events if e["id"] > moved["id"] and e["to_state"] == "stopped"
            )
            taken = next(
                e
                for e in events
                if e["id"] > moved["id"] and e["kind"] == "host" and "held_by" in e["data"]
            )
            handover.append(
                (
                    datetime.fromisoformat(taken["at"]) - datetime.fromisoformat(stopped["at"])
                ).total_seconds()
            )
            assert patched["version"] == moved["data"]["version"]

            def since_patch(before: int = before) -> list[tuple[datetime, str, str]] | None:
                found = sandbox_sessions(sandbox, account)[before:]
                return found if any(what == "logged in" for _, _, what in found) else None

            new = wait_for("the new session in the sandbox's log", since_patch)
            closed = next(at for at, _, what in new if what == "closed")
            login = next(at for at, _, what in new if what == "logged in")
            down.append((login - closed).total_seconds())
            here, there = there, here
        live: set[str] = set()
        for _, conn, what in sandbox_sessions(sandbox, account):
            if what == "logged in":
                live.add(conn)
            else:
                live.discard(conn)
            most = max(most, len(live))
    finally:
        for fleet in fleets:
            try:
                fleet.stop()
            finally:
                fleet.kill_leftovers()
        sandbox.stop()
        shutil.rmtree(root, ignore_errors=True)
    print(f"PATCH → old host records stopping (DB clock): {median_max(heard)}")
    print(f"old host records stopped → new host holds it (DB clock): {median_max(handover)}")
    print(f"PATCH → running on the new host (client):    {median_max(running)}")
    print(f"down in the sandbox (old close → new login): {median_max(down)}")
    print(f"most sessions of the bot at once: {most} (must be 1)")


if __name__ == "__main__":
    main()
