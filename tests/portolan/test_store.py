"""The SQLite store: schema/migrations, round trips, transactions, persistence across restarts."""

from __future__ import annotations

import sqlite3
import uuid
from pathlib import Path

import pytest

from portolan.errors import StoreUnavailable
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
from portolan.store import SCHEMA_VERSION, SchemaTooNew, UniqueViolation, open_store
from portolan.store.schema import MIGRATIONS
from tests.portolan.conftest import CN1, CN2, OWNER

MAC1 = bytes.fromhex("020000000001")
MAC2 = bytes.fromhex("020000000002")


def _net(uuid_: str = "aaaaaaaa-0000-4000-8000-000000000001", vnet: int = 7) -> Network:
    return Network(
        uuid=uuid_,
        name="net",
        owner_uuid=OWNER,
        vnet_id=vnet,
        vlan_id=3,
        subnet="10.0.0.0/24",
        gateway="10.0.0.1",
        provision_start="10.0.0.2",
        provision_end="10.0.0.254",
        version=1,
    )


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


def _log(cn: str, type_: int = LOG_VL2, **kw) -> LogRecord:
    return LogRecord(id=uuid.uuid4().bytes, cn_uuid=cn, type=type_, vnet_id=7, **kw)


def test_schema_version_is_recorded(tmp_path: Path) -> None:
    url = f"sqlite:{tmp_path / 'p.db'}"
    with open_store(url) as store:
        assert store.schema_version() == SCHEMA_VERSION == MIGRATIONS[-1].version
        with store.transaction(write=False) as tx:
            assert tx.meta_get("schema_version") == SCHEMA_VERSION
            assert tx.current_version() == 0
    # reopening migrates nothing and keeps the recorded version
    with open_store(url) as store:
        assert store.migrate() == SCHEMA_VERSION


def test_migrate_runs_the_missing_steps_on_an_empty_database(tmp_path: Path) -> None:
    url = f"sqlite:{tmp_path / 'p.db'}"
    with open_store(url, migrate=False) as store:
        assert store.schema_version() == 0
        assert store.migrate() == SCHEMA_VERSION
    con = sqlite3.connect(tmp_path / "p.db")
    tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    con.close()
    assert {"meta", "cns", "networks", "vnics", "shootdown_log", "routes", "rules"} <= tables


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    url = f"sqlite:{tmp_path / 'p.db'}"
    with open_store(url) as store, store.transaction() as tx:
        tx.meta_set("schema_version", SCHEMA_VERSION + 1)
    with pytest.raises(SchemaTooNew):
        open_store(url)


def test_sqlite_uses_wal_mode(tmp_path: Path) -> None:
    with open_store(f"sqlite:{tmp_path / 'p.db'}") as store, store.transaction(False) as tx:
        assert tx.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_memory_store_works() -> None:
    with open_store("sqlite::memory:") as store:
        with store.transaction() as tx:
            tx.insert_cn(ComputeNode(CN1, "192.168.1.1", 4789, tx.next_version()))
        assert store.snapshot().cns == [ComputeNode(CN1, "192.168.1.1", 4789, 1)]


def test_an_unreachable_postgresql_url_is_store_unavailable() -> None:
    # (the PostgreSQL backend's behaviour is pinned in test_store_backends.py)
    with pytest.raises(StoreUnavailable, match="database unreachable"):
        open_store("postgresql://portolan@127.0.0.1:1/portolan")


def test_unknown_url_scheme_is_refused() -> None:
    with pytest.raises(ValueError):
        open_store("mysql://x")


def test_unopenable_file_is_store_unavailable(tmp_path: Path) -> None:
    with pytest.raises(StoreUnavailable):
        open_store(f"sqlite:{tmp_path / 'missing-dir' / 'p.db'}")


def test_closed_store_is_unavailable(tmp_path: Path) -> None:
    store = open_store(f"sqlite:{tmp_path / 'p.db'}")
    store.close()
    with pytest.raises(StoreUnavailable):
        store.snapshot()


