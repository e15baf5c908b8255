"""Frames through the model: encap, decap, drop reasons, local switching, VLANs, point mode,
MTU, firewall hook, inject/resend. Outer datagrams are parsed with scapy's VXLAN layer."""

from __future__ import annotations

import struct

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import ARP, Dot1Q, Ether
from scapy.layers.vxlan import VXLAN
from scapy.packet import Raw
from trio.testing import wait_all_tasks_blocked

from protocol import vxlan
from tests.shim.shimnet import (
    A_IP,
    B_IP,
    DEV,
    MAC_A1,
    MAC_A2,
    MAC_A3,
    MAC_B1,
    VNET,
    A,
    B,
    C,
    frame,
    mac_text,
    outer,
    start_node,
)
from varpd.shim import (
    DstType,
    InvalidArgument,
    NotSupported,
    OverlayDriver,
    Point,
    TargetMode,
)

BCAST = b"\xff" * 6


def port(driver: OverlayDriver, mac: bytes):
    return driver.vnic(DEV, mac).port


async def test_encap_fields_and_decap(pair, captured, varpd_for):
    a, b = pair
    fake = varpd_for(a, {MAC_B1: B})
    data = frame(MAC_A1, MAC_B1, b"payload-1")
    await port(a, MAC_A1).send(data)
    await wait_all_tasks_blocked()

    [req] = fake.requests
    assert (req.device, req.varpd_id, req.vnet_id) == (DEV, 1, VNET)
    assert (req.hdr_size, req.pkt_size) == (14, len(data) - 14)
    assert (req.src_mac, req.dst_mac, req.dst_type) == (MAC_A1, MAC_B1, DstType.UNICAST)
    assert (req.sap, req.vlan, req.frame) == (0x0800, 0, data)

    [d] = captured
    pkt = outer(d)
    assert pkt[IP].src == A_IP and pkt[IP].dst == B_IP
    assert pkt[UDP].dport == 4789 and 49152 <= pkt[UDP].sport <= 65535
    assert pkt[UDP].sport == vxlan.source_port(vxlan.flow_hash(data))
    vx = pkt[VXLAN]
    assert vx.flags == 0x08 and vx.vni == VNET and vx.reserved1 == 0 and vx.reserved2 == 0
    assert bytes(vx[Ether]) == data
    assert port(b, MAC_B1).received() == [data]
    assert a.status(DEV).counters["tx_frames"] == 1
    assert b.status(DEV).counters["rx_frames"] == 1


async def test_source_port_stable_per_flow_and_differs_across_flows(pair, captured, varpd_for):
    a, _ = pair
    a.cache_set(DEV, MAC_B1, B)
    guest = port(a, MAC_A1)
    for _ in range(3):
        await guest.send(frame(MAC_A1, MAC_B1, b"x", sport=1111))
    for sport in range(2000, 2032):
        await guest.send(frame(MAC_A1, MAC_B1, b"x", sport=sport))
    sports = [outer(d)[UDP].sport for d in captured]
    assert len(set(sports[:3])) == 1
    assert len(set(sports[3:])) > 24
    assert all(49152 <= p <= 65535 for p in sports)


async def test_decap_drop_reasons_are_counted(pair, underlay):
    _, b = pair
    inner = frame(MAC_A1, MAC_B1)
    underlay.deliver(A, B, b"\x08\x00\x00")
    underlay.deliver(A, B, struct.pack(">II", 0, VNET << 8) + inner)
    underlay.deliver(A, B, vxlan.encode(VNET + 1, inner))
    underlay.deliver(A, B, vxlan.encode(VNET, inner[:10]))
    mux = b.metrics()["muxes"]["10.0.0.2:4789"]
    assert mux == {
        "rx_datagrams": 4,
        "rx_drop_short": 1,
        "rx_drop_no_i_bit": 1,
        "rx_drop_unknown_vni": 1,
    }
    assert b.status(DEV).counters["rx_drop_runt"] == 1
    assert port(b, MAC_B1).received() == []


async def test_decap_ignores_reserved_bits(pair, underlay):
    _, b = pair
    inner = frame(MAC_A1, MAC_B1)
    underlay.deliver(A, B, struct.pack(">II", 0xFFFFFFFF, (VNET << 8) | 0xAB) + inner)
    assert port(b, MAC_B1).received() == [inner]


