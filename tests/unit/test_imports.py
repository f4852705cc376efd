"""What each resident tgfleet process imports at start: its memory is mostly that.

Each check is a fresh interpreter (this one has imported everything the other
tests use) that imports what the process imports at start and reports which of
the listed modules it loaded. A module named here costs the fleet's manager
megabytes for as long as it runs (bench/memory.py has the figures).
"""

import subprocess
import sys

import pytest


def loaded_after(code: str, modules: list[str]) -> list[str]:
    probe = (
        f"import sys\n{code}\n"
        "print('loaded:', *(m for m in sys.argv[1:] if sys.modules.get(m)), file=sys.stderr)"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, *modules], capture_output=True, text=True, check=True
    )
    return done.stderr.splitlines()[-1].split()[1:]


@pytest.mark.parametrize(
    ("process", "code", "never"),
    [
        (
            # The controller: the sandbox and Telethon are the bots' business; typer is
            # the sandbox CLI's; jinja2 comes with the first watcher it renders, psutil
            # with the first bot user it removes.
            "controller",
            "import controller.app",
            ["telethon", "tgsandbox", "botrunner", "typer", "click", "jinja2", "psutil"],
        ),
        (
            # What `tgfleet up` leaves resident while the fleet runs: circusd, and of
            # tgfleet only its own small modules (the ordered stop imports more, then).
            "resident `tgfleet up` (circusd)",
            "import controller.upwait as u\nu.leave_out_optional_modules()\n"
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
