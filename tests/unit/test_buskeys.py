"""The bus keyring on disk: modes, what a restarted controller reads back, rotation."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
import zmq

from controller.buskeys import BusKeyError, BusKeys
from controller.home import Home


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_keys_are_private_and_survive_a_restart(tmp_path: Path) -> None:
    home = Home(tmp_path)
    keys = BusKeys.open(home)
    issued = keys.issue("shop")
    assert (mode(home.bus_key), mode(home.bus_keys_dir)) == (0o600, 0o700)
    assert mode(home.bus_public_keys("shop")) == 0o600
    # the controller keeps the bot's public key only; its secret goes to the config
    assert issued.secret_key not in home.bus_public_keys("shop").read_text()
    public = zmq.curve_public(issued.secret_key.encode())
    again = BusKeys.open(home)
    assert again.server_public_key == keys.server_public_key
    assert issued.server_key == keys.server_public_key.decode()
    assert again.bot_of(public) == "shop"


def test_rotation_keeps_one_previous_key_and_destroy_forgets_all(tmp_path: Path) -> None:
    keys = BusKeys.open(Home(tmp_path))
    first, second, third = (
        zmq.curve_public(keys.issue("shop").secret_key.encode()) for _ in range(3)
    )
    assert [keys.bot_of(k) for k in (first, second, third)] == [None, "shop", "shop"]
    keys.forget("shop")
    assert [keys.bot_of(k) for k in (second, third)] == [None, None]
    assert not keys.has("shop")
    recreated = zmq.curve_public(keys.issue("shop").secret_key.encode())
    assert recreated not in (first, second, third)


def test_a_broken_controller_key_file_is_refused(tmp_path: Path) -> None:
    home = Home(tmp_path)
    BusKeys.open(home)
    home.bus_key.write_text('{"public_key": "x", "secret_key": "y"}')
    with pytest.raises(BusKeyError, match="not a Z85 CURVE key"):
        BusKeys.open(home)


def test_deleting_the_controller_key_rotates_it_and_forgets_every_bots(tmp_path: Path) -> None:
    home = Home(tmp_path)
    keys = BusKeys.open(home)
    shop = zmq.curve_public(keys.issue("shop").secret_key.encode())
    keys.issue("cafe")
    home.bus_key.unlink()  # the fleet stopped: the operator rotates the key
    rotated = BusKeys.open(home)
    assert rotated.server_public_key != keys.server_public_key
    assert rotated.server_key_id != keys.server_key_id
    assert len(rotated.server_key_id) == 16
    # Keys issued beside the old controller key open nothing, and every bot is
    # written again (a bot without keys is not taken as rendered).
    assert rotated.bot_of(shop) is None
    assert not rotated.has("shop") and not rotated.has("cafe")
    assert list(home.bus_keys_dir.iterdir()) == []
    issued = rotated.issue("shop")
    assert issued.server_key == rotated.server_public_key.decode()
