"""One VNIC's compiled policy against scapy-built frames: spec/fwrule-cases.md §D mapped onto
the rules portolan would emit for that VNIC (written by hand here), plus state and exemptions."""

from __future__ import annotations

from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import ARP, Dot1Q, Ether
from scapy.packet import Raw

from tests.firewall.fwnet import (
    IN,
    ME4,
    ME6,
    OUT,
    Clock,
    eth,
    firewall,
    icmp6_in,
    icmp6_out,
    icmp_in,
    icmp_out,
    proto_in,
    proto_out,
    rule,
    tcp_in,
    tcp_out,
    udp_in,
    udp_out,
)

# --------------------------------------------------------------------------- defaults


def test_no_rules_blocks_inbound_and_passes_outbound():
    fw = firewall()
    assert not fw.check(tcp_in("192.0.2.1", 22), IN)
    assert not fw.check(udp_in("192.0.2.1", 53), IN)
    assert not fw.check(icmp_in("192.0.2.1"), IN)
    assert not fw.check(tcp_in("2001:db8::1", 22), IN)
    assert fw.check(tcp_out("192.0.2.1", 443), OUT)
    assert fw.check(udp_out("2001:db8::1", 53), OUT)
    assert fw.check(icmp_out("192.0.2.1"), OUT)
    assert fw.counters["drop_default"] == 4 and fw.counters["pass_default"] == 3


def test_tcp_syn_out_lets_syn_ack_in_but_unsolicited_syn_is_blocked():
    fw = firewall()
    assert fw.check(tcp_out("192.0.2.1", 443, sport=5555), OUT)
    assert fw.check(tcp_in("192.0.2.1", 5555, sport=443, flags="SA"), IN)
    assert fw.check(tcp_out("192.0.2.1", 443, sport=5555, flags="A"), OUT)
    assert fw.check(tcp_in("192.0.2.1", 5555, sport=443, flags="PA"), IN)
    # same remote, another port pair: not part of the flow
    assert not fw.check(tcp_in("192.0.2.1", 5556, sport=443, flags="SA"), IN)
    assert not fw.check(tcp_in("192.0.2.1", 22, sport=443, flags="S"), IN)
    # another remote answering from the same port: no
    assert not fw.check(tcp_in("192.0.2.2", 5555, sport=443, flags="SA"), IN)


def test_udp_and_icmp_echo_replies_pass_after_outbound():
    fw = firewall()
    assert fw.check(udp_out("192.0.2.53", 53, sport=3333), OUT)
    assert fw.check(udp_in("192.0.2.53", 3333, sport=53), IN)
    assert not fw.check(udp_in("192.0.2.53", 3334, sport=53), IN)
    assert fw.check(icmp_out("192.0.2.9", 8, id=77), OUT)
    assert fw.check(icmp_in("192.0.2.9", 0, id=77), IN)
    assert not fw.check(icmp_in("192.0.2.9", 0, id=78), IN)
    # the peer cannot send *requests* on the strength of our echo flow
    assert not fw.check(icmp_in("192.0.2.9", 8, id=77), IN)
    assert fw.check(icmp6_out("2001:db8::9", 128, id=5), OUT)
    assert fw.check(icmp6_in("2001:db8::9", 129, id=5), IN)
    assert not fw.check(icmp6_in("2001:db8::9", 129, id=6), IN)


def test_echo_reply_does_not_open_a_flow():
    fw = firewall(rule("out", "block", "icmp", types=[(0, None)], priority=1))
    assert fw.check(icmp_in("192.0.2.9", 0, id=1), IN) is False
    assert len(fw.conntrack) == 0


# --------------------------------------------------------------------------- §D scenarios


def test_d01_ssh_allowed_from_anywhere_and_vnic_without_rules_blocks_it():
    vm01 = firewall(rule("in", "allow", "tcp", ports=[22]))
    assert vm01.check(tcp_in("198.51.100.7", 22), IN)
    assert vm01.check(tcp_in("2001:db8::7", 22), IN)
    assert not vm01.check(tcp_in("198.51.100.7", 23), IN)
    vm03 = firewall()  # the other owner's VM: firewall on, rule does not apply
    assert not vm03.check(tcp_in("198.51.100.7", 22), IN)


