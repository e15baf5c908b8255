"""The linux backend end to end: portolan + varpd (backend = "linux") per compute node.

Every test builds its own namespaces (see conftest.py) and drives real kernel traffic from
tenant namespaces with `tenant.py` (raw-socket ICMP, TCP sockets, AF_PACKET ARP).
"""

from __future__ import annotations

import time

import pytest

from tests.linux.conftest import KernelCluster, cn_ip, wait_until

pytestmark = [pytest.mark.netns, pytest.mark.linux]

VNET = 0x4D2
MAC_A, IP_A = "02:00:00:4d:00:0a", "192.168.77.10"
MAC_B, IP_B = "02:00:00:4d:00:0b", "192.168.77.11"
VX = f"pvx{VNET:x}"
#: A's VNIC (tenant end vna, on cn1) into namespace tA, B's (vnb, on cn2) into tB
PLUGS = (("cn1", "vna", "tA", f"{IP_A}/24"), ("cn2", "vnb", "tB", f"{IP_B}/24"))


def two_nodes(c: KernelCluster, cns: int = 2) -> str:
    c.build(cns)
    net = c.network(VNET, "192.168.77.0/24")
    c.vnic(net, 1, MAC_A, IP_A)
    c.vnic(net, 2, MAC_B, IP_B)
    c.guests(VNET, (1, MAC_A, IP_A, "vna", "tA"), (2, MAC_B, IP_B, "vnb", "tB"))
    return net


def test_first_ping_resolves_through_svp_and_tcp_flows(kcluster: KernelCluster) -> None:
    c = kcluster
    two_nodes(c)
    took = c.ping("tA", IP_B, timeout=15)
    print(f"first ping answered after {took:.2f}s")
    # the kernel tables of cn1's vxlan device: B's IP -> B's MAC, B's MAC -> cn2
    neigh = c.kernel("cn1", "neigh", VX)
    assert (IP_B, MAC_B) in neigh, neigh
    fdb = c.kernel("cn1", "fdb", VX)
    assert (cn_ip(2), MAC_B) in fdb, fdb
    # varpdadm reads the same table
    assert c.cache_dest("cn1", MAC_B) == f"{cn_ip(2)}:4789"
    wait_until(lambda: c.cache_dest("cn2", MAC_A) == f"{cn_ip(1)}:4789", 10, "cn2 learns A")
    # portolan's VL3 shootdown log may have installed B's entry before the tenant asked;
    # make the next resolution a real L3 miss: forget it in the kernel and in the tenant
    import json

    from lab import netns

    def vxlan_tx_dropped() -> int:
        out = netns.run("ip", "-j", "-s", "-n", c.ns["cn1"], "link", "show", VX).stdout
        return int(json.loads(out)[0]["stats64"]["tx"]["dropped"])

    before = c.metric("cn1", "varpd_lookups_total", plugin="svp", result="proxy_arp")
    c.adm("cn1", "cache", "rm", "overlay0", MAC_B)
    netns.run("ip", "-n", c.ns["cn1"], "neigh", "del", IP_B, "dev", VX)
    netns.run("ip", "-n", c.ns["tA"], "neigh", "flush", "dev", "vna")
    dropped = vxlan_tx_dropped()
    c.ping("tA", IP_B, timeout=10)
    assert (IP_B, MAC_B) in c.kernel("cn1", "neigh", VX)
    assert c.metric("cn1", "varpd_lookups_total", plugin="svp", result="proxy_arp") > before
    # the tenant heard the answer only once the fdb entry was in: its first echo request was
    # forwarded, not dropped by the vxlan device for want of a remote
    assert vxlan_tx_dropped() == dropped
    show = c.adm("cn1", "show", "overlay0", "--json")
    assert show["backend"] == "linux"
    out = c.tcp("tB", "tA", IP_B)
    assert out.startswith("ok"), out
    print("tcp", out)


