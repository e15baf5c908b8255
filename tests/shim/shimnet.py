"""Helpers for the shim's packet-level tests: addresses, frames, nodes, a fake varpd."""

from __future__ import annotations

import trio
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Packet, Raw

from varpd.shim import (
    Datagram,
    LookupRequest,
    MemoryUnderlay,
    OverlayDriver,
    Point,
    TargetMode,
)

VNET = 0x123456
DEV = "overlay0"
A_IP = "10.0.0.1"
B_IP = "10.0.0.2"
C_IP = "10.0.0.3"
MAC_A1 = bytes.fromhex("020000000a01")
MAC_A2 = bytes.fromhex("020000000a02")
MAC_A3 = bytes.fromhex("020000000a03")
MAC_B1 = bytes.fromhex("020000000b01")
MAC_C1 = bytes.fromhex("020000000c01")
A = Point.of(A_IP, 4789)
B = Point.of(B_IP, 4789)
C = Point.of(C_IP, 4789)


def mac_text(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def outer(d: Datagram) -> Packet:
    """The datagram as scapy sees it on the wire: IP/UDP/VXLAN/Ether..."""
    wire = IP(src=str(d.src.address), dst=str(d.dst.address)) / UDP(
        sport=d.src.port, dport=d.dst.port
    )
    return IP(bytes(wire / Raw(d.payload)))


def frame(src: bytes, dst: bytes, payload: bytes = b"hello", **udp: int) -> bytes:
    """An untagged IPv4/UDP guest frame."""
    return bytes(
        Ether(src=mac_text(src), dst=mac_text(dst))
        / IP(src="192.168.0.1", dst="192.168.0.2")
        / UDP(sport=udp.get("sport", 1000), dport=udp.get("dport", 2000))
        / Raw(payload)
    )


async def start_node(
    nursery: trio.Nursery,
    underlay: MemoryUnderlay,
    ip: str,
    *,
    mode: TargetMode = TargetMode.DYNAMIC,
    point: Point | None = None,
    vnet: int = VNET,
    name: str = DEV,
    **driver_kw: int,
) -> OverlayDriver:
    driver = OverlayDriver(underlay, **driver_kw)
    await nursery.start(driver.run)
    driver.create_device(name, vnet)
    driver.set_prop(name, "vxlan/listen_ip", ip)
    driver.associate(name, 1, mode, point)
    await driver.activate(name)
    return driver


class FakeVarpd:
    """Answers lookups from a table (dst MAC -> Point; missing = DROP)."""

    def __init__(self, driver: OverlayDriver, answers: dict[bytes, Point]) -> None:
        self.driver = driver
        self.answers = answers
        self.requests: list[LookupRequest] = []

    async def run(self) -> None:
        while True:
            req = await self.driver.next_lookup()
            self.requests.append(req)
            point = self.answers.get(req.dst_mac)
            if point is None:
                self.driver.drop(req.req_id)
            else:
                self.driver.respond(req.req_id, point)
