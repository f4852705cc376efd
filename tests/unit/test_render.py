"""Rendering circus.ini and bot watcher files: every field, limits, escaping, no secrets."""

from __future__ import annotations

import configparser
import os
import stat
from pathlib import Path

import pytest
from circus.config import get_config

from controller import up, watchercheck
from controller.atomicfile import write_atomic
from controller.home import Home
from controller.pg import PgWatcher
from controller.render import (
    MIN_MEMORY_LIMIT_MB,
    BotWatcher,
    InvalidWatcherValue,
    SandboxWatcher,
    ini_value,
    render_circus_ini,
    render_watcher,
)

HOME = Home(Path("/srv/fleet"))
PY = "/opt/tgfleet/.venv/bin/python"
PG = PgWatcher(
    postgres=Path("/opt/pg/bin/postgres"),
    data_dir=HOME.pg_data,
    socket_dir=HOME.pg_run,
    working_dir=HOME.pg_dir,
    user="pgserver",
    group="pgserver",
)


def parse(text: str) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(text)
    return parser


def watcher(bot: BotWatcher) -> configparser.SectionProxy:
    return parse(render_watcher(HOME, bot, python=PY))[f"watcher:bot-{bot.name}"]


def test_bot_watcher_every_field() -> None:
    bot = BotWatcher("shop", autostart=True, memory_limit_mb=256)
    parsed = parse(render_watcher(HOME, bot, python=PY))
    assert parsed.sections() == ["watcher:bot-shop", "env:bot-shop"]
    assert dict(parsed["watcher:bot-shop"]) == {
        "cmd": PY,
        "args": "-m botrunner /srv/fleet/bots/shop/config.json",
        "working_dir": "/srv/fleet/bots/shop",
        "numprocesses": "1",
        "copy_env": "false",
        "autostart": "true",
        "respawn": "true",
        "max_retry": "5",
        "stop_signal": "TERM",
        "graceful_timeout": "5.0",
        "rlimit_data": str(256 * 1024 * 1024),
        "rlimit_nofile": "1024",
        "rlimit_core": "0",
        "stdout_stream.class": "FileStream",
        "stdout_stream.filename": "/srv/fleet/logs/bot-shop.out.log",
        "stdout_stream.max_bytes": str(10 * 1024 * 1024),
        "stdout_stream.backup_count": "3",
        "stderr_stream.class": "FileStream",
        "stderr_stream.filename": "/srv/fleet/logs/bot-shop.err.log",
        "stderr_stream.max_bytes": str(10 * 1024 * 1024),
        "stderr_stream.backup_count": "3",
    }
    assert dict(parsed["env:bot-shop"]) == {
        "HOME": "/srv/fleet/bots/shop",
        "LANG": "C.UTF-8",
        "MALLOC_ARENA_MAX": "2",
        "PYTHONUNBUFFERED": "1",
        "TGFLEET_GENERATION": "0",
    }


@pytest.mark.parametrize(
    ("bot", "field", "expected"),
    [
        (BotWatcher("a", autostart=False, memory_limit_mb=128), "autostart", "false"),
        (BotWatcher("a", autostart=True, memory_limit_mb=128), "rlimit_data", "134217728"),
        (BotWatcher("a", autostart=True, memory_limit_mb=1024), "rlimit_data", "1073741824"),
        (BotWatcher("a", True, 128, graceful_timeout_s=12), "graceful_timeout", "12.0"),
        (BotWatcher("a", True, 128, max_retry=-1), "max_retry", "-1"),
        (BotWatcher("a", True, 128, open_files=4096), "rlimit_nofile", "4096"),
        (BotWatcher("a", True, 128, processes=64), "rlimit_nproc", "64"),
        (BotWatcher("a", True, 128, user="tgf-0123", group="tgf-0123"), "uid", "tgf-0123"),
        (BotWatcher("a", True, 128, user="tgf-0123", group="tgf-0123"), "gid", "tgf-0123"),
    ],
)
def test_bot_watcher_values(bot: BotWatcher, field: str, expected: str) -> None:
    assert watcher(bot)[field] == expected