def test_move_delete_and_cache_commands(kcluster: KernelCluster) -> None:
    c = kcluster
    c.build(3)
    net = c.network(VNET, "192.168.77.0/24")
    c.vnic(net, 1, MAC_A, IP_A)
    c.vnic(net, 2, MAC_B, IP_B)
    c.start_varpd("cn1", VNET, [(MAC_A, "vna")])
    c.start_varpd("cn2", VNET, [(MAC_B, "vnb")])
    c.start_varpd("cn3", VNET, [])
    c.tenants(*PLUGS)
    c.ping("tA", IP_B, timeout=15)
    assert (cn_ip(2), MAC_B) in c.kernel("cn1", "fdb", VX)

    # the orchestrator moves B to cn3: a new veth there (vnic add tells its tenant end)
    added = c.adm("cn3", "vnic", "add", "overlay0", MAC_B, "--json")
    assert added["backend"] == "linux"
    new_if = added["ifname"]
    assert new_if and new_if in c.links(c.ns["cn3"])
    tb = c.ns["tB"]
    from lab import netns

    netns.run("ip", "-n", tb, "link", "set", "vnb", "down")
    netns.run("ip", "-n", tb, "addr", "flush", "dev", "vnb")
    c.plug("cn3", new_if, "tB", f"{IP_B}/24")
    c.api("PUT", f"/vnics/{MAC_B}", {"cn_uuid": "5b9bba4e-0000-4000-8000-000000000003"})
    t_move = time.monotonic()
    c.adm("cn2", "vnic", "rm", "overlay0", MAC_B)
    assert "vnb" not in c.links(tb)  # the veth pair went with its host end
    # the shootdown replaces cn1's fdb entry within the convergence bound
    wait_until(
        lambda: (cn_ip(3), MAC_B) in c.kernel("cn1", "fdb", VX), 5, "cn1's fdb to follow the move"
    )
    converged = time.monotonic() - t_move
    c.ping("tA", IP_B, timeout=10)
    print(f"cn1's kernel fdb followed the move after {converged:.2f}s")
    assert (IP_B, MAC_B) in c.kernel("cn1", "neigh", VX)

    # varpdadm cache writes the kernel fdb
    other = "02:00:00:4d:00:99"
    c.adm("cn1", "cache", "set", "overlay0", other, "10.77.0.9:4789")
    wait_until(lambda: ("10.77.0.9", other) in c.kernel("cn1", "fdb", VX), 5, "cache set")
    got = c.adm("cn1", "cache", "get", "overlay0", other, "--json")
    assert got["dest"] == "10.77.0.9:4789"
    c.adm("cn1", "cache", "set", "overlay0", other, "drop")
    wait_until(lambda: ("0.0.0.0", other) in c.kernel("cn1", "fdb", VX), 5, "drop entry")
    assert c.adm("cn1", "cache", "get", "overlay0", other, "--json")["flags"] == ["drop"]
    c.adm("cn1", "cache", "rm", "overlay0", other)
    wait_until(lambda: all(mac != other for _, mac in c.kernel("cn1", "fdb", VX)), 5, "cache rm")
    c.adm("cn1", "cache", "flush", "overlay0")
    wait_until(lambda: c.kernel("cn1", "fdb", VX) == [], 5, "cache flush")
    assert c.adm("cn1", "cache", "list", "overlay0", "--json") == []
    # traffic re-resolves after the flush
    c.ping("tA", IP_B, timeout=10)

    # deleting the VNIC in portolan removes cn1's entries for it (VL2 shootdown)
    c.api("DELETE", f"/vnics/{MAC_B}")
    wait_until(lambda: all(mac != MAC_B for _, mac in c.kernel("cn1", "fdb", VX)), 5, "fdb delete")


def test_restart_with_traffic_flowing_keeps_the_tenant_veth(kcluster: KernelCluster) -> None:
    from lab import netns

    c = kcluster
    two_nodes(c)
    c.ping("tA", IP_B, timeout=15)
    index_before = c.links(c.ns["tA"]).index("vna")
    host_ends = {n for n in c.links(c.ns["cn1"]) if n.startswith("pvh")}
    assert len(host_ends) == 1
    cn1 = ("ip", "-n", c.ns["cn1"], "link", "add")

    def restart() -> None:
        time.sleep(1.0)
        # leftovers a crashed varpd could leave: a host end no VNIC claims, a vxlan-named
        # link; and a link that is not varpd's at all
        netns.run(*cn1, "pvh0123456789ab", "type", "veth", "peer", "name", "orphan0")
        netns.run(*cn1, "pvx77", "type", "veth", "peer", "name", "pvb77")
        netns.run(*cn1, "keepme0", "type", "veth", "peer", "name", "keepme1")
        c.restart_varpd("cn1")

    # 8 MiB echoed in 64 KiB blocks, paced so the transfer spans the restart
    out = c.tcp("tB", "tA", IP_B, nbytes=8 << 20, pause=0.04, during=restart)
    assert out.startswith("ok"), out
    # the tenant kept its link, the host end was adopted, the entries were rebuilt
    assert c.links(c.ns["tA"]).index("vna") == index_before
    links = set(c.links(c.ns["cn1"]))
    assert host_ends <= links
    assert not {"pvh0123456789ab", "orphan0", "pvx77", "pvb77"} & links  # swept
    assert "keepme0" in links  # not varpd's: untouched
    c.ping("tA", IP_B, timeout=10)
    wait_until(lambda: (cn_ip(2), MAC_B) in c.kernel("cn1", "fdb", VX), 5, "fdb rebuilt")
    assert [v["mac"] for v in c.adm("cn1", "vnic", "list", "overlay0", "--json")] == [MAC_A]