def test_d03_tag_to_tag_allow_only_from_the_resolved_peer():
    vm02 = firewall(
        rule("in", "allow", "tcp", ports=[5432], peers=["10.0.0.1/32"]),
    )
    assert vm02.check(tcp_in("10.0.0.1", 5432, me="10.0.0.2"), IN)
    assert not vm02.check(tcp_in("10.0.0.3", 5432, me="10.0.0.2"), IN)
    vm01 = firewall()  # FROM side allow at priority 0: nothing emitted
    assert not vm01.check(tcp_in("10.0.0.2", 5432), IN)
    assert vm01.check(tcp_out("10.0.0.2", 5432), OUT)


def test_d04_tag_values_give_per_port_peers():
    vm01 = firewall(
        rule("in", "allow", "tcp", ports=[80], peers=["192.168.1.1/32"]),
        rule("in", "allow", "tcp", ports=[81], peers=["192.168.1.2/32"]),
    )
    assert vm01.check(tcp_in("192.168.1.1", 80), IN)
    assert vm01.check(tcp_in("192.168.1.2", 81), IN)
    assert not vm01.check(tcp_in("192.168.1.2", 80), IN)
    assert not vm01.check(tcp_in("192.168.1.3", 82), IN)


def test_d05_outbound_block_of_smtp_both_families():
    fw = firewall(rule("out", "block", "tcp", ports=[25]))
    assert not fw.check(tcp_out("192.0.2.25", 25), OUT)
    assert not fw.check(tcp_out("2001:db8::25", 25), OUT)
    assert fw.check(tcp_out("192.0.2.25", 587), OUT)
    assert fw.check(udp_out("192.0.2.25", 25), OUT)
    assert fw.counters["drop_rule"] == 2


def test_d06_priority_zero_noops_change_nothing():
    plain = firewall()
    noops = firewall(
        rule("in", "block", "tcp", ports=[23]),
        rule("out", "allow", "tcp", ports=[443]),
    )
    frames = [
        (tcp_in("192.0.2.1", 23), IN),
        (tcp_in("192.0.2.1", 443), IN),
        (tcp_out("192.0.2.1", 443, sport=1), OUT),
        (tcp_out("192.0.2.1", 23, sport=2), OUT),
    ]
    assert [plain.check(f, d) for f, d in frames] == [noops.check(f, d) for f, d in frames]
    assert [plain.check(f, d) for f, d in frames[:2]] == [False, False]


def test_d07_higher_priority_block_carves_a_subnet_out_of_an_allow():
    fw = firewall(
        rule("in", "allow", "tcp", ports=[25]),
        rule("in", "block", "tcp", ports=[25], peers=["10.20.30.0/24"], priority=1),
    )
    assert not fw.check(tcp_in("10.20.30.5", 25), IN)
    assert fw.check(tcp_in("10.20.31.5", 25), IN)
    assert fw.check(tcp_in("2001:db8::5", 25), IN)


def test_d08_equal_priority_tie_break_goes_against_the_default():
    fw = firewall(
        rule("in", "block", "tcp", ports=[80], peers=["10.9.9.9/32"], priority=5),
        rule("in", "allow", "tcp", ports=[80], peers=["10.9.9.9/32"], priority=5),
        rule("out", "allow", "udp", ports=[53], peers=["10.8.8.8/32"], priority=5),
        rule("out", "block", "udp", ports=[53], peers=["10.8.8.8/32"], priority=5),
    )
    assert fw.check(tcp_in("10.9.9.9", 80), IN)
    assert not fw.check(udp_out("10.8.8.8", 53), OUT)
    assert fw.check(udp_out("10.8.8.9", 53), OUT)


def test_d09_outbound_only_ssh_but_replies_to_allowed_inbound_pass():
    fw = firewall(
        rule("out", "block", "tcp"),
        rule("out", "allow", "tcp", ports=[22], priority=1),
        rule("in", "allow", "tcp", ports=[80]),
        rule("in", "allow", "udp", ports=[53]),
    )
    assert not fw.check(tcp_out("192.0.2.1", 443), OUT)
    assert fw.check(tcp_out("192.0.2.1", 22, sport=6000), OUT)
    assert fw.check(tcp_in("192.0.2.1", 6000, sport=22, flags="SA"), IN)
    # inbound http: SYN in, SYN/ACK and data out despite the outbound tcp block
    assert fw.check(tcp_in("203.0.113.4", 80, sport=50000), IN)
    assert fw.check(tcp_out("203.0.113.4", 50000, sport=80, flags="SA"), OUT)
    assert fw.check(tcp_out("203.0.113.4", 50000, sport=80, flags="PA"), OUT)
    # but not a new outbound connection from port 80 to elsewhere
    assert not fw.check(tcp_out("203.0.113.5", 50000, sport=80, flags="S"), OUT)
    assert fw.check(udp_in("203.0.113.4", 53, sport=999), IN)
    assert fw.check(udp_out("203.0.113.4", 999, sport=53), OUT)