def test_a_new_controller_bus_key_changes_the_watcher() -> None:
    """circusd restarts a bot whose watcher changed: the config it would read anew names
    the new controller key."""
    env = parse(render_watcher(HOME, BotWatcher("a", True, 128, bus_key_id="0a1b"), python=PY))
    assert env["env:bot-a"]["TGFLEET_BUS_KEY_ID"] == "0a1b"
    other = BotWatcher("a", True, 128, bus_key_id="2c3d")
    assert render_watcher(HOME, other, python=PY) != render_watcher(
        HOME, BotWatcher("a", True, 128, bus_key_id="0a1b"), python=PY
    )


@pytest.mark.parametrize(
    "make",
    [
        lambda: BotWatcher("Shop", True, 256),
        lambda: BotWatcher("shop\nx", True, 256),
        lambda: BotWatcher("a" * 33, True, 256),
        lambda: BotWatcher("shop", True, MIN_MEMORY_LIMIT_MB - 1),
        lambda: BotWatcher("shop", True, 256, graceful_timeout_s=0),
        lambda: BotWatcher("shop", True, 256, max_retry=-2),
        lambda: BotWatcher("shop", True, 256, user="tgf-0123"),
        lambda: BotWatcher("shop", True, 256, open_files=0),
        lambda: BotWatcher("shop", True, 256, launch="spawn"),  # type: ignore[arg-type]
        lambda: BotWatcher("shop", True, 256, user="tgf-x", group="tgf-x\nuid = root"),
        lambda: BotWatcher("shop", True, 256, bus_key_id="$(circus.env.x)"),
    ],
)
def test_bot_watcher_refuses_bad_spec(make: object) -> None:
    with pytest.raises(InvalidWatcherValue):
        make()  # type: ignore[operator]


def test_no_secret_can_reach_the_watcher_file() -> None:
    """A watcher file is built from BotWatcher alone, which has no secret fields."""
    fields = set(BotWatcher.__dataclass_fields__)
    assert fields == {
        "name",
        "autostart",
        "memory_limit_mb",
        "graceful_timeout_s",
        "max_retry",
        "generation",
        "bus_key_id",
        "open_files",
        "processes",
        "user",
        "group",
        "launch",
    }
    text = render_watcher(HOME, BotWatcher("shop", True, 256), python=PY)
    for word in ("token", "session", "api_hash", "secret", "TGFLEET_DATABASE_URL"):
        assert word not in text.lower().replace("secrets are in config.json", "")


@pytest.mark.parametrize(
    "value",
    [
        "a\nrlimit_as = 1",
        "a\rb",
        "a\x00b",
        "/x ; comment",
        "/x\t;comment",
        "100%",
        "$(circus.env.HOME)",
        "((circus.wid))",
        " leading",
        "trailing ",
        "",
    ],
)
def test_ini_value_refuses_what_would_change_the_file(value: str) -> None:
    with pytest.raises(InvalidWatcherValue):
        ini_value(value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (True, "true"),
        (False, "false"),
        (3, "3"),
        (0.5, "0.5"),
        (Path("/a b/c"), "/a b/c"),
        ("import time; time.sleep(1)", "import time; time.sleep(1)"),  # ';' after a non-space
        ("a#b", "a#b"),
    ],
)
def test_ini_value_passes_harmless_values(value: object, expected: str) -> None:
    assert ini_value(value) == expected


def test_home_with_forbidden_characters_is_refused() -> None:
    with pytest.raises(InvalidWatcherValue):
        render_watcher(Home(Path("/srv/a ;b")), BotWatcher("shop", True, 256), python=PY)
    with pytest.raises(InvalidWatcherValue):
        render_watcher(HOME, BotWatcher("shop", True, 256), python="python3")


def test_paths_with_spaces_are_quoted_for_circus_shlex() -> None:
    home = Home(Path("/srv/my fleet"))
    section = parse(render_watcher(home, BotWatcher("shop", True, 256), python=PY))
    assert (
        section["watcher:bot-shop"]["args"] == "-m botrunner '/srv/my fleet/bots/shop/config.json'"
    )