def test_round_trips_every_object(tmp_path: Path) -> None:
    with open_store(f"sqlite:{tmp_path / 'p.db'}") as store:
        net = _net()
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
        with store.transaction() as tx:
            tx.insert_cn(ComputeNode(CN1, "192.168.1.1", 4789, 1))
            tx.insert_network(net)
            v = _vnic()
            tx.insert_vnic(v)
            v6 = _vnic(MAC2, "fd00::5")
            tx.insert_vnic(v6)
            tx.put_route(route)
            tx.put_rule(rule)
        with store.transaction(write=False) as tx:
            assert tx.get_cn(CN1) == ComputeNode(CN1, "192.168.1.1", 4789, 1)
            assert tx.cn_by_ip("192.168.1.1") == tx.get_cn(CN1)
            assert tx.get_network(net.uuid) == net
            assert tx.list_networks(7) == [net] and tx.list_networks(8) == []
            assert tx.get_vnic(MAC1) == v
            assert tx.vnic_by_ip(7, "fd00::5") == v6
            assert tx.list_vnics(cn_uuid=CN1) == [v, v6]
            assert tx.cns_in_vnet(7) == {CN1}
            assert tx.count_vnics(cn_uuid=CN1) == 2
            assert tx.list_routes() == [route]
            assert tx.get_rule(rule.uuid) == rule
            snap = tx.snapshot()
        assert snap.vnics and sorted(snap.vnics) == sorted(
            [(int(MAC1.hex(), 16), "10.0.0.5", 7, CN1), (int(MAC2.hex(), 16), "fd00::5", 7, CN1)]
        )


def test_unique_constraints_raise_unique_violation(tmp_path: Path) -> None:
    with open_store(f"sqlite:{tmp_path / 'p.db'}") as store:
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


def test_a_failed_transaction_writes_nothing(tmp_path: Path) -> None:
    with open_store(f"sqlite:{tmp_path / 'p.db'}") as store:
        with pytest.raises(RuntimeError), store.transaction() as tx:
            tx.next_version()
            tx.insert_cn(ComputeNode(CN1, "192.168.1.1", 4789, 1))
            raise RuntimeError("boom")
        with store.transaction(write=False) as tx:
            assert tx.list_cns() == []
            assert tx.current_version() == 0


def test_version_counter_grows_by_one_per_take(tmp_path: Path) -> None:
    with open_store(f"sqlite:{tmp_path / 'p.db'}") as store:
        seen = []
        for _ in range(5):
            with store.transaction() as tx:
                seen.append(tx.next_version())
        assert seen == [1, 2, 3, 4, 5]


def test_log_entries_survive_a_restart_in_order(tmp_path: Path) -> None:
    url = f"sqlite:{tmp_path / 'p.db'}"
    recs = [
        _log(CN1, LOG_VL2, mac=MAC1, version=1),
        _log(CN1, LOG_VL3, ip="10.0.0.5", vlan=3, mac=MAC1, version=2),
        _log(CN2, LOG_VL2, mac=MAC2, version=2),
        _log(
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
    with open_store(url) as store, store.transaction() as tx:
        tx.append_log(recs)
    with open_store(url) as store:
        with store.transaction(write=False) as tx:
            got = tx.fetch_log(CN1)
            assert [r.id for r in got] == [recs[0].id, recs[1].id, recs[3].id]
            assert [r.seq for r in got] == sorted(r.seq for r in got)
            assert got[1].ip == "10.0.0.5" and got[1].vlan == 3 and got[1].mac == MAC1
            assert got[2].src_prefixlen == 120 and got[2].dst_vnet_id == 8
            assert [r.id for r in tx.fetch_log(CN1, types=(LOG_VL2, LOG_VL3))] == [
                recs[0].id,
                recs[1].id,
            ]
            assert len(tx.fetch_log(CN1, limit=1)) == 1
        with store.transaction() as tx:
            assert tx.remove_log([recs[0].id, b"\x00" * 16, recs[0].id]) == 1
            assert tx.count_log(CN1) == 2
            assert tx.count_log() == 3
