"""protocol.ethernet: L2 parse, 802.1Q tag, ARP / NDP / DHCP helpers checked with scapy."""

from __future__ import annotations

import pytest
from scapy.layers.dhcp import BOOTP, DHCP
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import (
    ICMPv6ND_NA,
    ICMPv6ND_NS,
    ICMPv6NDOptDstLLAddr,
    ICMPv6NDOptSrcLLAddr,
    IPv6,
)
from scapy.layers.l2 import ARP, Dot1Q, Ether
from scapy.packet import Raw

from protocol import ethernet as eth

SRC = "02:00:00:00:00:01"
ANSWER = bytes.fromhex("02000000aaaa")
ANSWER_TEXT = "02:00:00:00:aa:aa"


def arp_request(vlan=None, psrc="10.1.0.1", pdst="10.1.0.2", **arp):
    pkt = Ether(src=SRC, dst="ff:ff:ff:ff:ff:ff")
    if vlan is not None:
        pkt = pkt / Dot1Q(vlan=vlan, prio=3)
    return bytes(pkt / ARP(op=1, hwsrc=SRC, psrc=psrc, pdst=pdst, **arp))


def ns_frame(vlan=None, target="fd00::2", dst_ip=None, slla=True, src_ip="fd00::1", **icmp):
    dst_ip = dst_ip or "ff02::1:ff00:2"
    pkt = Ether(src=SRC, dst="33:33:ff:00:00:02")
    if vlan is not None:
        pkt = pkt / Dot1Q(vlan=vlan)
    pkt = pkt / IPv6(src=src_ip, dst=dst_ip, hlim=255) / ICMPv6ND_NS(tgt=target, **icmp)
    if slla:
        pkt = pkt / ICMPv6NDOptSrcLLAddr(lladdr=SRC)
    return bytes(pkt)


def dhcp_discover(pad=True, sport=68, dport=67, dst="ff:ff:ff:ff:ff:ff", vlan=None):
    pkt = Ether(src=SRC, dst=dst)
    if vlan is not None:
        pkt = pkt / Dot1Q(vlan=vlan)
    pkt = (
        pkt
        / IP(src="0.0.0.0", dst="255.255.255.255")
        / UDP(sport=sport, dport=dport)
        / BOOTP(chaddr=bytes.fromhex("020000000001"))
        / DHCP(options=[("message-type", "discover"), "end"])
    )
    data = bytes(pkt)
    return data + b"\x00" * 64 if pad else data  # real clients pad BOOTP to 300 bytes


# --------------------------------------------------------------------------- L2


def test_parse_l2_untagged():
    l2 = eth.parse_l2(arp_request())
    assert (l2.dst, l2.src) == (b"\xff" * 6, bytes.fromhex("020000000001"))
    assert (l2.vlan, l2.tagged, l2.sap, l2.hdr_size) == (0, False, eth.ETH_P_ARP, 14)
    assert l2.dst_type == eth.DST_BROADCAST


def test_parse_l2_tagged():
    l2 = eth.parse_l2(arp_request(vlan=42))
    assert (l2.vlan, l2.pcp, l2.tagged, l2.sap, l2.hdr_size) == (42, 3, True, eth.ETH_P_ARP, 18)


def test_parse_l2_short_frames():
    with pytest.raises(eth.FrameError) as info:
        eth.parse_l2(b"\x00" * 13)
    assert info.value.reason == "short"
    with pytest.raises(eth.FrameError):
        eth.parse_l2(b"\x00" * 12 + b"\x81\x00\x00")


def test_dst_type_classes():
    assert eth.dst_type(bytes.fromhex("020000000001")) == eth.DST_UNICAST
    assert eth.dst_type(bytes.fromhex("333300000001")) == eth.DST_MULTICAST
    assert eth.dst_type(b"\xff" * 6) == eth.DST_BROADCAST


def test_add_and_strip_vlan_tag_match_scapy():
    plain = bytes(Ether(src=SRC, dst="02:00:00:00:00:02") / IP() / UDP() / Raw(b"abc"))
    tagged = eth.add_vlan_tag(plain, 100, pcp=5)
    pkt = Ether(tagged)
    assert pkt[Dot1Q].vlan == 100 and pkt[Dot1Q].prio == 5 and pkt[Dot1Q].type == 0x0800
    assert bytes(pkt[IP]) == bytes(Ether(plain)[IP])
    assert eth.vlan_of(tagged) == 100 and eth.vlan_of(plain) == 0
    assert eth.strip_vlan_tag(tagged) == plain
    assert eth.strip_vlan_tag(plain) == plain
    with pytest.raises(ValueError):
        eth.add_vlan_tag(plain, 4096)


