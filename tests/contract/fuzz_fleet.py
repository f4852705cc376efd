"""Run a fleet and schemathesis against it, inside the network namespace this runs in.

Started by test_openapi_fuzz.py under ``unshare --net``: the namespace has only a
loopback, so the bots that fuzzed specs start (random Telegram servers among
them) can reach nothing outside this machine. Exit status: schemathesis's.
"""

from __future__ import annotations

import fcntl
import socket
import struct
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness import free_port, running_fleet, short_tmpdir

HERE = Path(__file__).resolve().parent
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1


def loopback_up() -> None:
    """``ip link set lo up`` without iproute2: a new namespace's loopback starts down."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sH14s", b"lo", 0, b"")
        flags = struct.unpack("16sH14s", fcntl.ioctl(sock, SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack("16sH14s", b"lo", flags | IFF_UP, b""))


def main(report: Path, examples: str, public_key: str) -> int:
    loopback_up()
    root = short_tmpdir("tgfz")
    # schemathesis probes every operation with wrong tokens and expects 401 each time;
    # the throttle that turns many of them into 429 has tests of its own.
    quiet = {"TGFLEET_AUTH_FAILURE_LIMIT": "1000000"}
    with running_fleet(root, None, env=quiet) as fleet:
        # Bots that fuzzed bodies start reach a closed local port and retry.
        fleet.api(
            "PUT",
            "/api/v1/defaults",
            {
                "autostart": False,
                "telegram": {
                    "api_id": 1,
                    "api_hash": "fuzz",
                    "server": {
                        "host": "127.0.0.1",
                        "port": free_port(),
                        "dc_id": 2,
                        "public_key": public_key,
                    },
                },
            },
        )
        # A token of its own, that may do everything the API offers: the run may
        # revoke what it creates, never the operator's.
        token = fleet.api("POST", "/api/v1/tokens", {"name": "fuzz", "scope": "admin"})["token"]
        command = [
            str(Path(sys.executable).parent / "schemathesis"),
            *("--config-file", str(HERE / "schemathesis.toml")),
            "run",
            f"http://{fleet.listen}/openapi.json",
            *("--header", f"Authorization: Bearer {token}"),
            *("--checks", "all"),
            *("--phases", "examples,coverage,fuzzing,stateful"),
            *("--max-examples", examples),
            *("--workers", "1", "--seed", "1"),
            # A stream that never ends by design; its frames are tested in test_fleet.
            *("--exclude-operation-id", "get_api_v1_events"),
            # Revoking follows links from GET /tokens to the run's own token, after which
            # every request is 401 and proves nothing; test_fleet covers revocation.
            *("--exclude-operation-id", "delete_api_v1_tokens_name"),
        ]
        with open(report, "w") as out:
            done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, timeout=900)
        # The operator's token still works: nothing the run did locked them out.
        fleet.api("GET", "/api/v1/bots")
    return done.returncode


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]).read_text()))
