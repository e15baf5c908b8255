"""Helpers for the management API tests: a Directory on a temporary SQLite store, the API served
over real HTTP on 127.0.0.1:0 inside the test's nursery, and an httpx client for it.

Not a ``conftest.py`` (that one belongs to the store's tests): test modules import what they
use from here explicitly.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import trio
from prometheus_client import CollectorRegistry

from portolan.api import create_app, serve_api
from portolan.service import Directory

TOKEN = "test-token-5f1b"


def new_uuid() -> str:
    return str(uuid.uuid4())


@dataclass
class ApiUnderTest:
    """A running API: its Directory, base URL, client and (optional) metrics registry."""

    directory: Any
    url: str
    client: httpx.AsyncClient
    registry: CollectorRegistry
    token: str | None

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    async def put(self, path: str, body: Any) -> httpx.Response:
        return await self.client.put(path, json=body, headers=self.auth)

    async def post(self, path: str, body: Any) -> httpx.Response:
        return await self.client.post(path, json=body, headers=self.auth)

    async def delete(self, path: str) -> httpx.Response:
        return await self.client.delete(path, headers=self.auth)

    async def get(self, path: str, **params: Any) -> httpx.Response:
        return await self.client.get(path, params=params or None)

    # Shortcuts that assert success and return the JSON.

    async def cn(self, ip: str, port: int | None = None, cn_uuid: str | None = None) -> dict:
        body: dict[str, Any] = {"ip": ip}
        if port is not None:
            body["port"] = port
        r = await self.put(f"/cns/{cn_uuid or new_uuid()}", body)
        assert r.status_code in (200, 201), r.text
        return r.json()

    async def network(self, **fields: Any) -> dict:
        body = {
            "name": "net",
            "owner_uuid": OWNER,
            "vnet_id": 12340,
            "vlan_id": 0,
            "subnet": "10.1.0.0/24",
        }
        body.update(fields)
        r = await self.post("/networks", body)
        assert r.status_code == 201, r.text
        return r.json()

    async def vnic(self, network_uuid: str, cn_uuid: str, **fields: Any) -> dict:
        r = await self.post("/vnics", {"network_uuid": network_uuid, "cn_uuid": cn_uuid, **fields})
        assert r.status_code == 201, r.text
        return r.json()


OWNER = "930896af-bf8c-48d4-885c-6573a94b1853"


async def open_directory(path: Path) -> Any:
    return await Directory.open(f"sqlite:{path}")


@asynccontextmanager
async def running_api(
    directory: Any, *, token: str | None = None, registry: CollectorRegistry | None = None
) -> AsyncIterator[ApiUnderTest]:
    """Serve the API for ``directory`` on 127.0.0.1:0 until the block ends."""
    registry = registry if registry is not None else CollectorRegistry()
    app = create_app(directory, token=token, registry=registry)
    async with trio.open_nursery() as nursery:
        host, port = await nursery.start(serve_api, app, "127.0.0.1", 0)
        url = f"http://{host}:{port}"
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            yield ApiUnderTest(directory, url, client, registry, token)
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def directory_and_api(
    tmp_path: Path, *, token: str | None = None
) -> AsyncIterator[ApiUnderTest]:
    directory = await open_directory(tmp_path / "portolan.db")
    try:
        async with running_api(directory, token=token) as api:
            yield api
    finally:
        await directory.aclose()