# --------------------------------------------------------------------------- ARP


@pytest.mark.parametrize("vlan", [None, 7])
def test_arp_reply_fields(vlan):
    request = arp_request(vlan=vlan)
    reply = Ether(eth.build_arp_reply(request, ANSWER))
    assert reply.dst == SRC and reply.src == ANSWER_TEXT
    if vlan is not None:
        assert reply[Dot1Q].vlan == vlan and reply[Dot1Q].prio == 3
    else:
        assert Dot1Q not in reply
    arp = reply[ARP]
    assert (arp.hwtype, arp.ptype, arp.hwlen, arp.plen, arp.op) == (1, 0x0800, 6, 4, 2)
    assert arp.hwsrc == ANSWER_TEXT and arp.psrc == "10.1.0.2"
    assert arp.hwdst == SRC and arp.pdst == "10.1.0.1"


def test_arp_reply_keeps_padding():
    request = arp_request() + b"\x00" * 18
    assert len(eth.build_arp_reply(request, ANSWER)) == len(request)


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"op": 2}, "not_request"),
        ({"hwtype": 6}, "bad_htype"),
        ({"ptype": 0x86DD}, "bad_ptype"),
        ({"psrc": "10.1.0.2"}, "gratuitous"),
    ],
)
def test_arp_request_checks(fields, reason):
    pkt = Ether(arp_request())
    for key, value in fields.items():
        setattr(pkt[ARP], key, value)
    with pytest.raises(eth.FrameError) as info:
        eth.check_arp_request(bytes(pkt))
    assert info.value.reason == reason


def test_arp_request_checks_size_and_sap():
    with pytest.raises(eth.FrameError) as info:
        eth.check_arp_request(arp_request()[:40])
    assert info.value.reason == "short"
    with pytest.raises(eth.FrameError) as info:
        eth.check_arp_request(arp_request() + b"\x00" * 1500)
    assert info.value.reason == "too_big"
    with pytest.raises(eth.FrameError) as info:
        eth.check_arp_request(bytes(Ether() / IP()))
    assert info.value.reason == "not_arp"


@pytest.mark.parametrize("vlan", [0, 12])
def test_garp_fields(vlan):
    pkt = Ether(eth.build_garp(ANSWER, "10.1.0.9", vlan))
    assert pkt.src == ANSWER_TEXT and pkt.dst == "ff:ff:ff:ff:ff:ff"
    assert (Dot1Q in pkt) == bool(vlan)
    if vlan:
        assert pkt[Dot1Q].vlan == vlan
    arp = pkt[ARP]
    assert arp.op == 1 and arp.hwsrc == ANSWER_TEXT and arp.psrc == arp.pdst == "10.1.0.9"
    assert arp.hwdst == "ff:ff:ff:ff:ff:ff"


def test_garp_to_unicast_dst():
    pkt = Ether(eth.build_garp(ANSWER, "10.1.0.9", dst=bytes.fromhex("020000000001")))
    assert pkt.dst == SRC


# --------------------------------------------------------------------------- NDP


def test_parse_ndp_ns():
    ns = eth.parse_ndp_ns(ns_frame(vlan=9))
    assert str(ns.target) == "fd00::2" and str(ns.src_ip) == "fd00::1"
    assert ns.source_lla == bytes.fromhex("020000000001")
    assert ns.hop_limit == 255 and ns.l2.vlan == 9


@pytest.mark.parametrize("vlan", [None, 9])
def test_ndp_na_fields_and_checksum(vlan):
    na_frame = eth.build_ndp_na(ns_frame(vlan=vlan), "fd00::2", ANSWER)
    pkt = Ether(na_frame)
    assert pkt.dst == SRC and pkt.src == ANSWER_TEXT
    if vlan is not None:
        assert pkt[Dot1Q].vlan == vlan
    ip6 = pkt[IPv6]
    assert ip6.src == "fd00::2" and ip6.dst == "fd00::1"
    assert ip6.hlim == 255 and ip6.plen == 32 and ip6.nh == 58
    na = pkt[ICMPv6ND_NA]
    assert (na.type, na.code, na.R, na.S, na.O) == (136, 0, 0, 1, 1)
    assert na.tgt == "fd00::2"
    assert pkt[ICMPv6NDOptDstLLAddr].lladdr == ANSWER_TEXT
    assert pkt[ICMPv6NDOptDstLLAddr].len == 1
    ours = na.cksum
    del na.cksum
    recomputed = Ether(bytes(pkt))[ICMPv6ND_NA].cksum
    assert ours == recomputed


