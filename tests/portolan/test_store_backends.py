"""The store and the Directory behave the same on every backend: SQLite and PostgreSQL.

Every test takes ``backend_url``: a fresh SQLite file, or a fresh database on the session's
private PostgreSQL cluster (``tests/support/pg_fixtures.py``; skipped with the reason when the
server binaries are missing). Behaviours pinned here: schema creation and versioning, round trips of every object, constraint errors, transactions,
the version counter, the shootdown log (order, removal, persistence), allocation (lowest free
IP, SubnetFull), conflicts, shootdown fan-out, ``load``, the index rebuilt on open, and two
Directories on one database allocating concurrently and sharing one log.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from portolan.errors import Conflict, StoreUnavailable, SubnetFull
from portolan.model import (
    LOG_ROUTE,
    LOG_VL2,
    LOG_VL3,
    ComputeNode,
    LogRecord,
    Network,
    Route,
    Rule,
    Vnic,
)
from portolan.service import Directory
from portolan.store import SCHEMA_VERSION, SchemaTooNew, UniqueViolation, open_store
from portolan.store.schema import MIGRATIONS
from protocol.addr import format_mac, ip_to_wire, parse_mac
from tests.portolan.conftest import (
    CN1,
    CN2,
    CN3,
    CN4,
    OWNER,
    UL1,
    UL2,
    UL4,
    VNET,
    create_net,
    drain,
    logs,
    put_cns,
)
from tests.support import pg_fixtures

MAC1 = bytes.fromhex("020000000001")
MAC2 = bytes.fromhex("020000000002")

# the PostgreSQL fixtures (tests/support/pg_fixtures.py): a session cluster, a database per test
pg_cluster = pg_fixtures.pg_cluster
pg_url = pg_fixtures.pg_url


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def backend_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:{tmp_path / 'portolan.db'}"
    else:
        yield request.getfixturevalue("pg_url")


@pytest.fixture
async def directory(backend_url: str) -> AsyncIterator[Directory]:
    d = await Directory.open(backend_url)
    try:
        yield d
    finally:
        await d.aclose()


def _vnic(mac: bytes = MAC1, ip: str = "10.0.0.5", cn: str = CN1, vnet: int = 7) -> Vnic:
    return Vnic(
        mac=mac,
        ip=ip,
        vnet_id=vnet,
        vlan_id=3,
        cn_uuid=cn,
        network_uuid=None,
        tags={"role": "db", "n": 1},
        firewall_enabled=True,
        version=2,
    )


def _logrec(cn: str, type_: int = LOG_VL2, **kw: Any) -> LogRecord:
    return LogRecord(id=uuid.uuid4().bytes, cn_uuid=cn, type=type_, vnet_id=7, **kw)


# -- schema -----------------------------------------------------------------------------------


def test_schema_is_created_and_its_version_recorded(backend_url: str) -> None:
    with open_store(backend_url) as store:
        assert store.schema_version() == SCHEMA_VERSION == MIGRATIONS[-1].version
        with store.transaction(write=False) as tx:
            assert tx.current_version() == 0
            for table in ("meta", "cns", "networks", "vnics", "shootdown_log", "routes"):
                assert store._has_table(tx, table), table
            assert store._has_table(tx, "changes")
            assert not store._has_table(tx, "no_such_table")
    with open_store(backend_url) as store:  # reopening migrates nothing
        assert store.migrate() == SCHEMA_VERSION


def test_a_newer_schema_is_refused(backend_url: str) -> None:
    with open_store(backend_url) as store, store.transaction() as tx:
        tx.meta_set("schema_version", SCHEMA_VERSION + 1)
    with pytest.raises(SchemaTooNew):
        open_store(backend_url)


# -- the store ---------------------------------------------------------------------------------


def test_round_trips_every_object(backend_url: str) -> None:
    net = Network(
        uuid="aaaaaaaa-0000-4000-8000-000000000001",
        name="net",
        owner_uuid=OWNER,
        vnet_id=7,
        vlan_id=3,
        subnet="10.0.0.0/24",
        gateway="10.0.0.1",
        provision_start="10.0.0.2",
        provision_end="10.0.0.254",
        version=1,
    )
    route = Route(
        vnet_id=7,
        vlan_id=3,
        subnet="10.0.0.0/24",
        r_dc_id=2,
        r_vnet_id=8,
        r_vlan_id=4,
        r_subnet="10.1.0.0/24",
        r_send_mac=bytes.fromhex("020000000099"),
        r_ul_ip="192.168.9.9",
        r_dst_mac=None,
        version=3,
    )
    rule = Rule(uuid=str(uuid.uuid4()), rule="FROM any TO all vms ALLOW tcp PORT 22", version=4)
    big_mac = bytes.fromhex("fe" + "ff" * 5)  # the largest MAC still fits the integer column
    with open_store(backend_url) as store:
        with store.transaction() as tx:
            tx.insert_cn(ComputeNode(CN1, "192.168.1.1", 4789, 1))
            tx.insert_network(net)
            v = _vnic()
            tx.insert_vnic(v)
            v6 = _vnic(MAC2, "fd00::5")
            tx.insert_vnic(v6)
            vbig = _vnic(big_mac, "10.0.0.6")
            tx.insert_vnic(vbig)
            tx.put_route(route)
            tx.put_rule(rule)
        with store.transaction(write=False) as tx:
            assert tx.get_cn(CN1) == ComputeNode(CN1, "192.168.1.1", 4789, 1)
            assert tx.cn_by_ip("192.168.1.1") == tx.get_cn(CN1)
            assert tx.get_network(net.uuid) == net
            assert tx.list_networks(7) == [net] and tx.list_networks(8) == []
            assert tx.get_vnic(MAC1) == v
            assert tx.get_vnic(big_mac) == vbig
            assert tx.vnic_by_ip(7, "fd00::5") == v6
            assert tx.get_vnics([MAC1, MAC2, b"\x02" * 6]) == {MAC1: v, MAC2: v6}
            assert sorted(tx.list_vnics(cn_uuid=CN1), key=lambda x: x.mac) == sorted(
                [v, v6, vbig], key=lambda x: x.mac
            )
            assert tx.cns_in_vnet(7) == {CN1}
            assert tx.count_vnics(cn_uuid=CN1) == 3
            assert tx.list_routes() == [route]
            assert tx.get_route(route.key) == route
            assert tx.get_rule(rule.uuid) == rule
            snap = tx.snapshot()
        assert sorted(snap.vnics) == sorted(
            [
                (int(MAC1.hex(), 16), "10.0.0.5", 7, CN1),
                (int(MAC2.hex(), 16), "fd00::5", 7, CN1),
                (int(big_mac.hex(), 16), "10.0.0.6", 7, CN1),
            ]
        )


def test_unique_constraints_raise_unique_violation(backend_url: str) -> None:
    with open_store(backend_url) as store:
        with store.transaction() as tx:
            tx.insert_cn(ComputeNode(CN1, "192.168.1.1", 4789, 1))
            tx.insert_vnic(_vnic())
        with pytest.raises(UniqueViolation), store.transaction() as tx:
            tx.insert_vnic(_vnic(ip="10.0.0.6"))  # same MAC
        with pytest.raises(UniqueViolation), store.transaction() as tx:
            tx.insert_vnic(_vnic(mac=MAC2))  # same (vnet, ip)
        with pytest.raises(UniqueViolation), store.transaction() as tx:
            tx.insert_cn(ComputeNode(CN2, "192.168.1.1", 4789, 1))  # same underlay IP
        with store.transaction() as tx:
            tx.insert_vnic(_vnic(mac=MAC2, vnet=8))  # same IP, other vnet: fine
        # the store is still usable after the refused writes
        assert len(store.snapshot().vnics) == 2


def test_a_failed_transaction_writes_nothing(backend_url: str) -> None:
    with open_store(backend_url) as store:
        with pytest.raises(RuntimeError), store.transaction() as tx:
            tx.next_version()
            tx.insert_cn(ComputeNode(CN1, "192.168.1.1", 4789, 1))
            raise RuntimeError("boom")
        with store.transaction(write=False) as tx:
            assert tx.list_cns() == []
            assert tx.current_version() == 0


def test_version_counter_grows_by_one_per_take(backend_url: str) -> None:
    with open_store(backend_url) as store:
        seen = []
        for _ in range(5):
            with store.transaction() as tx:
                seen.append(tx.next_version())
        assert seen == [1, 2, 3, 4, 5]


def test_log_entries_survive_a_reopen_in_order(backend_url: str) -> None:
    recs = [
        _logrec(CN1, LOG_VL2, mac=MAC1, version=1),
        _logrec(CN1, LOG_VL3, ip="10.0.0.5", vlan=3, mac=MAC1, version=2),
        _logrec(CN2, LOG_VL2, mac=MAC2, version=2),
        _logrec(
            CN1,
            LOG_ROUTE,
            src_ip="10.0.0.0",
            dst_ip="10.1.0.0",
            src_prefixlen=120,
            dst_prefixlen=120,
            src_vnet_id=7,
            dst_vnet_id=8,
            dc_id=1,
            version=3,
        ),
    ]
    with open_store(backend_url) as store, store.transaction() as tx:
        tx.append_log(recs)
    with open_store(backend_url) as store:
        with store.transaction(write=False) as tx:
            got = tx.fetch_log(CN1)
            assert [r.id for r in got] == [recs[0].id, recs[1].id, recs[3].id]
            assert all(isinstance(r.id, bytes) and len(r.id) == 16 for r in got)
            assert [r.seq for r in got] == sorted(r.seq for r in got)
            assert got[1].ip == "10.0.0.5" and got[1].vlan == 3 and got[1].mac == MAC1
            assert got[2].src_prefixlen == 120 and got[2].dst_vnet_id == 8
            only = tx.fetch_log(CN1, types=(LOG_VL2, LOG_VL3))
            assert [r.id for r in only] == [recs[0].id, recs[1].id]
            assert len(tx.fetch_log(CN1, limit=1)) == 1
        with store.transaction() as tx:
            assert tx.remove_log([recs[0].id, b"\x00" * 16, recs[0].id]) == 1
            assert tx.count_log(CN1) == 2
            assert tx.count_log() == 3


def test_a_closed_store_is_unavailable(backend_url: str) -> None:
    store = open_store(backend_url)
    store.close()
    with pytest.raises(StoreUnavailable):
        store.snapshot()


# -- the Directory -----------------------------------------------------------------------------


async def test_allocation_is_lowest_free_skips_the_gateway_and_fills_up(
    directory: Directory,
) -> None:
    await put_cns(directory)
    net = await create_net(directory, "10.0.0.0/29")  # hosts .1-.6, gateway .1
    ips = [(await directory.create_vnic(network_uuid=net.uuid, cn_uuid=CN1)).ip for _ in range(5)]
    assert ips == ["10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5", "10.0.0.6"]
    with pytest.raises(SubnetFull) as ei:
        await directory.create_vnic(network_uuid=net.uuid, cn_uuid=CN1)
    assert ei.value.http_status == 507
    freed = (await directory.list_vnics(network_uuid=net.uuid))[1]
    await directory.delete_vnic(freed.mac)
    again = await directory.create_vnic(network_uuid=net.uuid, cn_uuid=CN2)
    assert again.ip == freed.ip


async def test_duplicates_are_conflicts(directory: Directory) -> None:
    await put_cns(directory)
    net = await create_net(directory)
    mac = parse_mac("0:a:95:9d:68:16")
    await directory.create_vnic(network_uuid=net.uuid, cn_uuid=CN1, mac=mac, ip="10.0.0.9")
    with pytest.raises(Conflict) as ei:
        await directory.create_vnic(network_uuid=net.uuid, cn_uuid=CN1, mac=mac)
    assert [e.field for e in ei.value.errors] == ["mac"]
    with pytest.raises(Conflict) as ei:
        await directory.create_vnic(network_uuid=net.uuid, cn_uuid=CN1, ip="10.0.0.9")
    assert [e.field for e in ei.value.errors] == ["ip"]
    with pytest.raises(Conflict):
        await directory.put_cn(str(uuid.uuid4()), UL1)
    with pytest.raises(Conflict):
        await create_net(directory, "10.0.0.128/25")  # overlaps in the same vnet


async def test_changes_fan_out_shootdowns_and_reach_the_index(directory: Directory) -> None:
    await put_cns(directory)
    net = await create_net(directory)
    a = await directory.create_vnic(network_uuid=net.uuid, cn_uuid=CN1)
    b = await directory.create_vnic(network_uuid=net.uuid, cn_uuid=CN2)
    await drain(directory, CN1, CN2, CN3, CN4)
    await directory.update_vnic(b.mac, cn_uuid=CN4)
    expected = [("VL2", format_mac(b.mac), VNET), ("VL3", b.ip, 5, VNET)]
    assert await logs(directory, CN1, CN2, CN3, CN4) == {
        CN1: expected,
        CN2: expected,
        CN3: [],
        CN4: expected,
    }
    assert directory.index.vl2(b.mac, VNET) == (4789, ip_to_wire(UL4))
    await drain(directory, CN1, CN2, CN4)
    await directory.update_vnic(a.mac, ip="10.0.0.77")
    assert directory.index.vl3(ip_to_wire("10.0.0.77"), VNET) == (a.mac, 4789, ip_to_wire(UL1))
    assert directory.index.vl3(ip_to_wire(a.ip), VNET) is None
    await directory.delete_vnic(a.mac)
    assert directory.index.vl2(a.mac, VNET) is None
    vl2 = ("VL2", format_mac(a.mac), VNET)
    got = await logs(directory, CN1, CN4)
    assert got[CN1][-1] == vl2 and got[CN4][-1] == vl2


async def test_load_is_all_or_nothing_and_writes_no_log(directory: Directory) -> None:
    doc = {
        "cns": [{"uuid": CN1, "ip": UL1}, {"uuid": CN2, "ip": UL2}],
        "vnics": [
            {"mac": "00:0a:95:9d:68:16", "ip": "10.0.0.1", "vnet_id": VNET, "cn_uuid": CN1},
            {"mac": "00:0a:95:9d:68:17", "ip": "10.0.0.2", "vnet_id": VNET, "cn_uuid": CN2},
        ],
    }
    result = await directory.load(doc)
    assert (result["cns"], result["vnics"]) == (2, 2)
    mac = parse_mac("00:0a:95:9d:68:16")
    assert directory.index.vl2(mac, VNET) == (4789, ip_to_wire(UL1))
    assert await logs(directory, CN1, CN2) == {CN1: [], CN2: []}
    bad = {"vnics": [{**doc["vnics"][0], "cn_uuid": CN3}, {"mac": "zz"}]}
    with pytest.raises(Exception) as ei:
        await directory.load(bad)
    assert getattr(ei.value, "http_status", None) == 422
    assert (await directory.get_vnic(mac)).cn_uuid == CN1


async def test_the_index_is_rebuilt_from_the_store_on_open(backend_url: str) -> None:
    d = await Directory.open(backend_url)
    await put_cns(d)
    net = await create_net(d)
    v = await d.create_vnic(network_uuid=net.uuid, cn_uuid=CN2)
    version = d.index.version
    await d.aclose()
    d2 = await Directory.open(backend_url)
    try:
        assert d2.index.vl2(v.mac, VNET) == (4789, ip_to_wire(UL2))
        assert d2.index.vl3(ip_to_wire(v.ip), VNET) == (v.mac, 4789, ip_to_wire(UL2))
        assert d2.index.version == version
        assert len(await d2.log_records(CN2)) == 1  # the log survives too
    finally:
        await d2.aclose()


async def test_concurrent_creates_in_one_directory_never_share_an_ip(directory: Directory) -> None:
    await put_cns(directory)
    net = await create_net(directory, "10.0.0.0/27")
    got: list[Vnic] = []

    async def one(cn: str) -> None:
        got.append(await directory.create_vnic(network_uuid=net.uuid, cn_uuid=cn))

    async with trio.open_nursery() as nursery:
        for i in range(20):
            nursery.start_soon(one, (CN1, CN2, CN3)[i % 3])
    assert len({v.ip for v in got}) == 20 and len({v.mac for v in got}) == 20
    assert len({v.version for v in got}) == 20


async def test_two_directories_on_one_database_never_hand_out_the_same_address(
    backend_url: str,
) -> None:
    """Two Directory objects (two connections, two worker threads): 2 x 20 creates in a /27
    (29 assignable addresses besides the gateway) — 29 succeed, 11 are SubnetFull, every IP
    and MAC is unique."""
    a = await Directory.open(backend_url)
    b = await Directory.open(backend_url)
    try:
        await put_cns(a)
        net = await create_net(a, "10.0.0.0/27")
        made: list[Vnic] = []
        full = 0

        async def create(d: Directory, cn: str) -> None:
            nonlocal full
            try:
                made.append(await d.create_vnic(network_uuid=net.uuid, cn_uuid=cn))
            except SubnetFull:
                full += 1

        async def burst(d: Directory, cn: str) -> None:
            async with trio.open_nursery() as nursery:
                for _ in range(20):
                    nursery.start_soon(create, d, cn)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(burst, a, CN1)
            nursery.start_soon(burst, b, CN2)
        assert len(made) == 29 and full == 11
        assert len({v.ip for v in made}) == 29
        assert len({v.mac for v in made}) == 29
        assert len({v.version for v in made}) == 29
        stored = await a.list_vnics(network_uuid=net.uuid)
        assert sorted(v.ip for v in stored) == sorted(v.ip for v in made)
    finally:
        await a.aclose()
        await b.aclose()


async def test_the_shootdown_log_is_shared_by_directories_on_one_database(
    backend_url: str,
) -> None:
    a = await Directory.open(backend_url)
    b = await Directory.open(backend_url)
    try:
        await put_cns(a)
        net = await create_net(a)
        await a.create_vnic(network_uuid=net.uuid, cn_uuid=CN1)
        await b.create_vnic(network_uuid=net.uuid, cn_uuid=CN1)
        seen_by_b = await b.log_records(CN1)
        assert len(seen_by_b) == 2 and seen_by_b == await a.log_records(CN1)
        assert await b.remove_log([seen_by_b[0].id]) == 1  # LOG_RM through b ...
        assert [r.id for r in await a.log_records(CN1)] == [seen_by_b[1].id]  # ... gone for a
        entries = await a.fetch_log(CN1, 1024)
        assert len(entries) == 1
        assert await a.remove_log([entries[0].entry_id]) == 1
        assert await b.log_records(CN1) == []
    finally:
        await a.aclose()
        await b.aclose()
