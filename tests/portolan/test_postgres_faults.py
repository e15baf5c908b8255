"""PostgreSQL faults that are not a clean outage (issue 12, items 11-12).

- A server that is hung rather than down (every process of the cluster SIGSTOPped: its kernel
  still accepts and acknowledges, nothing answers) or cut off by a firewall dropping its
  packets (an nftables table of this test's own): writes are answered 503 within a few
  seconds (the goal is about 2 s), and a write answered 503 is never committed afterwards,
  when the server runs again.
- After the server restarts, another instance's answers follow the new writes within about a
  second (its LISTEN reconnect backoff stops at 1 s while the server's host answers TCP).

Each test runs its own throwaway cluster (``own_pg_cluster``); the stopped processes are
continued and the nftables table removed even when the test fails.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import trio

from portolan.api import create_app, serve_api
from portolan.coherence import Coherence
from portolan.service import Directory
from tests.portolan.conftest import CN1, CN2, OWNER, VNET
from tests.support import pg_fixtures
from tests.support.pg_fixtures import create_database
from tests.support.pgcluster import PgCluster

pytestmark = pytest.mark.postgres

own_pg_cluster = pg_fixtures.own_pg_cluster

NFT_PREFIX = "pgf12_"
#: generous test bound for "answered fast" (the goal, measured in the report, is about 2 s)
FAST = 8.0


def cluster_pids(cluster: PgCluster) -> list[int]:
    """The postmaster of ``cluster`` and its children (no other process)."""
    master = int((cluster.data / "postmaster.pid").read_text().split()[0])
    pids = [master]
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == master:
            pids.append(int(entry))
    return pids


@contextmanager
def hung(cluster: PgCluster) -> Iterator[None]:
    pids = cluster_pids(cluster)
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass


def _nft(*args: str) -> None:
    subprocess.run(["nft", *args], check=True, capture_output=True, text=True, timeout=30)


def _sweep_nft() -> None:
    out = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, timeout=30)
    for line in out.stdout.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[2].startswith(NFT_PREFIX):
            subprocess.run(["nft", "delete", "table", parts[1], parts[2]], timeout=30)


@contextmanager
def dropped(port: int) -> Iterator[None]:
    """Drop every TCP packet to or from ``port`` on this host (a table of our own)."""
    table = f"{NFT_PREFIX}{os.getpid()}"
    _nft("add", "table", "inet", table)
    try:
        _nft(
            "add chain inet",
            table,
            "out { type filter hook output priority -10 ; policy accept ; }",
        )
        _nft("add rule inet", table, "out", f"tcp dport {port} drop")
        _nft("add rule inet", table, "out", f"tcp sport {port} drop")
        yield
    finally:
        subprocess.run(["nft", "delete", "table", "inet", table], timeout=30)


def count_vnics(url: str) -> int:
    with psycopg.connect(url, connect_timeout=5) as conn:
        return int(conn.execute("SELECT COUNT(*) FROM vnics").fetchone()[0])


@asynccontextmanager
async def api_on_postgres(url: str) -> AsyncIterator[tuple[Directory, httpx.AsyncClient]]:
    directory = await Directory.open(url)
    try:
        app = create_app(directory, token=None)
        async with trio.open_nursery() as nursery:
            host, port = await nursery.start(serve_api, app, "127.0.0.1", 0)
            async with httpx.AsyncClient(base_url=f"http://{host}:{port}", timeout=40) as client:
                yield directory, client
            nursery.cancel_scope.cancel()
    finally:
        await directory.aclose()


async def _setup(client: httpx.AsyncClient) -> str:
    for cn, ip in ((CN1, "192.168.1.1"), (CN2, "192.168.1.2")):
        assert (await client.put(f"/cns/{cn}", json={"ip": ip})).status_code in (200, 201)
    body = {"name": "n", "owner_uuid": OWNER, "vnet_id": VNET, "vlan_id": 0}
    r = await client.post("/networks", json={**body, "subnet": "10.4.0.0/24"})
    assert r.status_code == 201, r.text
    net = r.json()["uuid"]
    r = await client.post("/vnics", json={"network_uuid": net, "cn_uuid": CN1})
    assert r.status_code == 201, r.text
    return net


async def _timed_post(client: httpx.AsyncClient, path: str, body: Any) -> tuple[Any, float]:
    t0 = time.monotonic()
    r = await client.post(path, json=body)
    return r, time.monotonic() - t0


async def _stays(url: str, expected: int, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert await trio.to_thread.run_sync(count_vnics, url) == expected
        await trio.sleep(0.25)


async def _write_until_created(client: httpx.AsyncClient, net: str, within: float = 30) -> None:
    deadline = time.monotonic() + within
    while True:
        r = await client.post("/vnics", json={"network_uuid": net, "cn_uuid": CN2})
        if r.status_code == 201:
            return
        assert r.status_code == 503, r.text
        assert time.monotonic() < deadline, r.text
        await trio.sleep(0.3)


# -- item 11: hung, not down ----------------------------------------------------------------


async def test_a_hung_server_gets_503_fast_and_the_refused_write_never_commits(
    own_pg_cluster: PgCluster,
) -> None:
    url = create_database(own_pg_cluster, "hung")
    async with api_on_postgres(url) as (directory, client):
        net = await _setup(client)
        before = await trio.to_thread.run_sync(count_vnics, url)
        with hung(own_pg_cluster):
            took = []
            # the pooled connection, then (the pool dropped) a fresh connection attempt
            for _ in range(2):
                r, t = await _timed_post(client, "/vnics", {"network_uuid": net, "cn_uuid": CN2})
                assert r.status_code == 503, r.text
                assert r.json()["code"] == "ServiceUnavailable"
                assert "database unreachable" in r.json()["message"]
                took.append(t)
            r = await client.get("/vnics")
            assert r.status_code == 503, r.text
            assert max(took) < FAST, took
        # Running again: what was refused stays refused, and writes work again.
        await _stays(url, before, 3.0)
        await _write_until_created(client, net)
        assert await trio.to_thread.run_sync(count_vnics, url) == before + 1


async def test_packets_dropped_on_the_way_get_503_fast_and_nothing_commits_later(
    own_pg_cluster: PgCluster,
) -> None:
    if shutil.which("nft") is None:
        pytest.skip("nft (nftables) is not installed")
    _sweep_nft()
    url = create_database(own_pg_cluster, "dropped")
    async with api_on_postgres(url) as (directory, client):
        net = await _setup(client)
        before = await trio.to_thread.run_sync(count_vnics, url)
        with dropped(own_pg_cluster.port):
            for _ in range(2):
                r, t = await _timed_post(client, "/vnics", {"network_uuid": net, "cn_uuid": CN2})
                assert r.status_code == 503, r.text
                assert t < FAST, t
        await _stays(url, before, 3.0)
        # the abandoned server session gives up its locks by itself (idle-in-transaction
        # timeout), then writes work again
        await _write_until_created(client, net)
        assert await trio.to_thread.run_sync(count_vnics, url) == before + 1


# -- item 12: coherence right after a restart ---------------------------------------------------


async def test_other_instances_follow_within_a_second_of_a_database_restart(
    own_pg_cluster: PgCluster,
) -> None:
    url = create_database(own_pg_cluster, "restart")
    async with trio.open_nursery() as nursery:
        a = await Directory.open(url)
        b = await Directory.open(url)
        try:
            for d in (a, b):
                await nursery.start(Coherence(d, url).run)
            await a.put_cn(CN1, "192.168.1.1")
            net = await a.create_network(
                name="n", owner_uuid=OWNER, vnet_id=VNET, vlan_id=0, subnet="10.5.0.0/24"
            )
            await trio.to_thread.run_sync(own_pg_cluster.stop)
            # long enough for a doubling backoff to reach its 5 s ceiling
            await trio.sleep(7.0)
            await trio.to_thread.run_sync(own_pg_cluster.start)
            t0 = time.monotonic()  # the restarted server accepts connections
            while True:
                try:
                    v = await a.create_vnic(network_uuid=net.uuid, cn_uuid=CN1)
                    break
                except Exception:
                    assert time.monotonic() - t0 < 10
                    await trio.sleep(0.05)
            while b.index.vl2(v.mac, VNET) is None:
                assert time.monotonic() - t0 < 10, "never seen"
                await trio.sleep(0.01)
            seen = time.monotonic() - t0
            # the bound, with a little room for a busy 2-core machine
            assert seen < 1.5, seen
        finally:
            nursery.cancel_scope.cancel()
            with trio.CancelScope(shield=True):
                await a.aclose()
                await b.aclose()