async def test_spoofed_source_is_dropped(pair, underlay):
    _, b = pair
    b.cache_set(DEV, MAC_A1, A)  # B believes A1 lives at 10.0.0.1
    inner = frame(MAC_A1, MAC_B1)
    underlay.deliver(Point(C.ip, 50000), B, vxlan.encode(VNET, inner))
    assert b.status(DEV).counters["rx_drop_spoofed"] == 1
    assert port(b, MAC_B1).received() == []
    underlay.deliver(Point(A.ip, 61234), B, vxlan.encode(VNET, inner))  # any source port
    assert port(b, MAC_B1).received() == [inner]
    # A MAC with no VALID entry is not checked (nothing known to compare with).
    other = frame(bytes.fromhex("020000000c09"), MAC_B1)
    underlay.deliver(C, B, vxlan.encode(VNET, other))
    assert port(b, MAC_B1).received() == [other]


async def test_unicast_to_local_vnic_is_switched_locally(pair, captured):
    a, _ = pair
    a.add_vnic(DEV, MAC_A2)
    data = frame(MAC_A1, MAC_A2)
    await port(a, MAC_A1).send(data)
    assert port(a, MAC_A2).received() == [data]
    assert captured == [] and a.misses.waiting() == 0
    assert a.status(DEV).counters["local_frames"] == 1


async def test_broadcast_goes_to_local_vnics_and_the_overlay(pair, captured, varpd_for):
    a, b = pair
    a.add_vnic(DEV, MAC_A2)
    a.add_vnic(DEV, MAC_A3)
    fake = varpd_for(a, {BCAST: B})
    data = bytes(Ether(src=mac_text(MAC_A1), dst="ff:ff:ff:ff:ff:ff") / ARP(pdst="10.1.0.2"))
    await port(a, MAC_A1).send(data)
    await wait_all_tasks_blocked()
    assert port(a, MAC_A2).received() == [data]
    assert port(a, MAC_A3).received() == [data]
    assert port(a, MAC_A1).received() == []
    [req] = fake.requests
    assert req.dst_type == DstType.BROADCAST and req.sap == 0x0806
    assert len(captured) == 1
    assert port(b, MAC_B1).received() == [data]


async def test_multicast_lookup_class(pair, varpd_for):
    a, _ = pair
    fake = varpd_for(a, {})
    await port(a, MAC_A1).send(frame(MAC_A1, bytes.fromhex("01005e000001")))
    await wait_all_tasks_blocked()
    assert fake.requests[0].dst_type == DstType.MULTICAST


async def test_vlan_tag_added_on_overlay_and_stripped_on_delivery(nursery, underlay, captured):
    a = await start_node(nursery, underlay, A_IP)
    b = await start_node(nursery, underlay, B_IP)
    a.add_vnic(DEV, MAC_A1, vlan=5)
    b.add_vnic(DEV, MAC_B1, vlan=5)
    b_other = b.add_vnic(DEV, bytes.fromhex("020000000b02"), vlan=6)
    a.cache_set(DEV, MAC_B1, B)
    a.cache_set(DEV, BCAST, B)
    data = frame(MAC_A1, MAC_B1)
    await port(a, MAC_A1).send(data)
    inner = outer(captured[0])[VXLAN][Ether]
    assert inner[Dot1Q].vlan == 5 and inner[Dot1Q].prio == 0
    assert bytes(inner[IP]) == bytes(Ether(data)[IP])
    assert port(b, MAC_B1).received() == [data]
    bcast = frame(MAC_A1, BCAST)
    await port(a, MAC_A1).send(bcast)
    assert port(b, MAC_B1).received() == [bcast]
    assert b_other.port.received() == []


async def test_vnic_only_receives_its_vlan(pair, underlay):
    _, b = pair  # B1 is on VLAN 0
    tagged = bytes(Ether(src=mac_text(MAC_A1), dst=mac_text(MAC_B1)) / Dot1Q(vlan=9) / IP())
    underlay.deliver(A, B, vxlan.encode(VNET, tagged))
    assert port(b, MAC_B1).received() == []
    assert b.status(DEV).counters["rx_unclaimed"] == 1


async def test_lookup_request_of_tagged_frame(nursery, underlay):
    a = await start_node(nursery, underlay, A_IP)
    a.add_vnic(DEV, MAC_A1, vlan=300)
    await port(a, MAC_A1).send(frame(MAC_A1, MAC_B1))
    req = await a.next_lookup()
    assert (req.vlan, req.hdr_size, req.sap) == (300, 18, 0x0800)
    assert Ether(req.frame)[Dot1Q].vlan == 300


