"""Several hosts, one PostgreSQL: two `tgfleet up` (two homes, two circusd, two
controllers with their own TGFLEET_HOST) on one real database, bots against one
sandbox. Each runs only its bots; a bot moved between them never runs on both, as the
sandbox itself saw it (its log of logins and closes per account); a host that dies
keeps its bots down until the operator forgets it."""

# ruff: noqa: F811  (pytest injects the imported fixtures by argument name)

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from harness import (
    EXTERNAL_DSN,
    Fleet,
    Sandbox,
    echo_spec,
    holds_for,
    kill_tree,
    sandbox_in_tmp,
    short_tmpdir,
    wait_for,
)
from pg_fixtures import fresh_database, postgres  # noqa: F401  (fixtures)

from controller.client import ApiError

pytestmark = pytest.mark.integration

#: "2026-11-25 21:05:00,123 sandbox INFO conn 7 from 127.0.0.1:4242 account 1000001: logged in"
_SESSION_LINE = re.compile(r"conn (\d+) from \S+ account (\d+): (logged in|closed)")


@pytest.fixture(scope="module")
def own_sandbox() -> Iterator[Sandbox]:
    """A sandbox of this module's own: its log holds only these tests' connections."""
    with sandbox_in_tmp("tgfh") as box:
        yield box


def sandbox_log(sandbox: Sandbox) -> str:
    return (sandbox.data.parent / "sandbox.log").read_text(errors="replace")


def sessions(log: str, account: int) -> tuple[int, int]:
    """(how many sessions ``account`` had, the most it had at once), from the sandbox's
    log: each connection counts from its login to its close, in the order the sandbox
    wrote them (one process, one log)."""
    live: set[str] = set()
    total = most = 0
    for conn, who, what in _SESSION_LINE.findall(log):
        if int(who) != account:
            continue
        if what == "logged in":
            live.add(conn)
            total += 1
            most = max(most, len(live))
        else:
            live.discard(conn)
    return total, most


@dataclass
class Pair:
    alpha: Fleet
    beta: Fleet

    def running_here(self, fleet: Fleet, name: str) -> dict[str, object] | None:
        """The bot as ``fleet`` shows it, once it runs there (its own process)."""
        bot = fleet.bot(name)
        ok = bot["state"] == "running" and bot["local"] and bot["pid"]
        return bot if ok else None


@pytest.fixture
def pair(own_sandbox: Sandbox, fresh_database: str) -> Iterator[Pair]:
    root = short_tmpdir("tgf2")
    for name in ("alpha", "beta"):
        (root / name).mkdir(mode=0o755)
    fleets = {name: Fleet.create(root / name) for name in ("alpha", "beta")}
    try:
        for name, fleet in fleets.items():
            fleet.env = {
                "TGFLEET_DATABASE_URL": fresh_database,
                "TGFLEET_HOST": name,
                "TGFLEET_HOST_FORGET_AFTER_S": "5",
            }
            if EXTERNAL_DSN is not None:
                fleet.database = fresh_database  # not one database each: this one, shared
            if name == "beta":  # the hosts share the key of the secrets and the admin token
                fleet.home.root.mkdir(mode=0o700)
                for path in ("secret_key", "admin_token"):
                    shutil.copy2(getattr(fleets["alpha"].home, path), getattr(fleet.home, path))
            fleet.start()
        fleets["alpha"].api(
            "PUT", "/api/v1/defaults", {"telegram": own_sandbox.telegram_defaults()}
        )
        yield Pair(fleets["alpha"], fleets["beta"])
    finally:
        for fleet in fleets.values():
            if fleet.proc is not None:
                try:
                    fleet.stop()
                finally:
                    fleet.kill_leftovers()
        shutil.rmtree(root, ignore_errors=True)


def watchers(fleet: Fleet) -> set[str]:
    return {line.split(":")[0] for line in fleet.circusctl("status").splitlines()}


