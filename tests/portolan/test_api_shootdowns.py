"""API changes reach compute nodes: after each API call returns, raw SVP against a real SVP server
answers the new state, and each CN's LOG_REQ yields exactly the shootdown entries CONVENTIONS
"Shootdowns" promises (recipients: every CN holding a VNIC of the vnet after the change, plus
the previous CN on a move; tag/firewall-only updates write none).

The SVP side is spoken by ``tests.support.svp_v1_client.StrictV1Client``, which checks every
reply as illumos varpd would, over a real TCP connection to `portolan.svp_server.SvpServer`.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from portolan.svp_server import SvpServer
from protocol.addr import format_mac, ip_text, ip_to_wire, parse_mac
from protocol.svp import (
    LogAck,
    LogRemove,
    LogRemoveAck,
    LogRequest,
    LogVL2Entry,
    LogVL3Entry,
    Status,
    VL2Ack,
    VL2Request,
    VL3Ack,
    VL3Request,
)
from tests.portolan.conftest_api import ApiUnderTest, new_uuid, open_directory, running_api
from tests.support.svp_v1_client import StrictV1Client

VNET = 12340
VLAN = 7
OTHER_VNET = 999
LOG_COUNT = 1024  # what illumos varpd asks for

_ids = itertools.count(1)


# -- a raw SVP session ---------------------------------------------------------------------


class SvpSession:
    """One SVP connection to the server, with the few requests these tests need."""

    def __init__(self, client: StrictV1Client) -> None:
        self.client = client

    async def vl2(self, mac: str, vnet_id: int) -> tuple[int, str] | None:
        ack = await self.client.request(VL2Request(next(_ids), parse_mac(mac), vnet_id))
        assert isinstance(ack, VL2Ack)
        if ack.status == Status.NOTFOUND:
            assert (ack.port, ack.addr) == (0, bytes(16))
            return None
        assert ack.status == Status.OK
        return ack.port, ip_text(ack.addr)

    async def vl3(self, ip: str, vnet_id: int) -> tuple[str, int, str] | None:
        ack = await self.client.request(VL3Request(next(_ids), ip_to_wire(ip), 1, vnet_id))
        assert isinstance(ack, VL3Ack)
        if ack.status == Status.NOTFOUND:
            return None
        assert ack.status == Status.OK
        return format_mac(ack.mac), ack.port, ip_text(ack.addr)

    async def log_req(self, underlay_ip: str) -> LogAck:
        ack = await self.client.request(LogRequest(next(_ids), LOG_COUNT, ip_to_wire(underlay_ip)))
        assert isinstance(ack, LogAck)
        assert ack.status == Status.OK
        return ack

    async def log_rm(self, entry_ids: list[bytes]) -> None:
        ack = await self.client.request(LogRemove(next(_ids), tuple(entry_ids)))
        assert isinstance(ack, LogRemoveAck) and ack.status == Status.OK

    async def drain(self, underlay_ip: str) -> list[tuple]:
        """Everything queued for the CN at ``underlay_ip`` (LOG_REQ until empty, LOG_RM each)."""
        out: list[tuple] = []
        while True:
            ack = await self.log_req(underlay_ip)
            if not ack.entries:
                return out
            out.extend(describe(e) for e in ack.entries)
            await self.log_rm([e.entry_id for e in ack.entries])


def describe(entry: Any) -> tuple:
    """A log entry without its random id: ("VL2", mac, vnet) or ("VL3", ip, vlan, vnet)."""
    if isinstance(entry, LogVL2Entry):
        return ("VL2", format_mac(entry.mac), entry.vnet_id)
    assert isinstance(entry, LogVL3Entry), entry
    return ("VL3", ip_text(entry.ip), entry.vlan, entry.vnet_id)


def vl2(mac: str, vnet_id: int = VNET) -> tuple:
    return ("VL2", mac, vnet_id)


def vl3(ip: str, vlan: int = VLAN, vnet_id: int = VNET) -> tuple:
    return ("VL3", ip, vlan, vnet_id)


@asynccontextmanager
async def svp_session(directory: Any) -> AsyncIterator[SvpSession]:
    server = SvpServer(directory)
    async with trio.open_nursery() as nursery:
        host, port = await nursery.start(server.serve, "127.0.0.1", 0)
        stream = await trio.open_tcp_stream(host, port)
        async with stream:
            yield SvpSession(StrictV1Client(stream))
        nursery.cancel_scope.cancel()


# -- the scenario --------------------------------------------------------------------------


@dataclass
class Cluster:
    api: ApiUnderTest
    svp: SvpSession
    cns: dict[str, dict[str, Any]]  # name -> CN JSON
    net: dict[str, Any]
    other_net: dict[str, Any]

    def ul(self, name: str) -> str:
        return self.cns[name]["ip"]

    async def logs(self) -> dict[str, list[tuple]]:
        """Drain every CN's log; entries sorted (the order inside one change is not pinned)."""
        return {name: sorted(await self.svp.drain(cn["ip"])) for name, cn in self.cns.items()}


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    directory = await open_directory(tmp_path / "portolan.db")
    try:
        async with running_api(directory) as api, svp_session(directory) as svp:
            cns = {
                "cn1": await api.cn("192.168.1.1"),
                "cn2": await api.cn("192.168.1.2", port=4790),
                "cn3": await api.cn("192.168.1.3"),
                "cn4": await api.cn("192.168.1.4"),
            }
            net = await api.network(vnet_id=VNET, vlan_id=VLAN, subnet="10.1.0.0/24")
            other_net = await api.network(vnet_id=OTHER_VNET, vlan_id=0, subnet="10.9.0.0/24")
            c = Cluster(api, svp, cns, net, other_net)
            # cn2 already holds a VNIC of the vnet; cn4 holds one of another vnet only.
            await api.vnic(net["uuid"], cns["cn2"]["uuid"], ip="10.1.0.2")
            await api.vnic(other_net["uuid"], cns["cn4"]["uuid"], ip="10.9.0.4")
            await c.logs()  # start from empty logs
            yield c
    finally:
        await directory.aclose()