def test_arp_hammer_for_an_unknown_ip_is_not_a_lookup_storm(kcluster: KernelCluster) -> None:
    c = kcluster
    two_nodes(c)
    c.ping("tA", IP_B, timeout=15)
    before = c.metric("cn1", "varpd_lookups_total", plugin="svp")
    seconds = 3.0
    proc = c.run_tenant("tA", "arp-hammer", "vna", "192.168.77.200", "100", str(seconds))
    assert proc.returncode == 0, proc.stderr
    sent = int(proc.stdout.split()[1])
    assert sent > 100
    lookups = c.metric("cn1", "varpd_lookups_total", plugin="svp") - before
    suppressed = c.metric("cn1", "varpd_overlay_upcalls_total", event="suppressed_negative")
    print(f"{sent} ARP requests -> {lookups:.0f} lookups, {suppressed:.0f} suppressed")
    # one lookup per second of negative memory, plus slack for timing
    assert lookups <= seconds + 3, lookups
    assert suppressed > 0


def test_vlan_and_failed_creation_leave_nothing_behind(kcluster: KernelCluster) -> None:
    c = kcluster
    two_nodes(c)
    before = set(c.links(c.ns["cn1"]))
    proc = c.adm(
        "cn1", "vnic", "add", "overlay0", "02:00:00:4d:01:00", "--vlan", "100", check=False
    )
    assert proc.returncode != 0
    assert "VLAN 100" in proc.stderr + proc.stdout
    # the tenant end's name is taken: the kernel refuses, the error names the step
    proc = c.adm("cn1", "vnic", "add", "overlay0", "02:00:00:4d:01:01", "--tap", "ul0", check=False)
    assert proc.returncode != 0
    text = proc.stderr + proc.stdout
    assert "add veth pair" in text and "exists" in text.lower(), text
    assert set(c.links(c.ns["cn1"])) == before
    assert {v["mac"] for v in c.adm("cn1", "vnic", "list", "overlay0", "--json")} == {MAC_A}


MAC_C, IP_C = "02:00:00:4d:00:0c", "192.168.77.12"


def test_mixed_overlay_linux_udp_and_plain_kernel_peer(kcluster: KernelCluster) -> None:
    """cn1 runs the linux backend, cn2 the udp backend (TAP), cn9 is a plain kernel vxlan
    with static entries: all three talk on one overlay."""
    from lab import netns

    c = kcluster
    c.build(2)
    peer = c.add_node(9)
    c.api("PUT", "/cns/5b9bba4e-0000-4000-8000-000000000009", {"ip": cn_ip(9), "port": 4789})
    net = c.network(VNET, "192.168.77.0/24")
    c.vnic(net, 1, MAC_A, IP_A)
    c.vnic(net, 2, MAC_B, IP_B)
    c.vnic(net, 9, MAC_C, IP_C)
    c.start_varpd("cn1", VNET, [(MAC_A, "vna")])
    c.start_varpd("cn2", VNET, [(MAC_B, "vnb")], backend="udp")
    # a veth underlay hands cn1's partial inner checksums on unfinished; the TAP node needs
    # them complete, which offload off on cn1's underlay veth does (see varpd.linux.devices)
    netns.txcsum_off(c.ns["cn1"], "ul0")
    c.tenants(*PLUGS)
    # the plain peer: its own static fdb and neighbour entries, no varpd
    ip = ("ip", "-n", peer)
    netns.run(*ip, "link", "add", "vx0", "address", MAC_C, "type", "vxlan", "id", str(VNET),
              "local", cn_ip(9), "dstport", "4789", "nolearning")  # fmt: skip
    netns.txcsum_off(peer, "vx0")  # its inner checksums must be complete for the TAP node
    netns.run(*ip, "addr", "add", f"{IP_C}/24", "dev", "vx0")
    netns.run(*ip, "link", "set", "vx0", "mtu", "1400", "up")
    for mac, addr, cn in ((MAC_A, IP_A, 1), (MAC_B, IP_B, 2)):
        netns.run(*ip, "neigh", "add", addr, "lladdr", mac, "dev", "vx0", "nud", "permanent")
        netns.run("bridge", "-n", peer, "fdb", "add", mac, "dev", "vx0", "dst", cn_ip(cn))
    c.ns["tC"] = peer

    c.ping("tA", IP_B, timeout=15)  # linux -> udp
    c.ping("tA", IP_C, timeout=10)  # linux -> plain kernel
    c.ping("tB", IP_A, timeout=10)  # udp -> linux
    c.ping("tC", IP_A, timeout=10)  # plain kernel -> linux
    c.ping("tB", IP_C, timeout=10)  # udp -> plain kernel
    assert (cn_ip(9), MAC_C) in c.kernel("cn1", "fdb", VX)
    assert (cn_ip(2), MAC_B) in c.kernel("cn1", "fdb", VX)
    out = c.tcp("tB", "tA", IP_B)  # linux <-> udp, checksums intact both ways
    assert out.startswith("ok"), out
    out = c.tcp("tA", "tC", IP_A)  # plain kernel <-> linux
    assert out.startswith("ok"), out


