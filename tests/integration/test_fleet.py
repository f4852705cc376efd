"""The spine, end to end: `tgfleet up`, real circusd, embedded PostgreSQL, real bots on the sandbox."""

from __future__ import annotations

import json
import os
import signal
import urllib.error
import urllib.request
from typing import Any

import psutil
import pytest
import zmq
from drills import sandbox_name, unique_name, username
from harness import Fleet, Sandbox, echo_spec, holds_for, wait_for
from zmq.utils.monitor import parse_monitor_message

from controller.client import ApiClient, ApiError
from controller.fleet import RECONCILE_INTERVAL_S

pytestmark = pytest.mark.integration


def new_bot(fleet: Fleet, sandbox: Sandbox, prefix: str, **settings: Any) -> str:
    name = unique_name(prefix)
    token = sandbox.create_bot(sandbox_name(name))
    fleet.api("POST", "/api/v1/bots", echo_spec(name, token, **settings))
    fleet.wait_state(name, "running")
    return name


def ask(sandbox: Sandbox, name: str, text: str) -> str:
    return sandbox.cli("send", username(name), text, "--user", "alice", "--wait", "20")


def pids(fleet: Fleet) -> dict[str, int]:
    return {b["name"]: b["pid"] for b in fleet.api("GET", "/api/v1/bots")["bots"] if b["pid"]}


def circus_status(fleet: Fleet) -> dict[str, str]:
    lines = fleet.circusctl("status").splitlines()
    return dict(line.split(": ", 1) for line in lines if ": " in line)


def test_create_runs_a_real_bot_that_answers(fleet: Fleet, sandbox: Sandbox) -> None:
    token = sandbox.create_bot("shop")
    done = fleet.cli(
        "bots", "create", "shop", "--token", token, "--plugin", "botrunner.plugins.echo:setup"
    )
    assert "created shop" in done.stdout
    bot = fleet.wait_state("shop", "running")
    assert bot["telegram"]["connected"] is True
    # forked by the fork server (launch: fork, the default), named for ps after its bot
    assert psutil.Process(bot["pid"]).name() == "tgf:shop"

    listing = fleet.cli("bots", "list").stdout.splitlines()
    header = listing[0].split()
    assert header[:2] == ["NAME", "STATE"]
    assert {"TELEGRAM", "PID", "UPTIME", "RESTARTS", "MEM"} <= set(header)
    row = dict(
        zip(header, next(line.split() for line in listing if line.startswith("shop ")), strict=True)
    )
    assert (row["STATE"], row["PID"], row["TELEGRAM"]) == ("running", str(bot["pid"]), "yes")
    assert "\x1b[" not in listing[1]  # no colour: stdout is a pipe

    status = circus_status(fleet)
    assert {"controller", "bot-shop"} <= set(status)
    assert ("postgres" in status) == fleet.embedded_postgres
    assert status["bot-shop"] == "active"

    assert ask(sandbox, "shop", "hello there") == "hello there"
    logs = fleet.cli("bots", "logs", "shop").stdout
    assert "ready in" in logs
    # The token is a secret: never in the API's answer nor in the watcher file.
    assert token not in str(fleet.bot("shop"))
    assert token not in fleet.home.watcher_file("shop").read_text()
    assert oct(fleet.home.bot_config("shop").stat().st_mode & 0o777) == "0o600"
    assert oct(fleet.home.bot_dir("shop").stat().st_mode & 0o777) == "0o700"


def test_kill_9_respawns_that_bot_alone(fleet: Fleet, sandbox: Sandbox) -> None:
    victim = new_bot(fleet, sandbox, "victim")
    other = new_bot(fleet, sandbox, "bystander")
    before = pids(fleet)
    os.kill(before[victim], signal.SIGKILL)

    bot = wait_for(
        "the victim back with a new pid",
        lambda: (
            (b := fleet.bot(victim))["state"] == "running"
            and b["pid"] not in (None, before[victim])
            and b
        ),
    )
    assert bot["restarts"] >= 1
    after = pids(fleet)
    assert {n: p for n, p in after.items() if n != victim} == {
        n: p for n, p in before.items() if n != victim
    }
    assert after[other] == before[other]
    assert ask(sandbox, victim, "still here?") == "still here?"


