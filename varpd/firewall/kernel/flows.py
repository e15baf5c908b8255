"""Cut the kernel's tracked flows that a new policy no longer allows (the engine's ``retain``).

After a transaction changes the rules of some VNICs, the Python engine drops every tracked
flow whose first packet the new rules would refuse (``VnicFirewall.install``). The kernel
counterpart: dump conntrack (netlink, ``pyroute2.Conntrack``), attribute each entry to the
changed VNICs by address (the original direction's destination is a VNIC address: the flow
came in to it; its source is one: the flow went out from it; both, for two local VNICs), judge
that first packet with the engine's own compiled rules (``varpd.firewall.engine.compile_rules``,
so both engines share one notion of "allowed"), and delete the entries refused.

What an entry's first packet is: (direction, family, protocol, remote address, key) with key
the destination port (tcp/udp), ``type << 8 | code`` (ICMP echo requests only: the only ICMP
flows that give state), or 0 (ah/esp). Other entries are left alone: the filter does not
consult them. VNIC addresses come from the policy's ``ips``; a VNIC without addresses cannot
have its flows attributed (documented limitation: portolan always sends them).

Runs in a worker thread (blocking netlink), inside the applier's namespace if it has one.
Errors are returned as text, never raised: a failed cut leaves flows that the next change
judges again; it never undoes the transaction.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from ipaddress import ip_address
from typing import Any

from protocol.fwpolicy import VnicPolicy
from varpd.firewall.engine import IN, OUT, CompiledRules, compile_rules

from .nftables import in_netns

PROTO_TCP, PROTO_UDP, PROTO_ICMP, PROTO_ICMP6, PROTO_ESP, PROTO_AH = 6, 17, 1, 58, 50, 51


class FlowJudge:
    """The changed VNICs' compiled rules, indexed by their addresses."""

    def __init__(self, vnics: Mapping[str, VnicPolicy]) -> None:
        self.by_addr: dict[bytes, list[CompiledRules]] = {}
        for vp in vnics.values():
            compiled = compile_rules(vp.rules)
            for ip in vp.ips:
                self.by_addr.setdefault(ip_address(ip).packed, []).append(compiled)

    def __bool__(self) -> bool:
        return bool(self.by_addr)

    def keep(self, family: int, proto: int, src: bytes, dst: bytes, key: int) -> bool:
        """False when a VNIC the flow belongs to would refuse its first packet now."""
        for compiled in self.by_addr.get(dst, ()):
            if compiled.decide(IN, family, proto, int.from_bytes(src, "big"), key) is not True:
                return False
        for compiled in self.by_addr.get(src, ()):
            verdict = compiled.decide(OUT, family, proto, int.from_bytes(dst, "big"), key)
            if verdict is None:
                verdict = proto not in (PROTO_AH, PROTO_ESP)
            if not verdict:
                return False
        return True


def _first_packet(entry: Any) -> tuple[int, int, bytes, bytes, int] | None:
    t = entry.tuple_orig
    family = 4 if t.family == socket.AF_INET else 6
    proto = t.proto
    if proto in (PROTO_TCP, PROTO_UDP):
        key = t.dport or 0
    elif proto in (PROTO_ICMP, PROTO_ICMP6):
        if t.icmp_type not in (8, 128):
            return None
        key = t.icmp_type << 8 | (t.icmp_code or 0)
    elif proto in (PROTO_AH, PROTO_ESP):
        key = 0
    else:
        return None
    try:
        src = ip_address(t.saddr).packed
        dst = ip_address(t.daddr).packed
    except ValueError:
        return None
    return family, proto, src, dst, key


def cut_flows(judge: FlowJudge, netns: str | None = None) -> tuple[int, str | None]:
    """Delete the conntrack entries ``judge`` refuses; (number deleted, error or None)."""
    if not judge:
        return 0, None
    deleted = 0
    try:
        from pyroute2 import Conntrack

        # pyroute2 opens its socket on first use: all of it runs inside the namespace
        from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

        # One socket per address family (a dump covers its socket's family); the kernel
        # filters each dump to the entries whose source or destination is a changed VNIC's
        # address, so the cost follows those VNICs' flows, not the whole table.
        with in_netns(netns):
            for family, size in ((socket.AF_INET, 4), (socket.AF_INET6, 16)):
                addrs = [a for a in judge.by_addr if len(a) == size]
                if not addrs:
                    continue
                ct = Conntrack(nfgen_family=family)
                try:
                    seen: set[Any] = set()
                    for addr in addrs:
                        text = str(ip_address(addr))
                        for filt in (
                            NFCTAttrTuple(family=family, saddr=text),
                            NFCTAttrTuple(family=family, daddr=text),
                        ):
                            for entry in list(ct.dump_entries(tuple_orig=filt)):
                                first = _first_packet(entry)
                                key = repr(entry.tuple_orig)
                                if first is None or key in seen or judge.keep(*first):
                                    continue
                                seen.add(key)
                                try:
                                    ct.delete(entry)
                                    deleted += 1
                                except Exception:  # noqa: BLE001 - gone meanwhile
                                    pass
                finally:
                    ct.close()
    except Exception as exc:  # noqa: BLE001 - reported, never fatal
        return deleted, f"{type(exc).__name__}: {exc}"
    return deleted, None
