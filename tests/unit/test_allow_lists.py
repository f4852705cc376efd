"""The keeper's watcher allow-list (controller.watchercheck) and the gate's command
allow-list (controller.gate), by table: every watcher the renderer writes passes,
and each way of making circusd (root) run something else is refused."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import zmq

from controller import watchercheck
from controller.gate import MAX_PENDING, Gate, refusal
from controller.home import Home
from controller.render import BotWatcher, render_watcher
from controller.watchercheck import WatcherRefused, check_watcher

HOME = Home(Path("/srv/fleet"))
ACCOUNT = ("tgf-0123456789ab", "tgf-0123456789ab")


def rendered(launch: str = "fork", user: bool = True, graceful_timeout_s: float = 5.0) -> str:
    bot = BotWatcher(
        name="shop",
        autostart=True,
        graceful_timeout_s=graceful_timeout_s,
        memory_limit_mb=512,
        processes=256 if user else None,
        user=ACCOUNT[0] if user else None,
        group=ACCOUNT[1] if user else None,
        launch=launch,  # type: ignore[arg-type]
        bus_key_id="ab" * 8,
    )
    return "# tgfleet: generation=1 autostart=true user=x\n" + render_watcher(
        HOME, bot, python=sys.executable, pythonpath=["/opt/plugins"]
    )


@pytest.mark.parametrize("launch", ["fork", "exec"])
@pytest.mark.parametrize("user", [True, False])
# Any float the spec allows (1 to 60 s), as the API stores it: schemathesis sent
# 39.89506521836861, which the keeper refused, and the controller's pass died with it.
@pytest.mark.parametrize("graceful_timeout_s", [1.0, 5.0, 39.89506521836861, 60.0, 1 / 3])
def test_what_the_renderer_writes_passes(
    launch: str, user: bool, graceful_timeout_s: float
) -> None:
    check_watcher(
        HOME,
        "shop",
        rendered(launch, user, graceful_timeout_s),
        python=sys.executable,
        account=ACCOUNT if user else None,
    )


OUT_LOG = "/srv/fleet/logs/bot-shop.out.log"
#: What a fork-mode watcher runs: tgf-launcher PYTHON SOCKET NAME CONFIG
LAUNCHER = watchercheck.launcher_binary()
PY = sys.executable
FORGERIES = [
    ("uid = tgf-0123456789ab\n", "uid = root\n", "uid/gid must be the own user"),
    ("uid = tgf-0123456789ab\n", "", "uid/gid must be the own user"),
    ("uid = tgf-0123456789ab\n", "uid = tgf-ffffffffffff\n", "uid/gid must be the own user"),
    ("gid = tgf-0123456789ab\n", "gid = root\n", "uid/gid must be the own user"),
    ("stdout_stream.class = FileStream", "stdout_stream.class = x.Y", "must be FileStream"),
    (OUT_LOG, "/etc/cron.d/x", "stdout_stream.filename must be"),
    (OUT_LOG, "/srv/fleet/logs/../../../etc/x", "stdout_stream.filename must be"),
    ("working_dir = /srv/fleet/bots/shop", "working_dir = /", "working_dir must be"),
    (f"cmd = {LAUNCHER}", "cmd = /bin/sh", "cmd must be the fleet's python"),
    (f"cmd = {LAUNCHER}", f"cmd = {LAUNCHER} -c 1", "cmd must be the fleet's"),
    # the launcher execs its first argument as the bot when no fork server answers
    (f"args = {PY}", "args = /bin/sh", "args must run botrunner"),
    (f"args = {PY}", f"args = {PY} -c import\\ os", "args must run botrunner"),
    (str(HOME.fork_socket), "/tmp/other.sock", "args must run botrunner"),
    # each launcher with the other's arguments
    (f"cmd = {LAUNCHER}", f"cmd = {PY}", "args must run botrunner"),
    (f"args = {PY} ", "args = -m botrunner ", "args must run botrunner"),
    ("/srv/fleet/bots/shop/config.json", "/srv/fleet/bots/other/config.json", "args must"),
    ("copy_env = false", "copy_env = true", "copy_env must be false"),
    ("rlimit_core = 0", "rlimit_core = 1000", "rlimit_core must be 0"),
    ("respawn = true\n", "respawn = true\nhooks.before_start = os.system\n", "hooks.before"),
    ("respawn = true\n", "respawn = true\nuse_sockets = true\n", "'use_sockets' is not"),
    ("respawn = true\n", "respawn = true\nrespawn = true\n", "respawn given twice"),
    ("respawn = true\n", "respawn = true\n  continued\n", "not 'key = value'"),
    ("respawn = true\n", "respawn: true\n", "not 'key = value'"),
    ("respawn = true\n", "rem = x\n", "'rem' is not one"),
    ("stop_signal = TERM", "stop_signal = $(circus.env.X)", "what circus would alter"),
    ("stop_signal = TERM", "stop_signal = TERM ;x", "what circus would alter"),
    ("[env:bot-shop]\n", "[plugin:evil]\nuse = evil.P\n[env:bot-shop]\n", "the only sections"),
    ("[env:bot-shop]\n", "[watcher:bot-other]\n", "the only sections"),
    ("[env:bot-shop]\n", "[circus]\n", "the only sections"),
    ("[env:bot-shop]\n", "[env:bot-shop]\nlower = x\n", "environment variable 'lower'"),
    # circus reads with universal newlines: a "\r" ends a line there, even in a comment
    (
        "[env:bot-shop]\n",
        "# note\r[watcher:evil]\rcmd = /bin/sh\rargs = -c id\r[env:bot-shop]\n",
        "character '\\r'",
    ),
    ("respawn = true\n", "respawn = true\r\n", "character '\\r'"),
    ("respawn = true\n", "respawn = true\n\x85uid = root\n", "character '\\x85'"),
    ("respawn = true\n", "respawn = true\n\x0buid = root\n", "character '\\x0b'"),
    ("respawn = true\n", "respawn = true\n;x\n", "not 'key = value'"),
]


@pytest.mark.parametrize(("old", "new", "why"), FORGERIES)
def test_a_forged_watcher_is_refused(old: str, new: str, why: str) -> None:
    text = rendered()
    assert old in text, old
    with pytest.raises(WatcherRefused) as refused:
        check_watcher(
            HOME, "shop", text.replace(old, new, 1), python=sys.executable, account=ACCOUNT
        )
    assert why in str(refused.value)


def test_the_launcher_in_python_passes_where_the_c_one_was_not_built(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(watchercheck, "launcher_binary", lambda: tmp_path / "not-built")
    text = rendered("fork")
    assert f"cmd = {PY}\nargs = -S -I {watchercheck.launcher_path()} " in text
    check_watcher(HOME, "shop", text, python=PY, account=ACCOUNT)
    forged = text.replace("args = -S -I", "args = -c import\\ os -S -I", 1)
    with pytest.raises(WatcherRefused, match="args must run botrunner"):
        check_watcher(HOME, "shop", forged, python=PY, account=ACCOUNT)


def test_a_value_circus_reads_otherwise_is_refused() -> None:
    """'""' passes the grammar as two quotes; circus' parser makes it empty."""
    text = rendered().replace("[env:bot-shop]\n", '[env:bot-shop]\nEMPTY = ""\n', 1)
    with pytest.raises(WatcherRefused, match="circus' own parser reads this file otherwise"):
        check_watcher(HOME, "shop", text, python=sys.executable, account=ACCOUNT)