def test_ipv6_neighbour_discovery_through_the_kernel_proxy(kcluster: KernelCluster) -> None:
    c = kcluster
    c.build(2)
    vnet = VNET + 1
    vx = f"pvx{vnet:x}"
    net = c.network(vnet, "fd77::/64")
    a6, b6 = "fd77::a", "fd77::b"
    c.vnic(net, 1, MAC_A, a6)
    c.vnic(net, 2, MAC_B, b6)
    c.start_varpd("cn1", vnet, [(MAC_A, "vna")])
    c.start_varpd("cn2", vnet, [(MAC_B, "vnb")])
    c.tenants(("cn1", "vna", "tA", f"{a6}/64"), ("cn2", "vnb", "tB", f"{b6}/64"), ipv6=True)
    took = c.ping("tA", b6, timeout=15)
    print(f"first ping6 answered after {took:.2f}s")
    assert (b6, MAC_B) in c.kernel("cn1", "neigh", vx)
    assert (cn_ip(2), MAC_B) in c.kernel("cn1", "fdb", vx)
    # portolan's shootdown log may have filled the tables before the first NS; make the
    # next resolution a real miss: fresh kernel tables (restart) and a tenant that forgot B
    c.restart_varpd("cn1")
    from lab import netns

    netns.run("ip", "-n", c.ns["tA"], "-6", "neigh", "flush", "dev", "vna")
    assert (b6, MAC_B) not in c.kernel("cn1", "neigh", vx)
    c.ping("tA", b6, timeout=15)
    assert (b6, MAC_B) in c.kernel("cn1", "neigh", vx)
    assert c.metric("cn1", "varpd_lookups_total", plugin="svp", result="proxy_ndp") >= 1
    out = c.tcp("tB", "tA", b6)
    assert out.startswith("ok"), out


def test_files_plugin(kcluster: KernelCluster) -> None:
    """Both nodes search the same files config (VL2 answers and proxy ARP from the file)."""
    import json

    c = kcluster
    c.build(2)
    files = c.tmp / "files.json"
    mapping = {
        MAC_B: {"ip": cn_ip(2), "port": 4789, "arp": IP_B},
        MAC_A: {"ip": cn_ip(1), "port": 4789, "arp": IP_A},
    }
    files.write_text(json.dumps(mapping))
    for cn, mac, ifname in (("cn1", MAC_A, "vna"), ("cn2", MAC_B, "vnb")):
        props = {"files/config": str(files)}
        c.start_varpd(cn, VNET, [(mac, ifname)], search="files", extra_props=props)
    c.tenants(*PLUGS)
    c.ping("tA", IP_B, timeout=15)
    c.ping("tB", IP_A, timeout=10)
    assert (IP_B, MAC_B) in c.kernel("cn1", "neigh", VX)
    assert (cn_ip(2), MAC_B) in c.kernel("cn1", "fdb", VX)
    assert c.metric("cn1", "varpd_lookups_total", plugin="files", result="proxy_arp") >= 1


