"""End to end over real namespaces: portolan + three varpd compute nodes + tenant guests.

Topology (every namespace and address is the test's own; see tests/e2e/netns.py; the
processes are driven by the linux tests' `KernelCluster`, on this test's underlay)::

    ns ul: bridge br0 10.88.0.254/24, `portolan serve` (SVP on 10.88.0.254, API on its lo)
       |-- veth -- ns cn1: ul0 10.88.0.1, `varpd run` (udp backend, svp) -- TAP vna -> ns tenA
       |-- veth -- ns cn2: ul0 10.88.0.2, `varpd run`                    -- TAP vnb -> ns tenB
       '-- veth -- ns cn3: ul0 10.88.0.3, `varpd run` (no VNIC yet)

The test drives portolan's API (from inside ns ul) to create the CNs, the network and two
VNICs, starts a real varpd per CN inside its namespace from a TOML config, moves each TAP into
its tenant namespace and addresses it there, then pings B from A: the guest's ARP is answered
by varpd's proxy (SVP VL3 lookup) and the unicast is sent where the VL2 lookup says
(``varpdadm cache list`` shows the entry). Then B migrates to cn3 the way an orchestrator
would -- ``varpdadm vnic add`` on cn3 with a new TAP moved into tenB, ``PUT /vnics/{mac}``
with the new cn_uuid, ``varpdadm vnic rm`` on cn2 -- and pings follow within 10 s (the
shootdown clears cn1's cache entry; the next lookup answers cn3).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e import netns
from tests.linux.conftest import KernelCluster, cn_uuid, managed

pytestmark = pytest.mark.netns

VNET = 4288
OWNER = "930896af-bf8c-48d4-885c-6573a94b1853"
MAC_A, IP_A = "02:00:00:88:00:0a", "192.168.88.10"
MAC_B, IP_B = "02:00:00:88:00:0b", "192.168.88.11"
MOVE_BOUND = 10.0


class Cluster(KernelCluster):
    """portolan and the varpd of cn1..cn3 on underlay 10.88.0.0/24 (torn down by the fixture)."""

    hub_ip = "10.88.0.254"
    underlay = "10.88.0"
    log_level = None


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    reason = netns.unavailable()
    if reason:
        pytest.skip(reason)
    with managed(Cluster(netns.Lab("e"), tmp_path)) as c:
        build(c)
        yield c


def build(c: Cluster) -> None:
    c.build(3)
    net = c.api(
        "POST",
        "/networks",
        {
            "name": "e2e",
            "owner_uuid": OWNER,
            "vnet_id": VNET,
            "vlan_id": 0,
            "subnet": "192.168.88.0/24",
        },  # fmt: skip
    )
    for mac, ip, cn in ((MAC_A, IP_A, 1), (MAC_B, IP_B, 2)):
        c.vnic(net["uuid"], cn, mac, ip)

    c.start_varpd("cn1", VNET, [(MAC_A, "vna")], backend="udp")
    c.start_varpd("cn2", VNET, [(MAC_B, "vnb")], backend="udp")
    c.start_varpd("cn3", VNET, [], backend="udp")
    c.tenants(("cn1", "vna", "tenA", f"{IP_A}/24"), ("cn2", "vnb", "tenB", f"{IP_B}/24"))


def ping_until(c: Cluster, src: str, dst: str, bound: float) -> float:
    """Ping until one reply arrives; returns the seconds it took (fails after ``bound``)."""
    t0 = time.monotonic()
    last = ""
    while time.monotonic() - t0 < bound:
        ok, last = netns.ping(c.ns[src], dst, count=1, deadline=1)
        if ok:
            return time.monotonic() - t0
    raise AssertionError(f"no reply from {dst} within {bound}s:\n{last}\n{c.diag()}")


def test_ping_across_the_overlay_and_follow_a_vnic_migration(cluster: Cluster) -> None:
    c = cluster
    t_start = time.monotonic()
    # A -> B: proxy ARP (VL3) on cn1, then a VL2 lookup for B's MAC
    ping_until(c, "tenA", IP_B, 15)
    ok, out = netns.ping(c.ns["tenA"], IP_B, count=3)
    assert ok, out
    neigh = netns.run("ip", "-n", c.ns["tenA"], "neigh", "show", IP_B).stdout
    assert MAC_B in neigh  # the proxied ARP answer
    assert c.cache_dest("cn1", MAC_B) == f"{c.cn_ip(2)}:4789"
    assert c.cache_dest("cn2", MAC_A) == f"{c.cn_ip(1)}:4789"
    assert c.metric("cn1", "varpd_proxied_replies_total", kind="arp") >= 1
    # lookups went to the svp plugin (the VL3 answer behind the proxied ARP may already fill
    # the cache entry for B's MAC, so the unicast need not miss)
    assert c.metric("cn1", "varpd_lookups_total", plugin="svp", result="proxy_arp") >= 1
    assert c.metric("cn1", "varpd_lookups_total", plugin="svp") >= 1

    # migrate B to cn3: add there (new TAP into tenB), tell portolan, remove from cn2
    c.adm("cn3", "vnic", "add", "overlay0", MAC_B, "--tap", "vnb3")
    tenb = c.ns["tenB"]
    netns.run("ip", "-n", tenb, "link", "set", "vnb", "down")
    netns.run("ip", "-n", tenb, "addr", "flush", "dev", "vnb")
    c.plug("cn3", "vnb3", "tenB", f"{IP_B}/24")
    c.api("PUT", f"/vnics/{MAC_B}", {"cn_uuid": cn_uuid(3)})
    t_move = time.monotonic()
    c.adm("cn2", "vnic", "rm", "overlay0", MAC_B)
    # cn2 closed the old TAP's fd: the link is gone from the tenant
    assert netns.run("ip", "-n", tenb, "link", "show", "vnb", check=False).returncode != 0

    took = ping_until(c, "tenA", IP_B, MOVE_BOUND)
    print(f"traffic followed the move after {time.monotonic() - t_move:.2f}s (ping {took:.2f}s)")
    assert c.cache_dest("cn1", MAC_B) == f"{c.cn_ip(3)}:4789"
    assert c.cache_dest("cn3", MAC_A) == f"{c.cn_ip(1)}:4789"
    vnics = c.adm("cn3", "vnic", "list", "overlay0", "--json")
    assert [v["mac"] for v in vnics] == [MAC_B]
    assert c.adm("cn2", "vnic", "list", "overlay0", "--json") == []
    assert time.monotonic() - t_start < 60