def test_a_link_to_the_fleets_python_is_refused(tmp_path: Path) -> None:
    """A link that points at the fleet's python today may point elsewhere tomorrow."""
    link = tmp_path / "python"
    link.symlink_to(sys.executable)
    text = rendered("exec").replace(f"cmd = {sys.executable}", f"cmd = {link}", 1)
    with pytest.raises(WatcherRefused, match="cmd must be the fleet's python"):
        check_watcher(HOME, "shop", text, python=sys.executable, account=ACCOUNT)


def test_a_watcher_for_another_bots_name_is_refused() -> None:
    with pytest.raises(WatcherRefused, match="the only sections"):
        check_watcher(HOME, "other", rendered(), python=sys.executable, account=ACCOUNT)


def command(verb: str, /, **properties: object) -> dict[str, object]:
    return {"id": "1", "command": verb, "properties": properties}


def stop_raw(graceful_timeout: str) -> object:
    """A stop command as the gate decodes it from the wire."""
    return json.loads(
        '{"id": "1", "command": "stop", "properties": '
        f'{{"name": "bot-shop", "graceful_timeout": {graceful_timeout}}}}}'
    )


@pytest.mark.parametrize(
    ("message", "why"),
    [
        (command("start", name="bot-shop"), None),
        (command("stop", name="bot-shop", match="simple", waiting=True), None),
        (command("restart", name="bot-shop"), None),
        (command("signal", name="bot-shop", signum=9), None),
        (command("status"), None),
        (command("status", name="bot-shop"), None),
        (command("list"), None),
        (command("list", name="bot-shop"), None),
        (command("reloadconfig", waiting=True), None),
        (command("set", name="bot-shop", key="uid", value=0), "'set' is not one"),
        (command("add", name="evil", cmd="/bin/sh"), "'add' is not one"),
        (command("rm", name="bot-shop"), "'rm' is not one"),
        (command("quit"), "'quit' is not one"),
        (command("options", name="bot-shop"), "'options' is not one"),
        (command("signal", name="controller", signum=9), "not 'controller'"),
        (command("signal", name="forkserver", signum=9), "not 'forkserver'"),
        (command("list", name="postgres"), "not 'postgres'"),
        (command("stop"), "needs the name of a bot's watcher"),
        (command("stop", name="bot-*", match="glob"), "not 'bot-*'"),
        (command("stop", name="bot-shop", match="regex"), "match must be 'simple'"),
        (command("start", name="bot-shop", cmd="/bin/sh"), "takes no 'cmd'"),
        (command("signal", name="bot-shop", signum=9, pid=1), "takes no 'pid'"),
        (command("signal", name="bot-shop", signum="KILL"), "signum must be"),
        (command("stop", name="bot-shop", waiting="yes"), "waiting must be"),
        (command("stop", name="bot-shop", graceful_timeout=5), None),
        (command("stop", name="bot-shop", graceful_timeout=0.5), None),
        (command("stop", name="bot-shop", graceful_timeout=3600), None),
        # json.loads reads NaN and Infinity: a stop that never ends holds circus' lock
        (stop_raw("NaN"), "graceful_timeout must be a number of seconds from 0 to 3600"),
        (stop_raw("Infinity"), "graceful_timeout must be"),
        (stop_raw("-Infinity"), "graceful_timeout must be"),
        (stop_raw("1e308"), "graceful_timeout must be"),
        (stop_raw("3600.5"), "graceful_timeout must be"),
        (stop_raw("-1"), "graceful_timeout must be"),
        (stop_raw("true"), "graceful_timeout must be"),
        (stop_raw('"5"'), "graceful_timeout must be"),
        ({"command": "start", "properties": [], "id": "1"}, "properties must be an object"),
        ({**command("start", name="bot-shop"), "msg_type": "cast"}, "only calls"),
        ({**command("start", name="bot-shop"), "extra": 1}, "unknown fields"),
        (["start"], "a command is a JSON object"),
    ],
)
def test_the_gate_passes_only_its_allow_list(message: object, why: str | None) -> None:
    reason = refusal(message)
    if why is None:
        assert reason is None
    else:
        assert reason is not None and why in reason, reason


