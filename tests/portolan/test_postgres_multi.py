"""Several portolan instances on one PostgreSQL database.

In-process instances (a Directory + its Coherence task + an SVP server each, separate store
connections) pin coherence: a change made through one instance is answered by the other's SVP
lookups (the goal is 100 ms, measured by bench/store.py; tests allow seconds), a lost LISTEN
connection or a pruned changes feed ends in a full reload, remote-change hooks fire for other
instances' changes only, the shootdown log is one table for all, and instances opening an
empty database together migrate it once (advisory lock).

Real ``portolan serve`` processes pin concurrent allocation over HTTP (two instances creating
40 VNICs each at once in one small network: unique addresses, the right count, SubnetFull for
the rest) and the outage story: with the server stopped every instance keeps answering SVP
lookups from memory, API writes fail fast with 503 ServiceUnavailable saying the database is
unreachable, and everything recovers by itself when the server is back.
"""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import trio

from portolan.coherence import Coherence
from portolan.errors import StoreUnavailable
from portolan.index import IndexChange
from portolan.service import Directory
from portolan.store import SCHEMA_VERSION, notify, open_store
from portolan.svp_server import SvpServer
from protocol.addr import ip_to_wire, parse_mac
from protocol.svp import (
    LogAck,
    LogRemove,
    LogRemoveAck,
    LogRequest,
    Status,
    VL2Ack,
    VL2Request,
    VL3Ack,
    VL3Request,
    VL3Type,
    decode_frame,
)
from tests.e2e.conftest import PortolanProcess, run_portolan, start_portolan
from tests.portolan.conftest import CN1, CN2, CN3, OWNER, VNET
from tests.support import pg_fixtures
from tests.support.pg_fixtures import create_database
from tests.support.pgcluster import PgCluster

pytestmark = pytest.mark.postgres

# the fixtures this module uses (tests/support/pg_fixtures.py)
pg_cluster = pg_fixtures.pg_cluster
pg_url = pg_fixtures.pg_url
own_pg_cluster = pg_fixtures.own_pg_cluster

UL1, UL2, UL3 = "192.168.1.1", "192.168.1.2", "192.168.1.3"
WITHIN = 5.0  # generous bound for "the other instance sees it" (the goal is 100 ms)


# -- helpers ---------------------------------------------------------------------------------


async def svp(address: tuple[str, int], msg: Any) -> Any:
    """One SVP exchange on a fresh connection; returns the decoded reply."""
    stream = await trio.open_tcp_stream(*address)
    async with stream:
        await stream.send_all(msg.encode())
        buf = b""
        while len(buf) < 16 or len(buf) < 16 + int.from_bytes(buf[4:8], "big"):
            data = await stream.receive_some(65536)
            assert data, "the SVP server closed the connection"
            buf += data
    return decode_frame(buf)


async def vl2(address: tuple[str, int], mac: bytes, vnet: int = VNET) -> VL2Ack:
    reply = await svp(address, VL2Request(id=7, mac=mac, vnet_id=vnet))
    assert isinstance(reply, VL2Ack)
    return reply


async def vl3(address: tuple[str, int], ip: str, vnet: int = VNET) -> VL3Ack:
    reply = await svp(
        address, VL3Request(id=8, ip=ip_to_wire(ip), ip_type=VL3Type.IP, vnet_id=vnet)
    )
    assert isinstance(reply, VL3Ack)
    return reply


async def eventually(check: Callable[[], Any], within: float = WITHIN) -> float:
    """Await until ``check()`` (sync or async) is truthy; returns the seconds it took."""
    t0 = time.monotonic()
    while True:
        got = check()
        if hasattr(got, "__await__"):
            got = await got
        if got:
            return time.monotonic() - t0
        if time.monotonic() - t0 > within:
            raise AssertionError(f"not true within {within}s")
        await trio.sleep(0.005)


@dataclass
class Instance:
    directory: Directory
    coherence: Coherence
    svp: tuple[str, int]


