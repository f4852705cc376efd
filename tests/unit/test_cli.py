"""The CLI's own logic (everything it does over HTTP is tested end to end)."""

import io
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from controller.cli import _spec_from_options, app, new_lines, parse_settings


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


def test_the_cli_does_without_the_sandbox_until_a_sandbox_command_runs() -> None:
    # A fresh interpreter: this one has imported everything the other tests use.
    heavy = ["tgsandbox", "telethon", "aiohttp", "cryptography"]
    probe = (
        "import sys, controller.cli; print(' '.join(m for m in sys.argv[1:] if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, *heavy], capture_output=True, text=True, check=True
    )
    assert done.stdout.split() == []


def test_sandbox_arguments_and_help_are_the_sandbox_cli_s() -> None:
    outcome = CliRunner().invoke(app, ["sandbox", "fault", "--help"], prog_name="tgfleet")
    assert outcome.exit_code == 0, outcome.output
    assert "tgfleet sandbox fault" in outcome.output
    assert "--seconds" in outcome.output


@pytest.mark.parametrize(
    "args",
    [["sandbox", "bot", "list"], ["sandbox"], ["up", "--demo", "--home", "{home}"]],
)
def test_without_the_sandbox_extra_sandbox_commands_say_what_to_install(
    args: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "cryptography", None)  # as if not installed
    home = tmp_path / "home"
    outcome = CliRunner().invoke(app, [a.format(home=home) for a in args])
    assert outcome.exit_code == 1
    assert outcome.output.count("\n") == 1, outcome.output
    assert "cryptography" in outcome.output
    assert "pip install 'tgfleet[sandbox]'" in outcome.output
    assert not home.exists()  # `up --demo` stopped before it made anything


def test_a_credential_given_as_dash_is_read_from_stdin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("123456:AAHsecret\n"))
    assert _spec_from_options("-", None, None, None, None, None) == {"token": "123456:AAHsecret"}
    monkeypatch.setattr(sys, "stdin", io.StringIO("1AbCdEf==\n"))
    assert _spec_from_options(None, "-", None, None, None, None) == {"session": "1AbCdEf=="}


@pytest.mark.parametrize(
    ("token", "session", "stdin", "says"),
    [
        ("-", None, "", "stdin, which gave nothing"),
        ("-", "-", "123456:AAHsecret\n", "only one of --token and --session"),
    ],
)
def test_a_dash_without_a_credential_on_stdin_is_refused(
    token: str | None, session: str | None, stdin: str, says: str, tmp_path: Path
) -> None:
    args = ["bots", "create", "shop", "--home", str(tmp_path / "home")]
    args += [*(["--token", token] if token else []), *(["--session", session] if session else [])]
    outcome = CliRunner().invoke(app, args, input=stdin)
    assert outcome.exit_code == 2, outcome.output
    assert says in outcome.output
