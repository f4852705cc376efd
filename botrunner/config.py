"""The bot's runtime config: ``<home>/bots/<name>/config.json``, read once, then trusted.

Its format is declared in ``botspec.config`` (shared with the controller, which
writes it); here the file is opened, checked to be private, and parsed.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from botspec.config import MAX_CONFIG_BYTES, BotConfig, ConfigError, PluginRef, parse

__all__ = ["BotConfig", "ConfigError", "PluginRef", "check_private", "load_config"]


def check_private(path: Path, st: os.stat_result) -> None:
    """Refuse a config file that others may read: it holds the bot's secrets."""
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{path} is not a regular file")
    if st.st_mode & 0o077:
        raise ConfigError(
            f"{path} has mode {stat.S_IMODE(st.st_mode):04o}; it holds secrets, "
            "it must be readable by its owner only (chmod 600)"
        )


def load_config(path: Path) -> BotConfig:
    """Read, check and parse the config file; ConfigError says what is wrong, in one line."""
    try:
        with open(path, "rb") as config_file:
            check_private(path, os.fstat(config_file.fileno()))
            data = config_file.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        return parse(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
