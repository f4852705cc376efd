"""Bot users: their names, and what a removed user leaves behind (no useradd here)."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import short_tmpdir

from botspec import procinfo
from controller.botfiles import BotFiles
from controller.botusers import (
    BotUsers,
    bot_user_name,
    fleet_group_name,
    kill_processes_of,
    service_user_name,
)
from controller.buskeys import BusKeys
from controller.home import Home
from controller.reconcile import Rendered
from controller.sysusers import SystemUserError, give_tree

HOME = Home(Path("/srv/fleet"))


def test_a_bot_user_name_fits_linux_whatever_the_bot_name() -> None:
    longest = "a" * 32
    assert len(bot_user_name(HOME, longest)) <= 32
    assert len(fleet_group_name(HOME)) <= 32
    assert bot_user_name(HOME, "shop") == bot_user_name(Home(Path("/srv/fleet")), "shop")


def test_two_fleets_and_two_bots_never_share_a_user() -> None:
    names = {
        bot_user_name(home, bot)
        for home in (HOME, Home(Path("/srv/other")))
        for bot in ("shop", "shop-2", "a")
    }
    assert len(names) == 6
    assert fleet_group_name(HOME) != fleet_group_name(Home(Path("/srv/other")))


def test_the_service_user_is_no_bots_and_no_other_fleets() -> None:
    other = Home(Path("/srv/other"))
    service = service_user_name(HOME)
    assert service.startswith("tgf-") and len(service) <= 32  # the leftover checks see it
    assert service != service_user_name(other)
    assert service not in {bot_user_name(HOME, bot) for bot in ("service", "sandbox", "shop")}


def test_not_root_means_no_user_at_all() -> None:
    users = BotUsers(HOME, enabled=False)
    assert users.user_name("shop") is None
    assert users.ensure("shop") is None
    assert users.ensure_service() is None
    users.remove_service()  # nothing to do, nothing raised
    users.remove("shop")  # nothing to do, nothing raised
    assert users.remove_all() == []


@pytest.mark.skipif(os.geteuid() != 0, reason="running as another uid needs root")
def test_a_removed_user_s_processes_are_killed_and_no_one_else_s() -> None:
    uid = 3_000_000 + os.getpid()  # no such user needed, nor anyone else's processes

    def running_as(real: int, effective: int) -> subprocess.Popen[bytes]:
        # started as root (the venv may not be another uid's to exec), then switched
        code = f"import os, time; os.setresuid({real}, {effective}, 0); time.sleep(60)"
        return subprocess.Popen([sys.executable, "-c", code])

    # its real uid, and its effective uid only (as a setuid program runs)
    theirs = [running_as(uid, uid), running_as(0, uid)]
    bystanders = [running_as(uid + 1, uid + 1), running_as(0, 0)]
    try:
        pids = {proc.pid for proc in theirs}
        deadline = time.monotonic() + 30
        while set(procinfo.processes_of(uid)) != pids:  # both have switched
            assert time.monotonic() < deadline, procinfo.processes_of(uid)
            time.sleep(0.01)
        kill_processes_of(uid)
        assert [proc.wait(timeout=10) for proc in theirs] == [-signal.SIGKILL] * 2
        assert [proc.poll() for proc in bystanders] == [None, None]
    finally:
        for proc in (*theirs, *bystanders):
            proc.kill()
            proc.wait()


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_the_sweep_removes_only_what_the_user_owned(tmp_path: Path) -> None:
    uid = 54321  # no such user needed: files can be owned by any uid
    mine_file, mine_dir, theirs = tmp_path / "f", tmp_path / "d", tmp_path / "t"
    mine_file.write_text("x")
    mine_dir.mkdir()
    (mine_dir / "inner").write_text("y")
    theirs.write_text("z")
    for path in (mine_file, mine_dir, mine_dir / "inner"):
        os.lchown(path, uid, uid)
    BotUsers(HOME, enabled=True, shared_writable=[tmp_path, tmp_path / "missing"])._sweep(uid)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t"]


def test_a_watcher_rendered_for_another_user_is_rendered_again(tmp_path: Path) -> None:
    """After an upgrade that brought a user per bot, every bot's watcher is rendered
    again (which restarts it as its user): the file says who it was rendered for."""
    home = Home(tmp_path)
    home.make_dirs()
    home.bot_dir("shop").mkdir()
    home.bot_config("shop").write_text("{}")
    mark = "# tgfleet: generation=3 autostart=true user=- bus=run/bus/bus.sock\n"
    home.watcher_file("shop").write_text(mark)
    keys = BusKeys.open(home)
    keys.issue("shop")  # the bot has its bus key: only the user decides here
    assert BotFiles(home, "/usr/bin/python3", keys).rendered("shop") == Rendered(3, True)
    as_root = BotFiles(home, "/usr/bin/python3", keys, users=BotUsers(home, enabled=True))
    assert as_root.rendered("shop") is None
    home.watcher_file("shop").write_text("# tgfleet: generation=3 autostart=true\n")  # before
    assert BotFiles(home, "/usr/bin/python3", keys).rendered("shop") is None
    # A config from before the bus moved to run/bus/ names the old socket: written again.
    old_bus = "# tgfleet: generation=3 autostart=true user=- bus=run/bus.sock\n"
    home.watcher_file("shop").write_text(old_bus)
    assert BotFiles(home, "/usr/bin/python3", keys).rendered("shop") is None


def test_open_files_never_exceed_the_fleets_own_hard_limit() -> None:
    import resource

    from controller.botfiles import _open_files

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        assert _open_files(65536) == 65536
    else:
        assert _open_files(hard + 1) == hard
        assert _open_files(64) == 64


def test_the_code_fingerprint_changes_when_code_is_added(tmp_path: Path) -> None:
    import os

    from controller.botusers import code_fingerprint

    (tmp_path / "pkg").mkdir()
    before = code_fingerprint([tmp_path])
    assert code_fingerprint([tmp_path]) == before
    (tmp_path / "newpkg").mkdir()  # an install adds a dir
    os.utime(tmp_path, ns=(1, 1))  # whatever the clock's resolution
    assert code_fingerprint([tmp_path]) != before


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_a_bots_dir_is_given_to_its_user_but_never_a_hard_link(tmp_path: Path) -> None:
    """A file with a second name elsewhere (a bot hard-linked /etc/shadow into its dir
    where fs.protected_hardlinks is 0) stays whose it was: giving it to the bot would
    give the bot that file."""
    bot_dir = tmp_path / "bots" / "shop"
    (bot_dir / "sub").mkdir(parents=True)
    (bot_dir / "sub" / "telegram.session").write_text("written as root")
    outside = tmp_path / "shadow"
    outside.write_text("root's secret")
    (bot_dir / "linked").hardlink_to(outside)
    give_tree(bot_dir, 65534, 65534)  # what the keeper's own_dir does
    owners = {p.name: (p.stat().st_uid, p.stat().st_gid) for p in (bot_dir, *bot_dir.rglob("*"))}
    assert owners == {
        "shop": (65534, 65534),
        "sub": (65534, 65534),
        "telegram.session": (65534, 65534),
        "linked": (0, 0),
    }
    assert (outside.stat().st_uid, outside.stat().st_gid) == (0, 0)


@pytest.mark.skipif(os.geteuid() != 0, reason="a link of another user needs root to make")
def test_up_follows_no_link_another_user_planted_in_the_home(tmp_path: Path) -> None:
    """The service user may create entries in the home (and owns pg/): a link it made
    where `up` (root) chmods and chowns would hand root's files to it."""
    from controller.up import UpError, _refuse_planted_links

    home = Home(tmp_path / "home")
    home.make_dirs()
    (home.root / "mine").symlink_to("/etc")  # root's own link: an operator's choice
    _refuse_planted_links(home)
    home.pg_dir.mkdir()
    home.pg_run.symlink_to("/etc")
    os.lchown(home.pg_run, 65534, 65534)
    with pytest.raises(UpError, match=r"pg/run is a symlink made by uid 65534, not root"):
        _refuse_planted_links(home)
    home.pg_run.unlink()
    (home.root / "bus-keys").rmdir()
    home.bus_keys_dir.symlink_to("/etc")
    os.lchown(home.bus_keys_dir, 65534, 65534)
    with pytest.raises(UpError, match="bus-keys is a symlink"):
        _refuse_planted_links(home)