def test_update_restarts_that_bot_alone(fleet: Fleet, sandbox: Sandbox) -> None:
    name = new_bot(fleet, sandbox, "greeter")
    new_bot(fleet, sandbox, "quiet")
    before = pids(fleet)
    fleet.cli("bots", "update", name, "--setting", "greeting=hi")
    bot = wait_for(
        "the updated bot running anew",
        lambda: (b := fleet.bot(name))["state"] == "running" and b["pid"] != before[name] and b,
    )
    assert bot["spec"]["settings"] == {"greeting": "hi"}
    after = pids(fleet)
    assert {n: p for n, p in after.items() if n != name} == {
        n: p for n, p in before.items() if n != name
    }
    assert ask(sandbox, name, "there") == "hi there"


def test_changing_what_only_the_controller_reads_restarts_nothing(
    fleet: Fleet, sandbox: Sandbox
) -> None:
    name = new_bot(fleet, sandbox, "tuned")
    before = pids(fleet)
    generation = fleet.bot(name)["generation"]
    bot = fleet.api("PATCH", f"/api/v1/bots/{name}", {"health": {"heartbeat_timeout_s": 20}})
    assert bot["generation"] == generation and bot["spec"]["health"] == {"heartbeat_timeout_s": 20}
    defaults = fleet.api("GET", "/api/v1/defaults")
    changed = {**defaults, "health": {**defaults.get("health", {}), "disconnect_grace_s": 15}}
    assert fleet.api("PUT", "/api/v1/defaults", changed)["health"]["disconnect_grace_s"] == 15
    history = fleet.api("GET", f"/api/v1/bots/{name}/events")["events"]
    assert history[-1]["reason"] == "spec changed; the process keeps running"
    assert pids(fleet) == before
    assert all(
        b["generation"] <= 2 or b["name"] != name for b in fleet.api("GET", "/api/v1/bots")["bots"]
    )


def test_stop_start_restart_destroy(fleet: Fleet, sandbox: Sandbox) -> None:
    name = new_bot(fleet, sandbox, "cycle")
    first = fleet.bot(name)["pid"]

    fleet.cli("bots", "stop", name)
    stopped = fleet.wait_state(name, "stopped")
    assert stopped["pid"] is None
    assert not psutil.pid_exists(first) or psutil.Process(first).status() == psutil.STATUS_ZOMBIE
    assert circus_status(fleet)[f"bot-{name}"] == "stopped"

    fleet.cli("bots", "start", name)
    second = fleet.wait_state(name, "running")["pid"]
    assert second != first

    fleet.cli("bots", "restart", name)
    third = wait_for(
        "a new pid after restart",
        lambda: (
            (b := fleet.bot(name))["state"] == "running" and b["pid"] not in (None, second) and b
        ),
    )["pid"]
    assert third != second

    fleet.cli("bots", "destroy", name)
    with pytest.raises(ApiError) as missing:
        fleet.bot(name)
    assert missing.value.status == 404
    assert not fleet.home.watcher_file(name).exists()
    assert not fleet.home.bot_dir(name).exists()
    assert f"bot-{name}" not in circus_status(fleet)
    assert not psutil.pid_exists(third) or psutil.Process(third).status() == psutil.STATUS_ZOMBIE
    with pytest.raises(ApiError) as gone:
        fleet.api("GET", f"/api/v1/bots/{name}/events")
    assert gone.value.status == 404  # the bot is gone; its trail is in the history
    history = fleet.api("GET", f"/api/v1/history?bot={name}")["events"]
    states = [e["to_state"] for e in history if e["kind"] == "transition"]
    assert states[-3:] == ["stopping", "stopped", "destroyed"]
    assert {"created", "desired"} <= {e["kind"] for e in history}


def test_rejected_token_fails_without_respawn_loop(fleet: Fleet, sandbox: Sandbox) -> None:
    fleet.api("POST", "/api/v1/bots", echo_spec("forged", "4242:not-a-real-token"))
    bot = fleet.wait_state("forged", "failed")
    assert "ACCESS_TOKEN_INVALID" in bot["reason"]
    wait_for("its watcher stopped", lambda: circus_status(fleet)["bot-forged"] == "stopped")
    events = fleet.api("GET", "/api/v1/bots/forged/events")["events"]
    assert any("ACCESS_TOKEN_INVALID" in e["reason"] for e in events)
    # Give a respawn loop every chance to show itself: watched through three reconcile
    # passes and more, the state stays failed and no process runs, at every look.
    controller = fleet.api("GET", "/api/v1/status")["controller"]["pid"]

    def still_failed() -> dict[str, Any] | None:
        bot = fleet.bot("forged")
        quiet = bot["state"] == "failed" and bot["pid"] is None and bot["restarts"] == 0
        return bot if quiet and circus_status(fleet)["bot-forged"] == "stopped" else None

    holds_for("failed, stopped, never respawned", still_failed, 3 * RECONCILE_INTERVAL_S + 2)
    status = fleet.api("GET", "/api/v1/status")
    assert status["controller"]["pid"] == controller and status["reconcile_error"] is None


