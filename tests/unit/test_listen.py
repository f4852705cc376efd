"""The API listens on loopback unless given TLS or told to be insecure."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from harness import short_tmpdir

from controller.botusers import BotUsers, service_user_name
from controller.home import Home
from controller.settings import ControllerSettings, SettingsError, is_loopback
from controller.sysusers import delete_group, ensure_group, grant_user
from controller.up import UpError, UpOptions, check_listen, insecure_listen_warning, prepare


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.0.1", True),
        ("::1", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.0.0.5", False),
        ("example.org", False),
    ],
)
def test_loopback_hosts(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def options(tmp_path: Path, listen: str, **more: object) -> UpOptions:
    return UpOptions(Home(tmp_path), listen, False, None, **more)  # type: ignore[arg-type]


def test_loopback_needs_nothing(tmp_path: Path) -> None:
    check_listen(options(tmp_path, "127.0.0.1:8710"))
    check_listen(options(tmp_path, "[::1]:8710"))
    assert insecure_listen_warning(options(tmp_path, "127.0.0.1:8710")) is None


@pytest.fixture
def shared(tmp_path: Path) -> Iterator[Path]:
    """A dir every user may traverse (pytest's tmp_path is root's 0700 when we are root)."""
    path = short_tmpdir("tgf-tls-")
    try:
        yield path
    finally:
        shutil.rmtree(path)


def test_beyond_loopback_needs_tls_or_insecure_listen(shared: Path) -> None:
    tmp_path = shared
    with pytest.raises(UpError, match=r"--tls-cert FILE --tls-key FILE\), or say --insecure"):
        check_listen(options(tmp_path, "0.0.0.0:8710"))
    insecure = options(tmp_path, "0.0.0.0:8710", insecure_listen=True)
    check_listen(insecure)
    warning = insecure_listen_warning(insecure)
    assert warning is not None and "in clear text" in warning
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("x")
    key.write_text("x")
    cert.chmod(0o644)
    key.chmod(0o644)
    with_tls = options(tmp_path, "0.0.0.0:8710", tls_cert=str(cert), tls_key=str(key))
    check_listen(with_tls)
    assert insecure_listen_warning(with_tls) is None
    with pytest.raises(UpError, match="go together"):
        check_listen(options(tmp_path, "0.0.0.0:8710", tls_cert=str(cert)))
    with pytest.raises(UpError, match="no such file"):
        check_listen(options(tmp_path, "0.0.0.0:1", tls_cert=str(cert), tls_key="/nope"))


def test_the_controller_must_read_the_key_it_serves_https_with(shared: Path) -> None:
    # As root the controller runs as the fleet's service user; made by this `up`, it
    # reads what any user may. Else it runs as this user.
    cert, key = shared / "cert.pem", shared / "key.pem"
    cert.write_text("x")
    key.write_text("x")
    cert.chmod(0o644)
    key.chmod(0o600 if os.geteuid() == 0 else 0o000)
    tls = options(shared, "0.0.0.0:8710", tls_cert=str(cert), tls_key=str(key))
    if os.geteuid() == 0:
        name = service_user_name(tls.home)
        says = f"{key} is not readable by {name}, .*setfacl -m u:{name}:r .*does not exist yet"
    else:
        says = f"cannot read {key}: the controller, run as this user, must read it"
    with pytest.raises(UpError, match=says):
        check_listen(tls)
    key.chmod(0o640 if os.geteuid() == 0 else 0o400)
    if os.geteuid() == 0:  # group root's: not the service user's
        with pytest.raises(UpError, match="is not readable by"):
            check_listen(tls)
        key.chmod(0o604)
    check_listen(tls)


@pytest.mark.skipif(os.geteuid() != 0, reason="the fleet's service user: root only")
def test_as_root_the_service_user_must_read_the_key(shared: Path) -> None:
    home = Home(shared / "home")
    home.root.mkdir()
    cert, key = shared / "tls" / "cert.pem", shared / "tls" / "key.pem"
    key.parent.mkdir(mode=0o700)
    cert.write_text("x")
    key.write_text("x")
    cert.chmod(0o644)
    key.chmod(0o600)
    tls = options(home.root, "0.0.0.0:8710", tls_cert=str(cert), tls_key=str(key))
    users = BotUsers(home, enabled=True)
    try:
        service = users.ensure_service()
        assert service is not None
        group = ensure_group(users.fleet_group)
        # The dir is not searchable for it: refused, the user named (it exists).
        with pytest.raises(UpError, match=f"{cert} is not readable by {service.user}") as refused:
            check_listen(tls)
        assert "does not exist yet" not in str(refused.value)
        key.parent.chmod(0o755)
        with pytest.raises(UpError, match=f"{key} is not readable by {service.user}"):
            check_listen(tls)
        grant_user(key, service.uid, 0o4)  # what the message says to do
        check_listen(tls)
        key.parent.chmod(0o750)  # root and its group only
        with pytest.raises(UpError, match=f"{cert} is not readable by {service.user}"):
            check_listen(tls)
        # The fleet's group is the controller's primary group (its watcher's gid).
        os.chown(key.parent, 0, group.gr_gid)
        check_listen(tls)
    finally:
        users.remove_service()
        delete_group(users.fleet_group)


def test_settings_say_https_with_a_certificate() -> None:
    plain = ControllerSettings(listen="127.0.0.1:1", database_url="postgresql://x")
    assert plain.api_url == "http://127.0.0.1:1"
    tls = ControllerSettings(
        listen="10.0.0.1:1", database_url="postgresql://x", tls_cert="c", tls_key="k"
    )
    assert tls.api_url == "https://10.0.0.1:1"
    with pytest.raises(SettingsError, match="go together"):
        ControllerSettings(listen="x:1", database_url="y", tls_cert="c").check()


def test_trusted_proxies_are_kept_and_checked(tmp_path: Path) -> None:
    home = Home(tmp_path)
    kept = ControllerSettings(
        listen="127.0.0.1:1", database_url="postgresql://x", trusted_proxies=("10.0.0.0/8",)
    )
    kept.save(home)
    assert ControllerSettings.load(home) == kept
    bad = ControllerSettings(listen="x:1", database_url="y", trusted_proxies=("proxy",))
    with pytest.raises(SettingsError, match="TGFLEET_TRUSTED_PROXIES: 'proxy' is not an IP"):
        bad.check()


def test_up_refuses_a_bad_trusted_proxy_before_making_anything(tmp_path: Path) -> None:
    home = Home(tmp_path / "home")
    bad = replace(options(tmp_path, "127.0.0.1:8710"), home=home, trusted_proxies=("::1", "nope"))
    with pytest.raises(UpError, match="TGFLEET_TRUSTED_PROXIES: 'nope'"):
        prepare(bad)
    assert not home.root.exists()
