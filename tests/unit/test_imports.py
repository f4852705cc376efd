"""What each resident tgfleet process imports at start: its memory is mostly that.

Each check is a fresh interpreter (this one has imported everything the other
tests use) that imports what the process imports at start and reports which of
the listed modules it loaded. A module named here costs the fleet's manager
megabytes for as long as it runs (bench/memory.py has the figures).
"""

import pytest
from imports_probe import loaded_after


@pytest.mark.parametrize(
    ("process", "code", "never"),
    [
        (
            # The controller: the sandbox and Telethon are the bots' business; typer is
            # the sandbox CLI's; jinja2 comes with the first watcher it renders,
            # importlib.metadata with the first request for the OpenAPI document; psutil
            # is circusd's (the controller reads /proc); cryptography is the sandbox's
            # (the secret box's Fernet uses the libcrypto that Python's ssl loaded).
            "controller",
            "import controller.app",
            [
                *("telethon", "tgsandbox", "botrunner", "typer", "click", "jinja2", "psutil"),
                "importlib.metadata",
                "cryptography",
            ],
        ),
        (
            # What every controller does with bots: render their watchers (with Jinja2,
            # from watcher.ini.j2) and seal and open their secrets, without the libraries
            # the controller left out.
            "controller with bots",
            "import controller.app\n"
            "from pathlib import Path\n"
            "from controller.home import Home\n"
            "from controller.render import BotWatcher, render_watcher\n"
            "from controller.secretbox import SecretBox, new_key\n"
            "bot = BotWatcher('shop', True, 256, launch='fork')\n"
            "render_watcher(Home(Path('/srv/fleet')), bot, python='/usr/bin/python3')\n"
            "box = SecretBox((new_key(),), 'test')\n"
            "assert box.open(box.seal('1:abc')) == '1:abc'",
            ["cryptography", "psutil"],
        ),
        (
            # What `tgfleet up` leaves resident while the fleet runs: circusd, and of
            # tgfleet only its own small modules (the ordered stop imports more, then).
            "resident `tgfleet up` (circusd)",
            "import controller.circusd as u\nu.leave_out_optional_modules()\n"
            "import controller.http1, controller.home, circus.circusd, tornado.ioloop",
            [
                *("ssl", "_ssl", "yaml", "curses", "ctypes"),
                "controller.up",
                "controller.circus",
                "controller.app",
                "aiohttp",
                "asyncpg",
                "jinja2",
                "cryptography",
                "msgspec",
                "telethon",
                "botspec",
            ],
        ),
    ],
)
def test_a_resident_process_imports_only_what_it_needs(
    process: str, code: str, never: list[str]
) -> None:
    assert loaded_after(code, never) == [], process