def test_controller_kill_9_touches_no_bot(fleet: Fleet, sandbox: Sandbox) -> None:
    new_bot(fleet, sandbox, "steady")
    before = pids(fleet)
    controller = fleet.api("GET", "/api/v1/status")["controller"]["pid"]
    os.kill(controller, signal.SIGKILL)
    wait_for(
        "a new controller",
        lambda: (s := fleet.api("GET", "/api/v1/status"))["controller"]["pid"] != controller and s,
        timeout=60,
    )
    # It converges on the same state: every bot running, same pids, no restart counted.
    bots = wait_for(
        "every bot seen again",
        lambda: (
            (bs := fleet.api("GET", "/api/v1/bots")["bots"])
            and all(b["pid"] for b in bs if b["state"] == "running")
            and bs
        ),
    )
    assert {b["name"]: b["pid"] for b in bots if b["pid"]} == before


BAD_REQUESTS = [
    ("POST", "/api/v1/bots", {"name": "Bad Name", "token": "1:a"}, 422, "name"),
    ("POST", "/api/v1/bots", {"name": "extra", "token": "1:a", "colour": "red"}, 422, "colour"),
    ("POST", "/api/v1/bots", {"name": "notoken"}, 422, "token"),
    (
        "POST",
        "/api/v1/bots",
        {"name": "noplug", "token": "1:a", "plugins": ["no.such.module:setup"]},
        422,
        "plugins[0]",
    ),
    (
        "POST",
        "/api/v1/bots",
        {"name": "negative", "token": "1:a", "memory_limit_mb": -1},
        422,
        "memory_limit_mb",
    ),
    ("PATCH", "/api/v1/bots/ghost", {"settings": {}}, 404, None),
    ("POST", "/api/v1/bots/ghost/start", None, 404, None),
    ("POST", "/api/v1/events", {"data": 1}, 422, "topic"),
    ("PUT", "/api/v1/defaults", {"token": "1:a"}, 422, "token"),
    ("PUT", "/api/v1/defaults", {"health": {"max_restarts": 0.5}}, 422, "health.max_restarts"),
    ("POST", "/api/v1/tokens", {"name": "Not OK"}, 422, "name"),
]


@pytest.mark.parametrize(("method", "path", "body", "status", "field"), BAD_REQUESTS)
def test_bad_input_gets_a_problem_and_changes_nothing(
    fleet: Fleet, method: str, path: str, body: object, status: int, field: str | None
) -> None:
    before_bots = fleet.api("GET", "/api/v1/bots")["bots"]
    before_files = sorted(p.name for p in fleet.home.bots_d.iterdir())
    with pytest.raises(ApiError) as refused:
        fleet.api(method, path, body)
    assert refused.value.status == status
    problem = refused.value.problem
    assert problem["status"] == status and problem["title"] and problem["detail"]
    if field is not None:
        assert field in {e["field"] for e in problem["errors"]}, problem
    assert [b["name"] for b in fleet.api("GET", "/api/v1/bots")["bots"]] == [
        b["name"] for b in before_bots
    ]
    assert sorted(p.name for p in fleet.home.bots_d.iterdir()) == before_files


def test_taken_name_malformed_json_and_auth(fleet: Fleet, sandbox: Sandbox) -> None:
    name = new_bot(fleet, sandbox, "taken")
    pid = fleet.bot(name)["pid"]
    with pytest.raises(ApiError) as taken:
        fleet.api("POST", "/api/v1/bots", echo_spec(name, "1:other"))
    assert taken.value.status == 409 and name in taken.value.problem["detail"]
    assert fleet.bot(name)["pid"] == pid

    request = urllib.request.Request(
        f"http://{fleet.listen}/api/v1/bots",
        data=b'{"name": "broken",',
        method="POST",
        headers={
            "Content-Type": "application/json",
            "Authorization": f"Bearer {fleet.client().token}",
        },
    )
    with pytest.raises(urllib.error.HTTPError) as malformed:
        urllib.request.urlopen(request, timeout=10)
    with malformed.value as answer:
        assert answer.code == 400
        assert answer.headers.get_content_type() == "application/problem+json"
        assert "not valid JSON" in json.loads(answer.read())["detail"]

    for token in (None, "tgf_wrong"):
        with pytest.raises(ApiError) as denied:
            ApiClient(f"http://{fleet.listen}", token).request("GET", "/api/v1/bots")
        assert denied.value.status == 401
    with pytest.raises(ApiError):
        fleet.api("GET", "/api/v1/bots/broken")


