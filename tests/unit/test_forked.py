"""The fork server's wire format (botrunner/launcher.py) and its record (botspec.forked)."""

from __future__ import annotations

import os
import py_compile
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from botrunner import launcher
from botspec import forked, procinfo


def test_a_request_round_trips() -> None:
    env = {"HOME": "/srv/fleet/bots/shop", "PYTHONPATH": "/a:/b", "EMPTY": "", "EQ": "a=b"}
    assert launcher.decode_request(launcher.encode_request("shop", env)) == ("shop", env)


@pytest.mark.parametrize(
    "data",
    [b"", b"tgfleet-fork 2\0shop", b"tgfleet-fork 1", b"tgfleet-fork 1\0shop\0NOEQUALS"],
)
def test_a_bad_request_is_refused(data: bytes) -> None:
    with pytest.raises(ValueError):
        launcher.decode_request(data)


def test_file_descriptors_round_trip() -> None:
    assert launcher.unpack_fds(launcher.pack_fds([0, 1, 2, 17])) == [0, 1, 2, 17]
    assert launcher.unpack_fds([(0, 0, b"junk")]) == []


def test_the_record_names_a_live_bot_only(tmp_path: Path) -> None:
    forked.registry_dir(tmp_path).mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        started = forked.start_time(sleeper.pid)
        assert started is not None
        forked.write(tmp_path, "shop", forked.Forked(os.getpid(), sleeper.pid, started))
        assert forked.bot_pid(tmp_path, "shop", os.getpid()) == sleeper.pid
        assert forked.bot_pid(tmp_path, "shop", 1) == 1  # another launcher: not its bot
        assert forked.bot_pid(tmp_path, "other", os.getpid()) == os.getpid()
        # a recycled pid has another start time
        forked.write(tmp_path, "shop", forked.Forked(os.getpid(), sleeper.pid, started + 1))
        assert forked.bot_pid(tmp_path, "shop", os.getpid()) == os.getpid()
        forked.remove(tmp_path, "shop", sleeper.pid + 1)  # not its bot: kept
        assert forked.read(tmp_path, "shop") is not None
        forked.remove(tmp_path, "shop", sleeper.pid)
        assert forked.read(tmp_path, "shop") is None
    finally:
        sleeper.kill()
        sleeper.wait()
    assert forked.start_time(sleeper.pid) is None


LAUNCH = str(Path(launcher.__file__).with_name("launch.py"))


