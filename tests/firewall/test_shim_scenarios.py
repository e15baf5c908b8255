"""The firewall in the data path: VnicFirewalls installed as ``Vnic.filter`` on shim VNICs of
two OverlayDrivers sharing a MemoryUnderlay, with a stand-in varpd answering lookups."""

from __future__ import annotations

from typing import Any

import trio
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import ARP, Ether
from trio.testing import wait_all_tasks_blocked

from protocol.fwpolicy import from_json
from tests.firewall.fwnet import Clock, rule
from varpd.firewall import FirewallTable, VnicFirewall
from varpd.shim import MemoryUnderlay, OverlayDriver, Point, TargetMode

VNET = 4242
DEV = "overlay0"
MAC_A1 = bytes.fromhex("02000000a001")
MAC_A2 = bytes.fromhex("02000000a002")
MAC_B1 = bytes.fromhex("02000000b001")
IP_A1, IP_A2, IP_B1 = "192.168.0.1", "192.168.0.3", "192.168.0.2"
UL_A, UL_B = Point.of("10.0.0.1", 4789), Point.of("10.0.0.2", 4789)


def mac_text(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def tcp(
    src_mac: bytes, src: str, dst_mac: bytes, dst: str, sport: int, dport: int, flags: str = "S"
) -> bytes:
    return bytes(
        Ether(src=mac_text(src_mac), dst=mac_text(dst_mac))
        / IP(src=src, dst=dst)
        / TCP(sport=sport, dport=dport, flags=flags)
    )


async def lookup_answerer(driver: OverlayDriver, answers: dict[bytes, Point]) -> None:
    """A stand-in varpd: answers the shim's misses from a table, drops unknown MACs."""
    while True:
        req = await driver.next_lookup()
        point = answers.get(req.dst_mac)
        if point is None:
            driver.drop(req.req_id)
        else:
            driver.respond(req.req_id, point)


async def node(
    nursery: trio.Nursery, underlay: MemoryUnderlay, listen: Point, answers: dict[bytes, Point]
) -> OverlayDriver:
    driver = OverlayDriver(underlay)
    await nursery.start(driver.run)
    driver.create_device(DEV, VNET)
    driver.set_prop(DEV, "vxlan/listen_ip", str(listen.address))
    driver.associate(DEV, 1, TargetMode.DYNAMIC)
    await driver.activate(DEV)
    nursery.start_soon(lookup_answerer, driver, answers)
    return driver


async def two_nodes(nursery: trio.Nursery) -> tuple[OverlayDriver, OverlayDriver]:
    underlay = MemoryUnderlay()
    a = await node(nursery, underlay, UL_A, {MAC_B1: UL_B})
    b = await node(nursery, underlay, UL_B, {MAC_A1: UL_A, MAC_A2: UL_A})
    a.add_vnic(DEV, MAC_A1)
    a.add_vnic(DEV, MAC_A2)
    b.add_vnic(DEV, MAC_B1)
    return a, b


async def send(driver: OverlayDriver, mac: bytes, frame: bytes) -> None:
    await driver.vnic(DEV, mac).port.send(frame)
    await wait_all_tasks_blocked()


def inbox(driver: OverlayDriver, mac: bytes) -> list[bytes]:
    return driver.vnic(DEV, mac).port.received()


async def test_inbound_rule_and_replies_across_the_overlay(nursery):
    a, b = await two_nodes(nursery)
    b1 = b.vnic(DEV, MAC_B1)
    b1.filter = VnicFirewall(
        MAC_B1, [IP_B1], [rule("in", "allow", "tcp", ports=[22], peers=[f"{IP_A1}/32"])]
    )
    a1 = a.vnic(DEV, MAC_A1)
    a1.filter = VnicFirewall(MAC_A1, [IP_A1], [])

    ssh = tcp(MAC_A1, IP_A1, MAC_B1, IP_B1, 40000, 22)
    await send(a, MAC_A1, ssh)
    assert inbox(b, MAC_B1) == [ssh]
    telnet = tcp(MAC_A1, IP_A1, MAC_B1, IP_B1, 40001, 23)
    await send(a, MAC_A1, telnet)
    assert inbox(b, MAC_B1) == []
    assert b1.counters["filter_drop_in"] == 1

    # B1's SYN/ACK crosses A1's firewall on A1's own outbound state
    synack = tcp(MAC_B1, IP_B1, MAC_A1, IP_A1, 22, 40000, "SA")
    await send(b, MAC_B1, synack)
    assert inbox(a, MAC_A1) == [synack]
    # ... but an unsolicited SYN from B1 to A1 is stopped at A1
    await send(b, MAC_B1, tcp(MAC_B1, IP_B1, MAC_A1, IP_A1, 5000, 22))
    assert inbox(a, MAC_A1) == []
    assert a1.counters["filter_drop_in"] == 1


async def test_outbound_block_stops_frames_before_the_overlay(nursery):
    a, b = await two_nodes(nursery)
    a1 = a.vnic(DEV, MAC_A1)
    a1.filter = VnicFirewall(MAC_A1, [IP_A1], [rule("out", "block", "udp", ports=[161])])
    snmp = bytes(
        Ether(src=mac_text(MAC_A1), dst=mac_text(MAC_B1))
        / IP(src=IP_A1, dst=IP_B1)
        / UDP(sport=1, dport=161)
    )
    dns = bytes(
        Ether(src=mac_text(MAC_A1), dst=mac_text(MAC_B1))
        / IP(src=IP_A1, dst=IP_B1)
        / UDP(sport=1, dport=53)
    )
    await send(a, MAC_A1, snmp)
    await send(a, MAC_A1, dns)
    assert inbox(b, MAC_B1) == [dns]
    assert a1.counters["filter_drop_out"] == 1
    assert a.status(DEV).counters["lookups"] == 1  # the blocked frame never reached the cache


async def test_locally_switched_pair_is_filtered_both_ways(nursery):
    a, _ = await two_nodes(nursery)
    a2 = a.vnic(DEV, MAC_A2)
    a2.filter = VnicFirewall(MAC_A2, [IP_A2], [rule("in", "allow", "tcp", ports=[80])])
    http = tcp(MAC_A1, IP_A1, MAC_A2, IP_A2, 1234, 80)
    other = tcp(MAC_A1, IP_A1, MAC_A2, IP_A2, 1234, 81)
    await send(a, MAC_A1, http)
    await send(a, MAC_A1, other)
    assert inbox(a, MAC_A2) == [http]
    # the reply from A2 goes out through A2's state; unsolicited traffic from A2 is fine too
    # (outbound default), but A1 with its own firewall only takes the reply
    a1 = a.vnic(DEV, MAC_A1)
    a1.filter = VnicFirewall(MAC_A1, [IP_A1], [])
    reply = tcp(MAC_A2, IP_A2, MAC_A1, IP_A1, 80, 1234, "SA")
    await send(a, MAC_A2, reply)
    assert inbox(a, MAC_A1) == []  # A1's table was created after its SYN left: no state
    await send(a, MAC_A1, http)  # A1 sends again: now tracked at A1
    await send(a, MAC_A2, reply)
    assert inbox(a, MAC_A1) == [reply]
    assert a.status(DEV).counters["filter_drop_in"] >= 2


async def test_broadcast_arp_is_never_filtered_and_table_binding_follows_policy(nursery):
    a, b = await two_nodes(nursery)
    table = FirewallTable(clock=Clock())
    for driver in (a, b):
        for vnic in driver.vnics(DEV):
            table.bind(vnic)
    doc: dict[str, Any] = {
        "version": 1,
        "cn_uuid": "cn",
        "generation": 1,
        "vnics": {
            mac_text(MAC_A2): {"ips": [IP_A2], "vnet_id": VNET, "rules": []},
        },
    }
    table.apply(from_json(doc))
    assert a.vnic(DEV, MAC_A2).filter is table.get(MAC_A2)
    assert a.vnic(DEV, MAC_A1).filter is None
    who_has = bytes(
        Ether(src=mac_text(MAC_A1), dst="ff:ff:ff:ff:ff:ff") / ARP(psrc=IP_A1, pdst=IP_A2)
    )
    await send(a, MAC_A1, who_has)
    assert inbox(a, MAC_A2) == [who_has]
    ssh = tcp(MAC_A1, IP_A1, MAC_A2, IP_A2, 999, 22)
    await send(a, MAC_A1, ssh)
    assert inbox(a, MAC_A2) == []
    doc["generation"] = 2
    doc["vnics"][mac_text(MAC_A2)]["rules"] = [rule("in", "allow", "tcp", ports=[22]).to_json()]
    table.apply(from_json(doc))
    await send(a, MAC_A1, ssh)
    assert inbox(a, MAC_A2) == [ssh]
    doc["generation"] = 3
    doc["vnics"] = {}
    table.apply(from_json(doc))
    assert a.vnic(DEV, MAC_A2).filter is None
