"""The event bus between bots (IR3): published, persisted, delivered to subscribers, streamed."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from typing import Any

import pytest
from harness import Fleet, Sandbox, wait_for

pytestmark = pytest.mark.integration

RELAY = "botrunner.plugins.relay:setup"


class EventStream:
    """GET /api/v1/events (server-sent events) on a plain socket, read in a thread."""

    def __init__(self, fleet: Fleet) -> None:
        host, port = fleet.listen.split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=60)
        request = (
            f"GET /api/v1/events HTTP/1.1\r\nHost: {fleet.listen}\r\n"
            f"Authorization: Bearer {fleet.client().token}\r\n\r\n"
        )
        self.sock.sendall(request.encode())
        self.lines = self.sock.makefile("rb")
        status = self.lines.readline().decode()
        assert status.split()[1] == "200", status
        headers = []
        while (line := self.lines.readline().decode().strip()) != "":
            headers.append(line.lower())
        assert "content-type: text/event-stream" in headers
        self.events: list[dict[str, Any]] = []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        # The body is chunked: data lines are whole inside chunks, size lines are skipped.
        with contextlib.suppress(OSError, ValueError):
            for raw in self.lines:
                line = raw.decode().rstrip("\r\n")
                if line.startswith("data: "):
                    self.events.append(json.loads(line[6:]))

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.thread.join(timeout=10)
        self.lines.close()
        self.sock.close()


def acks(fleet: Fleet, name: str) -> list[dict[str, Any]]:
    history = fleet.api("GET", f"/api/v1/bots/{name}/events?limit=1000")["events"]
    return [e["data"]["data"] for e in history if e["kind"] == "bus" and e["reason"] == "acks"]


def test_bots_talk_over_the_bus(fleet: Fleet, sandbox: Sandbox) -> None:
    stream = EventStream(fleet)
    try:
        fleet.api(
            "POST",
            "/api/v1/bots",
            {
                "name": "speaker",
                "token": sandbox.create_bot("speaker"),
                "plugins": [RELAY],
                "settings": {"topic": "chat"},
            },
        )
        fleet.api(
            "POST",
            "/api/v1/bots",
            {
                "name": "listener",
                "token": sandbox.create_bot("listener"),
                "plugins": [RELAY],
                "settings": {"listen": ["chat"]},
                "subscribe": ["chat"],
            },
        )
        fleet.wait_state("speaker", "running")
        fleet.wait_state("listener", "running")

        reply = sandbox.cli("send", "speaker_bot", "hello bus", "--user", "carol", "--wait", "20")
        assert reply == "relayed to chat"
        got = wait_for("the listener's ack", lambda: acks(fleet, "listener"))
        assert got[0] == {
            "ack": {"text": "hello bus", "from": "speaker"},
            "by": "listener",
            "source": "speaker",
        }
        # The publisher does not get its own event back.
        assert acks(fleet, "speaker") == []

        published = fleet.api("POST", "/api/v1/events", {"topic": "chat", "data": {"n": 1}})
        assert published["kind"] == "bus" and published["reason"] == "chat"
        wait_for(
            "the ack of the API's event",
            lambda: any(
                a["source"] == "controller" and a["ack"] == {"n": 1}
                for a in acks(fleet, "listener")
            ),
        )
        streamed = wait_for(
            "both acks on the event stream",
            lambda: (
                (s := [e for e in stream.events if e["kind"] == "bus" and e["reason"] == "acks"])
                and len(s) >= 2
                and s
            ),
        )
        assert {e["bot"] for e in streamed} == {"listener"}
    finally:
        stream.close()
        for name in ("speaker", "listener"):
            fleet.api("DELETE", f"/api/v1/bots/{name}")
