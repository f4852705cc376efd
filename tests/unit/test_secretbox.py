"""The secret box: its key sources and what it seals (the declared SECRET_PATHS only)."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from controller.home import Home
from controller.secretbox import SecretBox, SecretKeyError, is_sealed, new_key


def test_a_key_file_is_made_private_on_first_start(tmp_path: Path) -> None:
    home = Home(tmp_path)
    box = SecretBox.load(home, {})
    assert stat.S_IMODE(home.secret_key.stat().st_mode) == 0o600
    assert SecretBox.load(home, {}).keys == box.keys and box.from_file


def test_the_environment_wins_and_may_hold_several_keys(tmp_path: Path) -> None:
    new, old = new_key(), new_key()
    box = SecretBox.load(Home(tmp_path), {"TGFLEET_SECRET_KEY": f"{new},{old}"})
    assert box.keys == (new, old) and not box.from_file
    assert not Home(tmp_path).secret_key.exists()
    sealed_by_old = SecretBox((old,), "x").seal("secret")
    assert box.open(sealed_by_old) == "secret"
    with pytest.raises(SecretKeyError, match="no Fernet key"):
        SecretBox.load(Home(tmp_path), {"TGFLEET_SECRET_KEY": "not-a-key"})


def test_only_the_declared_secrets_are_sealed() -> None:
    box = SecretBox((new_key(),), "test")
    spec = {"token": "1:a", "plugins": ["m:f"], "telegram": {"api_id": 5, "api_hash": "h"}}
    sealed = box.seal_all(spec)
    assert is_sealed(sealed["token"]) and is_sealed(sealed["telegram"]["api_hash"])
    assert sealed["plugins"] == ["m:f"] and sealed["telegram"]["api_id"] == 5
    assert spec["token"] == "1:a"  # the input is left alone
    assert box.seal_all(sealed) == sealed  # sealed values are not sealed twice
    assert box.open_all(sealed) == spec
    assert box.open_all(spec) == spec  # clear text from before sealing reads as it is
    with pytest.raises(SecretKeyError, match="does not open"):
        SecretBox((new_key(),), "other").open_all(sealed)


def test_tgfleet_up_refuses_the_key_in_its_env_and_makes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`tgfleet up` would have to hand the key to the controller's watcher through its
    env, which `circusctl options controller` shows: it says where the key goes instead."""
    from controller.up import UpError, UpOptions, prepare

    monkeypatch.setenv("TGFLEET_SECRET_KEY", new_key())
    home = Home(tmp_path / "home")
    with pytest.raises(UpError, match="TGFLEET_SECRET_KEY") as refused:
        prepare(UpOptions(home=home, listen="127.0.0.1:8710", demo=False, database_url=None))
    assert str(home.secret_key) in str(refused.value)
    assert not home.root.exists()
