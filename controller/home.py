"""Where everything of one fleet lives on disk: the home dir and its paths."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

DEFAULT_HOME = "./.tgfleet"
# sun_path is 108 bytes on Linux, one of them the terminating NUL.
MAX_SOCKET_PATH = 107


class HomeError(Exception):
    """The home dir cannot be used (e.g. its socket paths would be too long)."""


@dataclass(frozen=True)
class Home:
    """The paths of one fleet's home dir. Pure: creating it touches no disk."""

    root: Path

    @classmethod
    def resolve(cls, home: str | os.PathLike[str] | None = None) -> Home:
        """The home given, else ``TGFLEET_HOME``, else ``./.tgfleet``, made absolute."""
        chosen = home if home is not None else os.environ.get("TGFLEET_HOME", DEFAULT_HOME)
        return cls(Path(chosen).expanduser().resolve())

    @property
    def circus_ini(self) -> Path:
        return self.root / "circus.ini"

    @property
    def circus_endpoint_file(self) -> Path:
        return self.root / "circus.endpoint"

    @property
    def controller_json(self) -> Path:
        return self.root / "controller.json"

    @property
    def admin_token(self) -> Path:
        return self.root / "admin.token"

    @property
    def secret_key(self) -> Path:
        """The key that seals secrets in the database (unless TGFLEET_SECRET_KEY is set)."""
        return self.root / "secret.key"

    @property
    def run_dir(self) -> Path:
        return self.root / "run"

    @property
    def circus_socket(self) -> Path:
        return self.run_dir / "circus.sock"

    @property
    def circus_pubsub_socket(self) -> Path:
        return self.run_dir / "circus-pubsub.sock"

    @property
    def circus_gate_socket(self) -> Path:
        """The controller's way to circusd (controller.gate: an allow-list in front of it)."""
        return self.run_dir / "circus-gate.sock"

    @property
    def circus_gate_endpoint(self) -> str:
        return f"ipc://{self.circus_gate_socket}"

    @property
    def bus_dir(self) -> Path:
        """The controller's own dir in ``run/``: it binds the bus there (as root, the
        fleet's service user's, which may not write ``run/`` itself)."""
        return self.run_dir / "bus"

    @property
    def bus_socket(self) -> Path:
        return self.bus_dir / "bus.sock"

    @property
    def keeper_socket(self) -> Path:
        """The keeper's socket (controller.keeper: root's operations for the controller)."""
        return self.run_dir / "keeper.sock"

    @property
    def fork_socket(self) -> Path:
        """The fork server's socket (botrunner.forkserver), where launchers ask for bots."""
        return self.run_dir / "fork.sock"

    @property
    def circus_endpoint(self) -> str:
        return f"ipc://{self.circus_socket}"

    @property
    def circus_pubsub_endpoint(self) -> str:
        return f"ipc://{self.circus_pubsub_socket}"

    @property
    def bus_endpoint(self) -> str:
        return f"ipc://{self.bus_socket}"

    @property
    def bus_key(self) -> Path:
        """The controller's CURVE key pair for the bus (0600)."""
        return self.root / "bus.key"

    @property
    def bus_keys_dir(self) -> Path:
        """The bots' CURVE public keys, one file per bot (0700, controller-owned)."""
        return self.root / "bus-keys"

    def bus_public_keys(self, name: str) -> Path:
        return self.bus_keys_dir / f"{name}.json"

    @property
    def bots_d(self) -> Path:
        return self.root / "bots.d"

    @property
    def bots_dir(self) -> Path:
        return self.root / "bots"

    def bot_dir(self, name: str) -> Path:
        return self.bots_dir / name

    def bot_config(self, name: str) -> Path:
        return self.bot_dir(name) / "config.json"

    def watcher_file(self, name: str) -> Path:
        return self.bots_d / f"{name}.ini"

    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"

    def watcher_log(self, watcher: str, stream: Literal["out", "err"]) -> Path:
        """Rotated stdout/stderr file of a Circus watcher (``bot-<name>``, ``controller``, …)."""
        return self.logs_dir / f"{watcher}.{stream}.log"

    @property
    def circusd_pidfile(self) -> Path:
        return self.run_dir / "circusd.pid"

    @property
    def pg_dir(self) -> Path:
        return self.root / "pg"

    @property
    def pg_data(self) -> Path:
        return self.pg_dir / "data"

    @property
    def pg_run(self) -> Path:
        return self.pg_dir / "run"

    @property
    def sandbox_dir(self) -> Path:
        return self.root / "sandbox"

    def check_socket_paths(self) -> None:
        """Raise HomeError when a unix socket under this home would be too long."""
        longest = max(
            (self.circus_pubsub_socket, self.bus_socket, self.pg_run / ".s.PGSQL.5432"),
            key=lambda p: len(str(p)),
        )
        if len(str(longest).encode()) > MAX_SOCKET_PATH:
            raise HomeError(
                f"home dir {self.root} is too deep: the socket path {longest} is "
                f"{len(str(longest).encode())} bytes, over the limit of {MAX_SOCKET_PATH}; "
                "choose a shorter --home"
            )

    def make_dirs(self) -> None:
        """Create the home and its private subdirs with their modes; a subdir that is
        a symlink is refused (SystemUserError), never followed: as root, bus-keys/ is the
        service user's, which could swap it for a link to /etc."""
        from controller.sysusers import private_dir  # sysusers' users need no home

        self.root.mkdir(parents=True, exist_ok=True)
        for private in (
            self.run_dir,
            self.bus_dir,
            self.bots_dir,
            self.bots_d,
            self.bus_keys_dir,
            self.logs_dir,
        ):
            private_dir(private, self.root)
