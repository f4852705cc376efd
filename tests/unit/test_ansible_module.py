"""The Ansible role's module (deploy/ansible/roles/tgfleet/library/tgfleet_fleet.py)
against the real API app over the shipped fakes (InMemoryStore, FakeSupervisor), served
over HTTPS as the role's `tgfleet_tls_cert` serves it: what it plans for a bot's `host`,
and that planning again after applying the plan finds nothing to do (idempotence).
tests/integration/test_ansible.py runs the whole role against a real fleet."""

from __future__ import annotations

import asyncio
import importlib.util
import ssl
import urllib.error
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer
from harness import fleet_in_memory, self_signed_certificate

from controller.api import build_app, hash_token
from controller.memstore import InMemoryStore

LIBRARY = (
    Path(__file__).resolve().parents[2] / "deploy" / "ansible" / "roles" / "tgfleet" / "library"
)


def _load_module() -> Any:
    """The role's module: a file of the role, not a package on the path."""
    spec = importlib.util.spec_from_file_location("tgfleet_fleet", LIBRARY / "tgfleet_fleet.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tgfleet_fleet = _load_module()

ADMIN = "tgf_admin-secret"
SPEC = {"token": "1:abc", "telegram": {"api_id": 1, "api_hash": "h" * 32}}


@dataclass
class Served:
    url: str
    ca_file: str
    store: InMemoryStore

    def api(self) -> Any:
        return tgfleet_fleet.Api(self.url, ADMIN, self.ca_file)

    async def plan(self, declared: dict[str, Any]) -> tuple[list[Any], Any, Any]:
        # The module is synchronous (urllib): off the loop that serves the API.
        return await asyncio.to_thread(tgfleet_fleet.plan_bot, self.api(), declared, False)

    async def apply(self, steps: list[Any]) -> None:
        api = self.api()
        for method, path, body in steps:
            await asyncio.to_thread(api.ok, method, path, body)


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    store, home, fleet = fleet_in_memory(tmp_path, host="alpha")
    await store.ensure_token("admin", hash_token(ADMIN))
    await store.create_bot("shop", SPEC, "stopped", "tester", "alpha")
    cert, key = self_signed_certificate(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    server = TestServer(build_app(fleet, store, home, lambda topic, event: None), host="127.0.0.1")
    await server.start_server(ssl=context)
    try:
        yield Served(str(server.make_url("")).rstrip("/"), str(cert), store)
    finally:
        await server.close()
        await fleet.close()


def declared(**fields: Any) -> dict[str, Any]:
    return {"name": "shop", "state": "stopped", **SPEC, **fields}


async def test_the_same_host_changes_nothing_and_another_moves_the_bot(served: Served) -> None:
    steps, before, after = await served.plan(declared(host="alpha"))
    assert steps == [] and before["host"] == after["host"] == "alpha"
    steps, _, _ = await served.plan(declared())  # no host declared: it is left alone
    assert steps == []

    steps, before, after = await served.plan(declared(host="beta"))
    assert [(method, path) for method, path, _ in steps] == [("PATCH", "/api/v1/bots/shop")]
    assert steps[0][2]["host"] == "beta" and "token" not in steps[0][2]
    assert (before["host"], after["host"]) == ("alpha", "beta")
    await served.apply(steps)
    assert (await served.store.get_bot("shop")).host == "beta"
    assert (await served.plan(declared(host="beta")))[0] == []

    # Null: the host whose API answers (alpha), and back it goes.
    steps, _, after = await served.plan(declared(host=None))
    assert [body["host"] for _, _, body in steps] == ["alpha"] and after["host"] == "alpha"
    await served.apply(steps)
    assert (await served.plan(declared(host=None)))[0] == []


async def test_a_new_bot_is_created_on_its_host(served: Served) -> None:
    new = {**declared(host="beta"), "name": "news"}
    steps, before, after = await served.plan(new)
    assert before is None and after["host"] == "beta"
    assert [(method, path) for method, path, _ in steps] == [("POST", "/api/v1/bots")]
    assert steps[0][2]["host"] == "beta"
    await served.apply(steps)
    assert (await served.store.get_bot("news")).host == "beta"
    assert (await served.plan(new))[0] == []


async def test_a_bad_host_is_the_api_s_422_naming_the_field(served: Served) -> None:
    steps, _, _ = await served.plan(declared(host="Not_A_Host"))
    with pytest.raises(tgfleet_fleet.ApiFailure, match=r"HTTP 422: .*\(host: must be a host name"):
        await served.apply(steps)
    assert (await served.store.get_bot("shop")).host == "alpha"


async def test_an_https_api_is_trusted_only_through_its_self_signed_certificate(
    served: Served, tmp_path: Path
) -> None:
    (tmp_path / "other").mkdir()
    stranger, _ = self_signed_certificate(tmp_path / "other")
    api = tgfleet_fleet.Api(served.url, ADMIN, str(stranger))
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
        await asyncio.to_thread(api.call, "GET", "/api/v1/bots/shop")
    status, bot = await asyncio.to_thread(served.api().call, "GET", "/api/v1/bots/shop")
    assert status == 200 and bot["host"] == "alpha"
