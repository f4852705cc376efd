"""A small async client of the sandbox's admin HTTP API (demo mode, tests, the CLI)."""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import aiohttp

DEFAULT_ADMIN = "127.0.0.1:8712"


class AdminError(Exception):
    """The admin API answered an error (its problem+json detail) or could not be reached."""

    def __init__(self, message: str, status: int | None = None, errors: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.errors = errors


@dataclass(frozen=True)
class BotInfo:
    id: int
    name: str
    username: str
    token: str


@dataclass(frozen=True)
class Message:
    """A message in a simulated user's box."""

    id: int
    peer: str | None
    peer_id: int
    out: bool
    text: str
    date: int
    edit_date: int | None
    reply_to: int | None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Message:
        return cls(
            id=int(data["id"]),
            peer=data.get("peer"),
            peer_id=int(data["peer_id"]),
            out=bool(data["out"]),
            text=str(data["text"]),
            date=int(data["date"]),
            edit_date=data.get("edit_date"),
            reply_to=data.get("reply_to"),
        )


def admin_url(address: str | None = None) -> str:
    """``http://HOST:PORT`` from an address, ``TGFLEET_SANDBOX_ADMIN``, or the default."""
    chosen = address or os.environ.get("TGFLEET_SANDBOX_ADMIN") or DEFAULT_ADMIN
    return chosen if chosen.startswith(("http://", "https://")) else f"http://{chosen}"


class AdminClient:
    """``async with AdminClient(url) as admin: await admin.create_bot("shop")``."""

    def __init__(self, url: str | None = None, *, timeout_s: float = 10.0) -> None:
        self.url = admin_url(url).rstrip("/")
        self._timeout_s = timeout_s
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> AdminClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: dict[str, str] | None = None,
        timeout_s: float | None = None,
    ) -> Any:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        timeout = aiohttp.ClientTimeout(total=timeout_s or self._timeout_s)
        try:
            async with self._session.request(
                method, self.url + path, json=json, params=params, timeout=timeout
            ) as response:
                body = await response.json(content_type=None)
                if response.status >= 400:
                    detail = body.get("detail") if isinstance(body, dict) else None
                    listed = body.get("errors") if isinstance(body, dict) else None
                    errors = {
                        str(e.get("field")): str(e.get("message"))
                        for e in (listed if isinstance(listed, list) else [])
                        if isinstance(e, dict)
                    }
                    fields = errors.items()
                    extra = [f"{k}: {v}" for k, v in fields if f"{k}: {v}" not in (detail or "")]
                    suffix = f" ({'; '.join(extra)})" if extra else ""
                    raise AdminError(
                        f"{method} {path}: {response.status} {detail or response.reason}{suffix}",
                        response.status,
                        errors,
                    )
                return body
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise AdminError(
                f"sandbox admin API at {self.url} unreachable: {exc or type(exc).__name__}"
            ) from exc

    async def health(self) -> dict[str, Any]:
        result: dict[str, Any] = await self._request("GET", "/healthz")
        return result

    async def create_bot(self, name: str) -> BotInfo:
        data = await self._request("POST", "/api/v1/bots", json={"name": name})
        return BotInfo(data["id"], data["name"], data["username"], data["token"])

    async def list_bots(self) -> list[BotInfo]:
        data = await self._request("GET", "/api/v1/bots")
        return [BotInfo(b["id"], b["name"], b["username"], b["token"]) for b in data["bots"]]

    async def get_bot(self, name: str) -> BotInfo:
        b = await self._request("GET", f"/api/v1/bots/{name}")
        return BotInfo(b["id"], b["name"], b["username"], b["token"])

    async def send_as_user(
        self, user: str, to_username: str, text: str, *, reply_to: int | None = None
    ) -> Message:
        body: dict[str, Any] = {"to": to_username, "text": text}
        if reply_to is not None:
            body["reply_to"] = reply_to
        data = await self._request("POST", f"/api/v1/users/{user}/messages", json=body)
        return Message.from_json(data)

    async def messages(
        self,
        user: str,
        *,
        peer: str | None = None,
        after_id: int = 0,
        direction: str = "all",
        wait_s: float = 0.0,
        limit: int = 100,
    ) -> list[Message]:
        params = {"after_id": str(after_id), "direction": direction, "limit": str(limit)}
        if peer is not None:
            params["peer"] = peer
        if wait_s:
            params["wait"] = f"{wait_s:g}"
        data = await self._request(
            "GET",
            f"/api/v1/users/{user}/messages",
            params=params,
            timeout_s=wait_s + self._timeout_s,
        )
        return [Message.from_json(m) for m in data["messages"]]

    async def wait_for_reply(
        self, user: str, from_username: str, *, after_id: int = 0, timeout_s: float = 10.0
    ) -> Message:
        """The first message from ``from_username`` after ``after_id`` in the user's box."""
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no reply from @{from_username} to {user} in {timeout_s:g}s")
            found = await self.messages(
                user,
                peer=from_username,
                after_id=after_id,
                direction="in",
                wait_s=min(remaining, 30.0),
                limit=1,
            )
            if found:
                return found[0]
            await asyncio.sleep(0)

    async def set_fault(
        self,
        target: str,
        kind: str,
        *,
        ms: int | None = None,
        seconds: int | None = None,
        scope: str | None = None,
    ) -> dict[str, Any]:
        """Inject a fault; ``scope="live"`` blackholes only the connections open now."""
        body: dict[str, Any] = {"target": target, "kind": kind}
        if ms is not None:
            body["ms"] = ms
        if seconds is not None:
            body["seconds"] = seconds
        if scope is not None:
            body["scope"] = scope
        result: dict[str, Any] = await self._request("POST", "/api/v1/faults", json=body)
        return result

    async def clear_fault(self, target: str) -> None:
        await self._request("DELETE", f"/api/v1/faults/{target}")

    async def faults(self) -> list[dict[str, Any]]:
        data = await self._request("GET", "/api/v1/faults")
        return list(data["faults"])