def test_d10_all_vms_peers_include_itself_and_the_v6_address():
    fw = firewall(
        rule("in", "allow", "tcp", ports=[22], peers=["10.0.0.1/32", "10.0.0.2/32", "fd00::5/128"])
    )
    assert fw.check(tcp_in("10.0.0.1", 22), IN)
    assert fw.check(tcp_in("10.0.0.2", 22), IN)
    assert fw.check(tcp_in("fd00::5", 22), IN)
    assert not fw.check(tcp_in("fd00::6", 22), IN)
    assert not fw.check(tcp_in("10.0.0.3", 22), IN)


def test_d11_remote_vm_of_the_same_owner_only():
    fw = firewall(rule("in", "allow", "tcp", ports=[22], peers=["172.29.0.4/32"]))
    assert fw.check(tcp_in("172.29.0.4", 22), IN)
    assert not fw.check(tcp_in("172.29.0.5", 22), IN)


def test_d13_icmp_families_types_and_codes():
    fw = firewall(
        rule("in", "allow", "icmp", types=[(8, 0)]),
        rule("in", "allow", "icmp6", types=[(128, 0), (135, None)]),
        rule("in", "allow", "icmp", peers=["10.1.1.1/32"]),
        rule("in", "allow", "icmp6", peers=["fd00::1/128"]),
    )
    assert fw.check(icmp_in("10.2.2.2", 8, 0), IN)
    assert not fw.check(icmp_in("10.2.2.2", 8, 1, id=8), IN)  # new echo id: no state
    assert not fw.check(icmp_in("10.2.2.2", 13, 0), IN)
    assert fw.check(icmp_in("10.1.1.1", 13, 0), IN)  # TYPE all from 10.1.1.1
    assert fw.check(icmp6_in("fd00::2", 128, 0), IN)
    assert not fw.check(icmp6_in("fd00::2", 128, 1, id=8), IN)
    assert fw.check(icmp6_in("fd00::2", 135, 9), IN)  # type only: every code
    assert not fw.check(icmp6_in("fd00::2", 2, 0), IN)  # packet too big from a stranger
    assert fw.check(icmp6_in("fd00::1", 2, 0, me="fd00::99"), IN)  # TYPE all from fd00::1
    # the icmp (v4) "any" allow never lets ICMPv6 in, nor the other way round
    only_v4 = firewall(rule("in", "allow", "icmp"))
    assert not only_v4.check(icmp6_in("fd00::2", 128), IN)
    only_v6 = firewall(rule("in", "allow", "icmp6"))
    assert not only_v6.check(icmp_in("10.2.2.2", 8), IN)


def test_d14_port_lists_and_ranges_with_mixed_families():
    fw = firewall(
        rule(
            "in",
            "allow",
            "tcp",
            ports=[443, 80, (8000, 8100)],
            peers=["fd00::1/128", "10.5.0.0/16", "fe80::/64"],
        )
    )
    for port in (80, 443, 8000, 8050, 8100):
        assert fw.check(tcp_in("10.5.3.4", port), IN), port
    for port in (79, 81, 444, 7999, 8101):
        assert not fw.check(tcp_in("10.5.3.4", port), IN), port
    assert fw.check(tcp_in("fe80::1234", 443, me="fe80::1"), IN)
    assert fw.check(tcp_in("fd00::1", 8080, me="fd00::99"), IN)
    assert not fw.check(tcp_in("fd00::2", 443), IN)
    assert not fw.check(tcp_in("10.6.0.1", 443), IN)


def test_d16_ah_and_esp():
    fw = firewall(
        rule("in", "allow", "ah", peers=["1.2.3.4/32"]),
        rule("out", "block", "esp"),
    )
    assert fw.check(proto_in("1.2.3.4", 51), IN)
    assert not fw.check(proto_in("1.2.3.5", 51), IN)
    assert not fw.check(proto_out("1.2.3.4", 50), OUT)
    assert not fw.check(proto_out("2001:db8::4", 50), OUT)
    assert fw.check(proto_out("1.2.3.9", 51), OUT)  # default outbound: allow ...
    assert not fw.check(proto_in("1.2.3.9", 51), IN)  # ... untracked: no way back in
    assert not fw.check(proto_in("1.2.3.4", 50), IN)