async def test_create_answers_lookups_and_queues_vl3_for_every_vnet_cn(cluster: Cluster) -> None:
    c = cluster
    vnic = await c.api.vnic(c.net["uuid"], c.cns["cn1"]["uuid"], ip="10.1.0.10")
    mac = vnic["mac"]

    assert await c.svp.vl2(mac, VNET) == (4789, "192.168.1.1")
    assert await c.svp.vl3("10.1.0.10", VNET) == (mac, 4789, "192.168.1.1")
    assert await c.svp.vl2(mac, OTHER_VNET) is None

    assert await c.logs() == {
        "cn1": [vl3("10.1.0.10")],
        "cn2": [vl3("10.1.0.10")],
        "cn3": [],
        "cn4": [],
    }


async def test_move_answers_new_cn_and_queues_vl2_and_vl3_including_old_cn(
    cluster: Cluster,
) -> None:
    c = cluster
    vnic = await c.api.vnic(c.net["uuid"], c.cns["cn1"]["uuid"], ip="10.1.0.10")
    mac = vnic["mac"]
    await c.logs()

    r = await c.api.put(f"/vnics/{mac}", {"cn_uuid": c.cns["cn3"]["uuid"]})
    assert r.status_code == 200, r.text

    assert await c.svp.vl2(mac, VNET) == (4789, "192.168.1.3")
    assert await c.svp.vl3("10.1.0.10", VNET) == (mac, 4789, "192.168.1.3")

    moved = sorted([vl2(mac), vl3("10.1.0.10")])
    assert await c.logs() == {"cn1": moved, "cn2": moved, "cn3": moved, "cn4": []}

    # Moving to cn2 (port 4790): the answer carries the CN's underlay port.
    await c.api.put(f"/vnics/{mac}", {"cn_uuid": c.cns["cn2"]["uuid"]})
    assert await c.svp.vl2(mac, VNET) == (4790, "192.168.1.2")
    logs = await c.logs()
    assert logs["cn2"] == moved and logs["cn3"] == moved  # cn3 is the previous CN
    assert logs["cn1"] == [] and logs["cn4"] == []


async def test_ip_change_answers_new_ip_and_queues_vl3_for_old_and_new(cluster: Cluster) -> None:
    c = cluster
    vnic = await c.api.vnic(c.net["uuid"], c.cns["cn1"]["uuid"], ip="10.1.0.10")
    mac = vnic["mac"]
    await c.logs()

    r = await c.api.put(f"/vnics/{mac}", {"ip": "10.1.0.11"})
    assert r.status_code == 200, r.text

    assert await c.svp.vl3("10.1.0.11", VNET) == (mac, 4789, "192.168.1.1")
    assert await c.svp.vl3("10.1.0.10", VNET) is None
    assert await c.svp.vl2(mac, VNET) == (4789, "192.168.1.1")

    readdressed = sorted([vl3("10.1.0.10"), vl3("10.1.0.11")])
    assert await c.logs() == {"cn1": readdressed, "cn2": readdressed, "cn3": [], "cn4": []}


