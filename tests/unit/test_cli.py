"""The CLI's own logic (everything it does over HTTP is tested end to end)."""

import io
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from imports_probe import loaded_after

from controller.cli import (
    COMMANDS,
    UsageError,
    _spec_from_options,
    bots_table,
    build_parser,
    hosts_table,
    new_lines,
    parse_settings,
    run,
)


@pytest.mark.parametrize(
    ("seen", "latest", "new"),
    [
        (["a", "b", "c"], ["b", "c", "d", "e"], ["d", "e"]),
        (["a", "b"], ["a", "b"], []),
        ([], ["a"], ["a"]),
        (["x", "y"], ["p", "q"], ["p", "q"]),
        (["a", "a"], ["a", "a", "a"], ["a"]),
    ],
)
def test_follow_prints_only_new_log_lines(
    seen: list[str], latest: list[str], new: list[str]
) -> None:
    assert new_lines(seen, latest) == new


def test_settings_values_are_json_when_they_can_be() -> None:
    assert parse_settings(["greeting=hi", "n=3", "on=true", "l=[1]", "s=a=b"]) == {
        "greeting": "hi",
        "n": 3,
        "on": True,
        "l": [1],
        "s": "a=b",
    }


def test_settings_that_are_not_key_value_are_a_usage_error() -> None:
    with pytest.raises(UsageError, match="'novalue' is not key=value"):
        parse_settings(["a=1", "novalue"])


#: What no command but `up` and `sandbox` needs: each costs the CLI tens of ms.
HEAVY_FOR_THE_CLI = [
    "tgsandbox",
    "telethon",
    "aiohttp",
    "cryptography",
    "typer",
    "click",
    "rich",
    "jinja2",
    "asyncpg",
    "zmq",
    "msgspec",
    "psutil",
    "asyncio",
    "controller.app",
    "controller.fleet",
    "botspec.spec",  # (botspec.hostname, stdlib only, is how settings check a host name)
    "botspec.validate",
]


def test_the_cli_module_and_its_help_import_nothing_heavy() -> None:
    assert loaded_after("import controller.cli", HEAVY_FOR_THE_CLI) == []
    code = "from controller.cli import run\nrun(['bots', 'create', '--help'])"
    assert loaded_after(code, HEAVY_FOR_THE_CLI) == []


def test_an_api_command_loads_the_http_client_only() -> None:
    # No fleet answers on port 9 (discard): the command fails after its imports.
    code = "from controller.cli import run\nrun(['bots', 'list', '--api', 'http://127.0.0.1:9'])"
    assert loaded_after(code, HEAVY_FOR_THE_CLI) == []
    assert loaded_after(code, ["controller.client"]) == ["controller.client"]


def test_an_api_command_that_reads_the_home_s_settings_loads_no_more(tmp_path: Path) -> None:
    # As a user runs it: the API's address from <home>/controller.json (its checks too).
    from controller.home import Home
    from controller.settings import ControllerSettings

    home = Home(tmp_path / "home")
    home.make_dirs()
    ControllerSettings(listen="127.0.0.1:9", database_url="postgresql://x@h/d").save(home)
    code = f"from controller.cli import run\nrun(['bots', 'list', '--home', {str(home.root)!r}])"
    assert loaded_after(code, HEAVY_FOR_THE_CLI) == []
    assert loaded_after(code, ["controller.settings"]) == ["controller.settings"]


def test_every_command_has_help_and_parses_its_own_help(
    capsys: pytest.CaptureFixture[str],
) -> None:
    for cmd in COMMANDS:
        assert cmd.run.__doc__, cmd.path
        if cmd.passthrough:
            continue
        assert run([*cmd.path, "--help"]) == 0
        out = capsys.readouterr().out
        assert out.startswith(f"usage: tgfleet {' '.join(cmd.path)}"), out
        assert cmd.run.__doc__.strip().split("\n")[0] in out


def test_bare_group_prints_its_commands_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert run([]) == 2
    top = capsys.readouterr().out
    assert all(word in top for word in ("up", "bots", "status", "token", "secret", "sandbox"))
    assert run(["bots"]) == 2
    assert "destroy" in capsys.readouterr().out


def test_bad_usage_exits_2_with_the_command_s_usage(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["bots", "create"]) == 2  # no name
    assert "usage: tgfleet bots create" in capsys.readouterr().err
    assert run(["bots", "update", "x", "--setting", "novalue", "--api", "http://127.0.0.1:9"]) == 2
    err = capsys.readouterr().err
    assert "usage: tgfleet bots update" in err and "'novalue' is not key=value" in err
    assert run(["bots", "create", "x", "--memory-limit", "lots"]) == 2
    assert "--memory-limit: invalid int value: 'lots'" in capsys.readouterr().err