@asynccontextmanager
async def instances(url: str, n: int = 2) -> AsyncIterator[list[Instance]]:
    """n in-process portolan instances on one database: Directory + Coherence + SVP server."""
    out: list[Instance] = []
    async with trio.open_nursery() as nursery:
        try:
            for _ in range(n):
                d = await Directory.open(url)
                c = Coherence(d, url)
                await nursery.start(c.run)
                addr = await nursery.start(SvpServer(d).serve, "127.0.0.1", 0)
                out.append(Instance(d, c, (str(addr[0]), int(addr[1]))))
            yield out
        finally:
            nursery.cancel_scope.cancel()
            with trio.CancelScope(shield=True):
                for i in out:
                    await i.directory.aclose()


async def _setup(d: Directory, subnet: str = "10.0.0.0/24") -> str:
    for cn, ip in ((CN1, UL1), (CN2, UL2), (CN3, UL3)):
        await d.put_cn(cn, ip)
    net = await d.create_network(
        name="n", owner_uuid=OWNER, vnet_id=VNET, vlan_id=0, subnet=subnet, gateway=None
    )
    return net.uuid


# -- coherence between instances ---------------------------------------------------------------


async def test_a_change_through_one_instance_is_answered_by_the_others_svp(pg_url: str) -> None:
    async with instances(pg_url) as (a, b):
        net = await _setup(a.directory)
        v = await a.directory.create_vnic(network_uuid=net, cn_uuid=CN1)
        await eventually(lambda: b.directory.index.vl2(v.mac, VNET) is not None)
        ack = await vl2(b.svp, v.mac)
        assert (ack.status, ack.addr) == (Status.OK, ip_to_wire(UL1))
        ack3 = await vl3(b.svp, v.ip)
        assert (ack3.status, ack3.mac) == (Status.OK, v.mac)

        # a move and a new IP at once: the old VL3 key must go on B too
        await a.directory.update_vnic(v.mac, cn_uuid=CN2, ip="10.0.0.200")

        async def moved() -> bool:
            return (await vl2(b.svp, v.mac)).addr == ip_to_wire(UL2)

        await eventually(moved)
        assert (await vl3(b.svp, "10.0.0.200")).mac == v.mac
        assert (await vl3(b.svp, v.ip)).status == Status.NOTFOUND

        # the CN's underlay moves: every VNIC on it follows on B
        await a.directory.put_cn(CN2, "192.168.7.7", 4790)
        await eventually(
            lambda: b.directory.index.vl2(v.mac, VNET) == (4790, ip_to_wire("192.168.7.7"))
        )

        # changes made through B reach A the same way, and deletes too
        w = await b.directory.create_vnic(network_uuid=net, cn_uuid=CN3)
        await eventually(lambda: a.directory.index.vl2(w.mac, VNET) is not None)
        await b.directory.delete_vnic(v.mac)
        await eventually(lambda: a.directory.index.vl2(v.mac, VNET) is None)
        assert (await vl2(a.svp, v.mac)).status == Status.NOTFOUND
        assert (await vl3(a.svp, "10.0.0.200")).status == Status.NOTFOUND

        # ``portolan load`` (routes included) through A reaches B
        doc = {
            "vnics": [
                {"mac": "00:0a:95:9d:68:16", "ip": "10.9.0.1", "vnet_id": 99, "cn_uuid": CN1}
            ],
            "routes": [
                {
                    "vnet_id": VNET,
                    "vlan_id": 0,
                    "subnet": "10.0.0.0/24",
                    "r_dc_id": 1,
                    "r_vnet_id": 99,
                    "r_subnet": "10.9.0.0/24",
                    "r_send_mac": "02:00:00:00:00:99",
                }
            ],
        }
        await a.directory.load(doc)
        mac = parse_mac("00:0a:95:9d:68:16")
        await eventually(lambda: b.directory.index.vl2(mac, 99) is not None)
        await eventually(
            lambda: (
                b.directory.index.route(VNET, 0, ip_to_wire("10.0.0.5"), ip_to_wire("10.9.0.1"))
                is not None
            )
        )
        # both indexes agree entry for entry with the store
        snap = await trio.to_thread.run_sync(a.directory.store.snapshot)
        for inst in (a, b):
            assert sorted(inst.directory.index.vl2_items()) == sorted(
                (m.to_bytes(6, "big"), vnet, *inst.directory.index.cn(cn))  # type: ignore[misc]
                for m, _ip, vnet, cn in snap.vnics
            )


