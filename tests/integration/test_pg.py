"""The embedded PostgreSQL as a real circusd watcher (as root: run by the pgserver user)."""

# The fixtures are imported (they live in circus_fixtures.py), so pytest's
# injection by argument name looks like a redefinition to ruff.
# ruff: noqa: F811

from __future__ import annotations

import os
import stat
import time
from collections.abc import Awaitable, Callable

import asyncpg
import psutil
import pytest
from circus_fixtures import (  # noqa: F401  (fixtures; tests/integration is on sys.path)
    PYTHON,
    Circusd,
    circusd_factory,
    short_home,
)

from controller.atomicfile import write_atomic
from controller.home import Home
from controller.pg import PG_SYSTEM_USER, PgUnavailable, prepare_embedded_pg, wait_for_pg
from controller.render import render_circus_ini

pytestmark = pytest.mark.integration

Factory = Callable[[Home], Awaitable[Circusd]]


async def test_embedded_pg_under_circusd(short_home: Home, circusd_factory: Factory) -> None:
    home = short_home
    started = time.monotonic()
    pg = prepare_embedded_pg(home)
    initdb_s = time.monotonic() - started
    version_mtime = (home.pg_data / "PG_VERSION").stat().st_mtime_ns
    assert stat.S_IMODE(home.pg_dir.stat().st_mode) == 0o700
    if os.geteuid() == 0:
        assert pg.user == PG_SYSTEM_USER
        assert home.pg_data.owner() == PG_SYSTEM_USER
        assert home.root.stat().st_mode & stat.S_IXOTH  # mkdtemp made it 0700; opened to o+x
        assert not home.root.stat().st_mode & stat.S_IROTH  # … but not readable

    write_atomic(
        home.circus_ini,
        render_circus_ini(
            home,
            python=PYTHON,
            listen="127.0.0.1:0",
            embedded_pg=pg,
            sandbox=None,
            controller_argv=[PYTHON, "-c", "import time; time.sleep(1e6)"],
        ),
    )
    circusd = await circusd_factory(home)
    client = circusd.client
    started = time.monotonic()
    await wait_for_pg(pg.dsn, timeout=20)
    ready_s = time.monotonic() - started
    (pid,) = await client.pids("postgres")
    await circusd.remember_pids()
    if os.geteuid() == 0:
        assert psutil.Process(pid).username() == PG_SYSTEM_USER

    # unix socket only, in pg/run; and a client holding a connection open …
    connection = await asyncpg.connect(pg.dsn)
    assert await connection.fetchval("SHOW listen_addresses") == ""
    assert await connection.fetchval("SHOW unix_socket_directories") == str(home.pg_run)
    await connection.execute("CREATE TABLE kept (v text); INSERT INTO kept VALUES ('yes')")

    # … does not hold up the stop: SIGINT is the fast shutdown (SIGTERM would wait for it)
    started = time.monotonic()
    await client.call("stop", name="postgres", match="simple", waiting=True)
    stop_s = time.monotonic() - started
    assert stop_s < 5, "graceful_timeout is 10 s: a smart shutdown would have run into it"
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert connection.is_closed() or not await _alive(connection)

    # a second start (prepare included) reuses the data dir
    again = prepare_embedded_pg(home)
    assert again == pg
    assert (home.pg_data / "PG_VERSION").stat().st_mtime_ns == version_mtime
    await client.start("postgres")
    await wait_for_pg(pg.dsn, timeout=20)
    await circusd.remember_pids()
    connection = await asyncpg.connect(pg.dsn)
    assert await connection.fetchval("SELECT v FROM kept") == "yes"
    await connection.close()
    print(f"initdb {initdb_s:.2f}s, first ready {ready_s:.2f}s, stop (INT) {stop_s:.2f}s")


async def _alive(connection: asyncpg.Connection) -> bool:
    try:
        await connection.fetchval("SELECT 1", timeout=2)
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
        return False
    return True


async def test_wait_for_pg_times_out(short_home: Home) -> None:
    started = time.monotonic()
    with pytest.raises(PgUnavailable):
        await wait_for_pg(f"postgresql://postgres@/postgres?host={short_home.pg_run}", 0.5)
    assert time.monotonic() - started < 2
