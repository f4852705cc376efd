"""What a running fleet exposes: its sockets, its database's contents, its API's refusals."""

from __future__ import annotations

import importlib.util
import ipaddress
import json
import subprocess
from pathlib import Path

import psutil
import pytest
from drills import sandbox_name
from harness import Fleet, Sandbox, echo_spec

pytestmark = pytest.mark.integration


def test_every_socket_of_the_fleet_is_loopback_or_unix(fleet: Fleet, sandbox: Sandbox) -> None:
    token = sandbox.create_bot(sandbox_name("sockets"))
    fleet.api("POST", "/api/v1/bots", echo_spec("sockets", token))
    bot = fleet.wait_state("sockets", "running")
    processes = [fleet.proc and psutil.Process(fleet.proc.pid), *fleet.processes()]
    pids = {p.pid for p in processes if p is not None}
    assert bot["pid"] in pids
    names = {p.name() for p in processes if p is not None}
    held = []
    for pid in pids:
        try:
            held += [(pid, c) for c in psutil.Process(pid).net_connections(kind="inet")]
        except psutil.NoSuchProcess:
            continue  # a short-lived child (a launcher) went away meanwhile
    assert held, f"no inet socket at all among {names}: the check would prove nothing"
    exposed = [
        (pid, psutil.Process(pid).name(), c.type.name, c.laddr, c.status)
        for pid, c in held
        if not ipaddress.ip_address(c.laddr.ip).is_loopback
    ]
    assert exposed == []
    # circusd's multicast discovery (UDP 12027) is off.
    assert not [c for _, c in held if c.laddr.port == 12027]
    fleet.api("DELETE", "/api/v1/bots/sockets")


def test_a_bots_token_is_nowhere_in_a_dump_of_the_database(fleet: Fleet, sandbox: Sandbox) -> None:
    token = sandbox.create_bot(sandbox_name("dumped"))
    fleet.api("POST", "/api/v1/bots", echo_spec("dumped", token))
    fleet.wait_state("dumped", "running")
    fleet.api("POST", "/api/v1/bots/dumped/restart")
    fleet.wait_state("dumped", "running")
    fleet.api("PATCH", "/api/v1/bots/dumped", {"settings": {"note": "changed"}})
    fleet.api("POST", "/api/v1/bots/dumped/stop")
    fleet.wait_state("dumped", "stopped")
    dsn = json.loads(fleet.home.controller_json.read_text())["database_url"]
    # Located, not imported (importing pgserver warns about XDG_RUNTIME_DIR).
    found = importlib.util.find_spec("pgserver")
    assert found is not None and found.submodule_search_locations
    pg_dump = Path(found.submodule_search_locations[0]) / "pginstall" / "bin" / "pg_dump"
    dump = subprocess.run(
        [str(pg_dump), "--dbname", dsn], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert "CREATE TABLE public.bots" in dump and "tgfleet-sealed:v1:" in dump
    assert token not in dump
    assert token.split(":", 1)[1] not in dump
    fleet.api("DELETE", "/api/v1/bots/dumped")