def test_each_host_runs_only_its_bots_and_a_move_never_runs_a_bot_twice(
    pair: Pair, own_sandbox: Sandbox
) -> None:
    shop_token = own_sandbox.create_bot("hshop")
    news_token = own_sandbox.create_bot("hnews")
    # Both created through alpha's API; news is placed on beta (with the CLI, as a user).
    pair.alpha.api("POST", "/api/v1/bots", echo_spec("hshop", shop_token, prefix="alpha: "))
    plugin = "botrunner.plugins.echo:setup"
    pair.alpha.cli("bots", "create", "hnews", "--token", news_token, "--plugin", plugin, "--host", "beta")  # fmt: skip
    shop = wait_for("hshop running on alpha", lambda: pair.running_here(pair.alpha, "hshop"))
    wait_for("hnews running on beta", lambda: pair.running_here(pair.beta, "hnews"))
    assert "bot-hshop" in watchers(pair.alpha) and "bot-hnews" not in watchers(pair.alpha)
    assert "bot-hnews" in watchers(pair.beta) and "bot-hshop" not in watchers(pair.beta)
    assert shop["pid"] in {p.pid for p in pair.alpha.processes()}
    # Either API lists both, with their hosts; another host's bot without live fields.
    for fleet in (pair.alpha, pair.beta):
        bots = {b["name"]: b for b in fleet.api("GET", "/api/v1/bots")["bots"]}
        assert {n: (b["host"], b["held_by"], b["state"]) for n, b in bots.items()} == {
            "hnews": ("beta", "beta", "running"),
            "hshop": ("alpha", "alpha", "running"),
        }
        remote = bots["hnews" if fleet is pair.alpha else "hshop"]
        assert (remote["local"], remote["pid"], remote["rss_mb"]) == (False, None, None)
    hosts = {h["name"]: h for h in pair.beta.api("GET", "/api/v1/hosts")["hosts"]}
    assert {n: (h["alive"], h["held"], h["answering"]) for n, h in hosts.items()} == {
        "alpha": (True, 1, False),
        "beta": (True, 1, True),
    }
    listed = json.loads(pair.beta.cli("hosts", "list", "--json").stdout)["hosts"]
    assert sorted(h["name"] for h in listed) == ["alpha", "beta"]
    header, *rows = pair.beta.cli("hosts", "list").stdout.splitlines()
    assert header.split()[:6] == ["NAME", "ALIVE", "SEEN", "HELD", "PLACED", "ANSWERING"]
    assert sorted(row.split()[:2] + row.split()[4:7] for row in rows) == [
        ["alpha", "yes", "1", "1", "http://" + pair.alpha.listen],
        ["beta", "yes", "1", "1", "yes"],
    ]

    # A bad host name is refused by the API, named, and changes nothing.
    version = pair.beta.bot("hshop")["version"]
    refused = pair.beta.cli("bots", "update", "hshop", "--host", "Not_A_Host", check=False)
    assert refused.returncode == 1 and "(HTTP 422)" in refused.stderr, refused.stderr
    assert "\n  host: must be a host name" in refused.stderr, refused.stderr
    assert (pair.beta.bot("hshop")["host"], pair.beta.bot("hshop")["version"]) == ("alpha", version)

    # Move hshop to beta through beta's API (the CLI's `bots update --host`).
    sent = own_sandbox.say("carol", "hshop_bot", "before")
    assert own_sandbox.reply("carol", "hshop_bot", sent) == "alpha: before"
    pair.beta.cli("bots", "update", "hshop", "--host", "beta", "--setting", "prefix=beta: ")
    moved = wait_for(
        "hshop running on beta", lambda: pair.running_here(pair.beta, "hshop"), timeout=60
    )
    assert moved["pid"] in {p.pid for p in pair.beta.processes()}
    assert "bot-hshop" not in watchers(pair.alpha)
    assert not pair.alpha.home.bot_dir("hshop").exists()  # its token left alpha too
    sent = own_sandbox.say("carol", "hshop_bot", "after")
    assert own_sandbox.reply("carol", "hshop_bot", sent) == "beta: after"

    account = int(shop_token.split(":")[0])
    total, most = sessions(sandbox_log(own_sandbox), account)
    assert total >= 2, "a session on each host"
    assert most == 1, "hshop was logged in twice at once"
    # The bystander on beta kept its one session.
    assert sessions(sandbox_log(own_sandbox), int(news_token.split(":")[0])) == (1, 1)
    kinds = [
        (e["kind"], e["actor"], e["to_state"] or e["reason"])
        for e in pair.alpha.api("GET", "/api/v1/bots/hshop/events?limit=1000")["events"]
    ]
    assert kinds.index(("transition", "reconciler", "stopped")) < next(
        i for i, k in enumerate(kinds) if k[:2] == ("host", "host:beta")
    )


def test_a_dead_host_keeps_its_bots_down_until_the_operator_forgets_it(
    pair: Pair, own_sandbox: Sandbox
) -> None:
    token = own_sandbox.create_bot("hlone")
    pair.alpha.api("POST", "/api/v1/bots", echo_spec("hlone", token))
    wait_for("hlone running on alpha", lambda: pair.running_here(pair.alpha, "hlone"))
    # alpha dies: its circusd, controller and bots at once (kill -9 of the whole tree).
    assert pair.alpha.proc is not None
    kill_tree(pair.alpha.proc)
    pair.alpha.proc.wait()
    pair.beta.cli("bots", "update", "hlone", "--host", "beta")
    account = int(token.split(":")[0])
    before = sessions(sandbox_log(own_sandbox), account)[0]

    def still_down() -> bool:
        bot = pair.beta.bot("hlone")
        return bot["held_by"] == "alpha" and not bot["local"]

    holds_for("beta to leave hlone to alpha, which may still run it", still_down, 3.0)
    assert sessions(sandbox_log(own_sandbox), account)[0] == before
    with pytest.raises(ApiError) as refused:
        pair.beta.api("DELETE", "/api/v1/hosts/alpha")
    assert refused.value.status == 409
    # The CLI says the same, and so does it for a name that is no host name.
    early = pair.beta.cli("hosts", "forget", "alpha", check=False)
    assert (
        early.returncode == 1 and "(HTTP 409)" in early.stderr and "alpha was seen" in early.stderr
    )
    bad = pair.beta.cli("hosts", "forget", "Bad_Host", check=False)
    assert bad.returncode == 1 and "(HTTP 422)" in bad.stderr, bad.stderr
    assert "host: the host name 'Bad_Host' must be" in bad.stderr, bad.stderr
    assert pair.beta.bot("hlone")["held_by"] == "alpha"

    def forget() -> str | None:
        done = pair.beta.cli("hosts", "forget", "alpha", check=False)
        return done.stdout if done.returncode == 0 else None

    forgotten = wait_for("alpha silent long enough to forget", forget, timeout=30, every=0.5)
    assert forgotten == "forgot alpha: it held hlone\n"
    wait_for("hlone running on beta", lambda: pair.running_here(pair.beta, "hlone"), timeout=60)
    sent = own_sandbox.say("dave", "hlone_bot", "still there?")
    assert own_sandbox.reply("dave", "hlone_bot", sent) == "still there?"
