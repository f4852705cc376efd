"""The secret sweep finds a secret where one is planted, in every form it looks for,
and nothing where there is none: a sweep that finds nothing proves something only then."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.parse
from pathlib import Path

from harness import wait_for
from sweep import Place, Secret, command_output, environments, files_under, found, process_list

TOKEN = Secret("the token", "7001234:AAH" + os.urandom(12).hex())
SESSION = Secret("the session", "1" + os.urandom(150).hex())


def test_nothing_is_found_where_nothing_was_planted(tmp_path: Path) -> None:
    (tmp_path / "log").write_text("bot 7001234 started; token=<redacted>\n")
    places = [*files_under(tmp_path), Place("answer", b'{"token": null}')]
    assert found([TOKEN, SESSION], places) == []


def test_each_form_of_a_planted_secret_is_found() -> None:
    bot_id, key = TOKEN.value.split(":")
    middle = SESSION.value[100:160]
    places = [
        Place("raw", f"token={TOKEN.value}".encode()),
        Place("json", json.dumps({"spec": {"token": TOKEN.value}}).encode()),
        Place("quoted", urllib.parse.quote(TOKEN.value, safe="").encode()),
        Place("key alone", f"key {key} of bot {bot_id}".encode()),
        Place("cut session", f"session={middle}...".encode()),
    ]
    hits = found([TOKEN, SESSION], places)
    assert hits == [
        "the token in raw",
        "the token in json",
        "the token in quoted",
        "the token in key alone",
        "the session in cut session",
    ]


def test_a_secret_planted_in_a_process_is_found_by_ps_and_environ(tmp_path: Path) -> None:
    sleeper = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()", TOKEN.value],
        stdin=subprocess.PIPE,
        env={**os.environ, "PLANTED": SESSION.value},
    )
    try:
        # Between fork and exec the child still shows pytest's command line and env.
        cmdline = Path(f"/proc/{sleeper.pid}/cmdline")
        wait_for("the child's exec", lambda: TOKEN.value.encode() in cmdline.read_bytes())
        assert found([TOKEN], [process_list()]) == ["the token in ps -e"]
        hits = found([TOKEN, SESSION], environments([sleeper.pid]))
        assert len(hits) == 1 and hits[0].startswith(
            f"the session in the environment of pid {sleeper.pid}"
        )
    finally:
        sleeper.communicate(b"")
    assert found([TOKEN], [process_list()]) == []


def test_a_secret_planted_in_a_file_or_a_commands_output_is_found(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "bot.log").write_text(f"connecting with {TOKEN.value}\n")
    (logs / "bot.log.1").write_text("nothing here\n")
    skipped = tmp_path / "config.json"
    skipped.write_text(json.dumps({"token": TOKEN.value}))
    hits = found([TOKEN], files_under(tmp_path, except_for=[skipped]))
    assert hits == [f"the token in {logs / 'bot.log'}"]
    shown = command_output(["cat", str(skipped)])
    assert found([TOKEN], [shown]) == [f"the token in cat {skipped}"]
