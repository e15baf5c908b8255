"""Seeded generators for the differential test: random policies and the packets to judge.

``random_policy(rng, macs, generation)`` gives a validated ``Policy`` over some of the lab's
VNICs (the others have the firewall off): 2..8 rules each, random direction, action,
priority, protocol, ports (single, ranges, ``all``), ICMP types (with and without codes,
``all``) and peers (``any``, remote prefixes, other VNICs' addresses).

``random_flows(rng, n, ...)`` gives ``Flow`` objects: one "new" datagram (TCP SYN, UDP, ICMP
/ICMPv6 echo, errors and neighbour discovery, AH, ESP; IPv4 and IPv6; sometimes fragmented)
between a remote peer (behind the uplink) and a VNIC or between two VNICs, and a ``reply``
builder for the answer. Every datagram carries a tag (IPv4 id / IPv6 flow label, and the
IPv6 fragment id) so the receiver can tell which one arrived.

IPv6 AH flows get a remote address of their own (see ``random_flow``). Flows between two
local VNICs are TCP/UDP/ICMP only, and get a reply only when their first
datagram passed: the engine keeps state per VNIC (the sender remembers a flow the receiver
refused) while the kernel has one conntrack entry per flow, so a "reply" to a datagram the
receiver never accepted is judged differently by design (documented in the kernel package).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from scapy.layers.inet import ICMP, IP, TCP, UDP, fragment
from scapy.layers.inet6 import (
    ICMPv6DestUnreach,
    ICMPv6EchoReply,
    ICMPv6EchoRequest,
    ICMPv6ND_NS,
    IPv6,
    IPv6ExtHdrFragment,
    fragment6,
)
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from protocol.fwpolicy import Policy, from_json

from .lab import UPLINK_MAC

REMOTE4 = ["10.8.1.5", "10.8.1.77", "10.8.2.9", "10.8.3.1"]
REMOTE6 = ["fd08:1::5", "fd08:1::77", "fd08:2::9", "fd08:3::1"]
PEERS4 = ["10.8.1.0/24", "10.8.1.5", "10.8.2.0/25", "10.8.0.0/16", "10.8.3.1"]
PEERS6 = ["fd08:1::/64", "fd08:1::5", "fd08:2::/120", "fd08::/32", "fd08:3::1"]
PORTS = [22, 80, 443, 53, 8050, 1234]
PORT_CHOICES: list[Any] = [[22, 22], [80, 80], [443, 443], [53, 53], [8000, 8100], [1000, 2000]]
TYPES4: list[Any] = [[8, None], [8, 0], [3, None], [3, 1], [11, 0], [0, None]]
TYPES6: list[Any] = [[128, None], [128, 0], [1, None], [1, 4], [129, None], [135, None]]


def vnic_ip(i: int, family: int) -> str:
    return f"10.9.0.{i + 1}" if family == 4 else f"fd09::{i + 1}"


def random_rule(rng: random.Random, n: int, uid: int, vnics: int) -> dict[str, Any]:
    proto = rng.choice(["tcp", "tcp", "udp", "icmp", "icmp6", "ah", "esp"])
    rule: dict[str, Any] = {
        "uuid": f"00000000-0000-4000-8000-{uid:012d}",
        "direction": rng.choice(["in", "out"]),
        "action": rng.choice(["allow", "allow", "block"]),
        "priority": rng.choice([0, 0, 0, 1, 2, 5]),
        "protocol": proto,
    }
    if proto in ("tcp", "udp"):
        rule["ports"] = "all" if rng.random() < 0.2 else rng.sample(PORT_CHOICES, rng.randint(1, 3))
    elif proto == "icmp":
        rule["types"] = "all" if rng.random() < 0.2 else rng.sample(TYPES4, rng.randint(1, 3))
    elif proto == "icmp6":
        rule["types"] = "all" if rng.random() < 0.2 else rng.sample(TYPES6, rng.randint(1, 3))
    if rng.random() < 0.3:
        rule["peers"] = "any"
    else:
        fams = {"icmp": [4], "icmp6": [6]}.get(proto, [4, 6])
        pool = []
        for f in fams:
            pool += PEERS4 if f == 4 else PEERS6
            pool += [vnic_ip(i, f) for i in range(vnics) if i != n]
        rule["peers"] = sorted(set(rng.sample(pool, rng.randint(1, 3))))
    return rule


def random_policy(rng: random.Random, vnics: int, macs: list[str], generation: int) -> Policy:
    doc: dict[str, Any] = {
        "version": 1,
        "cn_uuid": "cn-test",
        "generation": generation,
        "vnics": {},
    }
    firewalled = [i for i in range(vnics) if rng.random() < 0.8] or [0]
    uid = generation * 1000
    for i in firewalled:
        rules = []
        for _ in range(rng.randint(2, 8)):
            uid += 1
            rules.append(random_rule(rng, i, uid, vnics))
        doc["vnics"][macs[i]] = {
            "ips": [vnic_ip(i, 4), vnic_ip(i, 6)],
            "vnet_id": 1,
            "rules": rules,
        }
    return from_json(doc)


@dataclass
class Flow:
    """One datagram between two endpoints and what is needed to build its reply."""

    src_port: str  # lab port the datagram enters from ("up0" or "vN")
    dst_port: str
    src_mac: str
    dst_mac: str
    family: int
    proto: str
    src: str
    dst: str
    sport: int
    dport: int
    icmp: tuple[int, int] = (0, 0)
    frag: bool = False
    tag: int = 0
    frames: list[bytes] = field(default_factory=list)

    def describe(self) -> str:
        key = f"{self.sport}->{self.dport}" if self.proto in ("tcp", "udp") else f"{self.icmp}"
        frag = " fragmented" if self.frag else ""
        return (
            f"{self.proto} v{self.family} {self.src} ({self.src_port}) -> {self.dst} "
            f"({self.dst_port}) {key}{frag} tag {self.tag}"
        )


def _build(f: Flow, *, reply: bool = False) -> list[bytes]:
    l3: Any
    if f.family == 4:
        l3 = IP(src=f.src, dst=f.dst, id=f.tag, ttl=64)
    else:
        l3 = IPv6(src=f.src, dst=f.dst, fl=f.tag, hlim=64)
    payload = Raw(b"K" * (1200 if f.frag else 24))
    l4: Any
    if f.proto == "tcp":
        l4 = TCP(
            sport=f.sport,
            dport=f.dport,
            flags="SA" if reply else "S",
            seq=5000 if reply else 1000,
            ack=1001 if reply else 0,
        )
        payload = Raw(b"K" * 1200) if f.frag else None
    elif f.proto == "udp":
        l4 = UDP(sport=f.sport, dport=f.dport)
    elif f.proto == "icmp":
        t, c = f.icmp
        if t in (0, 8):
            l4 = ICMP(type=t, code=c, id=f.sport, seq=1)
        else:
            l4 = ICMP(type=t, code=c) / IP(src=f.dst, dst=f.src) / UDP(sport=53, dport=9999)
    elif f.proto == "icmp6":
        t, c = f.icmp
        if t == 128:
            l4 = ICMPv6EchoRequest(id=f.sport, seq=1)
        elif t == 129:
            l4 = ICMPv6EchoReply(id=f.sport, seq=1)
        elif t == 135:
            l4 = ICMPv6ND_NS(tgt=f.dst)
            l3.hlim = 255 if f.sport % 2 else 64
        else:
            l4 = ICMPv6DestUnreach(code=c) / IPv6(src=f.dst, dst=f.src) / UDP(sport=53, dport=9)
    else:
        if f.family == 4:
            l3.proto = 51 if f.proto == "ah" else 50
        else:
            l3.nh = 51 if f.proto == "ah" else 50
        # AH (transport mode over UDP: IPv6 conntrack tracks what AH carries): next header
        # 17, length 4 (24 bytes), spi, seq, 12 bytes ICV, then a UDP header. ESP: spi, seq.
        if f.proto == "ah":
            ip: Any = IP if f.family == 4 else IPv6
            ref = ip(bytes(ip(src=f.src, dst=f.dst) / UDP(sport=f.sport, dport=f.dport)))
            l4 = Raw(bytes([17, 4, 0, 0]) + bytes(4) + bytes(16)) / UDP(
                sport=f.sport, dport=f.dport, chksum=ref[UDP].chksum
            )
            payload = None
        else:
            l4 = Raw(f.sport.to_bytes(4, "big") + bytes(4))
    pkt = l3 / l4 if payload is None else l3 / l4 / payload
    eth = Ether(src=f.src_mac, dst=f.dst_mac)
    if not f.frag:
        return [bytes(eth / pkt)]
    if f.family == 4:
        return [bytes(eth / p) for p in fragment(IP(bytes(pkt)), fragsize=512)]
    whole = l3.copy() / IPv6ExtHdrFragment(id=f.tag) / (l4 if payload is None else l4 / payload)
    return [bytes(eth / p) for p in fragment6(IPv6(bytes(whole)), 600)]


def new_frames(f: Flow) -> list[bytes]:
    return _build(f)


def reply_flow(f: Flow, tag: int) -> Flow | None:
    """The answer to ``f`` (SYN-ACK, UDP back, echo reply, ah/esp back); None if none."""
    if f.proto in ("icmp", "icmp6") and f.icmp[0] not in (8, 128):
        return None
    icmp = (0, 0) if f.proto == "icmp" else (129, 0) if f.proto == "icmp6" else f.icmp
    return Flow(
        f.dst_port,
        f.src_port,
        f.dst_mac,
        f.src_mac,
        f.family,
        f.proto,
        f.dst,
        f.src,
        f.dport if f.proto in ("tcp", "udp", "ah") else f.sport,
        f.sport if f.proto in ("tcp", "udp", "ah") else f.dport,
        icmp,
        False,
        tag,
    )


def reply_frames(f: Flow) -> list[bytes]:
    return _build(f, reply=True)


def random_flow(rng: random.Random, vnics: int, macs: list[str], tag: int, sport: int) -> Flow:
    local = rng.random() < 0.2 and vnics > 1
    proto = rng.choice(["tcp", "tcp", "udp", "udp", "icmp", "icmp6", "ah", "esp"])
    if local and proto in ("ah", "esp"):
        proto = "udp"
    family = 4 if proto == "icmp" else 6 if proto == "icmp6" else rng.choice([4, 6])
    a = rng.randrange(vnics)
    if local:
        b = rng.choice([i for i in range(vnics) if i != a])
        ends = [(f"v{a}", macs[a], vnic_ip(a, family)), (f"v{b}", macs[b], vnic_ip(b, family))]
    else:
        remote = rng.choice(REMOTE4 if family == 4 else REMOTE6)
        if proto == "ah" and family == 6:
            # IPv6 conntrack looks through AH to the transport it carries, so its state is
            # per carried flow, where the engine's is per address pair: a peer of its own
            # keeps this flow's state from answering for another one (kernel package doc).
            remote = f"fd08:1::1:{tag:x}"
        ends = [("up0", UPLINK_MAC, remote), (f"v{a}", macs[a], vnic_ip(a, family))]
        if rng.random() < 0.5:
            ends.reverse()
    (sp, smac, sip), (dp, dmac, dip) = ends
    icmp = (0, 0)
    if proto == "icmp":
        icmp = rng.choice([(8, 0), (8, 0), (3, 1), (3, 3), (11, 0), (0, 0)])
    elif proto == "icmp6":
        icmp = rng.choice([(128, 0), (128, 0), (1, 4), (3, 0), (129, 0), (135, 0)])
    frag = (
        proto in ("tcp", "udp", "esp")
        and rng.random() < 0.15
        or (proto in ("icmp", "icmp6") and icmp[0] in (8, 128) and rng.random() < 0.15)
    )
    dport = rng.choice([*PORTS, rng.randint(1, 65535), 8000, 8100, 2000])
    return Flow(sp, dp, smac, dmac, family, proto, sip, dip, sport, dport, icmp, frag, tag)