def test_circus_ini_every_field() -> None:
    text = render_circus_ini(
        HOME,
        python=PY,
        listen="127.0.0.1:8710",
        embedded_pg=PG,
        sandbox=SandboxWatcher(
            "127.0.0.1:8711", "127.0.0.1:8712", HOME.sandbox_dir, "tgf-5e41ce", "tgf-5e41ce"
        ),
        check_delay=0.5,
    )
    parsed = parse(text)
    assert dict(parsed["circus"]) == {
        "endpoint": "ipc:///srv/fleet/run/circus.sock",
        "pubsub_endpoint": "ipc:///srv/fleet/run/circus-pubsub.sock",
        "umask": "077",
        "statsd": "false",
        "multicast_endpoint": "",
        "pidfile": "/srv/fleet/run/circusd.pid",
        "check_delay": "0.5",
        "warmup_delay": "0",
        "include_dir": "/srv/fleet/bots.d",
    }
    controller = parsed["watcher:controller"]
    assert controller["cmd"] == PY
    assert controller["args"] == "-m controller serve --home /srv/fleet"
    assert controller["copy_env"] == "false"
    assert controller["stdout_stream.filename"] == "/srv/fleet/logs/controller.out.log"
    assert controller["stderr_stream.filename"] == "/srv/fleet/logs/controller.err.log"
    assert float(controller["graceful_timeout"]) <= 5
    assert dict(parsed["env:controller"]) == {
        "HOME": "/srv/fleet",
        "LANG": "C.UTF-8",
        "PYTHONUNBUFFERED": "1",
        "TGFLEET_HOME": "/srv/fleet",
        "TGFLEET_LISTEN": "127.0.0.1:8710",
    }
    postgres = parsed["watcher:postgres"]
    assert postgres["cmd"] == "/opt/pg/bin/postgres"
    assert postgres["args"] == (
        "-D /srv/fleet/pg/data -k /srv/fleet/pg/run -h '' -c listen_addresses= "
        "-c unix_socket_permissions=0700"
    )
    assert postgres["stop_signal"] == "INT"
    assert (postgres["uid"], postgres["gid"]) == ("pgserver", "pgserver")
    # higher priority starts first: postgres, then the sandbox, then the controller
    assert int(postgres["priority"]) > int(parsed["watcher:sandbox"]["priority"])
    assert int(parsed["watcher:sandbox"]["priority"]) > int(controller["priority"])
    assert parsed["watcher:sandbox"]["args"] == (
        "-m tgsandbox serve --listen 127.0.0.1:8711 --admin-listen 127.0.0.1:8712 "
        "--data /srv/fleet/sandbox"
    )
    sandbox = parsed["watcher:sandbox"]
    assert (sandbox["uid"], sandbox["gid"]) == ("tgf-5e41ce", "tgf-5e41ce")
    assert sandbox["working_dir"] == "/srv/fleet/sandbox"
    assert parsed["env:sandbox"]["HOME"] == "/srv/fleet/sandbox"


@pytest.mark.parametrize(
    ("user", "group"), [("tgf-1", None), (None, "tgf-1"), ("tgf-1", "x\nuid = root"), ("0", "0")]
)
def test_sandbox_watcher_refuses_a_bad_account(user: str | None, group: str | None) -> None:
    with pytest.raises(InvalidWatcherValue):
        SandboxWatcher("127.0.0.1:1", "127.0.0.1:2", HOME.sandbox_dir, user, group)


def test_circus_ini_without_pg_and_sandbox() -> None:
    text = render_circus_ini(
        HOME, python=PY, listen="127.0.0.1:8710", embedded_pg=None, sandbox=None
    )
    sections = parse(text).sections()
    assert sections == [
        "circus",
        "watcher:forkserver",
        "env:forkserver",
        "watcher:controller",
        "env:controller",
    ]
    pg_no_root = render_circus_ini(
        HOME,
        python=PY,
        listen="x",
        embedded_pg=PgWatcher(PG.postgres, PG.data_dir, PG.socket_dir, PG.working_dir, None, None),
        sandbox=None,
    )
    assert "uid" not in parse(pg_no_root)["watcher:postgres"]
    not_root = render_circus_ini(
        HOME,
        python=PY,
        listen="x",
        embedded_pg=None,
        sandbox=SandboxWatcher("127.0.0.1:1", "127.0.0.1:2", HOME.sandbox_dir),
    )
    assert "uid" not in parse(not_root)["watcher:sandbox"]