def test_d16_allowed_inbound_ah_keeps_state_past_an_outbound_block():
    fw = firewall(
        rule("in", "allow", "ah", peers=["1.2.3.4/32"]),
        rule("out", "block", "ah"),
    )
    assert not fw.check(proto_out("1.2.3.4", 51), OUT)
    assert fw.check(proto_in("1.2.3.4", 51), IN)
    assert fw.check(proto_out("1.2.3.4", 51), OUT)
    assert not fw.check(proto_out("1.2.3.5", 51), OUT)


def test_d17_each_rule_is_enforced_on_the_end_it_changes():
    vm01 = firewall(rule("out", "block", "udp", ports=[161], peers=["10.0.0.2/32"]))
    vm02 = firewall(rule("in", "allow", "tcp", ports=[3306], peers=["10.0.0.1/32"]))
    assert not vm01.check(udp_out("10.0.0.2", 161), OUT)
    assert vm01.check(udp_out("10.0.0.3", 161), OUT)
    assert vm01.check(tcp_out("10.0.0.2", 3306), OUT)
    assert vm02.check(tcp_in("10.0.0.1", 3306, me="10.0.0.2"), IN)
    assert not vm02.check(udp_in("10.0.0.1", 161, me="10.0.0.2"), IN)


def test_d18_remote_vm_addresses_as_peers():
    r1 = ["172.29.0.4/32", "172.29.1.4/32"]
    fw = firewall(
        rule("in", "allow", "tcp", ports=[22], peers=r1),
        rule(
            "in",
            "allow",
            "tcp",
            ports=[9000],
            peers=["10.0.0.1/32", "10.0.0.2/32", *r1, "172.29.0.9/32"],
        ),
        rule("out", "block", "udp", ports=[54], peers=r1),
    )
    assert fw.check(tcp_in("172.29.1.4", 22), IN)
    assert not fw.check(tcp_in("172.29.0.9", 22), IN)
    assert fw.check(tcp_in("172.29.0.9", 9000), IN)
    assert not fw.check(udp_out("172.29.0.4", 54), OUT)
    assert fw.check(udp_out("172.29.0.9", 54), OUT)


def test_d19_logged_rules_enforce_the_same():
    fw = firewall(
        rule("out", "block", "tcp", ports=[8080], peers=["10.99.99.254/32"]),
        rule("in", "allow", "tcp", ports=[80]),
    )
    assert not fw.check(tcp_out("10.99.99.254", 8080), OUT)
    assert fw.check(tcp_in("10.99.99.254", 80), IN)


def test_d20_inbound_block_above_allow_with_a_higher_allow_on_top():
    fw = firewall(
        rule("in", "block", "tcp", priority=1),
        rule("in", "allow", "tcp", ports=[22], peers=["10.3.3.3/32"], priority=2),
        rule("in", "allow", "tcp", ports=[80]),  # below the priority-1 block: dead
    )
    assert fw.check(tcp_in("10.3.3.3", 22), IN)
    assert not fw.check(tcp_in("10.3.3.3", 80), IN)
    assert not fw.check(tcp_in("10.4.4.4", 22), IN)
    assert not fw.check(tcp_in("2001:db8::3", 22), IN)


def test_priority_beats_specificity_and_rule_order():
    fw = firewall(
        rule("in", "allow", "tcp", ports=[(1, 65535)], peers=["10.0.0.0/8"], priority=7),
        rule("in", "block", "tcp", ports=[443], peers=["10.1.2.3/32"], priority=6),
    )
    assert fw.check(tcp_in("10.1.2.3", 443), IN)
    fw2 = firewall(
        rule("in", "block", "tcp", ports=[443], peers=["10.1.2.3/32"], priority=8),
        rule("in", "allow", "tcp", ports=[(1, 65535)], peers=["10.0.0.0/8"], priority=7),
    )
    assert not fw2.check(tcp_in("10.1.2.3", 443), IN)
    assert fw2.check(tcp_in("10.1.2.4", 443), IN)


# --------------------------------------------------------------------------- exemptions, edge cases


def test_arp_and_other_non_ip_frames_are_below_the_firewall():
    fw = firewall()
    arp = bytes(Ether(src="02:00:00:00:00:99", dst="ff:ff:ff:ff:ff:ff") / ARP(pdst=ME4))
    assert fw.check(arp, IN) and fw.check(arp, OUT)
    lldp = bytes(Ether(dst="01:80:c2:00:00:0e", type=0x88CC) / Raw(b"\x00" * 40))
    assert fw.check(lldp, IN)
    assert fw.counters["pass_not_ip"] == 3