async def test_local_switching_respects_vlans(nursery, underlay, captured):
    a = await start_node(nursery, underlay, A_IP, mode=TargetMode.POINT, point=B)
    a.add_vnic(DEV, MAC_A1, vlan=5)
    a.add_vnic(DEV, MAC_A2, vlan=0)
    await port(a, MAC_A1).send(frame(MAC_A1, MAC_A2))
    assert port(a, MAC_A2).received() == []
    assert len(captured) == 1  # not local: different VLAN, goes to the overlay


async def test_point_mode_sends_everything_to_the_point(nursery, underlay, captured):
    a = await start_node(nursery, underlay, A_IP, mode=TargetMode.POINT, point=B)
    b = await start_node(nursery, underlay, B_IP)
    a.add_vnic(DEV, MAC_A1)
    b.add_vnic(DEV, MAC_B1)
    frames = [
        frame(MAC_A1, MAC_B1),
        frame(MAC_A1, BCAST),
        frame(MAC_A1, bytes.fromhex("333300000001")),
        frame(MAC_A1, bytes.fromhex("02000000ffff")),
    ]
    for data in frames:
        await port(a, MAC_A1).send(data)
    assert [outer(d)[IP].dst for d in captured] == [B_IP] * 4
    assert [bytes(outer(d)[VXLAN][Ether]) for d in captured] == frames
    assert a.misses.waiting() == 0 and a.counters["lookups"] == 0
    assert port(b, MAC_B1).received() == frames[:3]
    with pytest.raises(NotSupported):
        a.cache_set(DEV, MAC_B1, C)
    [entry] = a.cache_list(DEV)
    assert entry.mac == b"\x00" * 6 and entry.point == B
    assert a.cache_get(DEV, MAC_B1).point == B


async def test_mtu_enforced_on_tx(nursery, underlay, captured):
    a = await start_node(nursery, underlay, A_IP, mode=TargetMode.POINT, point=B)
    a.add_vnic(DEV, MAC_A1)
    a.add_vnic(DEV, MAC_A2, vlan=3)
    base = frame(MAC_A1, MAC_B1, b"")
    fits = base + b"\x00" * (1400 + 14 - len(base))
    await port(a, MAC_A1).send(fits)
    await port(a, MAC_A1).send(fits + b"\x00")
    await port(a, MAC_A2).send(fits)  # tagged on the overlay: 1418 bytes, allowed
    assert [len(outer(d)[VXLAN].payload) for d in captured] == [1414, 1418]
    assert a.status(DEV).counters["tx_drop_mtu"] == 1
    a.resend(DEV, fits + b"\x00")  # untagged 1415 > 1414
    assert a.status(DEV).counters["tx_drop_mtu"] == 2


class Refuse:
    def __init__(self, direction):
        self.direction = direction
        self.seen = []

    def check(self, data, direction):
        self.seen.append(direction)
        return direction != self.direction


async def test_filter_applies_to_locally_switched_frames(pair):
    from varpd.shim import Direction

    a, _ = pair
    a2 = a.add_vnic(DEV, MAC_A2)
    a2.filter = Refuse(Direction.IN)
    await port(a, MAC_A1).send(frame(MAC_A1, MAC_A2))
    assert a2.port.received() == []
    assert a2.counters["filter_drop_in"] == 1
    a1 = a.vnic(DEV, MAC_A1)
    a1.filter = Refuse(Direction.OUT)
    a2.filter = None
    await port(a, MAC_A1).send(frame(MAC_A1, MAC_A2))
    assert a2.port.received() == []
    assert a.status(DEV).counters["filter_drop_out"] == 1


async def test_filter_applies_to_received_frames_but_not_proxy_injects(pair, underlay):
    from varpd.shim import Direction

    _, b = pair
    b1 = b.vnic(DEV, MAC_B1)
    b1.filter = Refuse(Direction.IN)
    inner = frame(MAC_A1, MAC_B1)
    underlay.deliver(A, B, vxlan.encode(VNET, inner))
    assert b1.port.received() == []
    b.inject(DEV, inner)
    assert b1.port.received() == [inner]
    b.inject(DEV, inner, bypass_filter=False)
    assert b1.port.received() == []
    assert b1.counters["filter_drop_in"] == 2