async def test_a_lost_listener_connection_ends_in_a_full_reload(pg_url: str) -> None:
    async with instances(pg_url) as (a, b):
        net = await _setup(a.directory)
        reloads = b.coherence.full_reloads

        def kill_listeners() -> int:
            with psycopg.connect(pg_url, autocommit=True) as conn:
                rows = conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE application_name = 'portolan-listen'"
                ).fetchall()
            return len(rows)

        assert await trio.to_thread.run_sync(kill_listeners) == 2
        # a change committed while nobody listens: no notification will ever carry it
        v = await a.directory.create_vnic(network_uuid=net, cn_uuid=CN1)
        await eventually(lambda: b.directory.index.vl2(v.mac, VNET) is not None)
        await eventually(lambda: b.coherence.full_reloads > reloads and b.coherence.listening)
        # and notifications flow again afterwards
        w = await a.directory.create_vnic(network_uuid=net, cn_uuid=CN2)
        await eventually(lambda: b.directory.index.vl2(w.mac, VNET) is not None)


async def test_a_pruned_feed_makes_a_lagging_instance_reload(pg_url: str) -> None:
    async with instances(pg_url) as (a, b):
        net = await _setup(a.directory)
        await eventually(lambda: b.coherence.cursor == a.directory.index.version)
        reloads = b.coherence.full_reloads

        def prune_everything() -> None:
            with open_store(pg_url) as store, store.transaction() as tx:
                tx.execute("DELETE FROM changes")
                tx.meta_set("changes_floor", tx.current_version() + 1)

        await trio.to_thread.run_sync(prune_everything)
        v = await a.directory.create_vnic(network_uuid=net, cn_uuid=CN1)
        await eventually(lambda: b.directory.index.vl2(v.mac, VNET) is not None)
        assert b.coherence.full_reloads > reloads


async def test_a_change_too_big_for_the_feed_is_a_reload_for_the_others(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(notify, "MAX_KEYS", 3)
    async with instances(pg_url) as (a, b):
        await _setup(a.directory)
        reloads = b.coherence.full_reloads
        doc = {
            "vnics": [
                {
                    "mac": f"02:00:00:00:01:{i:02x}",
                    "ip": f"10.5.0.{i}",
                    "vnet_id": 5,
                    "cn_uuid": CN1,
                }
                for i in range(1, 11)
            ]
        }
        await a.directory.load(doc)
        await eventually(lambda: len(b.directory.index) == 10)
        assert b.coherence.full_reloads > reloads


async def test_hooks_hear_of_other_instances_changes_only(pg_url: str) -> None:
    async with instances(pg_url) as (a, b):
        heard: list[IndexChange | None] = []

        async def hook(change: IndexChange | None) -> None:
            heard.append(change)

        b.coherence.add_hook(hook)
        net = await _setup(a.directory)
        await eventually(lambda: heard)
        heard.clear()
        v = await a.directory.create_vnic(network_uuid=net, cn_uuid=CN1)
        await eventually(lambda: any(c is not None and v in c.vnics_put for c in heard))
        heard.clear()
        await b.directory.create_vnic(network_uuid=net, cn_uuid=CN2)  # B's own change
        mark = b.coherence.catch_ups
        await eventually(lambda: b.coherence.catch_ups > mark)  # B read its own record back
        await trio.sleep(0.2)
        assert heard == []


async def test_a_rule_written_through_one_instance_wakes_the_others_policy_waiters(
    pg_url: str,
) -> None:
    from portolan.firewall import rules
    from portolan.firewall.policy_service import policy_service_for

    async with instances(pg_url) as (a, b):
        net = await _setup(a.directory)
        v = await a.directory.create_vnic(network_uuid=net, cn_uuid=CN1, firewall_enabled=True)
        await eventually(lambda: b.directory.index.vl2(v.mac, VNET) is not None)
        service = policy_service_for(b.directory)
        await service.ensure_fresh()
        generation = service.generation(CN1)
        got: list[int] = []

        async def waiter() -> None:
            got.append(await service.wait_changed(CN1, generation))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            await trio.sleep(0.1)
            await rules.create(
                a.directory,
                {"rule": "FROM any TO all vms ALLOW tcp PORT 22", "global": True, "enabled": True},
            )
            with trio.fail_after(WITHIN):
                while not got:
                    await trio.sleep(0.01)
        assert got[0] > generation
        assert "22" in service.document(CN1).json_bytes().decode()


async def test_the_shootdown_log_is_shared_between_svp_servers(pg_url: str) -> None:
    async with instances(pg_url) as (a, b):
        net = await _setup(a.directory)
        await a.directory.create_vnic(network_uuid=net, cn_uuid=CN1)
        await a.directory.create_vnic(network_uuid=net, cn_uuid=CN1)
        ack_a = await svp(a.svp, LogRequest(id=1, count=1024, ip=ip_to_wire(UL1)))
        ack_b = await svp(b.svp, LogRequest(id=2, count=1024, ip=ip_to_wire(UL1)))
        assert isinstance(ack_a, LogAck) and isinstance(ack_b, LogAck)
        assert len(ack_a.entries) == 2 and ack_a.entries == ack_b.entries
        first = ack_a.entries[0].entry_id
        rm = await svp(a.svp, LogRemove(id=3, ids=(first,)))  # LOG_RM through A ...
        assert isinstance(rm, LogRemoveAck) and rm.status == Status.OK
        again = await svp(b.svp, LogRequest(id=4, count=1024, ip=ip_to_wire(UL1)))
        assert [e.entry_id for e in again.entries] == [ack_a.entries[1].entry_id]  # ... gone for B


def test_instances_starting_together_migrate_once(pg_url: str) -> None:
    """Four openers race on an empty database: the advisory lock makes them migrate one after
    the other; all succeed and the schema is made once."""
    barrier = threading.Barrier(4)
    errors: list[BaseException] = []
    versions: list[int] = []

    def opener() -> None:
        try:
            barrier.wait()
            with open_store(pg_url) as store:
                versions.append(store.schema_version())
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=opener) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert versions == [SCHEMA_VERSION] * 4
    with open_store(pg_url) as store, store.transaction(False) as tx:
        assert tx.current_version() == 0  # the counter row was inserted exactly once