@pytest.mark.parametrize("script", [launcher.__file__, LAUNCH], ids=["launcher.py", "launch.py"])
def test_the_launcher_stays_small_and_stdlib_only(script: str) -> None:
    """Run as its watcher runs it (-S -I), it imports only the interpreter's C modules
    (``socket``, ``signal`` would bring enum and selectors: ~1 MB per bot)."""
    done = subprocess.run(
        [sys.executable, "-S", "-I", "-X", "importtime", script],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 64 and "usage: launcher.py" in done.stderr  # no arguments
    imported = {
        line.rsplit("|", 1)[1].strip()
        for line in done.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }
    assert {"_socket", "select"} <= imported
    assert not imported & {"socket", "signal", "enum", "selectors", "json", "site", "contextlib"}


def test_a_zombie_is_told_from_a_living_process() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    wait_for_exit = 0
    while not procinfo.is_zombie(child.pid) and wait_for_exit < 1000:
        time.sleep(0.01)
        wait_for_exit += 1
    assert procinfo.is_zombie(child.pid)  # ended, not reaped yet
    assert not procinfo.is_zombie(os.getpid())
    child.wait()
    assert not procinfo.is_zombie(child.pid)  # gone


def test_the_watcher_s_launcher_runs_from_compiled_bytecode(tmp_path: Path) -> None:
    """launch.py runs launcher.py's cached bytecode (compiling it anew left ~1 MB in each
    launcher): with a fresh cache, a source of the same size and mtime is not read."""
    source = tmp_path / "launcher.py"
    shutil.copy(launcher.__file__, source)
    shutil.copy(LAUNCH, tmp_path / "launch.py")
    py_compile.compile(str(source), doraise=True)
    stat = source.stat()
    other = b"def main(argv):\n    raise SystemExit(3)\n"
    source.write_bytes(other.ljust(stat.st_size, b"#"))  # same size, another program
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    run = [sys.executable, "-S", "-I", str(tmp_path / "launch.py")]
    done = subprocess.run(run, capture_output=True, text=True, check=False)
    assert done.returncode == 64 and "usage: launcher.py" in done.stderr
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # stale: the source runs
    assert subprocess.run(run, capture_output=True, check=False).returncode == 3


def test_children_forked_after_the_warm_up_draw_their_own_randomness() -> None:
    """The fork server sets OpenSSL's generator up before it forks (warm_up): each
    child must still draw bytes of its own, from ``ssl`` and from ``random``."""
    probe = (
        "import os, random, ssl, sys\n"
        "from botrunner import forkserver\n"
        "forkserver.warm_up()\n"
        "for _ in range(2):\n"
        "    r, w = os.pipe()\n"
        "    if os.fork() == 0:\n"
        "        forkserver._reseed()\n"
        "        os.write(w, (ssl.RAND_bytes(16).hex() + random.randbytes(16).hex()).encode())\n"
        "        os._exit(0)\n"
        "    os.close(w)\n"
        "    print(os.read(r, 200).decode())\n"
        "    os.wait()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    first, second = done.stdout.split()
    assert len(first) == 64 and first[:32] != second[:32] and first[32:] != second[32:]


@pytest.mark.parametrize("blocked", [False, True], ids=["default", "sigio-blocked"])
def test_a_bot_ends_with_its_launcher_s_end_of_the_pair(blocked: bool) -> None:
    # The bot's side of forkserver._watch_launcher, in a process of its own: when the
    # launcher's end closes, the kernel's SIGIO ends it, also when SIGIO came blocked
    # down the process tree (a mask survives fork and exec).
    import signal
    import socket

    bot_end, launcher_end = socket.socketpair()
    code = (
        "import signal, sys, time\n"
        f"if {blocked}: signal.pthread_sigmask(signal.SIG_BLOCK, {{signal.SIGIO}})\n"
        "from botrunner.forkserver import _watch_launcher\n"
        "_watch_launcher(int(sys.argv[1]))\n"
        "print('watching', flush=True)\n"
        "time.sleep(30)\n"
        "sys.exit(42)\n"
    )
    with bot_end, launcher_end:
        bot = subprocess.Popen(
            [sys.executable, "-c", code, str(bot_end.fileno())],
            pass_fds=[bot_end.fileno()],
            stdout=subprocess.PIPE,
        )
        bot_end.close()
        try:
            assert bot.stdout is not None and bot.stdout.readline() == b"watching\n"
            launcher_end.close()
            assert bot.wait(timeout=10) == -signal.SIGIO
        finally:
            bot.kill()
            bot.communicate()


C_SOURCE = Path(launcher.__file__).with_name("launcher.c")


def c_define(name: str) -> str:
    match = re.search(rf"^#define {name} (\S+)", C_SOURCE.read_text(), re.MULTILINE)
    assert match, f"launcher.c defines no {name}"
    return match.group(1)


def test_the_c_launcher_speaks_launcher_py_s_protocol() -> None:
    """tgf-launcher (launcher.c) and launcher.py: one wire format, one set of timeouts,
    the same signals passed on (the fork server reads launcher.py's)."""
    text = C_SOURCE.read_text()
    assert f'#define PROTOCOL "{launcher.PROTOCOL.decode()}"' in text
    assert int(c_define("FORK_WAIT_MS")) == launcher.FORK_WAIT_S * 1000
    assert int(c_define("STATUS_WAIT_MS")) == launcher.STATUS_WAIT_S * 1000
    assert int(c_define("MAX_MESSAGE")) == launcher.MAX_MESSAGE
    forwarded = re.search(r"FORWARDED\[\] = \{([^}]*)\}", text)
    assert forwarded is not None
    names = [name.strip() for name in forwarded.group(1).split(",")]
    assert [getattr(signal, name) for name in names] == list(launcher.FORWARDED)
    for reply in (launcher.PID_REPLY, launcher.EXIT_REPLY, launcher.ERROR_REPLY):
        assert f'"{reply.decode()}", {len(reply)}' in text, reply
    for byte in (launcher.DROPPED, launcher.EXIT_PREFIX):
        assert f"== '{byte.decode()}'" in text, byte
    assert f'"{launcher.GO.decode()}", 1' in text


def test_the_c_launcher_without_arguments_says_how_to_call_it() -> None:
    """What the controller asks before it renders a watcher that runs it (exit 64)."""
    binary = Path(launcher.__file__).with_name("tgf-launcher")
    done = subprocess.run([binary], capture_output=True, text=True, check=False)
    assert done.returncode == 64
    assert done.stderr == "usage: tgf-launcher PYTHON SOCKET NAME CONFIG\n"


# A fork server that forks a "bot" writing ``X<code>`` and is gone at once after its
# answer (as one killed -9 is): the launcher has only the bot's own word to exit with.
GONE_FORK_SERVER = r"""
import os, socket, sys
from botrunner import launcher
listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
listener.bind(sys.argv[1])
listener.listen(1)
print("ready", flush=True)
conn, _ = listener.accept()
data, ancillary, _flags, _addr = conn.recvmsg(launcher.MAX_MESSAGE, socket.CMSG_SPACE(16))
pair = launcher.unpack_fds(ancillary)[3]
pid = os.fork()
if pid == 0:
    os.write(pair, launcher.DROPPED)
    os.read(pair, 1)  # GO
    os.write(pair, launcher.EXIT_PREFIX + sys.argv[2].encode() + b"\n")
    os._exit(0)
conn.sendmsg([launcher.PID_REPLY + b"%d" % pid], launcher.pack_fds([os.pidfd_open(pid)]))
conn.close()
"""


@pytest.mark.parametrize("kind", ["c", "python"])
@pytest.mark.parametrize(("said", "exit_code"), [("0", 0), ("3", 3), ("-1", 255), ("300", 44)])
def test_with_its_fork_server_gone_a_launcher_exits_with_the_bot_s_own_code(
    tmp_path: Path, kind: str, said: str, exit_code: int
) -> None:
    """As the bot's ``os._exit(code)`` would end it: -1 is 255 (the C launcher took
    -1 for no code at all, and reported SIGKILL)."""
    sock = str(tmp_path / "fork.sock")
    server = subprocess.Popen(
        [sys.executable, "-c", GONE_FORK_SERVER, sock, said], stdout=subprocess.PIPE
    )
    try:
        assert server.stdout is not None and server.stdout.readline() == b"ready\n"
        here = Path(launcher.__file__).parent
        if kind == "c":
            argv = [str(here / "tgf-launcher"), sys.executable, sock, "shop", "/nonexistent"]
        else:
            argv = [sys.executable, "-S", "-I", str(here / "launch.py"), sock, "shop", "x"]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
        assert done.returncode == exit_code, done.stderr
        assert "starting the bot by exec" not in done.stderr
    finally:
        server.kill()
        server.wait()
        if server.stdout is not None:
            server.stdout.close()
