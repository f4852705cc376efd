"""The admin API validates its input: problem+json with errors per field, and no change."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from tgsandbox.admin_client import AdminClient
from tgsandbox.service import Sandbox


async def raw(tg: Sandbox, method: str, path: str, **kwargs: Any) -> tuple[int, str, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, tg.admin_url + path, **kwargs) as response,
    ):
        return response.status, response.content_type, await response.json(content_type=None)


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status", "field"),
    [
        ("POST", "/api/v1/bots", {"json": {"name": "Bad Name"}}, 422, "name"),
        ("POST", "/api/v1/bots", {"json": {}}, 422, "name"),
        ("POST", "/api/v1/bots", {"json": {"name": "ok", "colour": "red"}}, 422, "colour"),
        ("POST", "/api/v1/bots", {"data": b"{not json"}, 400, None),
        ("POST", "/api/v1/bots", {"json": ["name"]}, 400, None),
        ("POST", "/api/v1/users/alice/messages", {"json": {"to": "known_bot"}}, 422, "text"),
        (
            "POST",
            "/api/v1/users/alice/messages",
            {"json": {"to": "nobody_bot", "text": "hi"}},
            422,
            "to",
        ),
        (
            "POST",
            "/api/v1/users/alice/messages",
            {"json": {"to": "known_bot", "text": "x" * 5000}},
            422,
            "text",
        ),
        (
            "POST",
            "/api/v1/users/Not A User/messages",
            {"json": {"to": "known_bot", "text": "hi"}},
            422,
            "user",
        ),
        ("GET", "/api/v1/users/alice/messages", {"params": {"wait": "600"}}, 422, "wait"),
        ("GET", "/api/v1/users/alice/messages", {"params": {"direction": "up"}}, 422, "direction"),
        ("GET", "/api/v1/bots/missing", {}, 404, None),
        ("DELETE", "/api/v1/faults/missing", {}, 404, None),
    ],
)
async def test_bad_requests_get_problems_and_change_nothing(
    tg: Sandbox,
    admin: AdminClient,
    method: str,
    path: str,
    kwargs: dict[str, Any],
    status: int,
    field: str | None,
) -> None:
    await admin.create_bot("known")
    accounts_before = (
        len(tg.server.world.bots()),
        tg.server.world.pts(tg.server.world.bot("known").id),
    )
    got_status, content_type, body = await raw(tg, method, path, **kwargs)
    assert (got_status, content_type) == (status, "application/problem+json")
    assert {"type", "title", "status", "detail"} <= set(body) and body["status"] == status
    if field is not None:
        assert field in {e["field"] for e in body["errors"]}
    assert (len(tg.server.world.bots()), tg.server.world.pts(tg.server.world.bot("known").id)) == (
        accounts_before
    )
    assert [b.name for b in await admin.list_bots()] == ["known"]


async def test_duplicate_bot_is_a_conflict(admin: AdminClient) -> None:
    first = await admin.create_bot("twin")
    with pytest.raises(Exception, match="409"):
        await admin.create_bot("twin")
    assert await admin.list_bots() == [first]
    assert (await admin.get_bot("twin_bot")).token == first.token