@pytest.mark.skipif(os.geteuid() != 0, reason="giving files to another user needs root")
def test_up_gives_an_older_homes_controller_files_to_the_service_user(tmp_path: Path) -> None:
    """A home made by an older tgfleet holds the controller's files as root's; bots.d/
    stays root's, and a watcher file the keeper would refuse is removed."""
    import grp
    import stat

    from controller.botusers import BotAccount
    from controller.up import _share_home

    home = Home(tmp_path / "home")
    home.make_dirs()
    for own in (home.secret_key, home.bus_key, home.admin_token, home.controller_json):
        own.write_text("root's\n")
        own.chmod(0o600)
    home.bus_public_keys("shop").write_text("{}")
    home.watcher_file("evil").write_text("[watcher:bot-evil]\ncmd = /bin/sh\n")
    home.logs_dir.joinpath("bot-shop.err.log").write_text("a line\n")
    service = BotAccount("nobody", "nogroup", 65534, 65534)
    _share_home(home, service, grp.getgrgid(65534).gr_name)

    for own in (home.secret_key, home.bus_key, home.admin_token, home.bus_keys_dir):
        assert own.stat().st_uid == 65534, own
    assert home.bus_public_keys("shop").stat().st_uid == 65534
    assert home.controller_json.stat().st_uid == 0  # read through an ACL, written by root
    assert home.root.stat().st_mode & stat.S_ISVTX
    assert not home.watcher_file("evil").exists()
    assert home.bots_d.stat().st_uid == 0
    # An ACL entry: tag ACL_USER (2), permissions r (4), uid 65534 (little-endian).
    for readable in (home.controller_json, home.logs_dir / "bot-shop.err.log"):
        assert b"\x02\x00\x04\x00\xfe\xff\x00\x00" in os.getxattr(
            readable, "system.posix_acl_access"
        )