async def test_an_unreachable_database_fails_fast_with_a_clear_message() -> None:
    t0 = time.monotonic()
    with pytest.raises(StoreUnavailable) as ei:
        await Directory.open("postgresql://portolan@127.0.0.1:1/portolan")
    assert time.monotonic() - t0 < 3
    assert "database unreachable" in ei.value.message
    assert ei.value.http_status == 503 and ei.value.code == "ServiceUnavailable"


def test_serve_with_an_unreachable_database_exits_with_one_clear_line() -> None:
    r = run_portolan(
        "serve",
        "--store",
        "postgresql://portolan@127.0.0.1:1/portolan",
        "--svp-listen",
        "127.0.0.1:0",
        "--api-listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
    )
    assert r.returncode == 1
    assert "cannot open the store: database unreachable" in r.stderr
    assert "Traceback" not in r.stderr


# -- real `portolan serve` processes -----------------------------------------------------------


def _serve(tmp_path: Path, url: str) -> PortolanProcess:
    return start_portolan(tmp_path, store_url=url)


def _base(p: PortolanProcess) -> str:
    host, port = p.api
    return f"http://{host}:{port}"


@pytest.mark.slow
async def test_two_serve_processes_allocating_at_once_never_share_an_address(
    pg_url: str, tmp_path: Path
) -> None:
    """2 x 40 parallel POST /vnics into a /26 (61 assignable besides the gateway): 61 created,
    19 answered 507 SubnetFull, every IP and MAC unique, both instances answer for all."""
    procs = [_serve(tmp_path, pg_url), _serve(tmp_path, pg_url)]
    try:
        async with httpx.AsyncClient(timeout=30) as client:
            base_a, base_b = _base(procs[0]), _base(procs[1])
            for cn, ip in ((CN1, UL1), (CN2, UL2)):
                r = await client.put(f"{base_a}/cns/{cn}", json={"ip": ip})
                assert r.status_code in (200, 201), r.text
            r = await client.post(
                f"{base_b}/networks",
                json={
                    "name": "n",
                    "owner_uuid": OWNER,
                    "vnet_id": VNET,
                    "vlan_id": 0,
                    "subnet": "10.3.0.0/26",
                    "gateway": "10.3.0.1",
                },
            )
            assert r.status_code == 201, r.text
            net = r.json()["uuid"]
            statuses: list[int] = []
            made: list[dict[str, Any]] = []

            async def create(base: str, cn: str) -> None:
                r = await client.post(f"{base}/vnics", json={"network_uuid": net, "cn_uuid": cn})
                statuses.append(r.status_code)
                if r.status_code == 201:
                    made.append(r.json())
                else:
                    assert r.json()["code"] == "SubnetFull", r.text

            async with trio.open_nursery() as nursery:
                for _ in range(40):
                    nursery.start_soon(create, base_a, CN1)
                    nursery.start_soon(create, base_b, CN2)
            assert statuses.count(201) == 61 and statuses.count(507) == 19
            assert len({v["ip"] for v in made}) == 61
            assert len({v["mac"] for v in made}) == 61
            r = await client.get(f"{base_a}/vnics", params={"network_uuid": net})
            assert sorted(v["ip"] for v in r.json()) == sorted(v["ip"] for v in made)
        # every instance answers for every VNIC, whichever instance created it
        for p in procs:
            svp_addr = p.svp

            async def all_answered(addr: tuple[str, int] = svp_addr) -> bool:
                for v in made:
                    if (await vl3(addr, v["ip"])).status != Status.OK:
                        return False
                return True

            await eventually(all_answered)
    finally:
        for p in procs:
            p.terminate()