async def test_tag_and_firewall_updates_queue_nothing(cluster: Cluster) -> None:
    c = cluster
    vnic = await c.api.vnic(c.net["uuid"], c.cns["cn1"]["uuid"], ip="10.1.0.10")
    await c.logs()
    for body in ({"tags": {"role": "web"}}, {"firewall_enabled": True}, {"owner_uuid": new_uuid()}):
        r = await c.api.put(f"/vnics/{vnic['mac']}", body)
        assert r.status_code == 200, r.text
    assert await c.logs() == {"cn1": [], "cn2": [], "cn3": [], "cn4": []}
    assert await c.svp.vl3("10.1.0.10", VNET) == (vnic["mac"], 4789, "192.168.1.1")


async def test_delete_answers_notfound_and_queues_vl2_for_every_vnet_cn(cluster: Cluster) -> None:
    c = cluster
    vnic = await c.api.vnic(c.net["uuid"], c.cns["cn1"]["uuid"], ip="10.1.0.10")
    mac = vnic["mac"]
    await c.logs()

    r = await c.api.delete(f"/vnics/{mac}")
    assert r.status_code == 204

    assert await c.svp.vl2(mac, VNET) is None
    assert await c.svp.vl3("10.1.0.10", VNET) is None
    assert await c.logs() == {"cn1": [vl2(mac)], "cn2": [vl2(mac)], "cn3": [], "cn4": []}


async def test_refused_api_calls_queue_nothing(cluster: Cluster) -> None:
    c = cluster
    vnic = await c.api.vnic(c.net["uuid"], c.cns["cn1"]["uuid"], ip="10.1.0.10")
    await c.logs()
    refused = [
        await c.api.put(f"/vnics/{vnic['mac']}", {"cn_uuid": c.cns["cn3"]["uuid"], "ip": "bad"}),
        await c.api.put(f"/vnics/{vnic['mac']}", {"ip": "10.1.0.2"}),  # taken: 409
        await c.api.post(
            "/vnics",
            {"network_uuid": c.net["uuid"], "cn_uuid": c.cns["cn3"]["uuid"], "mac": vnic["mac"]},
        ),
        await c.api.client.put(f"/vnics/{vnic['mac']}", content=b'{"ip": '),
    ]
    assert [r.status_code for r in refused] == [422, 409, 409, 422]
    assert await c.logs() == {"cn1": [], "cn2": [], "cn3": [], "cn4": []}
    assert await c.svp.vl2(vnic["mac"], VNET) == (4789, "192.168.1.1")


async def test_unacknowledged_log_entries_survive_a_restart(tmp_path: Path) -> None:
    db = tmp_path / "portolan.db"
    cn_uuid = new_uuid()

    # First life: create a VNIC through the API; read the log but do not acknowledge it.
    directory = await open_directory(db)
    try:
        async with running_api(directory) as api, svp_session(directory) as svp:
            cn = await api.cn("192.168.1.1", cn_uuid=cn_uuid)
            net = await api.network(vnet_id=VNET, vlan_id=VLAN, subnet="10.1.0.0/24")
            vnic = await api.vnic(net["uuid"], cn["uuid"], ip="10.1.0.10")
            before = (await svp.log_req("192.168.1.1")).entries
            assert [describe(e) for e in before] == [vl3("10.1.0.10")]
    finally:
        await directory.aclose()

    # Second life: the same store, reopened; the entry is still queued, with the same id.
    directory = await open_directory(db)
    try:
        async with running_api(directory) as api, svp_session(directory) as svp:
            assert (await api.get(f"/vnics/{vnic['mac']}")).json() == vnic
            assert await svp.vl2(vnic["mac"], VNET) == (4789, "192.168.1.1")
            after = (await svp.log_req("192.168.1.1")).entries
            assert after == before
            await svp.log_rm([e.entry_id for e in after])
            assert (await svp.log_req("192.168.1.1")).entries == ()
            # LOG_RM of ids already gone is fine.
            await svp.log_rm([e.entry_id for e in after])
    finally:
        await directory.aclose()

    # Third life: the removal was durable.
    directory = await open_directory(db)
    try:
        async with svp_session(directory) as svp:
            assert (await svp.log_req("192.168.1.1")).entries == ()
    finally:
        await directory.aclose()