def test_neighbour_discovery_passes_only_with_hop_limit_255():
    fw = firewall(rule("out", "block", "icmp6", priority=1))
    for icmp_type in (133, 134, 135, 136, 137):
        assert fw.check(icmp6_in("fe80::2", icmp_type, hlim=255, me="fe80::1"), IN)
        assert fw.check(icmp6_out("fe80::2", icmp_type, hlim=255, me="fe80::1"), OUT)
    assert not fw.check(icmp6_in("2001:db8::2", 135, hlim=64), IN)
    assert not fw.check(icmp6_in("fe80::2", 138, hlim=255, me="fe80::1"), IN)


def test_dhcp_reply_passes_only_after_the_vnics_own_request():
    clock = Clock()
    fw = firewall(clock=clock)
    offer = eth(
        IP(src="10.0.0.254", dst="255.255.255.255") / UDP(sport=67, dport=68) / Raw(b"x" * 300)
    )
    assert not fw.check(offer, IN)
    discover = eth(
        IP(src="0.0.0.0", dst="255.255.255.255") / UDP(sport=68, dport=67) / Raw(b"x" * 300),
        to_guest=False,
    )
    assert fw.check(discover, OUT)
    assert fw.check(offer, IN)
    clock.advance(61)
    assert not fw.check(offer, IN)
    # DHCPv6 the same way
    solicit = eth(IPv6(src="fe80::1", dst="ff02::1:2") / UDP(sport=546, dport=547), to_guest=False)
    advertise = eth(IPv6(src="fe80::fe", dst="fe80::1") / UDP(sport=547, dport=546))
    assert not fw.check(advertise, IN)
    assert fw.check(solicit, OUT)
    assert fw.check(advertise, IN)


def test_icmp_error_quoting_a_tracked_flow_passes_from_a_router():
    fw = firewall()
    sent = IP(src=ME4, dst="192.0.2.80") / UDP(sport=4444, dport=9999)
    assert fw.check(eth(sent, to_guest=False), OUT)
    quote = bytes(sent)[:28]
    unreachable = eth(IP(src="192.0.2.80", dst=ME4) / ICMP(type=3, code=3) / Raw(quote))
    ttl_exceeded = eth(IP(src="198.51.100.1", dst=ME4) / ICMP(type=11, code=0) / Raw(quote))
    assert fw.check(unreachable, IN)
    assert fw.check(ttl_exceeded, IN)
    other = bytes(IP(src=ME4, dst="192.0.2.81") / UDP(sport=4444, dport=9999))[:28]
    assert not fw.check(eth(IP(src="192.0.2.81", dst=ME4) / ICMP(type=3, code=3) / Raw(other)), IN)
    assert fw.counters["pass_related"] == 2


def test_icmpv6_packet_too_big_for_a_tracked_tcp_flow_passes():
    fw = firewall()
    sent = IPv6(src=ME6, dst="2001:db8::80") / TCP(sport=4444, dport=443, flags="S")
    assert fw.check(eth(sent, to_guest=False), OUT)
    ptb = icmp6_error("2001:db8::1", 2, bytes(sent)[:48])
    assert fw.check(ptb, IN)
    stranger = bytes(IPv6(src=ME6, dst="2001:db8::81") / TCP(sport=4444, dport=443))[:48]
    assert not fw.check(icmp6_error("2001:db8::1", 2, stranger), IN)


def icmp6_error(router: str, icmp_type: int, quote: bytes) -> bytes:
    from scapy.layers.inet6 import ICMPv6Unknown

    return eth(
        IPv6(src=router, dst=ME6)
        / ICMPv6Unknown(type=icmp_type, code=0, msgbody=b"\x00\x00\x05\x00" + quote)
    )


def test_outbound_icmp_error_for_an_inbound_allowed_flow_passes_an_outbound_block():
    fw = firewall(rule("in", "allow", "udp", ports=[53]), rule("out", "block", "icmp", priority=1))
    query = IP(src="192.0.2.5", dst=ME4) / UDP(sport=777, dport=53)
    assert fw.check(eth(query), IN)
    err = eth(
        IP(src=ME4, dst="192.0.2.5") / ICMP(type=3, code=3) / Raw(bytes(query)[:28]), to_guest=False
    )
    assert fw.check(err, OUT)
    assert not fw.check(icmp_out("192.0.2.5", 8), OUT)


