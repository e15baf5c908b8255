"""The Directory: validation, errors, allocation, shootdown fan-out, the log, load, versions."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import trio

from portolan.errors import (
    Conflict,
    InUse,
    InvalidParameters,
    NotFound,
    StoreUnavailable,
    SubnetFull,
)
from portolan.model import LOG_ROUTE, LogRecord
from portolan.service import Directory
from protocol.addr import format_mac, ip_to_wire, parse_mac
from protocol.svp import LogRouteEntry, LogVL2Entry, LogVL3Entry
from tests.portolan.conftest import (
    CN1,
    CN2,
    CN3,
    CN4,
    OWNER,
    UL1,
    UL2,
    UL3,
    VNET,
    create_net,
    drain,
    logs,
    put_cns,
)

# -- compute nodes ---------------------------------------------------------------------------


async def test_put_cn_creates_updates_and_is_idempotent(directory: Directory) -> None:
    cn, created = await directory.put_cn(CN1, UL1)
    assert created and cn.port == 4789 and cn.ip == UL1 and cn.version == 1
    same, created = await directory.put_cn(CN1, UL1)
    assert not created and same == cn  # nothing changed: no new version
    moved, created = await directory.put_cn(CN1, "10.9.9.9", 4790)
    assert not created and moved.version == 2 and moved.port == 4790
    assert await directory.get_cn(CN1) == moved
    assert await directory.list_cns() == [moved]
    assert directory.index.cns_for_underlay_ip(ip_to_wire("10.9.9.9")) == [CN1]


async def test_put_cn_refuses_a_duplicate_underlay_ip(directory: Directory) -> None:
    await directory.put_cn(CN1, UL1)
    with pytest.raises(Conflict) as ei:
        await directory.put_cn(CN2, UL1)
    assert ei.value.http_status == 409 and [e.field for e in ei.value.errors] == ["ip"]
    assert await directory.list_cns() == [await directory.get_cn(CN1)]


async def test_put_cn_lists_every_bad_field(directory: Directory) -> None:
    with pytest.raises(InvalidParameters) as ei:
        await directory.put_cn("not-a-uuid", "300.1.1.1", 0)
    assert ei.value.fields() == ["ip", "port", "uuid"]
    assert ei.value.http_status == 422
    body = ei.value.to_json()
    assert body["code"] == "InvalidParameters"
    assert {e["code"] for e in body["errors"]} == {"InvalidParameter"}


async def test_delete_cn_is_refused_while_vnics_live_there(directory: Directory) -> None:
    await put_cns(directory)
    net = await create_net(directory)
    v = await directory.create_vnic(network_uuid=net.uuid, cn_uuid=CN1)
    with pytest.raises(InUse) as ei:
        await directory.delete_cn(CN1)
    assert ei.value.code == "InUse" and ei.value.http_status == 409
    await directory.delete_vnic(v.mac)
    assert await directory.log_records(CN1)
    await directory.delete_cn(CN1)
    assert await directory.log_records(CN1) == []  # its pending log went with it
    with pytest.raises(NotFound):
        await directory.get_cn(CN1)
    with pytest.raises(NotFound):
        await directory.delete_cn(CN1)
    assert directory.index.cns_for_underlay_ip(ip_to_wire(UL1)) == []


# -- networks ---------------------------------------------------------------------------------


async def test_create_network_lists_every_bad_field(directory: Directory) -> None:
    with pytest.raises(InvalidParameters) as ei:
        await directory.create_network(
            name="",
            owner_uuid="nope",
            vnet_id=1 << 24,
            vlan_id=4095,
            subnet="10.0.0.1/24",
            gateway="bogus",
        )
    assert ei.value.fields() == ["gateway", "name", "owner_uuid", "subnet", "vlan_id", "vnet_id"]
    with pytest.raises(InvalidParameters) as ei:
        await directory.create_network(
            name="n",
            owner_uuid=OWNER,
            vnet_id=1,
            vlan_id=1,
            subnet="10.0.0.0/24",
            gateway="10.1.0.1",
            provision_start="10.0.0.200",
            provision_end="10.0.0.100",
        )
    assert ei.value.fields() == ["gateway", "provision_start"]


async def test_create_network_requires_fields(directory: Directory) -> None:
    with pytest.raises(InvalidParameters) as ei:
        await directory.create_network(
            name=None, owner_uuid=None, vnet_id=None, vlan_id=None, subnet=None
        )  # type: ignore[arg-type]
    assert {e.code for e in ei.value.errors} == {"MissingParameter"}
    assert ei.value.message == "Missing parameters"


async def test_network_defaults_and_round_trip(directory: Directory) -> None:
    net = await directory.create_network(
        name="n", owner_uuid=OWNER, vnet_id=1, vlan_id=0, subnet="10.0.0.0/24"
    )
    assert (net.provision_start, net.provision_end, net.gateway) == ("10.0.0.1", "10.0.0.254", None)
    v6 = await directory.create_network(
        name="n6", owner_uuid=OWNER, vnet_id=1, vlan_id=0, subnet="fd00::/64"
    )
    assert v6.provision_start == "fd00::1"
    assert await directory.get_network(net.uuid) == net
    assert {n.uuid for n in await directory.list_networks()} == {net.uuid, v6.uuid}
    assert net.to_json()["subnet"] == "10.0.0.0/24"


async def test_overlapping_subnets_in_one_vnet_are_a_conflict(directory: Directory) -> None:
    await create_net(directory, "10.0.0.0/24")
    with pytest.raises(Conflict) as ei:
        await create_net(directory, "10.0.0.128/25")
    assert [(e.field, e.code) for e in ei.value.errors] == [("subnet", "Overlap")]
    with pytest.raises(Conflict):
        await create_net(directory, "10.0.0.0/16")
    # another vnet may reuse the subnet; the same vnet may hold a disjoint one
    await create_net(directory, "10.0.0.0/24", vnet=VNET + 1)
    await create_net(directory, "10.0.1.0/24")


async def test_delete_network_is_refused_while_in_use(directory: Directory) -> None:
    await put_cns(directory)
    net = await create_net(directory)
    v = await directory.create_vnic(network_uuid=net.uuid, cn_uuid=CN1)
    with pytest.raises(InUse):
        await directory.delete_network(net.uuid)
    await directory.delete_vnic(v.mac)
    await directory.delete_network(net.uuid)
    with pytest.raises(NotFound):
        await directory.get_network(net.uuid)
    with pytest.raises(NotFound):
        await directory.delete_network(net.uuid)


# -- VNICs and allocation ---------------------------------------------------------------------


async def test_allocation_is_lowest_free_and_skips_the_gateway(directory: Directory) -> None:
    await put_cns(directory)
    net = await create_net(directory, "10.0.0.0/29")  # hosts .1-.6, gateway .1
    ips = [(await directory.create_vnic(network_uuid=net.uuid, cn_uuid=CN1)).ip for _ in range(5)]
    assert ips == ["10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5", "10.0.0.6"]
    with pytest.raises(SubnetFull) as ei:
        await directory.create_vnic(network_uuid=net.uuid, cn_uuid=CN1)
    assert ei.value.http_status == 507 and ei.value.to_json()["network_uuid"] == net.uuid
    freed = (await directory.list_vnics(network_uuid=net.uuid))[1]
    await directory.delete_vnic(freed.mac)
    again = await directory.create_vnic(network_uuid=net.uuid, cn_uuid=CN2)
    assert again.ip == freed.ip


async def test_a_slash_30_holds_one_vnic_besides_its_gateway(directory: Directory) -> None:
    await put_cns(directory)
    net = await create_net(directory, "10.0.0.0/30")
    v = await directory.create_vnic(network_uuid=net.uuid, cn_uuid=CN1)
    assert v.ip == "10.0.0.2"
    with pytest.raises(SubnetFull):
        await directory.create_vnic(network_uuid=net.uuid, cn_uuid=CN1)


async def test_allocation_respects_the_provision_range_and_explicit_ips(
    directory: Directory,
) -> None:
    await put_cns(directory)
    net = await create_net(directory, provision_start="10.0.0.100", provision_end="10.0.0.101")
    a = await directory.create_vnic(network_uuid=net.uuid, cn_uuid=CN1, ip="10.0.0.100")
    b = await directory.create_vnic(network_uuid=net.uuid, cn_uuid=CN1)
    assert (a.ip, b.ip) == ("10.0.0.100", "10.0.0.101")
    c = await directory.create_vnic(network_uuid=net.uuid, cn_uuid=CN1, ip="10.0.0.7")
    assert c.ip == "10.0.0.7"  # an explicit IP only has to be inside the subnet
    with pytest.raises(SubnetFull):
        await directory.create_vnic(network_uuid=net.uuid, cn_uuid=CN1)


async def test_allocated_macs_are_locally_administered_unicast(directory: Directory) -> None:
    await put_cns(directory)
    net = await create_net(directory)
    for _ in range(5):
        v = await directory.create_vnic(network_uuid=net.uuid, cn_uuid=CN1)
        assert v.mac[0] == 0x02 and len(v.mac) == 6


async def test_mac_allocation_retries_on_collision(store_url: str) -> None:
    d = await Directory.open(store_url)
    try:
        await put_cns(d)
        net = await create_net(d)
        draws = iter([1, 1, 2])
        d._randbits = lambda bits: next(draws)
        a = await d.create_vnic(network_uuid=net.uuid, cn_uuid=CN1)
        b = await d.create_vnic(network_uuid=net.uuid, cn_uuid=CN1)
        assert a.mac == bytes.fromhex("020000000001") and b.mac == bytes.fromhex("020000000002")
    finally:
        await d.aclose()


async def test_create_vnic_conflicts_and_bad_references(directory: Directory) -> None:
    await put_cns(directory)
    net = await create_net(directory)
    mac = parse_mac("0:a:95:9d:68:16")
    v = await directory.create_vnic(
        network_uuid=net.uuid,
        cn_uuid=CN1,
        mac=mac,
        ip="10.0.0.9",
        tags={"role": "web"},
        firewall_enabled=True,
        owner_uuid=OWNER,
    )
    assert v.to_json()["mac"] == "00:0a:95:9d:68:16" and v.tags == {"role": "web"}
    assert v.vnet_id == VNET and v.vlan_id == 5 and v.network_uuid == net.uuid
    with pytest.raises(Conflict) as ei:
        await directory.create_vnic(network_uuid=net.uuid, cn_uuid=CN1, mac=mac)
    assert [e.field for e in ei.value.errors] == ["mac"]
    with pytest.raises(Conflict) as ei:
        await directory.create_vnic(network_uuid=net.uuid, cn_uuid=CN1, ip="10.0.0.9")
    assert [e.field for e in ei.value.errors] == ["ip"]
    missing = str(uuid.uuid4())
    with pytest.raises(InvalidParameters) as ei:
        await directory.create_vnic(network_uuid=missing, cn_uuid=missing)
    assert ei.value.fields() == ["cn_uuid", "network_uuid"]
    with pytest.raises(InvalidParameters) as ei:
        await directory.create_vnic(network_uuid=net.uuid, cn_uuid=CN1, ip="10.1.0.9")
    assert ei.value.fields() == ["ip"]
    with pytest.raises(InvalidParameters) as ei:
        await directory.create_vnic(network_uuid=net.uuid, cn_uuid=CN1, ip="10.0.0.255")
    assert ei.value.fields() == ["ip"]  # broadcast
    with pytest.raises(InvalidParameters) as ei:
        await directory.create_vnic(
            network_uuid=net.uuid,
            cn_uuid=CN1,
            mac="01:00:5e:00:00:01",
            ip="nope",
            tags=["x"],
            firewall_enabled="yes",
            owner_uuid="x",
        )  # type: ignore[arg-type]
    assert ei.value.fields() == ["firewall_enabled", "ip", "mac", "owner_uuid", "tags"]


async def test_get_list_update_delete_vnic(directory: Directory) -> None:
    await put_cns(directory)
    net = await create_net(directory)
    a = await directory.create_vnic(network_uuid=net.uuid, cn_uuid=CN1, owner_uuid=OWNER)
    b = await directory.create_vnic(network_uuid=net.uuid, cn_uuid=CN2)
    assert await directory.get_vnic(a.mac) == a
    assert await directory.get_vnic(format_mac(a.mac)) == a
    assert await directory.list_vnics(cn_uuid=CN2) == [b]
    assert await directory.list_vnics(owner_uuid=OWNER) == [a]
    assert len(await directory.list_vnics(vnet_id=VNET)) == 2
    assert await directory.list_vnics(cn_uuid="garbage") == []
    with pytest.raises(InvalidParameters) as ei:
        await directory.update_vnic(a.mac, vnet_id=5, mac="x")
    assert ei.value.fields() == ["mac", "vnet_id"]
    with pytest.raises(InvalidParameters) as ei:
        await directory.update_vnic(a.mac, cn_uuid=str(uuid.uuid4()))
    assert ei.value.fields() == ["cn_uuid"]
    with pytest.raises(Conflict):
        await directory.update_vnic(a.mac, ip=b.ip)
    with pytest.raises(NotFound):
        await directory.update_vnic(bytes.fromhex("020000000077"), tags={})
    with pytest.raises(NotFound) as nf:
        await directory.get_vnic(bytes.fromhex("020000000077"))
    assert nf.value.to_json()["code"] == "ResourceNotFound" and nf.value.http_status == 404
    u = await directory.update_vnic(a.mac, belongs_to_uuid=OWNER, owner_uuid=None)
    assert u.belongs_to_uuid == OWNER and u.owner_uuid is None and u.version > a.version
    await directory.delete_vnic(a.mac)
    with pytest.raises(NotFound):
        await directory.delete_vnic(a.mac)


async def test_lookups_see_every_change_as_soon_as_the_call_returns(
    directory: Directory,
) -> None:
    await put_cns(directory)
    net = await create_net(directory)
    v = await directory.create_vnic(network_uuid=net.uuid, cn_uuid=CN1)
    ip16 = ip_to_wire(v.ip)
    assert directory.index.vl2(v.mac, VNET) == (4789, ip_to_wire(UL1))
    assert directory.index.vl3(ip16, VNET) == (v.mac, 4789, ip_to_wire(UL1))
    await directory.update_vnic(v.mac, cn_uuid=CN2, ip="10.0.0.50")
    assert directory.index.vl2(v.mac, VNET) == (4789, ip_to_wire(UL2))
    assert directory.index.vl3(ip16, VNET) is None
    assert directory.index.vl3(ip_to_wire("10.0.0.50"), VNET) == (v.mac, 4789, ip_to_wire(UL2))
    await directory.put_cn(CN2, "172.16.0.2", 4800)
    assert directory.index.vl2(v.mac, VNET) == (4800, ip_to_wire("172.16.0.2"))
    await directory.delete_vnic(v.mac)
    assert directory.index.vl2(v.mac, VNET) is None
    assert directory.index.vl3(ip_to_wire("10.0.0.50"), VNET) is None


async def test_the_index_is_rebuilt_from_the_store_on_open(store_url: str) -> None:
    d = await Directory.open(store_url)
    await put_cns(d)
    net = await create_net(d)
    v = await d.create_vnic(network_uuid=net.uuid, cn_uuid=CN3)
    await d.aclose()
    d = await Directory.open(store_url)
    try:
        assert d.index.vl2(v.mac, VNET) == (4789, ip_to_wire(UL3))
        assert d.index.version == v.version
    finally:
        await d.aclose()


# -- versions -----------------------------------------------------------------------------------


async def test_versions_grow_with_every_change(directory: Directory) -> None:
    seen = [(await directory.put_cn(CN1, UL1))[0].version]
    net = await create_net(directory)
    seen.append(net.version)
    v = await directory.create_vnic(network_uuid=net.uuid, cn_uuid=CN1)
    seen.append(v.version)
    seen.append((await directory.update_vnic(v.mac, tags={"a": 1})).version)
    seen.append((await directory.update_vnic(v.mac, firewall_enabled=True)).version)
    seen.append((await directory.put_cn(CN1, UL2))[0].version)
    assert seen == sorted(set(seen)) and seen[0] >= 1
    assert directory.index.version == seen[-1]
    assert await directory.current_version() == seen[-1]
    # a no-op update changes nothing, not even the version
    same = await directory.update_vnic(v.mac, firewall_enabled=True)
    assert same.version == seen[-2]


# -- shootdowns --------------------------------------------------------------------------------


async def test_create_sends_vl3_to_every_cn_of_the_vnet(directory: Directory) -> None:
    await put_cns(directory)
    net = await create_net(directory)
    a = await directory.create_vnic(network_uuid=net.uuid, cn_uuid=CN1)
    assert await logs(directory, CN1, CN2, CN3) == {
        CN1: [("VL3", a.ip, 5, VNET)],
        CN2: [],
        CN3: [],
    }
    await drain(directory, CN1)
    b = await directory.create_vnic(network_uuid=net.uuid, cn_uuid=CN2)
    assert await logs(directory, CN1, CN2, CN3) == {
        CN1: [("VL3", b.ip, 5, VNET)],
        CN2: [("VL3", b.ip, 5, VNET)],
        CN3: [],
    }


async def _two_vnics(d: Directory):
    await put_cns(d)
    net = await create_net(d)
    a = await d.create_vnic(network_uuid=net.uuid, cn_uuid=CN1)
    b = await d.create_vnic(network_uuid=net.uuid, cn_uuid=CN2)
    # an unrelated vnet on CN3 must never hear of these
    other = await create_net(d, vnet=VNET + 1)
    await d.create_vnic(network_uuid=other.uuid, cn_uuid=CN3)
    await drain(d, CN1, CN2, CN3, CN4)
    return a, b


async def test_ip_change_sends_vl3_for_the_new_and_the_old_ip(directory: Directory) -> None:
    a, _ = await _two_vnics(directory)
    await directory.update_vnic(a.mac, ip="10.0.0.77")
    expected = [("VL3", "10.0.0.77", 5, VNET), ("VL3", a.ip, 5, VNET)]
    assert await logs(directory, CN1, CN2, CN3) == {CN1: expected, CN2: expected, CN3: []}


async def test_move_sends_vl2_and_vl3_including_the_previous_cn(directory: Directory) -> None:
    _, b = await _two_vnics(directory)
    await directory.update_vnic(b.mac, cn_uuid=CN4)
    m = format_mac(b.mac)
    expected = [("VL2", m, VNET), ("VL3", b.ip, 5, VNET)]
    assert await logs(directory, CN1, CN2, CN3, CN4) == {
        CN1: expected,
        CN2: expected,  # the previous CN
        CN3: [],
        CN4: expected,  # the new CN
    }


async def test_delete_sends_vl2_to_the_cns_of_the_vnet_before_the_delete(
    directory: Directory,
) -> None:
    a, _ = await _two_vnics(directory)
    await directory.delete_vnic(a.mac)
    expected = [("VL2", format_mac(a.mac), VNET)]
    assert await logs(directory, CN1, CN2, CN3) == {CN1: expected, CN2: expected, CN3: []}


async def test_cn_address_change_sends_vl2_for_each_of_its_vnics(directory: Directory) -> None:
    a, b = await _two_vnics(directory)
    other = await create_net(directory, "10.5.0.0/24", vnet=VNET + 2)
    c = await directory.create_vnic(network_uuid=other.uuid, cn_uuid=CN1)
    d4 = await directory.create_vnic(network_uuid=other.uuid, cn_uuid=CN4)
    await drain(directory, CN1, CN2, CN3, CN4)
    await directory.put_cn(CN1, "172.16.1.1")
    got = await logs(directory, CN1, CN2, CN3, CN4)
    va, vc = ("VL2", format_mac(a.mac), VNET), ("VL2", format_mac(c.mac), VNET + 2)
    assert sorted(got[CN1]) == sorted([va, vc])
    assert got[CN2] == [va]
    assert got[CN3] == []
    assert got[CN4] == [vc]
    assert d4.cn_uuid == CN4 and b.cn_uuid == CN2


async def test_attribute_only_updates_write_no_log_entries(directory: Directory) -> None:
    a, _ = await _two_vnics(directory)
    before = a.version
    u = await directory.update_vnic(a.mac, tags={"role": "db"})
    u = await directory.update_vnic(a.mac, firewall_enabled=True)
    u = await directory.update_vnic(a.mac, owner_uuid=OWNER, belongs_to_uuid=OWNER)
    assert u.version > before and u.tags == {"role": "db"} and u.firewall_enabled
    assert await logs(directory, CN1, CN2, CN3, CN4) == {CN1: [], CN2: [], CN3: [], CN4: []}


async def test_log_rows_are_written_with_the_change_version(directory: Directory) -> None:
    a, _ = await _two_vnics(directory)
    u = await directory.update_vnic(a.mac, ip="10.0.0.88")
    recs = await directory.log_records(CN2)
    assert {r.version for r in recs} == {u.version}
    assert len({r.id for r in recs}) == len(recs) and all(len(r.id) == 16 for r in recs)


# -- the log protocol ------------------------------------------------------------------------------


async def _three_vl2(d: Directory) -> list[LogRecord]:
    await put_cns(d)
    net = await create_net(d)
    vs = [await d.create_vnic(network_uuid=net.uuid, cn_uuid=CN1) for _ in range(3)]
    await drain(d, CN1)
    for v in vs:
        await d.delete_vnic(v.mac)
    recs = await d.log_records(CN1)
    assert len(recs) == 3
    return recs


async def test_fetch_log_budget_counts_the_status_word(directory: Directory) -> None:
    recs = await _three_vl2(directory)
    two = await directory.fetch_log(CN1, 4 + 32 * 2)
    assert [type(e) for e in two] == [LogVL2Entry, LogVL2Entry]
    assert [e.entry_id for e in two] == [recs[0].id, recs[1].id]  # oldest first
    assert two[0].mac == recs[0].mac and two[0].vnet_id == VNET
    assert len(await directory.fetch_log(CN1, 4 + 32 * 2 - 1)) == 1
    assert len(await directory.fetch_log(CN1, 1024)) == 3
    assert await directory.fetch_log(CN1, 4 + 31) == []
    assert await directory.fetch_log(CN1, 3) == []
    assert await directory.fetch_log(CN2, 1024) == []


async def test_fetch_log_stops_at_the_first_entry_that_does_not_fit(
    directory: Directory,
) -> None:
    await put_cns(directory)
    net = await create_net(directory)
    v = await directory.create_vnic(network_uuid=net.uuid, cn_uuid=CN1)  # VL3 (44)
    await directory.delete_vnic(v.mac)  # VL2 (32)
    got = await directory.fetch_log(CN1, 4 + 44 + 31)
    assert [type(e) for e in got] == [LogVL3Entry]
    assert got[0].ip == ip_to_wire(v.ip) and got[0].vlan == 5
    assert len(await directory.fetch_log(CN1, 4 + 44 + 32)) == 2
    assert await directory.fetch_log(CN1, 4 + 43) == []  # never skip ahead past the oldest


async def test_route_entries_are_skipped_for_v1(directory: Directory) -> None:
    await put_cns(directory)
    route = LogRecord(
        id=uuid.uuid4().bytes,
        cn_uuid=CN1,
        type=LOG_ROUTE,
        src_vnet_id=1,
        dst_vnet_id=2,
        dc_id=3,
        src_ip="10.0.0.0",
        dst_ip="10.1.0.0",
        src_prefixlen=120,
        dst_prefixlen=120,
    )

    def write() -> None:
        with directory.store.transaction() as tx:
            tx.append_log([route])

    await trio.to_thread.run_sync(write)
    net = await create_net(directory)
    await directory.create_vnic(network_uuid=net.uuid, cn_uuid=CN1)
    v1 = await directory.fetch_log(CN1, 1024, version=1)
    assert [type(e) for e in v1] == [LogVL3Entry]
    v2 = await directory.fetch_log(CN1, 1024, version=2)
    assert [type(e) for e in v2] == [LogRouteEntry, LogVL3Entry]
    assert v2[0].src_ip == ip_to_wire("10.0.0.0") and v2[0].dst_prefixlen == 120
    assert [type(e) for e in await directory.fetch_log(CN1, 4 + 72, version=2)] == [LogRouteEntry]
    assert len(await directory.pending_log(CN1)) == 2


async def test_remove_log_deletes_listed_ids_and_ignores_missing(directory: Directory) -> None:
    recs = await _three_vl2(directory)
    n = await directory.remove_log([recs[0].id, b"\xee" * 16, recs[2].id])
    assert n == 2
    assert [e.entry_id for e in await directory.pending_log(CN1)] == [recs[1].id]
    assert await directory.remove_log([]) == 0


async def test_log_entries_survive_a_restart(store_url: str) -> None:
    d = await Directory.open(store_url)
    recs = await _three_vl2(d)
    await d.aclose()
    d = await Directory.open(store_url)
    try:
        assert [e.entry_id for e in await d.fetch_log(CN1, 1024)] == [r.id for r in recs]
    finally:
        await d.aclose()


# -- load ---------------------------------------------------------------------------------------


DOC = {
    "cns": [
        {"uuid": CN1, "ip": UL1, "port": 4789},
        {"uuid": CN2, "ip": UL2},
    ],
    "vnics": [
        {"mac": "00:0a:95:9d:68:16", "ip": "10.0.0.1", "vnet_id": VNET, "vlan": 0, "cn_uuid": CN1},
        {"mac": "0:a:95:9d:68:17", "ip": "10.0.0.2", "vnet_id": VNET, "vlan_id": 7, "cn_uuid": CN2},
    ],
    "routes": [
        {
            "vnet_id": VNET,
            "vlan_id": 0,
            "subnet": "10.0.0.0/24",
            "r_dc_id": 1,
            "r_vnet_id": VNET,
            "r_vlan_id": 7,
            "r_subnet": "10.0.0.0/24",
            "r_send_mac": "02:00:00:00:00:aa",
        }
    ],
}


async def test_load_imports_a_state_without_log_entries(directory: Directory) -> None:
    result = await directory.load(DOC)
    assert result["cns"] == 2 and result["vnics"] == 2 and result["routes"] == 1
    mac = parse_mac("00:0a:95:9d:68:16")
    assert directory.index.vl2(mac, VNET) == (4789, ip_to_wire(UL1))
    assert directory.index.vl3(ip_to_wire("10.0.0.2"), VNET) == (
        parse_mac("00:0a:95:9d:68:17"),
        4789,
        ip_to_wire(UL2),
    )
    v = await directory.get_vnic(mac)
    assert v.network_uuid is None and v.vlan_id == 0 and v.version == result["version"]
    assert (await directory.get_vnic(parse_mac("00:0a:95:9d:68:17"))).vlan_id == 7
    assert await logs(directory, CN1, CN2) == {CN1: [], CN2: []}
    ans = directory.index.route(VNET, 0, ip_to_wire("10.0.0.1"), ip_to_wire("10.0.0.2"))
    assert ans is not None and ans.dst_mac == parse_mac("00:0a:95:9d:68:17")
    assert len(await directory.list_routes()) == 1
    # loading again with a change replaces (moves a VNIC) only when asked to (issue 12),
    # and then writes the move's shootdowns (tests/portolan/test_load_strict.py)
    doc2 = {"vnics": [{**DOC["vnics"][0], "cn_uuid": CN2, "ip": "10.0.0.9"}]}
    await directory.load(doc2, replace_existing=True)
    assert directory.index.vl2(mac, VNET) == (4789, ip_to_wire(UL2))
    assert directory.index.vl3(ip_to_wire("10.0.0.1"), VNET) is None


async def test_a_bad_document_names_every_bad_field_and_writes_nothing(
    directory: Directory,
) -> None:
    bad = {
        "cns": [{"uuid": CN1, "ip": "not-an-ip"}, {"uuid": CN2, "ip": UL2}],
        "vnics": [
            DOC["vnics"][0],
            {"mac": "zz", "ip": "10.0.0.2", "vnet_id": VNET, "cn_uuid": CN2},
            {"mac": "00:0a:95:9d:68:18", "ip": "10.0.0.3", "vnet_id": -1, "cn_uuid": CN2},
            {"mac": "00:0a:95:9d:68:19", "ip": "10.0.0.4", "vnet_id": VNET, "vlan": 5000},
            "nonsense",
            {"mac": "00:0a:95:9d:68:1a", "ip": "10.0.0.1", "vnet_id": VNET, "cn_uuid": CN1},
        ],
    }
    with pytest.raises(InvalidParameters) as ei:
        await directory.load(bad)
    assert ei.value.fields() == [
        "cns[0].ip",
        "vnics[1].mac",
        "vnics[2].vnet_id",
        "vnics[3].cn_uuid",
        "vnics[3].vlan",
        "vnics[4]",
        "vnics[5].ip",
    ]
    assert await directory.list_cns() == []
    assert await directory.list_vnics() == []
    assert await directory.current_version() == 0


async def test_load_checks_references_and_conflicts_against_the_store(
    directory: Directory,
) -> None:
    await directory.load({"cns": DOC["cns"], "vnics": DOC["vnics"][:1]})
    bad = {
        "cns": [{"uuid": CN3, "ip": UL1}],
        "vnics": [
            {"mac": "00:0a:95:9d:68:20", "ip": "10.0.0.1", "vnet_id": VNET, "cn_uuid": CN2},
            {"mac": "00:0a:95:9d:68:21", "ip": "10.0.0.5", "vnet_id": VNET, "cn_uuid": CN4},
            {"mac": "00:0a:95:9d:68:22", "ip": "10.0.0.6", "vnet_id": VNET, "cn_uuid": CN2},
        ],
    }
    with pytest.raises(InvalidParameters) as ei:
        await directory.load(bad)
    assert ei.value.fields() == ["cns[0].ip", "vnics[0].ip", "vnics[1].cn_uuid"]
    assert len(await directory.list_vnics()) == 1


async def test_load_rejects_a_non_object(directory: Directory) -> None:
    with pytest.raises(InvalidParameters):
        await directory.load([])  # type: ignore[arg-type]
    with pytest.raises(InvalidParameters) as ei:
        await directory.load({"vnics": {}})
    assert ei.value.fields() == ["vnics"]


# -- concurrency and the store going away -----------------------------------------------------------


async def test_concurrent_creates_never_share_an_ip(directory: Directory) -> None:
    await put_cns(directory)
    net = await create_net(directory, "10.0.0.0/27")
    got = []

    async def one(cn: str) -> None:
        got.append(await directory.create_vnic(network_uuid=net.uuid, cn_uuid=cn))

    async with trio.open_nursery() as nursery:
        for i in range(20):
            nursery.start_soon(one, (CN1, CN2, CN3)[i % 3])
    assert len({v.ip for v in got}) == 20 and len({v.mac for v in got}) == 20
    assert len({v.version for v in got}) == 20


async def test_a_closed_store_is_store_unavailable(tmp_path: Path) -> None:
    d = await Directory.open(f"sqlite:{tmp_path / 'x.db'}")
    await trio.to_thread.run_sync(d.store.close)
    with pytest.raises(StoreUnavailable) as ei:
        await d.list_cns()
    assert ei.value.http_status == 503 and ei.value.code == "ServiceUnavailable"
    with pytest.raises(StoreUnavailable):
        await d.put_cn(CN1, UL1)
    await d.aclose()


async def test_idle_log_polls_are_answered_from_memory_until_a_write(
    directory: Directory, monkeypatch: pytest.MonkeyPatch
) -> None:
    await put_cns(directory)
    net = await create_net(directory)
    reads = 0
    real_read = directory._read

    async def counting_read(fn):  # type: ignore[no-untyped-def]
        nonlocal reads
        reads += 1
        return await real_read(fn)

    monkeypatch.setattr(directory, "_read", counting_read)
    assert await directory.fetch_log(CN2, 1024) == []
    assert reads == 1
    for _ in range(5):  # an idle CN polling every 250 ms costs no store read
        assert await directory.fetch_log(CN2, 1024) == []
    assert reads == 1
    # any write moves the epoch: the next poll reads the store and sees the new entry
    await directory.create_vnic(network_uuid=net.uuid, cn_uuid=CN2)
    entries = await directory.fetch_log(CN2, 1024)
    assert [type(e) for e in entries] == [LogVL3Entry]
    assert reads == 2
