"""The firewall's frame parser against scapy-built frames."""

from __future__ import annotations

from ipaddress import ip_address

from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6
from scapy.layers.l2 import ARP, Dot1Q, Ether
from scapy.packet import Raw

from varpd.firewall.packet import (
    FRAG_FIRST,
    FRAG_LATER,
    FRAG_NONE,
    MALFORMED,
    NOT_IP,
    Packet,
    parse_frame,
)


def parsed(pkt) -> Packet:
    p = parse_frame(bytes(Ether() / pkt))
    assert isinstance(p, Packet)
    return p


def addr(b: bytes) -> str:
    return str(ip_address(b))


def test_ipv4_tcp_fields():
    p = parsed(IP(src="10.0.0.1", dst="10.0.0.2", ttl=9) / TCP(sport=1234, dport=80, flags="SA"))
    assert (p.family, p.proto, addr(p.src), addr(p.dst)) == (4, 6, "10.0.0.1", "10.0.0.2")
    assert (p.sport, p.dport, p.flags, p.hop_limit, p.frag) == (1234, 80, 0x12, 9, FRAG_NONE)


def test_ipv4_options_are_skipped():
    p = parsed(
        IP(src="10.0.0.1", dst="10.0.0.2", options=b"\x01\x01\x01\x00") / UDP(sport=5, dport=6)
    )
    assert (p.proto, p.sport, p.dport) == (17, 5, 6)


def test_ipv6_udp_and_icmpv6_echo():
    p = parsed(IPv6(src="fd00::1", dst="fd00::2", hlim=255) / UDP(sport=546, dport=547))
    assert (p.family, p.proto, addr(p.src), p.sport, p.dport, p.hop_limit) == (
        6,
        17,
        "fd00::1",
        546,
        547,
        255,
    )
    e = parsed(IPv6(src="fd00::1", dst="fd00::2") / ICMPv6EchoRequest(id=99))
    assert (e.proto, e.icmp_type, e.icmp_code, e.ident) == (58, 128, 0, 99)


def test_icmp_echo_and_error_quote():
    e = parsed(IP(src="1.1.1.1", dst="2.2.2.2") / ICMP(type=8, id=321))
    assert (e.icmp_type, e.icmp_code, e.ident, e.inner) == (8, 0, 321, None)
    quoted = bytes(IP(src="2.2.2.2", dst="3.3.3.3") / TCP(sport=10, dport=20))[:28]
    err = parsed(IP(src="9.9.9.9", dst="2.2.2.2") / ICMP(type=3, code=4) / Raw(quoted))
    assert err.inner == (6, bytes([2, 2, 2, 2]), bytes([3, 3, 3, 3]), 10, 20)
    bad = parsed(IP(src="9.9.9.9", dst="2.2.2.2") / ICMP(type=11) / Raw(b"\x45" + b"\x00" * 5))
    assert bad.inner is None and bad.icmp_type == 11


def test_fragments_are_classified():
    first = parsed(IP(src="1.1.1.1", dst="2.2.2.2", id=7, flags="MF") / UDP(sport=1, dport=2))
    assert (first.frag, first.ip_id, first.dport) == (FRAG_FIRST, 7, 2)
    later = parsed(IP(src="1.1.1.1", dst="2.2.2.2", id=7, frag=185, proto=17) / Raw(b"x" * 8))
    assert (later.frag, later.ip_id, later.dport) == (FRAG_LATER, 7, 0)


def test_vlan_tag_is_skipped_and_non_ip_is_reported():
    p = parse_frame(
        bytes(Ether() / Dot1Q(vlan=3) / IP(src="1.1.1.1", dst="2.2.2.2") / UDP(dport=53))
    )
    assert isinstance(p, Packet) and p.dport == 53
    assert parse_frame(bytes(Ether() / ARP())) == NOT_IP
    assert parse_frame(bytes(Ether() / Dot1Q(vlan=3) / ARP())) == NOT_IP


def test_ethernet_padding_is_not_payload():
    # a 60-byte minimum frame: the IPv4 total length says where the packet ends
    frame = bytes(Ether() / IP(src="1.1.1.1", dst="2.2.2.2", proto=6) / Raw(b"\x00" * 4))
    padded = frame + b"\x00" * (60 - len(frame))
    assert parse_frame(padded) == MALFORMED  # 4 bytes of "TCP" + padding is not a TCP header


def test_truncations_are_malformed():
    full = bytes(Ether() / IPv6(src="fd00::1", dst="fd00::2") / TCP())
    assert parse_frame(full[:13]) == MALFORMED
    assert parse_frame(full[: 14 + 39]) == MALFORMED
    assert parse_frame(full[:-1]) == MALFORMED
    assert isinstance(parse_frame(full), Packet)
