"""The embedded PostgreSQL: binaries from the ``pgserver`` package, run as a Circus watcher.

``prepare_embedded_pg`` creates the data dir once (initdb) and returns what
the ``postgres`` watcher needs; circusd then runs the server itself, so it is
supervised like every other process. PostgreSQL refuses to run as root: when
we are root, the server and initdb run as the system user ``pgserver`` (the
same user the pgserver package would create).
"""

from __future__ import annotations

import asyncio
import grp
import importlib.util
import logging
import os
import pwd
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from controller.home import Home
from controller.sysusers import (
    SystemUserError,
    ensure_system_user,
    give_tree,
    open_path_prefix,
    open_tree,
    private_dir,
)

log = logging.getLogger(__name__)

PG_SYSTEM_USER = "pgserver"
INITDB_TIMEOUT_S = 120.0


class EmbeddedPgError(Exception):
    """The embedded PostgreSQL cannot be prepared (binaries missing, initdb failed, …)."""


class PgUnavailable(Exception):
    """PostgreSQL did not accept a connection in time."""


@dataclass(frozen=True)
class PgWatcher:
    """Everything the ``postgres`` watcher and its clients need."""

    postgres: Path  # the server binary
    data_dir: Path
    socket_dir: Path
    working_dir: Path
    user: str | None  # system user to run as; None: the current user
    group: str | None

    @property
    def args(self) -> list[str]:
        """Arguments of ``postgres``: unix socket only, in ``socket_dir``."""
        return [
            "-D",
            str(self.data_dir),
            "-k",
            str(self.socket_dir),
            "-h",
            "",
            "-c",
            "listen_addresses=",
            "-c",
            "unix_socket_permissions=0700",
        ]

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@/postgres?host={self.socket_dir}"


def pgserver_bin_dir() -> Path:
    """``pgserver/pginstall/bin``, found without importing pgserver (its import is heavy)."""
    spec = importlib.util.find_spec("pgserver")
    if spec is None or spec.origin is None:
        raise EmbeddedPgError("the pgserver package is not installed")
    bin_dir = Path(spec.origin).parent / "pginstall" / "bin"
    if not (bin_dir / "postgres").is_file():
        raise EmbeddedPgError(f"no postgres binary in {bin_dir}")
    return bin_dir


def _pg_user() -> pwd.struct_passwd:
    try:
        user, created = ensure_system_user(PG_SYSTEM_USER)
    except SystemUserError as exc:
        raise EmbeddedPgError(str(exc)) from exc
    if created:
        log.info(
            "created system user %s to run PostgreSQL (it refuses to run as root)", user.pw_name
        )
    return user


def _open_pginstall(bin_dir: Path) -> list[Path]:
    """Let another user read the PostgreSQL install and run its programs."""
    return open_tree(bin_dir.parent)


def prepare_embedded_pg(home: Home, run_as: pwd.struct_passwd | None = None) -> PgWatcher:
    """Create ``home.pg_data`` with initdb on first use; return the watcher's settings.

    As root: PostgreSQL runs as ``run_as`` (`tgfleet up`: the fleet's service user,
    which runs the controller too, so that it reaches the 0700 socket dir), else as
    the system user ``pgserver`` (created when missing); ``home.pg_dir`` and what is
    in it become that user's (mode 0700: a cluster made as ``pgserver`` changes
    hands), and o+x is added to the ancestors of ``home.pg_dir`` and read access to
    the pgserver install where missing, so that user can reach them.
    """
    bin_dir = pgserver_bin_dir()
    as_root = os.geteuid() == 0
    user = (run_as or _pg_user()) if as_root else None

    # pg/ is PostgreSQL's user's: as root, nothing in it is reached through a link it
    # may have planted (private_dir, give_tree walk by fd).
    home.root.mkdir(parents=True, exist_ok=True)
    try:
        for owned in (home.pg_dir, home.pg_run):
            private_dir(owned, home.root)
        if user is not None:
            give_tree(home.pg_dir, user.pw_uid, user.pw_gid)
    except SystemUserError as exc:
        raise EmbeddedPgError(str(exc)) from exc
    if user is not None:
        open_path_prefix(home.pg_dir)
        _open_pginstall(bin_dir)

    if not (home.pg_data / "PG_VERSION").exists():
        _initdb(bin_dir, home, user)

    group = grp.getgrgid(user.pw_gid).gr_name if user is not None else None
    return PgWatcher(
        postgres=bin_dir / "postgres",
        data_dir=home.pg_data,
        socket_dir=home.pg_run,
        working_dir=home.pg_dir,
        user=user.pw_name if user is not None else None,
        group=group,
    )


def _initdb(bin_dir: Path, home: Home, user: pwd.struct_passwd | None) -> None:
    """initdb into a scratch dir, then rename it into place: a crash leaves no half cluster."""
    if home.pg_data.exists():
        if any(home.pg_data.iterdir()):
            raise EmbeddedPgError(
                f"{home.pg_data} is not empty but holds no PG_VERSION: not a PostgreSQL data "
                "dir; move it away"
            )
        home.pg_data.rmdir()
    scratch = home.pg_dir / "data.initdb"
    shutil.rmtree(scratch, ignore_errors=True)
    command = [
        str(bin_dir / "initdb"),
        "-D",
        str(scratch),
        "--auth=trust",
        "--auth-local=trust",
        "-U",
        "postgres",
        "--encoding=utf8",
        "--locale=C",
    ]
    started = time.monotonic()
    try:
        result = subprocess.run(
            command,
            capture_output=True,
            text=True,
            check=False,
            cwd=home.pg_dir,
            timeout=INITDB_TIMEOUT_S,
            env={"LANG": "C.UTF-8", "PATH": "/usr/bin:/bin"},
            user=user.pw_uid if user is not None else None,
            group=user.pw_gid if user is not None else None,
            # drop root's supplementary groups too
            extra_groups=[] if user is not None else None,
        )
    except subprocess.TimeoutExpired as exc:
        raise EmbeddedPgError(f"initdb took over {INITDB_TIMEOUT_S}s") from exc
    if result.returncode != 0:
        raise EmbeddedPgError(f"initdb failed ({result.returncode}): {result.stderr.strip()}")
    scratch.rename(home.pg_data)
    log.info("initdb %s in %.1fs", home.pg_data, time.monotonic() - started)


async def wait_for_pg(dsn: str, timeout: float) -> None:
    """Return once PostgreSQL at ``dsn`` answers a query.

    Raises ``PgUnavailable`` when it does not within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise PgUnavailable(f"PostgreSQL at {dsn} not ready after {timeout}s: {last_error}")
        try:
            connection = await asyncpg.connect(dsn, timeout=min(remaining, 2.0))
            try:
                await connection.fetchval("SELECT 1", timeout=min(remaining, 2.0))
            finally:
                await connection.close()
            return
        # Not up yet: no socket, socket but refusing, or still starting up.
        except (OSError, TimeoutError, asyncpg.CannotConnectNowError) as exc:
            last_error = exc
        await asyncio.sleep(min(0.1, max(remaining, 0)))
