"""No lost update: a bot's ETag, If-Match, and concurrent PATCHes of one bot."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from typing import Any

import pytest
from drills import unique_name
from harness import Fleet

pytestmark = pytest.mark.integration


def request(
    fleet: Fleet, method: str, path: str, body: object | None = None, **headers: str
) -> tuple[int, dict[str, str], Any]:
    """Status, headers and JSON body of one API request."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"http://{fleet.listen}{path}", data=data, method=method)
    req.add_header("Authorization", f"Bearer {fleet.home.admin_token.read_text().strip()}")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    for key, value in headers.items():
        req.add_header(key.replace("_", "-"), value)
    try:
        with urllib.request.urlopen(req, timeout=60) as answer:
            return answer.status, dict(answer.headers), json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), json.loads(exc.read())


def idle_bot(fleet: Fleet) -> str:
    """A bot that never starts: updates need no process."""
    name = unique_name("patched")
    fleet.api("POST", "/api/v1/bots", {"name": name, "token": "1:abc", "autostart": False})
    return name


def test_two_concurrent_patches_of_different_keys_both_land(fleet: Fleet) -> None:
    name = idle_bot(fleet)
    path = f"/api/v1/bots/{name}"
    answers: list[int] = []

    def patch(key: str, value: int, start: threading.Barrier) -> None:
        start.wait()
        status, _, _ = request(fleet, "PATCH", path, {"settings": {key: value}})
        answers.append(status)

    for round_ in range(8):
        answers.clear()
        start = threading.Barrier(2)
        threads = [
            threading.Thread(target=patch, args=(key, round_, start))
            for key in (f"a{round_}", f"b{round_}")
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert answers == [200, 200]
        settings = fleet.bot(name)["spec"]["settings"]
        assert settings[f"a{round_}"] == round_ and settings[f"b{round_}"] == round_, settings
    bot = fleet.bot(name)
    assert len(bot["spec"]["settings"]) == 16 and bot["version"] == 17
    fleet.api("DELETE", path)


def test_if_match_refuses_a_stale_etag_and_changes_nothing(fleet: Fleet) -> None:
    name = idle_bot(fleet)
    path = f"/api/v1/bots/{name}"
    status, headers, bot = request(fleet, "GET", path)
    assert status == 200 and headers["ETag"] == f'"{bot["version"]}"'
    first = headers["ETag"]

    status, headers, bot = request(
        fleet, "PATCH", path, {"settings": {"colour": "blue"}}, If_Match=first
    )
    assert status == 200 and bot["spec"]["settings"] == {"colour": "blue"}
    second = headers["ETag"]
    assert second != first

    # Someone else read `first` and writes now: refused, nothing changes.
    status, headers, problem = request(
        fleet, "PATCH", path, {"settings": {"colour": "red"}}, If_Match=first
    )
    assert status == 412 and headers["Content-Type"].startswith("application/problem+json")
    assert problem["title"] == "Precondition failed" and second in problem["detail"]
    for weak_or_foreign in (f"W/{second}", "nonsense"):
        status, _, _ = request(
            fleet, "PATCH", path, {"settings": {"colour": "red"}}, If_Match=weak_or_foreign
        )
        assert status == 412
    status, headers, bot = request(fleet, "GET", path)
    assert bot["spec"]["settings"] == {"colour": "blue"} and headers["ETag"] == second

    # Any of several tags, or `*`, will do.
    status, _, bot = request(
        fleet, "PATCH", path, {"settings": {"size": 1}}, If_Match=f"{first}, {second}"
    )
    assert status == 200 and bot["spec"]["settings"] == {"colour": "blue", "size": 1}
    status, _, _ = request(fleet, "PATCH", path, {"settings": {"size": 2}}, If_Match="*")
    assert status == 200
    fleet.api("DELETE", path)