def test_an_unreachable_api_is_one_error_line_and_exit_1(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert run(["status", "--api", "http://127.0.0.1:9"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: cannot reach the tgfleet API at http://127.0.0.1:9")
    assert err.count("\n") == 1


def test_a_command_registers_with_one_decorator() -> None:
    from controller import cli

    def render_nothing(args: Any) -> int:
        """Render nothing (a test command)."""
        return 3 if args.flag else 0

    before = list(cli.COMMANDS)
    cli.GROUPS["example"] = "Example commands."
    try:
        cli.command("example nothing", cli.opt("--flag", action="store_true"))(render_nothing)
        assert run(["example", "nothing", "--flag"]) == 3
        assert "nothing" in subcommands(build_parser(), "example")
    finally:
        cli.COMMANDS[:] = before
        del cli.GROUPS["example"]


def subcommands(parser: Any, group: str) -> list[str]:
    for action in parser._subparsers._group_actions:
        if group in action.choices:
            inner = action.choices[group]._subparsers._group_actions[0]
            return list(inner.choices)
    return []


BOT = {
    "name": "shop",
    "state": "running",
    "health": {"status": "healthy"},
    "telegram": {"connected": True},
    "pid": 4242,
    "uptime_s": 75.0,
    "restarts": 2,
    "rss_mb": 51.6,
    "spec": {"memory_limit_mb": 256},
}


def test_bots_table_shows_a_column_only_when_the_answer_has_its_field() -> None:
    lines = bots_table([BOT]).splitlines()
    assert lines[0].split() == [
        "NAME", "STATE", "HEALTH", "TELEGRAM", "PID", "UPTIME", "RESTARTS", "MEM",
    ]  # fmt: skip
    assert lines[1].split() == ["shop", "running", "healthy", "yes", "4242", "1m15s", "2", "52/256MB"]  # fmt: skip
    newer = {
        **BOT,
        "resources": {"cpu_percent": 3.4},
        "messages": {"received": 12, "sent": 11, "handled": 12, "handler_errors": 0},
    }
    stopped = {**BOT, "name": "off", "state": "stopped", "pid": None, "rss_mb": None}
    lines = bots_table([newer, stopped]).splitlines()
    assert lines[0].split()[-3:] == ["CPU", "MEM", "MSGS"]
    assert lines[1].split()[-3:] == ["3%", "52/256MB", "12/11"]
    assert lines[2].split()[4] == "-" and lines[2].split()[-3:] == ["-", "-", "-"]


def test_bots_table_colours_the_state_only_when_asked() -> None:
    plain = bots_table([BOT])
    assert "\x1b[" not in plain
    coloured = bots_table([BOT], colour=True)
    assert "\x1b[32mrunning" in coloured
    assert coloured.splitlines()[0] == plain.splitlines()[0]  # the header stays plain


def test_no_colour_when_stdout_is_no_terminal_or_no_color_is_set(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from controller import cli

    # A real terminal: the secondary side of a pseudo-terminal pair.
    primary, secondary = os.openpty()
    with os.fdopen(primary, "wb") as _, open(secondary, "w") as terminal:
        monkeypatch.setattr(sys, "stdout", terminal)
        monkeypatch.delenv("NO_COLOR", raising=False)
        assert cli.colour_wanted()
        monkeypatch.setenv("NO_COLOR", "1")
        assert not cli.colour_wanted()
    with open(__file__) as not_a_terminal:
        monkeypatch.setattr(sys, "stdout", not_a_terminal)
        monkeypatch.delenv("NO_COLOR")
        assert not cli.colour_wanted()


def test_sandbox_arguments_and_help_are_the_sandbox_cli_s() -> None:
    # A real `tgfleet` process: typer (the sandbox's CLI) writes to the real stdout.
    done = subprocess.run(
        [str(Path(sys.executable).parent / "tgfleet"), "sandbox", "fault", "--help"],
        capture_output=True,
        text=True,
        env={**os.environ, "NO_COLOR": "1", "COLUMNS": "100"},
    )
    assert done.returncode == 0, done.stderr
    assert "tgfleet sandbox fault" in done.stdout
    assert "--seconds" in done.stdout


@pytest.mark.parametrize(
    "args",
    [["sandbox", "bot", "list"], ["sandbox"], ["up", "--demo", "--home", "{home}"]],
)
def test_without_the_sandbox_extra_sandbox_commands_say_what_to_install(
    args: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setitem(sys.modules, "cryptography", None)  # as if not installed
    home = tmp_path / "home"
    assert run([a.format(home=home) for a in args]) == 1
    output = capsys.readouterr()
    assert output.out == ""
    assert output.err.count("\n") == 1, output.err
    assert "cryptography" in output.err
    assert "pip install 'tgfleet[sandbox]'" in output.err
    assert not home.exists()  # `up --demo` stopped before it made anything


def _create_args(*extra: str) -> Any:
    return build_parser().parse_args(["bots", "create", "shop", *extra])


def test_a_credential_given_as_dash_is_read_from_stdin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("123456:AAHsecret\n"))
    assert _spec_from_options(_create_args("--token", "-")) == {"token": "123456:AAHsecret"}
    monkeypatch.setattr(sys, "stdin", io.StringIO("1AbCdEf==\n"))
    assert _spec_from_options(_create_args("--session", "-")) == {"session": "1AbCdEf=="}


@pytest.mark.parametrize(
    ("token", "session", "stdin", "says"),
    [
        ("-", None, "", "stdin, which gave nothing"),
        ("-", "-", "123456:AAHsecret\n", "only one of --token and --session"),
    ],
)
def test_a_dash_without_a_credential_on_stdin_is_refused(
    token: str | None,
    session: str | None,
    stdin: str,
    says: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    args = ["bots", "create", "shop", "--home", str(tmp_path / "home")]
    args += [*(["--token", token] if token else []), *(["--session", session] if session else [])]
    assert run(args) == 2
    assert says in capsys.readouterr().err


def test_host_moves_a_bot_on_update_and_places_it_on_create() -> None:
    assert _spec_from_options(_create_args("--host", "beta")) == {"host": "beta"}
    update = build_parser().parse_args(["bots", "update", "shop", "--host", "alpha"])
    assert _spec_from_options(update) == {"host": "alpha"}
    # The host of `up` and `render` is this controller's own, not a bot's.
    up = build_parser().parse_args(["render", "circus-ini", "--host", "alpha"])
    assert up.host == "alpha"


def test_hosts_table_says_who_is_alive_and_who_answered() -> None:
    hosts = [
        {"name": "alpha", "alive": True, "silent_s": 0.4, "held": 2, "placed": 3,
         "answering": True, "api_url": "https://alpha:8710"},
        {"name": "beta", "alive": False, "silent_s": 3700.0, "held": 1, "placed": 0,
         "answering": False, "api_url": ""},
        {"name": "gamma", "alive": False, "silent_s": None, "held": 0, "placed": 1,
         "answering": False, "api_url": ""},
    ]  # fmt: skip
    header, *rows = hosts_table(hosts).splitlines()
    assert header.split() == ["NAME", "ALIVE", "SEEN", "HELD", "PLACED", "ANSWERING", "API"]
    assert rows[0].split() == ["alpha", "yes", "0s", "ago", "2", "3", "yes", "https://alpha:8710"]
    assert rows[1].split() == ["beta", "no", "1h01m", "ago", "1", "0", "-"]
    assert rows[2].split() == ["gamma", "no", "never", "0", "1", "-"]


def test_a_table_shows_control_characters_from_the_database_and_obeys_none() -> None:
    # A host's name and api_url come from the shared database: any controller wrote them.
    hosts = [
        {"name": "evil\x1b]0;owned\x07\r", "alive": True, "silent_s": 1.0, "held": 0,
         "placed": 0, "answering": True, "api_url": "https://a\u202eexe.b\x9b2J\nfake"},
        {"name": "ok", "alive": False, "silent_s": None, "held": 0, "placed": 0,
         "answering": False, "api_url": ""},
    ]  # fmt: skip
    shown = hosts_table(hosts)
    assert not [c for c in shown if c != "\n" and not c.isprintable()]
    header, first, second = shown.split("\n")  # one line per host: no newline got through
    assert first.split()[0] == "evil\\x1b]0;owned\\x07\\x0d"
    assert first.split()[-1] == "https://a\\u202eexe.b\\x9b2J\\x0afake"
    # Columns line up on what is shown.
    assert header.index("ALIVE") == first.index("yes") == second.index("no")


def test_a_hosts_command_loads_the_http_client_only() -> None:
    code = "from controller.cli import run\nrun(['hosts', 'list', '--api', 'http://127.0.0.1:9'])"
    assert loaded_after(code, HEAVY_FOR_THE_CLI) == []


def test_a_bot_name_is_one_path_segment() -> None:
    from controller.cli import segment

    assert segment("shop") == "shop"
    assert segment("shop?x") == "shop%3Fx"  # not /bots/shop with a query
    assert segment("a/../b c") == "a%2F..%2Fb%20c"


@pytest.mark.parametrize(
    ("key", "raw", "says"),
    [
        ("TGFLEET_AUTH_FAILURE_LIMIT", "nan", "must be a whole number, not 'nan'"),
        ("TGFLEET_AUTH_FAILURE_LIMIT", "1.9", "must be a whole number, not '1.9'"),
        ("TGFLEET_EVENT_RETENTION_COUNT", "1e400", "must be a whole number"),
        ("TGFLEET_DATABASE_TIMEOUT_S", "inf", "must be a finite number, not 'inf'"),
    ],
)
def test_a_bad_number_in_the_environment_is_named_and_nothing_is_made(
    key: str,
    raw: str,
    says: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv(key, raw)
    home = tmp_path / "home"
    assert run(["render", "circus-ini", "--home", str(home), "--write"]) == 1
    err = capsys.readouterr().err
    assert f"{key} {says}" in err and err.count("\n") == 1, err
    assert not home.exists()