def test_the_gate_answers_what_it_refuses_in_circus_shape() -> None:
    from controller.gate import error_answer

    answer = json.loads(error_answer("7", "no"))
    assert {k: answer[k] for k in ("status", "errno", "id", "reason")} == {
        "status": "error",
        "errno": 3,
        "id": "7",
        "reason": "refused by tgfleet's gate: no",
    }
    assert json.loads(error_answer(["x"], "no"))["id"] is None


def test_the_gate_forwards_at_most_its_cap_of_unanswered_commands(tmp_path: Path) -> None:
    """A circusd that answers nothing (busy: a reloadconfig waiting for bots to stop)
    gets MAX_PENDING commands through the gate, no more: the rest are answered at once
    with an error, and the gate holds no DEALER for them."""
    home = Home(tmp_path)
    home.run_dir.mkdir()
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    circusd = context.socket(zmq.ROUTER)  # circusd's socket, reading and not answering
    circusd.bind(home.circus_endpoint)
    gate = Gate(home, os.getuid())
    gate.context = context
    gate.listen()
    controller = context.socket(zmq.DEALER)
    controller.connect(home.circus_gate_endpoint)
    sent = MAX_PENDING + 6
    try:
        for number in range(sent):
            controller.send_json({"id": str(number), "command": "status", "properties": {}})
        for _ in range(sent):
            assert gate.front.poll(10_000), "the gate got every request"
            gate.take()
        assert len(gate.pending) == MAX_PENDING
        forwarded = 0
        while circusd.poll(1000):
            circusd.recv_multipart()
            forwarded += 1
        assert forwarded == MAX_PENDING
        refused: list[dict[str, object]] = []
        while controller.poll(1000):
            refused.append(json.loads(controller.recv()))
        assert [answer["id"] for answer in refused] == [str(n) for n in range(MAX_PENDING, sent)]
        assert all(
            answer["status"] == "error" and "wait for circusd's answer" in str(answer["reason"])
            for answer in refused
        ), refused
    finally:
        for back in gate.pending:
            back.close(linger=0)
        for socket in (gate.front, controller, circusd):
            socket.close(linger=0)
        context.term()
