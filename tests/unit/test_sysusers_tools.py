"""How the keeper runs useradd/userdel/groupadd (controller.sysusers._run): in
circusd's process, where circus reaps every child with ``waitpid(-1)`` on each
SIGCHLD, a tool's exit status must still come back as the tool gave it."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

# A process of its own (its children are only the tools run here), with a thread
# that reaps any child of the process as soon as it ends, as circusd's does.
REAPED = """
import json, os, sys, threading, time
from controller.sysusers import _run

stop = threading.Event()

def reap_every_child() -> None:
    while not stop.is_set():
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            time.sleep(0.001)

threading.Thread(target=reap_every_child, daemon=True).start()
results = []
for script in sys.argv[1:]:
    result = _run("sh", "-c", script)
    results.append([result.returncode, result.stdout, result.stderr])
stop.set()
print(json.dumps(results))
"""


def test_a_tools_exit_status_comes_back_past_a_reaper_of_every_child() -> None:
    scripts = {
        "echo made; exit 0": [0, "made\n", ""],
        "echo 'useradd: cannot lock /etc/passwd' >&2; exit 10": [
            10,
            "",
            "useradd: cannot lock /etc/passwd\n",
        ],
        "exit 1": [1, "", ""],
        "echo half; exit 12": [12, "half\n", ""],
    }
    killed = "kill -9 $$"  # the reporting shell says 128 + 9 (and may say "Killed")
    ran = subprocess.run(
        [sys.executable, "-c", REAPED, *scripts, killed],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert ran.returncode == 0, ran.stderr
    *results, (status, out, _) = json.loads(ran.stdout)
    assert results == list(scripts.values())
    assert (status, out) == (128 + 9, "")


TIMED_OUT = """
import sys
import time
from pathlib import Path
from controller import sysusers

sysusers.TOOL_TIMEOUT_S = 0.5
try:
    sysusers._run("sh", "-c", f"echo $$ > {sys.argv[1]}; exec sleep 60")
except sysusers.SystemUserError as exc:
    print(exc)
"""


def test_a_tool_past_its_time_is_killed_with_what_runs_it(tmp_path: Path) -> None:
    pid_file = tmp_path / "tool.pid"
    ran = subprocess.run(
        [sys.executable, "-c", TIMED_OUT, str(pid_file)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert "took over 0.5s" in ran.stdout, (ran.stdout, ran.stderr)
    stat_file = Path("/proc") / pid_file.read_text().strip() / "stat"
    deadline = time.monotonic() + 10
    while alive(stat_file) and time.monotonic() < deadline:  # SIGKILL is not instant
        time.sleep(0.05)
    assert not alive(stat_file), "the tool (sleep 60) outlived its timeout"


def alive(stat_file: Path) -> bool:
    """Whether the process runs (gone, or a zombie init has not reaped yet: not)."""
    try:
        state = stat_file.read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")
