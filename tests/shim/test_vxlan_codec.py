"""protocol.vxlan: byte-exact header, permissive decode, flow hash and source port."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Dot1Q, Ether
from scapy.layers.vxlan import VXLAN
from scapy.packet import Raw

from protocol import vxlan

INNER = bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / IP() / UDP() / b"x")


def test_encode_writes_exact_words():
    data = vxlan.encode(0xABCDEF, INNER)
    assert data[:8] == bytes.fromhex("08000000abcdef00")
    assert data[8:] == INNER


def test_encode_is_parsed_by_scapy_vxlan():
    pkt = VXLAN(vxlan.encode(4660, INNER))
    assert pkt.flags == 0x08 and pkt.flags.Instance
    assert pkt.vni == 4660
    assert pkt.reserved1 == 0 and pkt.reserved2 == 0
    assert bytes(pkt[Ether]) == INNER


def test_decode_of_scapy_frame():
    assert vxlan.decode(bytes(VXLAN(vni=77) / Raw(INNER))) == (77, INNER)


@pytest.mark.parametrize("vni", [-1, 1 << 24])
def test_encode_refuses_vni_out_of_range(vni):
    with pytest.raises(ValueError):
        vxlan.encode(vni, INNER)


@pytest.mark.parametrize("size", [0, 1, 7])
def test_decode_short(size):
    with pytest.raises(vxlan.VxlanError) as info:
        vxlan.decode(b"\x08" * size)
    assert info.value.reason == "short"


def test_decode_without_i_bit():
    with pytest.raises(vxlan.VxlanError) as info:
        vxlan.decode(struct.pack(">II", 0xF7FFFFFF, 5 << 8) + INNER)
    assert info.value.reason == "no_i_bit"


def test_decode_ignores_reserved_bits():
    data = struct.pack(">II", 0xFFFFFFFF, (99 << 8) | 0xFF) + INNER
    assert vxlan.decode(data) == (99, INNER)


def test_decode_header_only_gives_empty_inner():
    assert vxlan.decode(vxlan.encode_header(3)) == (3, b"")


@given(st.integers(0, vxlan.VNI_MAX), st.binary(max_size=64))
def test_roundtrip(vni, inner):
    assert vxlan.decode(vxlan.encode(vni, inner)) == (vni, inner)


def _udp(sport, dport, src="192.168.0.1", dst="192.168.0.2"):
    return bytes(
        Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
        / IP(src=src, dst=dst)
        / UDP(sport=sport, dport=dport)
        / Raw(b"payload")
    )


def test_flow_hash_stable_per_flow_ignoring_payload():
    a = _udp(1000, 2000)
    b = bytes(
        Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
        / IP(src="192.168.0.1", dst="192.168.0.2", id=999, ttl=3)
        / UDP(sport=1000, dport=2000)
        / Raw(b"other payload entirely")
    )
    assert vxlan.flow_hash(a) == vxlan.flow_hash(b)
    # CRC-32 based: the same in every process (no salted hash()).
    assert vxlan.flow_hash(a) == vxlan.flow_hash(bytes(a))


def test_flow_hash_differs_across_flows():
    hashes = {vxlan.flow_hash(_udp(1000 + i, 2000)) for i in range(64)}
    hashes |= {vxlan.flow_hash(_udp(1000, 2000, src=f"192.168.1.{i}")) for i in range(64)}
    assert len(hashes) == 128
    ports = {vxlan.source_port(h) for h in hashes}
    assert len(ports) > 100


def test_flow_hash_covers_ipv6_tcp_and_vlan():
    def v6(sport, vlan=None):
        eth = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
        if vlan is not None:
            eth = eth / Dot1Q(vlan=vlan)
        return bytes(eth / IPv6(src="fd00::1", dst="fd00::2") / TCP(sport=sport, dport=80))

    assert vxlan.flow_hash(v6(1)) != vxlan.flow_hash(v6(2))
    assert vxlan.flow_hash(v6(1)) != vxlan.flow_hash(v6(1, vlan=5))
    assert vxlan.flow_hash(v6(1, vlan=5)) == vxlan.flow_hash(v6(1, vlan=5))


def test_flow_hash_of_odd_frames_does_not_raise():
    for data in (b"", b"\x00" * 13, b"\x00" * 12 + b"\x08\x00", b"\x00" * 12 + b"\x81\x00\x00"):
        assert isinstance(vxlan.flow_hash(data), int)


@given(st.integers(0, 2**32 - 1))
def test_source_port_in_ephemeral_range(h):
    assert 49152 <= vxlan.source_port(h) <= 65535
