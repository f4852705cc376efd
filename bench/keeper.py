"""What a privileged operation costs the unprivileged controller: one round trip to the
keeper, and circusd's commands through the gate against circusd's own socket.

Run (as root: the keeper and the gate run only for a fleet run as root):
    .venv/bin/python bench/keeper.py [--calls 200]
A fleet of its own (no bot); as the fleet's service user, with the fleet's group (as
the controller runs), a client times ``--calls`` keeper requests (``has_config``,
``usage`` of nothing) and ``status`` through the gate; as root, ``status`` on
circusd's own socket. Prints median / max in milliseconds, and circusd's RSS.
"""

from __future__ import annotations

import argparse
import grp
import os
import pwd
import shutil
import subprocess
import sys
from pathlib import Path

import psutil
from _fleet import running_fleet, short_tmpdir

from controller.botusers import fleet_group_name, service_user_name

CLIENT = """
import json, socket, statistics, sys, time, zmq

keeper, gate, circus, calls = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])


def keeper_call(request):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.connect(keeper)
        conn.sendall(json.dumps(request).encode())
        conn.shutdown(socket.SHUT_WR)
        answer = json.loads(conn.makefile().read())
    assert answer["ok"], answer


context = zmq.Context()


def circus_call(endpoint):
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    sock.send(json.dumps({"id": "1", "command": "status", "properties": {}}).encode())
    answer = json.loads(sock.recv())
    sock.close()
    assert answer["status"] == "ok", answer


def timed(call, *args):
    spent = []
    for _ in range(calls):
        started = time.perf_counter()
        call(*args)
        spent.append((time.perf_counter() - started) * 1000)
    return f"{statistics.median(spent):.2f} ms / {max(spent):.2f} ms"


if gate != "-":
    print("keeper has_config:", timed(keeper_call, {"op": "has_config", "bot": "absent"}))
    print("keeper usage (no bot):", timed(keeper_call, {"op": "usage", "pids": {}}))
    print("status through the gate:", timed(circus_call, gate))
else:
    print("status on circusd's own socket:", timed(circus_call, circus))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: the keeper and the gate serve a fleet run as root")
    root = short_tmpdir("tgfk")
    try:
        with running_fleet(root, None) as fleet:
            home = fleet.home
            service = pwd.getpwnam(service_user_name(home))
            group = grp.getgrnam(fleet_group_name(home)).gr_gid
            base = [sys.executable, "-I", "-c", CLIENT, str(home.keeper_socket)]
            for gate, user in ((home.circus_gate_endpoint, service.pw_uid), ("-", 0)):
                done = subprocess.run(
                    [*base, gate, home.circus_endpoint, str(args.calls)],
                    capture_output=True,
                    text=True,
                    timeout=600,
                    user=user,
                    group=group if user else 0,
                    extra_groups=[],
                    check=False,
                )
                print(done.stdout, end="", file=sys.stdout)
                if done.returncode:
                    sys.exit(done.stderr)
            circusd = psutil.Process(fleet.proc.pid if fleet.proc else 0)
            print(
                f"circusd (with the keeper and the gate): RSS {circusd.memory_info().rss / 2**20:.1f} MB"
            )
            print(f"load average: {Path('/proc/loadavg').read_text().split()[0]}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
