"""A VNIC never hears its own announcement.

After a VNIC's IP changes, the VL3 shootdown makes varpd inject an unsolicited NA (IPv6) or a
gratuitous ARP (IPv4) saying "IP is at MAC" towards the local guests. It used to reach the
owner's VNIC too, with the VNIC's own MAC as source: a guest still doing DAD on the new address
then marks it ``dadfailed``. Other local guests must still get it.
"""

from __future__ import annotations

from ipaddress import IPv6Address
from typing import Any

import trio
from scapy.layers.inet6 import ICMPv6ND_NA
from scapy.layers.l2 import ARP, Ether

from protocol.addr import format_mac, ip_to_wire
from protocol.ethernet import build_garp, build_unsolicited_na
from protocol.svp import LogVL3Entry
from tests.varpd.svp_script_server import ScriptServer
from varpd.shim import MemoryUnderlay, OverlayDriver

VNET = 4242
DEV = "ovl0"
MAC_OWNER = bytes.fromhex("020000000a01")
MAC_OTHER = bytes.fromhex("020000000a02")
MAC_VLAN5 = bytes.fromhex("020000000a05")
IP6 = IPv6Address("fd00::5")


def driver_with_vnics() -> OverlayDriver:
    driver = OverlayDriver(MemoryUnderlay())
    driver.create_device(DEV, VNET)
    driver.add_vnic(DEV, MAC_OWNER)
    driver.add_vnic(DEV, MAC_OTHER)
    driver.add_vnic(DEV, MAC_VLAN5, vlan=5)
    return driver


def received(driver: OverlayDriver, mac: bytes) -> list[bytes]:
    return driver.vnic(DEV, mac).port.received()


def test_an_injected_na_skips_the_vnic_it_announces() -> None:
    driver = driver_with_vnics()
    na = build_unsolicited_na(MAC_OWNER, ip_to_wire(IP6))
    driver.inject(DEV, na)
    assert received(driver, MAC_OWNER) == []
    [got] = received(driver, MAC_OTHER)
    assert Ether(got)[ICMPv6ND_NA].tgt == str(IP6)
    assert received(driver, MAC_VLAN5) == []  # another VLAN


def test_an_injected_garp_skips_its_source_vnic_but_not_the_others() -> None:
    driver = driver_with_vnics()
    driver.inject(DEV, build_garp(MAC_OWNER, bytes([10, 0, 0, 5])))
    assert received(driver, MAC_OWNER) == []
    [got] = received(driver, MAC_OTHER)
    assert Ether(got)[ARP].hwsrc == format_mac(MAC_OWNER)
    # an announcement of a remote MAC reaches every local VNIC of the VLAN
    driver.inject(DEV, build_garp(bytes.fromhex("020000000b01"), bytes([10, 0, 0, 9])))
    assert len(received(driver, MAC_OWNER)) == 1 and len(received(driver, MAC_OTHER)) == 1


async def test_vl3_shootdown_na_does_not_reach_the_moved_vnic(
    make_varpd: Any, nursery: trio.Nursery, until: Any
) -> None:
    server = ScriptServer()
    server.vl3[(ip_to_wire(IP6), VNET)] = (MAC_OWNER, 4789, ip_to_wire("10.0.0.1"))
    server.log = [LogVL3Entry((1).to_bytes(16, "big"), ip_to_wire(IP6), 0, VNET)]
    await server.start(nursery)
    props = {
        "vxlan/listen_ip": "10.0.0.1",
        "svp/host": "127.0.0.1",
        "svp/port": server.port,
        "svp/underlay_ip": "10.0.0.1",
    }
    async with make_varpd("own") as v:
        vnics = [{"mac": format_mac(MAC_OWNER)}, {"mac": format_mac(MAC_OTHER)}]
        await v.create(DEV, VNET, "svp", props=props, vnics=vnics)
        await v.activate(DEV)
        other = v.vnic(DEV, MAC_OTHER).port
        await until(lambda: not server.log and other.pending())
        [got] = other.received()
        assert Ether(got)[ICMPv6ND_NA].tgt == str(IP6)
        assert v.vnic(DEV, MAC_OWNER).port.received() == []