async def test_inject_honours_vlan_and_size(pair):
    _, b = pair
    b5 = b.add_vnic(DEV, bytes.fromhex("020000000b05"), vlan=5)
    reply = bytes(Ether(src=mac_text(MAC_A1), dst=mac_text(b5.mac)) / Dot1Q(vlan=5) / ARP(op=2))
    b.inject(DEV, reply)
    [got] = b5.port.received()
    assert Dot1Q not in Ether(got) and Ether(got)[ARP].op == 2
    assert port(b, MAC_B1).received() == []
    with pytest.raises(InvalidArgument):
        b.inject(DEV, b"\x00" * 1519)
    with pytest.raises(InvalidArgument):
        b.inject(DEV, b"\x00" * 13)
    with pytest.raises(InvalidArgument):
        b.resend(DEV, b"\x00" * 1519)


async def test_resend_goes_through_the_target_cache(pair, captured):
    a, b = pair
    data = frame(MAC_A1, MAC_B1)
    a.resend(DEV, data)
    req = await a.next_lookup()
    assert req.frame == data
    a.respond(req.req_id, B)
    assert port(b, MAC_B1).received() == [data]
    assert a.status(DEV).counters["resent"] == 1


async def test_backend_refusal_is_counted(pair, underlay):
    a, _ = pair
    a.cache_set(DEV, MAC_B1, B)
    underlay.refuse = lambda d: True
    await port(a, MAC_A1).send(frame(MAC_A1, MAC_B1))
    assert a.status(DEV).counters["tx_drop_backend"] == 1
    assert a.status(DEV).counters["tx_frames"] == 0


async def test_frames_before_activation_are_dropped(underlay):
    driver = OverlayDriver(underlay)
    driver.create_device(DEV, VNET)
    vnic = driver.add_vnic(DEV, MAC_A1)
    await vnic.port.send(frame(MAC_A1, MAC_B1))
    await vnic.port.send(b"\x00" * 10)
    counters = driver.status(DEV).counters
    assert counters["tx_drop_inactive"] == 1 and counters["tx_drop_runt"] == 1


async def test_removed_vnic_no_longer_sends_or_receives(pair, underlay):
    a, b = pair
    p = port(b, MAC_B1)
    b.remove_vnic(DEV, MAC_B1)
    underlay.deliver(A, B, vxlan.encode(VNET, frame(MAC_A1, MAC_B1)))
    assert p.received() == []
    with pytest.raises(RuntimeError):
        await p.send(frame(MAC_B1, MAC_A1))


async def test_vnic_validation(pair):
    from varpd.shim import AlreadyExists, NoSuchEntry

    a, _ = pair
    with pytest.raises(AlreadyExists):
        a.add_vnic(DEV, MAC_A1)
    with pytest.raises(InvalidArgument):
        a.add_vnic(DEV, BCAST)
    with pytest.raises(InvalidArgument):
        a.add_vnic(DEV, MAC_A2, vlan=4095)
    with pytest.raises(NoSuchEntry):
        a.remove_vnic(DEV, MAC_A2)


async def test_guest_receive_waits_for_a_frame(pair, nursery):
    a, b = pair
    a.cache_set(DEV, MAC_B1, B)
    got = []

    async def guest():
        got.append(await port(b, MAC_B1).receive())

    nursery.start_soon(guest)
    await wait_all_tasks_blocked()
    assert got == []
    data = frame(MAC_A1, MAC_B1, Raw(b"z").load)
    await port(a, MAC_A1).send(data)
    await wait_all_tasks_blocked()
    assert got == [data]


async def test_guest_cannot_send_tagged_frames(pair, captured):
    a, _ = pair
    a.add_vnic(DEV, MAC_A2, vlan=5)
    a.cache_set(DEV, MAC_B1, B)
    hop = bytes(Ether(src=mac_text(MAC_A1), dst=mac_text(MAC_A2)) / Dot1Q(vlan=5) / IP())
    await port(a, MAC_A1).send(hop)
    await port(a, MAC_A1).send(eth_tagged_to(MAC_B1))
    assert port(a, MAC_A2).received() == [] and captured == []
    assert a.status(DEV).counters["tx_drop_tagged"] == 2


def eth_tagged_to(dst: bytes) -> bytes:
    return bytes(Ether(src=mac_text(MAC_A1), dst=mac_text(dst)) / Dot1Q(vlan=5) / IP())