@pytest.mark.parametrize(("value", "merge"), [("", False), ("0", False), ("1", True)])
def test_merge_pages_reaches_the_fork_server_env_only_when_asked(
    value: str, merge: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TGFLEET_MERGE_PAGES", value)
    text = render_circus_ini(
        HOME, python=PY, listen="x", embedded_pg=None, sandbox=None, merge_pages=up.merge_pages()
    )
    ini = parse(text)
    assert (ini["env:forkserver"].get("TGFLEET_MERGE_PAGES") == "1") is merge
    assert "TGFLEET_MERGE_PAGES" not in ini["env:controller"]


@pytest.mark.parametrize("value", ["yes", "2", "true"])
def test_a_bad_merge_pages_is_refused_naming_the_variable(
    value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TGFLEET_MERGE_PAGES", value)
    with pytest.raises(up.UpError, match=f"TGFLEET_MERGE_PAGES must be 0 or 1, not '{value}'"):
        up.merge_pages()


@pytest.mark.parametrize("check_delay", [0, 1.5, -1])
def test_circus_ini_check_delay_bounds(check_delay: float) -> None:
    with pytest.raises(InvalidWatcherValue):
        render_circus_ini(
            HOME, python=PY, listen="x", embedded_pg=None, sandbox=None, check_delay=check_delay
        )


def test_circus_itself_reads_what_we_render(tmp_path: Path) -> None:
    """circus's own config loader, on the rendered files: types and env as circusd sees them."""
    home = Home(tmp_path)
    home.make_dirs()
    write_atomic(
        home.circus_ini,
        render_circus_ini(
            home,
            python=PY,
            listen="x",
            embedded_pg=PG,
            sandbox=None,
            plugin_path=["/srv/plugins"],
        ),
    )
    write_atomic(
        home.watcher_file("shop"),
        render_watcher(
            home,
            BotWatcher(
                "shop",
                False,
                200,
                graceful_timeout_s=3,
                processes=100,
                user="nobody",
                group="nogroup",
            ),
            python=PY,
            pythonpath=["/srv/plugins"],
        ),
    )
    config = get_config(str(home.circus_ini))
    assert config["check_delay"] == 1.0
    assert config["umask"] == 0o077
    assert config["statsd"] is False
    # Empty: circusd's controller then binds no UDP multicast socket (its default is
    # udp://237.219.251.97:12027 on 0.0.0.0).
    assert config["multicast_endpoint"] == ""
    watchers = {w["name"]: w for w in config["watchers"]}
    assert set(watchers) == {"controller", "postgres", "forkserver", "bot-shop"}
    forkserver = watchers["forkserver"]
    assert forkserver["args"] == f"-I -u -m botrunner.forkserver {home.root}"
    # Third-party plugins reach each bot's child (its launcher's env), never the root parent.
    assert "PYTHONPATH" not in forkserver["env"]
    bot = watchers["bot-shop"]
    assert bot["rlimits"] == {"data": 200 * 1024 * 1024, "nofile": 1024, "nproc": 100, "core": 0}
    assert (bot["uid"], bot["gid"]) == ("nobody", "nogroup")
    assert bot["autostart"] is False
    assert bot["graceful_timeout"] == 3.0
    assert bot["copy_env"] is False
    assert bot["stop_signal"] == 15
    assert bot["stdout_stream"]["filename"] == str(home.logs_dir / "bot-shop.out.log")
    assert {k: v for k, v in bot["env"].items() if k != "__name__"} == {
        "HOME": str(home.bot_dir("shop")),
        "LANG": "C.UTF-8",
        "MALLOC_ARENA_MAX": "2",
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": "/srv/plugins",
        "TGFLEET_GENERATION": "0",
    }
    assert watchers["postgres"]["stop_signal"] == 2


def test_a_fork_mode_watcher_runs_the_launcher(tmp_path: Path) -> None:
    home = Home(tmp_path)
    forked = parse(render_watcher(home, BotWatcher("shop", True, 256, launch="fork"), python=PY))
    section = forked["watcher:bot-shop"]
    # The C one, built by scripts/_venv.sh (as setup.py builds it into the wheel); it is
    # told the fleet's python: it execs `-m botrunner <config>` when no fork server answers
    binary = watchercheck.launcher_binary()
    assert os.access(binary, os.X_OK), "scripts/_venv.sh builds botrunner/tgf-launcher"
    assert section["cmd"] == str(binary)
    assert section["args"].split() == [
        PY,
        str(home.fork_socket),
        "shop",
        str(home.bot_config("shop")),
    ]
    # Circus' limits reach the launcher; the fork server copies them into the bot
    assert section["rlimit_data"] == str(256 * 1024 * 1024)
    execd = parse(render_watcher(home, BotWatcher("shop", True, 256), python=PY))
    assert execd["watcher:bot-shop"]["args"].split() == [
        "-m",
        "botrunner",
        str(home.bot_config("shop")),
    ]


def test_write_atomic(tmp_path: Path) -> None:
    target = tmp_path / "a.ini"
    assert write_atomic(target, "one\n", 0o600) is True
    assert target.read_text() == "one\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    inode = target.stat().st_ino
    assert write_atomic(target, "one\n", 0o600) is False  # unchanged: not rewritten
    assert target.stat().st_ino == inode
    assert write_atomic(target, "two\n", 0o640) is True
    assert target.read_text() == "two\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert sorted(os.listdir(tmp_path)) == ["a.ini"]  # no temp file left behind


@pytest.mark.parametrize("planted", ["symlink to /dev/zero", "fifo", "symlink to a file"])
def test_write_atomic_replaces_what_a_bot_planted_without_reading_it(
    tmp_path: Path, planted: str
) -> None:
    """In its own dir a bot can put anything where its config goes: a symlink to an
    endless file or a FIFO must not hang the controller, and a symlink's target is
    left alone (the link itself is replaced)."""
    target, outside = tmp_path / "config.json", tmp_path / "outside"
    outside.write_text("root's file\n")
    if planted == "fifo":
        os.mkfifo(target)
    else:
        target.symlink_to("/dev/zero" if "zero" in planted else outside)
    assert write_atomic(target, "root's file\n", 0o600) is True
    assert not target.is_symlink() and target.read_text() == "root's file\n"
    assert outside.read_text() == "root's file\n" and outside.stat().st_ino != target.stat().st_ino


@pytest.mark.parametrize("binary", ["missing", "foreign"])
def test_without_the_c_launcher_a_fork_mode_watcher_runs_launcher_py(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, binary: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A tgfleet built where no C compiler was, or a wheel built for another machine
    (here: bytes no kernel runs): the launcher in Python, under -S -I, and a warning."""
    path = tmp_path / "tgf-launcher"
    built = watchercheck.launcher_binary()
    if binary == "foreign":
        path.write_bytes(b"\x7fELF" + bytes(60))
        path.chmod(0o755)
    monkeypatch.setattr(watchercheck, "launcher_binary", lambda: path)
    home = Home(tmp_path)
    forked = parse(render_watcher(home, BotWatcher("shop", True, 256, launch="fork"), python=PY))
    section = forked["watcher:bot-shop"]
    assert section["cmd"] == PY
    assert section["args"].split() == [
        "-S",
        "-I",
        str(watchercheck.launcher_path()),
        str(home.fork_socket),
        "shop",
        str(home.bot_config("shop")),
    ]
    assert watchercheck.launcher_path().is_file()
    assert caplog.text.count(f"{path} cannot run") == 1
    render_watcher(home, BotWatcher("other", True, 256, launch="fork"), python=PY)
    assert caplog.text.count(f"{path} cannot run") == 1  # said once, not at every render
    if binary == "missing":  # built meanwhile: the next render runs it
        path.symlink_to(built)
        again = parse(render_watcher(home, BotWatcher("late", True, 256, launch="fork"), python=PY))
        assert again["watcher:bot-late"]["cmd"] == str(path)