@pytest.mark.slow
async def test_an_outage_keeps_lookups_answering_fails_writes_fast_and_heals(
    own_pg_cluster: PgCluster,
    tmp_path: Path,
) -> None:
    cluster = own_pg_cluster
    url = create_database(cluster, "outage")
    procs = [_serve(tmp_path, url), _serve(tmp_path, url)]
    a, b = procs
    try:
        async with httpx.AsyncClient(timeout=30) as client:
            for cn, ip in ((CN1, UL1), (CN2, UL2)):
                r = await client.put(f"{_base(a)}/cns/{cn}", json={"ip": ip})
                assert r.status_code in (200, 201), r.text
            r = await client.post(
                f"{_base(a)}/networks",
                json={
                    "name": "n",
                    "owner_uuid": OWNER,
                    "vnet_id": VNET,
                    "vlan_id": 0,
                    "subnet": "10.4.0.0/24",
                },
            )
            net = r.json()["uuid"]
            r = await client.post(f"{_base(a)}/vnics", json={"network_uuid": net, "cn_uuid": CN1})
            v = r.json()
            mac = parse_mac(v["mac"])

            async def b_knows(m: bytes = mac) -> bool:
                return (await vl2(b.svp, m)).status == Status.OK

            await eventually(b_knows)

            await trio.to_thread.run_sync(cluster.stop)
            # lookups keep being answered from memory, on both instances
            for p in procs:
                assert (await vl2(p.svp, mac)).addr == ip_to_wire(UL1)
                assert (await vl3(p.svp, v["ip"])).mac == mac
            # writes fail fast with 503 ServiceUnavailable naming the database
            for p in procs:
                t0 = time.monotonic()
                r = await client.post(
                    f"{_base(p)}/vnics", json={"network_uuid": net, "cn_uuid": CN2}
                )
                took = time.monotonic() - t0
                assert r.status_code == 503, r.text
                assert r.json()["code"] == "ServiceUnavailable"
                assert "database unreachable" in r.json()["message"]
                assert took < 3.0, took
            # still answering a while later (the listener is retrying in the background)
            await trio.sleep(1.0)
            assert (await vl2(b.svp, mac)).status == Status.OK

            await trio.to_thread.run_sync(cluster.start)
            # the first write after the outage works on both (stale pooled connections are
            # replaced), and each instance's change reaches the other
            made = {}
            for p in procs:
                deadline = time.monotonic() + 15
                while True:
                    r = await client.post(
                        f"{_base(p)}/vnics", json={"network_uuid": net, "cn_uuid": CN2}
                    )
                    if r.status_code == 201 or time.monotonic() > deadline:
                        break
                    await trio.sleep(0.2)
                assert r.status_code == 201, r.text
                made[p.svp] = parse_mac(r.json()["mac"])
            for here, other in ((a, b), (b, a)):
                m = made[here.svp]

                async def seen(addr: tuple[str, int] = other.svp, m: bytes = m) -> bool:
                    return (await vl2(addr, m)).status == Status.OK

                await eventually(seen, within=15)
    finally:
        for p in procs:
            p.terminate()