def test_cli_reports_bad_input_precisely(fleet: Fleet) -> None:
    done = fleet.cli("bots", "create", "Nope", "--token", "x", check=False)
    assert done.returncode == 1
    assert "name: must match" in done.stderr and "token:" in done.stderr
    done = fleet.cli("bots", "update", "ghost", "--setting", "novalue", check=False)
    assert done.returncode == 2 and "key=value" in done.stderr


def test_metrics_openapi_dashboard_and_tokens(fleet: Fleet) -> None:
    metrics = fleet.api("GET", "/metrics")
    assert 'tgfleet_bots{state="running"}' in metrics
    assert "# TYPE tgfleet_bot_restarts_total counter" in metrics
    document = fleet.api("GET", "/openapi.json")
    assert document["openapi"].startswith("3.") and "/api/v1/bots/{name}" in document["paths"]

    anonymous = ApiClient(f"http://{fleet.listen}", None)
    # the dashboard sends a stranger to log in (urllib follows the 303; the CLI's client does not)
    with urllib.request.urlopen(f"http://{fleet.listen}/", timeout=10) as answer:
        page = answer.read().decode()
    assert "<title>tgfleet · log in</title>" in page and 'name="token"' in page
    with pytest.raises(ApiError) as closed:
        anonymous.request("GET", "/metrics")
    assert closed.value.status == 401

    secret = fleet.cli("token", "create", "ci").stdout.strip()
    assert secret.startswith("tgf_")
    assert "ci" in fleet.cli("token", "list").stdout
    ApiClient(f"http://{fleet.listen}", secret).request("GET", "/api/v1/bots")
    fleet.cli("token", "revoke", "ci")
    with pytest.raises(ApiError) as revoked:
        ApiClient(f"http://{fleet.listen}", secret).request("GET", "/api/v1/bots")
    assert revoked.value.status == 401
    assert secret not in fleet.cli("token", "list", "--json").stdout
    # With every other token revoked, the operator's is the last live one: revoking
    # it would lock everyone out, so it is refused (409) and still works.
    for token in fleet.api("GET", "/api/v1/tokens")["tokens"]:
        if not token["revoked_at"] and token["name"] != "admin":
            fleet.api("DELETE", f"/api/v1/tokens/{token['name']}")
    with pytest.raises(ApiError) as last:
        fleet.api("DELETE", "/api/v1/tokens/admin")
    assert last.value.status == 409
    assert fleet.api("GET", "/api/v1/tokens")["tokens"]


def forged_heartbeat(bot: str, pid: int) -> bytes:
    return json.dumps(
        {
            "v": 1,
            "type": "heartbeat",
            "bot": bot,
            "pid": pid,
            "generation": 1,
            "ts": 0,
            "seq": 1,
            "uptime_s": 1,
            "rss_mb": 1,
            "handled": 0,
            "handler_errors": 0,
            "telegram": {
                "connected": False,
                "disconnected_since": 1.0,
                "last_error": "forged",
                "last_update_age_s": None,
                "flood_wait_until": None,
            },
        }
    ).encode()


def forged_fatal(bot: str, pid: int) -> bytes:
    return json.dumps(
        {
            "v": 1,
            "type": "fatal",
            "bot": bot,
            "pid": pid,
            "generation": 1,
            "ts": 0,
            "kind": "auth",
            "error": "AUTH_KEY_UNREGISTERED",
            "detail": "forged",
        }
    ).encode()


def bus_key_of(fleet: Fleet, name: str) -> str:
    """A bot's bus secret key, as a plugin of that bot could read it from its config."""
    config = json.loads(fleet.home.bot_config(name).read_text())
    return str(config["bus_secret_key"])


class RoguePeer:
    """A DEALER on the fleet's bus under any routing id, proving ``secret_key`` (a
    bot's, or a made-up one) or no key at all; its monitor tells how the handshake went."""

    def __init__(
        self, context: zmq.Context[Any], fleet: Fleet, routing_id: str, secret_key: str | None
    ) -> None:
        self.socket = context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 1000)
        self.socket.setsockopt(zmq.ROUTING_ID, routing_id.encode())
        if secret_key is not None:
            server_key = json.loads(fleet.home.bus_key.read_text())["public_key"]
            self.socket.setsockopt(zmq.CURVE_SECRETKEY, secret_key.encode())
            self.socket.setsockopt(zmq.CURVE_PUBLICKEY, zmq.curve_public(secret_key.encode()))
            self.socket.setsockopt(zmq.CURVE_SERVERKEY, server_key.encode())
        self.monitor = self.socket.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_SUCCEEDED
            | zmq.EVENT_HANDSHAKE_FAILED_AUTH
            | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
            | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
        )
        self.socket.connect(fleet.home.bus_endpoint)

    def handshake_succeeded(self) -> bool:
        assert self.monitor.poll(30_000), "no handshake within 30 s"
        return bool(
            parse_monitor_message(self.monitor.recv_multipart())["event"]
            == zmq.EVENT_HANDSHAKE_SUCCEEDED
        )

    def close(self) -> None:
        self.socket.disable_monitor()
        self.monitor.close()
        self.socket.close()


