"""A PostgreSQL for the tests of the store: the embedded one, run once per module.

Import the fixtures you need in a test module::

    from pg_fixtures import postgres, fresh_database  # noqa: F401

With TGFLEET_DATABASE_URL set, that server is used instead (a fresh database each test).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator

import pytest
from harness import EXTERNAL_DSN, create_database, drop_database, short_tmpdir

from controller.home import Home
from controller.pg import prepare_embedded_pg, wait_for_pg
from controller.sysusers import open_path_prefix


@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
    """The DSN of a PostgreSQL server's admin database, up for this module's tests."""
    if EXTERNAL_DSN is not None:
        yield EXTERNAL_DSN
        return
    root = short_tmpdir("tgfp")
    home = Home(root / "home")
    home.check_socket_paths()
    home.make_dirs()
    pg = prepare_embedded_pg(home)
    as_user = pg.user is not None
    # Open to local users as a packaged server's socket is: as root, a fleet's controller
    # connects as that fleet's service user.
    home.pg_run.chmod(0o755)
    open_path_prefix(home.pg_run)
    with (home.logs_dir / "postgres.log").open("ab") as log:
        # As circusd runs it (controller/render.py), minus the supervisor.
        server = subprocess.Popen(
            [str(pg.postgres), *pg.args, "-c", "unix_socket_permissions=0777"],
            cwd=pg.working_dir,
            env={"LANG": "C.UTF-8", "PGDATA": str(pg.data_dir), "PATH": os.defpath},
            user=pg.user,
            group=pg.group,
            extra_groups=[] if as_user else None,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        asyncio.run(wait_for_pg(pg.dsn, timeout=30))
        yield pg.dsn
    finally:
        server.send_signal(signal.SIGINT)  # the fast shutdown: open connections do not hold it
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(5)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def fresh_database(postgres: str) -> Iterator[str]:
    """The DSN of a new, empty database, dropped after the test."""
    dsn = create_database(postgres)
    try:
        yield dsn
    finally:
        drop_database(postgres, dsn)
