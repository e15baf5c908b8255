"""Shared fixtures for portolan's store / index / Directory tests: real SQLite files in tmp_path."""

from __future__ import annotations

import ipaddress
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from portolan.model import LOG_ROUTE, LOG_VL2, LOG_VL3, LogRecord, Network
from portolan.service import Directory
from protocol.addr import format_mac

CN1 = "11111111-1111-4111-8111-111111111111"
CN2 = "22222222-2222-4222-8222-222222222222"
CN3 = "33333333-3333-4333-8333-333333333333"
CN4 = "44444444-4444-4444-8444-444444444444"
OWNER = "99999999-9999-4999-8999-999999999999"
VNET = 12340
UL1, UL2, UL3, UL4 = "192.168.1.1", "192.168.1.2", "192.168.1.3", "192.168.1.4"


@pytest.fixture
def store_url(tmp_path: Path) -> str:
    return f"sqlite:{tmp_path / 'portolan.db'}"


@pytest.fixture
async def directory(store_url: str) -> AsyncIterator[Directory]:
    d = await Directory.open(store_url)
    try:
        yield d
    finally:
        await d.aclose()


def summarize(records: list[LogRecord]) -> list[tuple[Any, ...]]:
    """A log as comparable tuples: ("VL2", mac, vnet) / ("VL3", ip, vlan, vnet) / ("ROUTE", ...)."""
    out: list[tuple[Any, ...]] = []
    for r in records:
        if r.type == LOG_VL2:
            assert r.mac is not None
            out.append(("VL2", format_mac(r.mac), r.vnet_id))
        elif r.type == LOG_VL3:
            out.append(("VL3", r.ip, r.vlan, r.vnet_id))
        elif r.type == LOG_ROUTE:
            out.append(("ROUTE", r.src_ip, r.dst_ip))
    return out


async def logs(d: Directory, *cns: str) -> dict[str, list[tuple[Any, ...]]]:
    return {cn: summarize(await d.log_records(cn)) for cn in cns}


async def drain(d: Directory, *cns: str) -> None:
    """Remove every pending log entry of the given CNs."""
    for cn in cns:
        recs = await d.log_records(cn)
        await d.remove_log([r.id for r in recs])


async def put_cns(d: Directory) -> None:
    """CN1..CN4 with underlay addresses UL1..UL4."""
    for cn, ip in ((CN1, UL1), (CN2, UL2), (CN3, UL3), (CN4, UL4)):
        await d.put_cn(cn, ip)


async def create_net(
    d: Directory, subnet: str = "10.0.0.0/24", vnet: int = VNET, **kw: Any
) -> Network:
    """A network of OWNER on VLAN 5; the gateway defaults to the subnet's first host."""
    kw.setdefault("gateway", str(next(iter(ipaddress.ip_network(subnet).hosts()))))
    return await d.create_network(
        name="fabric0", owner_uuid=OWNER, vnet_id=vnet, vlan_id=5, subnet=subnet, **kw
    )
