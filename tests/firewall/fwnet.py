"""Helpers for the firewall tests: hand-compiled rules (as portolan would emit them), frames."""

from __future__ import annotations

from typing import Any

from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from scapy.packet import Packet, Raw

from protocol.fwpolicy import PolicyRule, rule_from_json
from varpd.firewall import VnicFirewall

IN = 1
OUT = 2
MAC = "02:00:00:00:00:01"
GUEST_MAC = "02:00:00:00:00:01"
OTHER_MAC = "02:00:00:00:00:99"
ME4 = "10.0.0.1"
ME6 = "fd00::1"

_counter = 0


def rule(
    direction: str,
    action: str,
    protocol: str,
    *,
    ports: Any = None,
    types: Any = None,
    peers: Any = "any",
    priority: int = 0,
    uuid: str | None = None,
) -> PolicyRule:
    """One effective rule in the policy's JSON shape (validated by fwpolicy)."""
    global _counter
    _counter += 1
    doc: dict[str, Any] = {
        "uuid": uuid or f"00000000-0000-4000-8000-{_counter:012d}",
        "direction": direction,
        "action": action,
        "priority": priority,
        "protocol": protocol,
        "peers": peers,
    }
    if protocol in ("tcp", "udp"):
        doc["ports"] = (
            "all" if ports is None else [[p, p] if isinstance(p, int) else list(p) for p in ports]
        )
    if protocol in ("icmp", "icmp6"):
        doc["types"] = "all" if types is None else [list(t) for t in types]
    return rule_from_json(doc)


class Clock:
    """A settable monotonic clock for conntrack timeouts."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def firewall(*rules: PolicyRule, clock: Clock | None = None, **kw: Any) -> VnicFirewall:
    return VnicFirewall(MAC, [ME4, ME6], rules, clock=clock or Clock(), **kw)


def _ip(src: str, dst: str) -> Packet:
    return IPv6(src=src, dst=dst) if ":" in src else IP(src=src, dst=dst)


def eth(payload: Packet, *, to_guest: bool = True) -> bytes:
    src, dst = (OTHER_MAC, GUEST_MAC) if to_guest else (GUEST_MAC, OTHER_MAC)
    return bytes(Ether(src=src, dst=dst) / payload)


def tcp_in(
    remote: str, dport: int, *, sport: int = 40000, flags: str = "S", me: str | None = None
) -> bytes:
    me = me or (ME6 if ":" in remote else ME4)
    return eth(_ip(remote, me) / TCP(sport=sport, dport=dport, flags=flags))


def tcp_out(
    remote: str, dport: int, *, sport: int = 40000, flags: str = "S", me: str | None = None
) -> bytes:
    me = me or (ME6 if ":" in remote else ME4)
    return eth(_ip(me, remote) / TCP(sport=sport, dport=dport, flags=flags), to_guest=False)


def udp_in(remote: str, dport: int, *, sport: int = 40000, me: str | None = None) -> bytes:
    me = me or (ME6 if ":" in remote else ME4)
    return eth(_ip(remote, me) / UDP(sport=sport, dport=dport) / Raw(b"q"))


def udp_out(remote: str, dport: int, *, sport: int = 40000, me: str | None = None) -> bytes:
    me = me or (ME6 if ":" in remote else ME4)
    return eth(_ip(me, remote) / UDP(sport=sport, dport=dport) / Raw(b"q"), to_guest=False)


def icmp_in(remote: str, type: int = 8, code: int = 0, *, id: int = 7, me: str = ME4) -> bytes:
    return eth(IP(src=remote, dst=me) / ICMP(type=type, code=code, id=id))


def icmp_out(remote: str, type: int = 8, code: int = 0, *, id: int = 7, me: str = ME4) -> bytes:
    return eth(IP(src=me, dst=remote) / ICMP(type=type, code=code, id=id), to_guest=False)


def icmp6_in(
    remote: str, type: int = 128, code: int = 0, *, id: int = 7, hlim: int = 64, me: str = ME6
) -> bytes:
    from scapy.layers.inet6 import ICMPv6Unknown

    payload = (id).to_bytes(2, "big") + b"\x00\x01"
    return eth(
        IPv6(src=remote, dst=me, hlim=hlim) / ICMPv6Unknown(type=type, code=code, msgbody=payload)
    )


def icmp6_out(
    remote: str, type: int = 128, code: int = 0, *, id: int = 7, hlim: int = 64, me: str = ME6
) -> bytes:
    from scapy.layers.inet6 import ICMPv6Unknown

    payload = (id).to_bytes(2, "big") + b"\x00\x01"
    return eth(
        IPv6(src=me, dst=remote, hlim=hlim) / ICMPv6Unknown(type=type, code=code, msgbody=payload),
        to_guest=False,
    )


def proto_in(remote: str, proto: int, me: str | None = None) -> bytes:
    me = me or (ME6 if ":" in remote else ME4)
    ip = (
        IPv6(src=remote, dst=me, nh=proto) if ":" in remote else IP(src=remote, dst=me, proto=proto)
    )
    return eth(ip / Raw(b"\x00" * 16))


def proto_out(remote: str, proto: int, me: str | None = None) -> bytes:
    me = me or (ME6 if ":" in remote else ME4)
    ip = (
        IPv6(src=me, dst=remote, nh=proto) if ":" in remote else IP(src=me, dst=remote, proto=proto)
    )
    return eth(ip / Raw(b"\x00" * 16), to_guest=False)
