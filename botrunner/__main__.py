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

from botrunner.entry import (  # noqa: E402
    USAGE,
    import_telethon_without_aiohttp,
    main,
    stop_before_serving,
)

signal.signal(signal.SIGTERM, stop_before_serving)

__all__ = ["STARTED_MONOTONIC", "USAGE", "import_telethon_without_aiohttp", "main"]

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], STARTED_MONOTONIC))
