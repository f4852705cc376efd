"""The API listens on loopback unless given TLS or told to be insecure."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from controller.home import Home
from controller.settings import ControllerSettings, SettingsError, is_loopback
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


def test_beyond_loopback_needs_tls_or_insecure_listen(tmp_path: Path) -> None:
    with pytest.raises(UpError, match=r"--tls-cert FILE --tls-key FILE\), or say --insecure"):
        check_listen(options(tmp_path, "0.0.0.0:8710"))
    insecure = options(tmp_path, "0.0.0.0:8710", insecure_listen=True)
    check_listen(insecure)
    warning = insecure_listen_warning(insecure)
    assert warning is not None and "in clear text" in warning
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("x")
    key.write_text("x")
    with_tls = options(tmp_path, "0.0.0.0:8710", tls_cert=str(cert), tls_key=str(key))
    check_listen(with_tls)
    assert insecure_listen_warning(with_tls) is None
    with pytest.raises(UpError, match="go together"):
        check_listen(options(tmp_path, "0.0.0.0:8710", tls_cert=str(cert)))
    with pytest.raises(UpError, match="no such file"):
        check_listen(options(tmp_path, "0.0.0.0:1", tls_cert=str(cert), tls_key="/nope"))


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
