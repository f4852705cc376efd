"""The controller's settings, written by `tgfleet up` to <home>/controller.json (0600)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from controller.home import Home
from controller.render import write_atomic

DEFAULT_LISTEN = "127.0.0.1:8710"
DEFAULT_SANDBOX_LISTEN = "127.0.0.1:8711"
DEFAULT_SANDBOX_ADMIN = "127.0.0.1:8712"


class SettingsError(ValueError):
    pass


def parse_hostport(value: str, what: str) -> tuple[str, int]:
    """``HOST:PORT`` → (host, port), or SettingsError saying what is wrong."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise SettingsError(f"{what} must be HOST:PORT with a port from 1 to 65535, not {value!r}")
    return host.strip("[]"), int(port_text)


@dataclass(frozen=True)
class ControllerSettings:
    listen: str
    database_url: str
    demo: bool = False
    sandbox_listen: str | None = None
    sandbox_admin: str | None = None
    webhook_url: str | None = None  # POSTed a JSON body when a bot is given up on (failed)

    def save(self, home: Home) -> None:
        write_atomic(home.controller_json, json.dumps(asdict(self), indent=2) + "\n", 0o600)

    @classmethod
    def load(cls, home: Home) -> ControllerSettings:
        path: Path = home.controller_json
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise SettingsError(f"{path} is missing: run `tgfleet up` to create it") from exc
        except json.JSONDecodeError as exc:
            raise SettingsError(f"{path} is not valid JSON: {exc}") from exc
        if not isinstance(raw, dict):
            raise SettingsError(f"{path} must hold a JSON object")
        try:
            settings = cls(**raw)
        except TypeError as exc:
            raise SettingsError(f"{path}: {exc}") from exc
        parse_hostport(settings.listen, "listen")
        return settings