def test_direct_plugin(kcluster: KernelCluster) -> None:
    """Each node sends everything to the other: one default fdb entry, no miss flags, no
    proxy (ARP crosses the overlay as the shim sends it to the point)."""
    c = kcluster
    c.build(2)
    for cn, other, mac, ifname in (("cn1", 2, MAC_A, "vna"), ("cn2", 1, MAC_B, "vnb")):
        props = {"direct/dest_ip": cn_ip(other), "direct/dest_port": 4789}
        c.start_varpd(cn, VNET, [(mac, ifname)], search="direct", extra_props=props)
    c.tenants(*PLUGS)
    c.ping("tA", IP_B, timeout=15)
    c.ping("tB", IP_A, timeout=10)
    assert ("10.77.0.1", "00:00:00:00:00:00") in c.kernel("cn2", "fdb", VX)
    assert c.adm("cn2", "cache", "list", "overlay0", "--json") == [
        {"mac": "00:00:00:00:00:00", "flags": ["valid"], "dest": f"{cn_ip(1)}:4789"}
    ]
    assert c.kernel("cn1", "neigh", VX) == []  # nothing proxied, nothing looked up
    assert c.metric("cn1", "varpd_lookups_total") == 0


SPOOF_SENDER = """
import socket, struct, sys
vni, dst, src_mac, dst_mac, count = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
inner = bytes.fromhex(dst_mac.replace(":", "")) + bytes.fromhex(src_mac.replace(":", "")) + b"\\x08\\x00" + bytes(46)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(count):
    s.sendto(struct.pack("!II", 0x08000000, vni << 8) + inner, (dst, 4789))
"""


def test_spoofed_inner_source_is_dropped_by_nftables(kcluster: KernelCluster) -> None:
    import sys

    from lab import netns
    from varpd.firewall.kernel.nftables import NftDriver, NftError

    try:
        NftDriver()
    except NftError as exc:
        pytest.skip(f"the spoof defence needs nftables: {exc}")
    c = kcluster
    two_nodes(c)
    c.ping("tA", IP_B, timeout=15)
    assert (cn_ip(2), MAC_B) in c.kernel("cn1", "fdb", VX)
    before = c.metric("cn1", "varpd_overlay_upcalls_total", event="spoofed_dropped")

    def send(src_mac: str, count: int) -> None:
        argv = netns.nsexec(
            c.ns["ul"], sys.executable, "-c", SPOOF_SENDER, str(VNET), cn_ip(1), src_mac, MAC_A,
            str(count),
        )  # fmt: skip
        netns.run(*argv)

    # from the hub's address (10.77.0.254), claiming to be B (cached at cn2): dropped
    send(MAC_B, 20)
    wait_until(
        lambda: (
            c.metric("cn1", "varpd_overlay_upcalls_total", event="spoofed_dropped") >= before + 20
        ),
        10,
        "the spoof counter",
    )
    # an inner source nobody cached is not the spoof rule's business
    after = c.metric("cn1", "varpd_overlay_upcalls_total", event="spoofed_dropped")
    send("02:00:00:4d:00:55", 5)
    time.sleep(3)
    assert c.metric("cn1", "varpd_overlay_upcalls_total", event="spoofed_dropped") == after
    c.ping("tA", IP_B, timeout=10)  # B itself still gets through


def test_varpdadm_create_activate_delete_builds_and_removes_kernel_objects(
    kcluster: KernelCluster,
) -> None:
    c = kcluster
    two_nodes(c)
    vnet = 0x99
    c.adm(
        "cn1", "create", "overlay9", "--vnetid", str(vnet), "--search", "direct",
        "-p", f"vxlan/listen_ip={cn_ip(1)}", "-p", "vxlan/listen_port=4789",
        "-p", f"direct/dest_ip={cn_ip(2)}", "-p", "direct/dest_port=4789",
    )  # fmt: skip
    added = c.adm("cn1", "vnic", "add", "overlay9", "02:00:00:99:00:01", "--json")
    assert added["ifname"].startswith("pvt")
    c.adm("cn1", "activate", "overlay9")
    links = set(c.links(c.ns["cn1"]))
    assert {"pvx99", "pvb99", added["ifname"]} <= links
    assert (cn_ip(2), "00:00:00:00:00:00") in c.kernel("cn1", "fdb", "pvx99")
    assert "backend: linux" in c.adm("cn1", "show", "overlay9")
    c.adm("cn1", "vnic", "rm", "overlay9", "02:00:00:99:00:01")
    c.adm("cn1", "delete", "overlay9")
    links = set(c.links(c.ns["cn1"]))
    assert not {"pvx99", "pvb99", added["ifname"]} & links
    # the other device was not disturbed
    c.ping("tA", IP_B, timeout=10)
