"""What a running fleet exposes: its sockets, its database's contents, its API's refusals."""

from __future__ import annotations

import ipaddress

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