def test_garbage_and_forged_bus_messages_are_ignored(fleet: Fleet, sandbox: Sandbox) -> None:
    # Sent over a connection that proved the honest bot's own key: what a broken or
    # hostile plugin of that bot could send.
    name = new_bot(fleet, sandbox, "honest")
    controller = fleet.api("GET", "/api/v1/status")["controller"]["pid"]
    honest = fleet.bot(name)
    key = bus_key_of(fleet, name)

    context = zmq.Context()
    try:
        for n, frames in enumerate(
            [
                [b"\xff\x00 not json"],  # malformed
                [b'{"v": 1, "type": "nonsense"}'],  # unknown type
                [forged_heartbeat("other", 1)],  # claims to be another bot
                [forged_heartbeat("ghost", 1)],  # claims to be no bot of the fleet
                [b"a", b"b", b"c"],  # too many frames
            ]
        ):
            # A routing id of its own, as the bot's are: the ROUTER (no handover) holds
            # back a peer whose id is still in use, and the one before may not have been
            # seen to leave yet; its message would wait for ever.
            peer = RoguePeer(context, fleet, f"{name}/rogue-{n}", key)
            assert peer.handshake_succeeded()
            peer.socket.send_multipart(frames)
            peer.close()
    finally:
        context.term()
    # The controller lives on, and nothing it reports moved.
    wait_for(
        "the controller's log to show the drops",
        lambda: "ghost" in (fleet.home.logs_dir / "controller.err.log").read_text(),
    )
    assert fleet.api("GET", "/api/v1/status")["controller"]["pid"] == controller
    after = fleet.bot(name)
    assert after["pid"] == honest["pid"] and after["telegram"]["last_error"] != "forged"
    with pytest.raises(ApiError) as ghost:
        fleet.bot("ghost")
    assert ghost.value.status == 404


def test_a_rogue_peer_cannot_speak_as_a_bot(fleet: Fleet, sandbox: Sandbox) -> None:
    # The exploit of issue 10: a DEALER naming itself after the victim sent a fatal
    # (kind auth) in its name, and the controller failed and stopped the victim.
    victim = new_bot(fleet, sandbox, "victim")
    other = new_bot(fleet, sandbox, "other")
    before = {name: fleet.bot(name)["pid"] for name in (victim, other)}
    made_up = zmq.curve_keypair()[1].decode()
    log_file = fleet.home.logs_dir / "controller.err.log"

    context = zmq.Context()
    try:
        for secret_key, let_in in [
            (None, False),
            (made_up, False),
            (bus_key_of(fleet, other), True),
        ]:
            rogue = RoguePeer(context, fleet, victim, secret_key)
            try:
                rogue.socket.send_multipart([forged_heartbeat(victim, before[victim])])
                rogue.socket.send_multipart([forged_fatal(victim, before[victim])])
                # No key, a made-up key: refused at the door. Another bot's key: let in as
                # that bot, and what it says in the victim's name is dropped.
                assert rogue.handshake_succeeded() is let_in
            finally:
                rogue.close()
    finally:
        context.term()
    wait_for(
        "the controller's log to show the drops",
        lambda: log_file.read_text().count(f"from {other!r}: it says it is from {victim!r}") >= 2,
    )
    assert "refused a peer whose key" in log_file.read_text()
    holds_for(
        "both bots running, the same processes, nothing forged",
        lambda: all(
            (b := fleet.bot(name))["state"] == "running"
            and b["pid"] == before[name]
            and b["telegram"]["last_error"] != "forged"
            for name in (victim, other)
        ),
        2 * RECONCILE_INTERVAL_S,
    )
    assert ask(sandbox, victim, "still here?") == "still here?"
    states = [
        e.get("to_state") for e in fleet.api("GET", f"/api/v1/bots/{victim}/events")["events"]
    ]
    assert "failed" not in states
