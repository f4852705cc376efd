"""``python -m botrunner <config.json>``: run one bot until SIGTERM.

Exit codes: 0 after a clean stop, 1 when a side task died, 78 (EX_CONFIG)
when the config file is unreadable or invalid (one line on stderr says why).
"""

from __future__ import annotations

import time

# As early as the bot's own code can be: startup_s is measured from the
# kernel's start time of the process where /proc has it, else from here.
STARTED_MONOTONIC = time.monotonic()

import signal  # noqa: E402
import sys  # noqa: E402
from types import FrameType  # noqa: E402


def _stop_before_serving(signum: int, frame: FrameType | None) -> None:
    """SIGTERM while the bot still imports (Telethon takes ~0.4 s, more on a busy host):
    nothing to drain yet, so a clean exit (0) rather than death by signal (-15).
    The runner installs its graceful handler once it serves."""
    raise SystemExit(0)


signal.signal(signal.SIGTERM, _stop_before_serving)

import asyncio  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
from pathlib import Path  # noqa: E402

from botrunner import ExitCode  # noqa: E402
from botrunner.config import ConfigError, load_config  # noqa: E402
from botspec import jsonlog  # noqa: E402

USAGE = "usage: python -m botrunner <path to config.json>"


def import_telethon_without_aiohttp() -> None:
    """Import Telethon without the aiohttp it imports when it can (~10 MB RSS per bot).

    Telethon only uses aiohttp to download web documents; with it hidden during
    Telethon's import, that one call says aiohttp is missing. A plugin that
    imports aiohttp itself still gets it (and pays for it).
    """
    if "telethon" in sys.modules or "aiohttp" in sys.modules:
        return
    sys.modules["aiohttp"] = None  # type: ignore[assignment]  # makes `import aiohttp` fail
    try:
        import telethon  # noqa: F401
    finally:
        del sys.modules["aiohttp"]


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0].startswith("-"):
        print(USAGE, file=sys.stderr)
        return ExitCode.USAGE
    try:
        config = load_config(Path(argv[0]))
    except ConfigError as exc:
        print(f"botrunner: invalid config: {exc}", file=sys.stderr)
        return ExitCode.CONFIG
    jsonlog.configure(bot=config.name)
    logging.getLogger("telethon").setLevel(logging.WARNING)
    # Imported only now: Telethon is most of the bot's memory and start-up time.
    import_telethon_without_aiohttp()
    from botrunner.alive import ENV_VAR
    from botrunner.runner import Runner

    alive_file = os.environ.get(ENV_VAR) or None
    runner = Runner(config, STARTED_MONOTONIC, alive_file=Path(alive_file) if alive_file else None)
    return asyncio.run(runner.run())


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
