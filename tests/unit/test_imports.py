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
            # What `tgfleet up` leaves resident while the fleet runs: circusd, and of
            # tgfleet only its own small modules (the ordered stop imports more, then).
            "resident `tgfleet up` (circusd)",
            "import controller.circusd as u\nu.leave_out_optional_modules()\n"
            "import controller.http1, controller.home, circus.circusd, tornado.ioloop",
            [
                *("ssl", "_ssl", "yaml", "curses"),
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