def test_later_fragments_follow_their_first_fragment():
    fw = firewall(rule("in", "allow", "udp", ports=[5000]))
    big = IP(src="192.0.2.7", dst=ME4, id=4242) / UDP(sport=1, dport=5000) / Raw(b"y" * 3000)
    from scapy.layers.inet import fragment

    first, *rest = fragment(big, fragsize=1000)
    assert all(f.frag > 0 for f in rest)
    assert fw.check(eth(first), IN)
    assert all(fw.check(eth(f), IN) for f in rest)
    blocked = IP(src="192.0.2.7", dst=ME4, id=4343) / UDP(sport=1, dport=5001) / Raw(b"y" * 3000)
    first_b, *rest_b = fragment(blocked, fragsize=1000)
    assert not fw.check(eth(first_b), IN)
    assert not any(fw.check(eth(f), IN) for f in rest_b)
    # a later fragment with no first fragment seen: dropped
    orphan = IP(src="192.0.2.7", dst=ME4, id=99, frag=100, proto=17) / Raw(b"z" * 64)
    assert not fw.check(eth(orphan), IN)
    assert fw.counters["drop_fragment"] == len(rest_b) + 1


def test_malformed_ip_is_dropped_both_ways():
    fw = firewall()
    good = tcp_out("192.0.2.1", 80)
    assert not fw.check(good[: 14 + 20 + 10], OUT)  # TCP header cut short
    assert not fw.check(good[: 14 + 12], OUT)  # IP header cut short
    assert not fw.check(good[:10], IN)
    bad_ihl = bytearray(good)
    bad_ihl[14] = 0x43
    assert not fw.check(bytes(bad_ihl), OUT)
    assert fw.counters["drop_malformed"] == 4


def test_vlan_tagged_frame_is_parsed_past_the_tag():
    fw = firewall(rule("in", "allow", "tcp", ports=[22]))
    tagged = bytes(
        Ether() / Dot1Q(vlan=5) / IP(src="192.0.2.1", dst=ME4) / TCP(dport=22, flags="S")
    )
    assert fw.check(tagged, IN)
    tagged23 = bytes(
        Ether() / Dot1Q(vlan=5) / IP(src="192.0.2.1", dst=ME4) / TCP(dport=23, flags="S")
    )
    assert not fw.check(tagged23, IN)


def test_ipv6_fragments_follow_their_first_fragment():
    from scapy.layers.inet6 import IPv6ExtHdrFragment, IPv6ExtHdrHopByHop

    fw = firewall(rule("in", "allow", "tcp", ports=[22]))
    first = eth(IPv6(src="2001:db8::1", dst=ME6) / IPv6ExtHdrFragment(m=1, id=7) / TCP(dport=22))
    later = eth(IPv6(src="2001:db8::1", dst=ME6) / IPv6ExtHdrFragment(offset=3, id=7, nh=6))
    stray = eth(IPv6(src="2001:db8::1", dst=ME6) / IPv6ExtHdrFragment(offset=3, id=8, nh=6))
    blocked = eth(IPv6(src="2001:db8::1", dst=ME6) / IPv6ExtHdrFragment(m=1, id=9) / TCP(dport=23))
    assert fw.check(first, IN) and fw.check(later, IN)
    assert not fw.check(stray, IN) and not fw.check(blocked, IN)
    # other extension headers are still "other" protocols
    hbh = eth(IPv6(src="2001:db8::1", dst=ME6) / IPv6ExtHdrHopByHop() / TCP(dport=22))
    assert not fw.check(hbh, IN)
    assert fw.check(
        eth(
            IPv6(src=ME6, dst="2001:db8::1") / IPv6ExtHdrFragment() / TCP(dport=22), to_guest=False
        ),
        OUT,
    )


def test_check_never_raises_on_garbage():
    import random

    fw = firewall(rule("in", "allow", "tcp"))
    rng = random.Random(7)
    base = [tcp_in("192.0.2.1", 22), icmp6_in("fd00::2", 1), udp_out("2001:db8::1", 53)]
    for _ in range(3000):
        f = bytearray(rng.choice(base))
        for _ in range(rng.randint(1, 6)):
            f[rng.randrange(len(f))] = rng.randrange(256)
        f = f[: rng.randint(0, len(f))]
        assert fw.check(bytes(f), rng.choice((IN, OUT))) in (True, False)