# What the tree's owner runs (as that user) against root's give_tree: once root hands it
# the tree, it swaps the dir `a` for a symlink to root's `target` while the walk goes on.
_SWAPPER = """
import os, sys, time
tree, target = sys.argv[1], sys.argv[2]
print("ready", flush=True)
deadline = time.monotonic() + 30
while os.stat(tree).st_uid != os.getuid():
    if time.monotonic() > deadline:
        sys.exit(3)
os.rename(tree + "/a", tree + "/a.old")
os.symlink(target, tree + "/a")
"""


@pytest.fixture
def open_tmp() -> Iterator[Path]:
    """A dir under /tmp that other users may search (pytest's tmp_path is root's 0700)."""
    base = short_tmpdir("tgf-givetree-")
    try:
        yield base
    finally:
        shutil.rmtree(base)


@pytest.mark.skipif(os.geteuid() != 0, reason="another user's process and chown need root")
def test_give_tree_follows_no_dir_swapped_for_a_link_while_it_walks(open_tmp: Path) -> None:
    """The tree's owner swaps a dir for a symlink to root's files while root walks the
    tree: root gives away nothing outside the tree."""
    tree, target = open_tmp / "tree", open_tmp / "target"
    names = [f"f{i:05d}" for i in range(10000)]  # a walk long enough to be raced
    for top in (tree / "a", target):
        top.mkdir(parents=True)
        for name in names:
            (top / name).touch()
    tree.chmod(0o755)
    with subprocess.Popen(
        [sys.executable, "-c", _SWAPPER, str(tree), str(target)],
        user=65534,
        group=65534,
        extra_groups=[],
        stdout=subprocess.PIPE,
        text=True,
    ) as swapper:
        try:
            assert swapper.stdout is not None
            assert swapper.stdout.readline() == "ready\n"
            give_tree(tree, 65534, 65534)
            assert swapper.wait(timeout=30) == 0  # it did swap
        finally:
            swapper.kill()
    assert (tree / "a").is_symlink()
    given = [p.name for p in (target, *target.iterdir()) if p.lstat().st_uid != 0]
    assert given == []


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_give_tree_leaves_a_symlinked_root_alone(tmp_path: Path) -> None:
    """A tree's root that is a symlink is not followed: it is left alone and said so."""
    target = tmp_path / "target"
    (target / "sub").mkdir(parents=True)
    (target / "sub" / "shadow").write_text("root's")
    link = tmp_path / "bot"
    link.symlink_to(target)
    left = give_tree(link, 65534, 65534)
    assert {p.lstat().st_uid for p in (link, target, *target.rglob("*"))} == {0}
    assert left == [link]


