"""What runs a bot, once its process exists: read the config, then the Runner.

Shared by ``python -m botrunner`` (exec mode, ``botrunner/__main__.py``) and the
fork server's children (``botrunner.forkserver``). Importing it has no side effect.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from pathlib import Path
from types import FrameType

from botrunner import ExitCode
from botrunner.config import ConfigError, load_config
from botspec import jsonlog

USAGE = "usage: python -m botrunner <path to config.json>"


def stop_before_serving(signum: int, frame: FrameType | None) -> None:
    """SIGTERM while the bot still imports (Telethon takes ~0.4 s, more on a busy host):
    nothing to drain yet, so a clean exit (0) rather than death by signal (-15).
    The runner installs its graceful handler once it serves."""
    raise SystemExit(0)


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


def main(argv: list[str], started_monotonic: float) -> int:
    """Run the bot of the config file ``argv[0]`` until SIGTERM; its exit code."""
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
    runner = Runner(config, started_monotonic, alive_file=Path(alive_file) if alive_file else None)
    return asyncio.run(runner.run())
