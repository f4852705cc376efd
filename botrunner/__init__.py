"""One bot process: ``python -m botrunner <config.json>`` (see botrunner/__main__.py)."""

from enum import IntEnum


class ExitCode(IntEnum):
    """How a bot process ends (docs/internals.md)."""

    OK = 0  # stopped by SIGTERM/SIGINT, cleanly
    FAILURE = 1  # a side task or the startup died of a bug; it still stopped cleanly
    USAGE = 64  # EX_USAGE: no config path given
    CONFIG = 78  # EX_CONFIG: the config file is unreadable or invalid