def _planted_link(path: Path, to: Path) -> None:
    """``path`` made a symlink to ``to`` by uid 65534 (what a service user can do in
    the home after `up` checked it)."""
    path.symlink_to(to)
    os.lchown(path, 65534, 65534)


@pytest.mark.skipif(os.geteuid() != 0, reason="a link of another user needs root to make")
def test_make_dirs_chmods_through_no_link(tmp_path: Path) -> None:
    """bus-keys/ is the service user's: swapped for a link, make_dirs (as root) refuses
    it and changes nothing where it points."""
    target = tmp_path / "target"
    target.mkdir(mode=0o755)
    target.chmod(0o755)
    home = Home(tmp_path / "home")
    home.root.mkdir()
    _planted_link(home.bus_keys_dir, target)
    with pytest.raises(SystemUserError, match=r"bus-keys is a symlink or no dir"):
        home.make_dirs()
    from controller.up import UpError, _make_dirs

    with pytest.raises(UpError, match=r"bus-keys is a symlink or no dir"):  # `up` says so
        _make_dirs(home)
    assert stat.S_IMODE(target.stat().st_mode) == 0o755


@pytest.mark.skipif(os.geteuid() != 0, reason="a link of another user needs root to make")
def test_embedded_pg_dirs_are_given_through_no_link(tmp_path: Path) -> None:
    """pg/ is the service user's (PostgreSQL runs as it): pg/run swapped for a link after
    `up` checked the home, root chmods and chowns nothing where it points."""
    from controller.pg import EmbeddedPgError, prepare_embedded_pg

    target = tmp_path / "target"
    target.mkdir()
    (target / "sudoers").write_text("root's")
    home = Home(tmp_path / "home")
    home.make_dirs()
    home.pg_dir.mkdir(mode=0o700)
    os.chown(home.pg_dir, 65534, 65534)
    _planted_link(home.pg_run, target)
    with pytest.raises(EmbeddedPgError, match=r"pg/run is a symlink or no dir"):
        prepare_embedded_pg(home, pwd.getpwuid(65534))
    assert {p.stat().st_uid for p in (target, target / "sudoers")} == {0}
    assert stat.S_IMODE(target.stat().st_mode) == 0o755


@pytest.mark.skipif(os.geteuid() != 0, reason="a link of another user needs root to make")
def test_the_sandbox_dir_is_given_through_no_link(tmp_path: Path) -> None:
    """sandbox/ is the service user's: swapped for a link, `up --demo` (as root)
    refuses it and gives nothing where it points."""
    from controller.botusers import BotAccount
    from controller.up import UpError, _open_sandbox_dir

    target = tmp_path / "target"
    target.mkdir()
    (target / "secret").write_text("root's")
    home = Home(tmp_path / "home")
    home.make_dirs()
    _planted_link(home.sandbox_dir, target)
    service = BotAccount("nobody", "nogroup", 65534, 65534)
    with pytest.raises(UpError, match=r"sandbox is a symlink or no dir"):
        _open_sandbox_dir(home, service)
    assert {p.stat().st_uid for p in (target, target / "secret")} == {0}
    assert stat.S_IMODE(target.stat().st_mode) == 0o755