def test_ndp_na_defaults_target_to_ns_target():
    assert eth.build_ndp_na(ns_frame(), None, ANSWER) == eth.build_ndp_na(
        ns_frame(), "fd00::2", ANSWER
    )


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"slla": False}, "no_slla"),
        ({"target": "ff02::1"}, "bad_target"),
        ({"target": "::ffff:10.0.0.1"}, "bad_target"),
        ({"target": "::1"}, "bad_target"),
        ({"dst_ip": "fd00::99"}, "bad_ip_dst"),
        ({"dst_ip": "ff05::1"}, "bad_ip_dst"),
        ({"type": 137, "code": 1}, "not_ns"),
    ],
)
def test_ndp_ns_checks(kwargs, reason):
    with pytest.raises(eth.FrameError) as info:
        eth.parse_ndp_ns(ns_frame(**kwargs))
    assert info.value.reason == reason


def test_ndp_type_check_keeps_illumos_and_quirk():
    # type != 135 but code == 0 passes, as in libvarpd_arp.c.
    assert eth.parse_ndp_ns(ns_frame(type=137)).icmp_type == 137


def test_ndp_ns_any_link_local_scope_multicast_accepted():
    assert eth.parse_ndp_ns(ns_frame(dst_ip="ff02::1")).target.compressed == "fd00::2"


def test_ndp_ns_refuses_zero_length_option_and_non_multicast_mac():
    pkt = Ether(ns_frame())
    pkt[ICMPv6NDOptSrcLLAddr].len = 0
    with pytest.raises(eth.FrameError) as info:
        eth.parse_ndp_ns(bytes(pkt))
    assert info.value.reason == "zero_length_option"
    pkt = Ether(ns_frame())
    pkt.dst = "02:00:00:00:00:09"
    with pytest.raises(eth.FrameError) as info:
        eth.parse_ndp_ns(bytes(pkt))
    assert info.value.reason == "not_ipv6_multicast"


def test_ndp_ns_refuses_extension_headers_and_truncation():
    pkt = Ether(ns_frame())
    pkt[IPv6].nh = 0
    with pytest.raises(eth.FrameError) as info:
        eth.parse_ndp_ns(bytes(pkt))
    assert info.value.reason == "not_icmpv6"
    pkt = Ether(ns_frame())
    pkt[IPv6].plen = 200
    with pytest.raises(eth.FrameError) as info:
        eth.parse_ndp_ns(bytes(pkt))
    assert info.value.reason == "truncated"


def test_icmpv6_checksum_matches_scapy_for_an_ns():
    pkt = Ether(ns_frame())
    icmp = bytearray(bytes(pkt[ICMPv6ND_NS]))
    icmp[2:4] = b"\x00\x00"
    src = bytes.fromhex("fd000000000000000000000000000001")
    dst = bytes.fromhex("ff0200000000000000000001ff000002")
    assert eth.icmpv6_checksum(src, dst, icmp) == pkt[ICMPv6ND_NS].cksum


# --------------------------------------------------------------------------- DHCP


def test_dhcp_client_broadcast_recognised():
    assert eth.is_dhcp_client_broadcast(dhcp_discover())
    assert eth.is_dhcp_client_broadcast(dhcp_discover(vlan=3))


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"pad": False}, "short"),
        ({"sport": 67}, "bad_ports"),
        ({"dport": 68}, "bad_ports"),
        ({"dst": "02:00:00:00:00:02"}, "not_broadcast"),
    ],
)
def test_dhcp_checks(kwargs, reason):
    data = dhcp_discover(**kwargs)
    assert not eth.is_dhcp_client_broadcast(data)
    with pytest.raises(eth.FrameError) as info:
        eth.check_dhcp_client_broadcast(data)
    assert info.value.reason == reason


def test_dhcp_check_refuses_non_ipv4_frames():
    assert not eth.is_dhcp_client_broadcast(arp_request())
    assert not eth.is_dhcp_client_broadcast(b"\xff" * 6)


def test_set_dst_mac_retargets():
    server = bytes.fromhex("02000000dddd")
    pkt = Ether(eth.set_dst_mac(dhcp_discover(), server))
    assert pkt.dst == "02:00:00:00:dd:dd" and pkt[UDP].dport == 67
