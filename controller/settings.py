"""The controller's settings, written by `tgfleet up` to <home>/controller.json (0600)."""

from __future__ import annotations

import ipaddress
import json
import math
import re
import socket
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from botspec.hostname import FLEET_HOST_PATTERN, MAX_FLEET_HOST
from controller.access import trusted_networks
from controller.atomicfile import write_atomic
from controller.home import Home

DEFAULT_LISTEN = "127.0.0.1:8710"
DEFAULT_SANDBOX_LISTEN = "127.0.0.1:8711"
DEFAULT_SANDBOX_ADMIN = "127.0.0.1:8712"
DEFAULT_DATABASE_TIMEOUT_S = 2.0
DEFAULT_EVENT_RETENTION_DAYS = 30.0
DEFAULT_EVENT_RETENTION_COUNT = 100_000
#: Wrong tokens from one address within a minute before its wrong tokens get 429.
DEFAULT_AUTH_FAILURE_LIMIT = 10
DEFAULT_OUTBOX_LIMIT = 10_000
#: A host may be forgotten (the bots it held let go of) only after this long unseen.
DEFAULT_FORGET_AFTER_S = 60.0


class SettingsError(ValueError):
    pass


def host_problem(host: str) -> str | None:
    """Why ``host`` is no controller host name (the pattern a bot's ``host`` has), or None."""
    if len(host) > MAX_FLEET_HOST or not re.fullmatch(FLEET_HOST_PATTERN, host):
        return (
            f"the host name {host!r} must be lower-case letters, digits and '-' in "
            f"dot-separated labels of 1 to 63 (at most {MAX_FLEET_HOST} characters)"
        )
    return None


def default_host() -> str:
    """This machine's host name, lower-cased and with '_' as '-' (a host name as a bot's
    ``host`` must be): the controller's host unless told otherwise."""
    return socket.gethostname().lower().replace("_", "-")


def is_loopback(host: str) -> bool:
    """Whether a listen host is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


def parse_hostport(value: str, what: str) -> tuple[str, int]:
    """``HOST:PORT`` → (host, port), or SettingsError saying what is wrong."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise SettingsError(f"{what} must be HOST:PORT with a port from 1 to 65535, not {value!r}")
    return host.strip("[]"), int(port_text)


def env_number(environ: Mapping[str, str], key: str, default: float) -> float:
    """A number from the environment (``default`` when unset); SettingsError when not one."""
    raw = environ.get(key, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{key} must be a number, not {raw!r}") from None
    if not math.isfinite(value):
        raise SettingsError(f"{key} must be a finite number, not {raw!r}")
    return value


def env_integer(environ: Mapping[str, str], key: str, default: int) -> int:
    """A whole number from the environment (``default`` when unset); SettingsError when
    not one (``1.9`` is refused, not read as 1)."""
    raw = environ.get(key, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise SettingsError(f"{key} must be a whole number, not {raw!r}") from None


@dataclass(frozen=True)
class ControllerSettings:
    listen: str
    database_url: str
    demo: bool = False
    sandbox_listen: str | None = None
    sandbox_admin: str | None = None
    webhook_url: str | None = None  # POSTed a JSON body when a bot is given up on (failed)
    # Dirs put on every bot's PYTHONPATH (plugins that are not installed in the venv).
    plugin_path: tuple[str, ...] = ()
    # The bound on every query and pool acquire; the API answers within it.
    database_timeout_s: float = DEFAULT_DATABASE_TIMEOUT_S
    # Events older than this, or beyond the newest count, are pruned.
    event_retention_days: float = DEFAULT_EVENT_RETENTION_DAYS
    event_retention_count: int = DEFAULT_EVENT_RETENTION_COUNT
    # Wrong tokens from one address within a minute; past it, its wrong tokens get 429.
    auth_failure_limit: int = DEFAULT_AUTH_FAILURE_LIMIT
    # Reverse proxies (addresses or networks) whose X-Forwarded-For names the client
    # that the throttle counts; none: the peer is the client.
    trusted_proxies: tuple[str, ...] = ()
    # Writes queued while PostgreSQL is away; beyond it the oldest are dropped.
    outbox_limit: int = DEFAULT_OUTBOX_LIMIT
    # Rotation of every watcher's stdout/stderr (TGFLEET_LOG_MAX_BYTES, _BACKUP_COUNT).
    log_max_bytes: int = 10 * 1024 * 1024
    log_backup_count: int = 3
    # The API's certificate and key (PEM): it then speaks HTTPS only.
    tls_cert: str | None = None
    tls_key: str | None = None
    # This controller's host: it runs the bots whose ``host`` is this, and only those.
    host: str = field(default_factory=default_host)
    # Another host may be forgotten (DELETE /api/v1/hosts/NAME) once silent this long.
    forget_after_s: float = DEFAULT_FORGET_AFTER_S

    @property
    def api_url(self) -> str:
        return f"{'https' if self.tls_cert else 'http'}://{self.listen}"

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
        for listed in ("plugin_path", "trusted_proxies"):
            if isinstance(raw.get(listed), list):
                raw[listed] = tuple(raw[listed])
        try:
            settings = cls(**raw)
        except TypeError as exc:
            raise SettingsError(f"{path}: {exc}") from exc
        parse_hostport(settings.listen, "listen")
        settings.check()
        return settings

    def check(self) -> None:
        """SettingsError naming the first value out of its range."""
        if (self.tls_cert is None) != (self.tls_key is None):
            raise SettingsError("--tls-cert and --tls-key go together")
        if not 0.1 <= self.database_timeout_s <= 60:
            raise SettingsError(
                f"database_timeout_s must be from 0.1 to 60 seconds, not {self.database_timeout_s}"
            )
        if not self.event_retention_days > 0:
            raise SettingsError(
                f"event_retention_days must be above 0, not {self.event_retention_days}"
            )
        if self.auth_failure_limit < 1:
            raise SettingsError(
                f"auth_failure_limit must be at least 1, not {self.auth_failure_limit}"
            )
        if self.event_retention_count < 1:
            raise SettingsError(
                f"event_retention_count must be at least 1, not {self.event_retention_count}"
            )
        for entry in self.plugin_path:
            if not entry.startswith("/") or ":" in entry:
                raise SettingsError(f"plugin dir {entry!r} must be an absolute path")
        try:
            trusted_networks(self.trusted_proxies)
        except ValueError as exc:
            raise SettingsError(f"TGFLEET_TRUSTED_PROXIES: {exc}") from None
        if self.log_max_bytes < 64 * 1024 or self.log_backup_count < 1:
            raise SettingsError(
                "log rotation needs log_max_bytes of at least 65536 and log_backup_count of "
                f"at least 1, not {self.log_max_bytes} and {self.log_backup_count}"
            )
        if not 5 <= self.forget_after_s <= 86400:
            raise SettingsError(
                f"forget_after_s must be from 5 to 86400 seconds, not {self.forget_after_s}"
            )
        if problem := host_problem(self.host):
            raise SettingsError(f"{problem} (set TGFLEET_HOST or --host)")
        if self.outbox_limit < 1:
            raise SettingsError(f"outbox_limit must be at least 1, not {self.outbox_limit}")
