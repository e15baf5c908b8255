"""The Python engine lets later fragments of an allowed datagram through on every path
(ICMP echo state, AH/ESP state), as the kernel does after reassembly."""

from __future__ import annotations

from scapy.layers.inet import ICMP, IP, fragment
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from tests.firewall.fwnet import GUEST_MAC, IN, ME4, OTHER_MAC, OUT, firewall, rule

REMOTE = "192.0.2.9"


def frags(pkt, size=256):
    return [bytes(Ether(src=OTHER_MAC, dst=GUEST_MAC) / f) for f in fragment(pkt, fragsize=size)]


def test_fragmented_echo_reply_of_an_allowed_ping_passes_whole():
    fw = firewall()
    request = bytes(Ether(src=GUEST_MAC, dst=OTHER_MAC) / IP(src=ME4, dst=REMOTE) / ICMP(id=7))
    assert fw.check(request, OUT)
    reply = IP(src=REMOTE, dst=ME4, id=99) / ICMP(type=0, id=7) / Raw(b"x" * 1000)
    pieces = frags(reply)
    assert len(pieces) > 2
    assert [fw.check(p, IN) for p in pieces] == [True] * len(pieces)


def test_fragmented_esp_of_a_tracked_flow_passes_whole():
    fw = firewall(rule("out", "allow", "esp"))
    out = bytes(
        Ether(src=GUEST_MAC, dst=OTHER_MAC) / IP(src=ME4, dst=REMOTE, proto=50) / Raw(b"s" * 40)
    )
    assert fw.check(out, OUT)
    back = IP(src=REMOTE, dst=ME4, proto=50, id=5) / Raw(b"e" * 900)
    pieces = frags(back)
    assert [fw.check(p, IN) for p in pieces] == [True] * len(pieces)


def test_later_fragments_of_a_refused_datagram_stay_out():
    fw = firewall()
    pieces = frags(IP(src=REMOTE, dst=ME4, id=6) / ICMP(type=8, id=9) / Raw(b"x" * 900))
    assert [fw.check(p, IN) for p in pieces] == [False] * len(pieces)
