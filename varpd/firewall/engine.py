"""Per-VNIC compiled firewall (``VnicFirewall``) and the table of all of them (``FirewallTable``).

See the package docstring for the semantics; this module is the mechanics.

Compilation (``compile_rules``)
-------------------------------
Rules are grouped by ``(direction, protocol number)``. Within a group every rule covers one or
more *key ranges*: the destination port for tcp/udp (``all`` = 0..65535), ``type << 8 | code``
for icmp/icmp6 (a type without a code covers the 256 codes of that type; ``all`` covers
everything), 0..65535 for ah/esp (whose key is always 0). The ranges' boundaries cut the key
space into elementary segments; each segment keeps the rules that cover it, **merged by rank**:

    rank = 2 * priority + (1 if the action is the one *against* the default else 0)

(inbound: ALLOW is against the default; outbound: BLOCK). A higher rank wins, and every rule
of one rank has the same action, so a segment is a short tuple of *levels*, highest rank first,
each ``(allow, any_peer, v4_prefixes, v6_prefixes)`` where the prefixes of all the level's rules
are merged into one set per prefix length: ``((shift, frozenset(address >> shift)), ...)``.

Per packet: one dict lookup for the group, one ``bisect`` for the segment, then the levels in
order until one contains the remote address (one set lookup per distinct prefix length). The
cost depends on the number of distinct ranks and prefix lengths that apply to that port, never
on how many rules exist for other VNICs, other protocols or other ports. Identical segments
share one levels tuple.

Check order (``VnicFirewall.check``)
------------------------------------
1. non-IP frames pass; IP frames too short to classify are dropped;
2. non-first fragments (IPv4, and IPv6 with a fragment header: `_ipv6_fragment`) follow
   their first fragment (pass iff it passed, within 30 s);
3. conntrack (one dict lookup): a packet of a tracked flow passes and refreshes the flow;
   an ICMP error whose quoted header belongs to a tracked flow passes;
4. exemptions: NDP (ICMPv6 133..137 with hop limit 255) both ways; DHCP replies inbound
   while the VNIC's own DHCP request is recent;
5. rules, then the default (in: drop; out: pass);
6. a passing TCP/UDP packet, ICMP echo request, or AH/ESP packet passed by an ALLOW rule
   creates a flow; a passing first fragment is remembered.
"""

from __future__ import annotations

import time
from bisect import bisect_left, bisect_right
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from protocol.addr import format_mac, parse_mac
from protocol.fwpolicy import Policy, PolicyRule, VnicPolicy

from .conntrack import DEFAULT_MAX_FLOWS, Conntrack, FirstPacket, Flow, FlowKey, Timeouts
from .packet import (
    FRAG_FIRST,
    FRAG_LATER,
    ICMP4_ECHO_REPLY,
    ICMP4_ECHO_REQUEST,
    ICMP6_ECHO_REPLY,
    ICMP6_ECHO_REQUEST,
    NOT_IP,
    PROTO_AH,
    PROTO_ESP,
    PROTO_ICMP,
    PROTO_ICMP6,
    PROTO_TCP,
    PROTO_UDP,
    Packet,
    parse_frame,
)

IN = 1  # == varpd.shim.Direction.IN: towards the guest
OUT = 2  # == varpd.shim.Direction.OUT: from the guest

KEY_MAX = 0xFFFF
PROTO_FRAGMENT6 = 44  # IPv6 fragment header
NDP_TYPES = frozenset(range(133, 138))  # RS, RA, NS, NA, Redirect
FRAGMENT_TABLE_SIZE = 4096
FRAGMENT_TIMEOUT = 30.0

COUNTERS = (
    "pass_state",  # packet of a tracked flow
    "pass_related",  # ICMP error quoting a tracked flow
    "pass_rule",  # an ALLOW rule decided
    "pass_default",  # no rule matched, outbound
    "pass_ndp",  # neighbour discovery exemption
    "pass_dhcp",  # DHCP reply to the VNIC's own request
    "pass_fragment",  # later fragment of a datagram whose first fragment passed
    "pass_not_ip",  # ARP and other non-IP frames (below the firewall)
    "drop_rule",  # a BLOCK rule decided
    "drop_default",  # no rule matched, inbound
    "drop_fragment",  # later fragment without a passed first fragment
    "drop_malformed",  # IP packet too short to classify
)

Level = tuple[
    bool, bool, tuple[tuple[int, frozenset[int]], ...], tuple[tuple[int, frozenset[int]], ...]
]
Levels = tuple[Level, ...]


# --------------------------------------------------------------------------- compilation


class RangeIndex:
    """Key (port or icmp type/code) -> levels, over elementary segments of 0..65535."""

    __slots__ = ("starts", "levels", "rules")

    def __init__(self, starts: list[int], levels: list[Levels], rules: int) -> None:
        self.starts = starts
        self.levels = levels
        self.rules = rules

    def lookup(self, key: int) -> Levels:
        return self.levels[bisect_right(self.starts, key) - 1]


class CompiledRules:
    """The rules of one VNIC, indexed by ``direction << 8 | protocol``."""

    __slots__ = ("groups", "rules")

    def __init__(self, groups: dict[int, RangeIndex], rules: tuple[PolicyRule, ...]) -> None:
        self.groups = groups
        self.rules = rules

    def decide(self, direction: int, family: int, proto: int, remote: int, key: int) -> bool | None:
        """ALLOW (True) / BLOCK (False) of the best matching rule, None if none matches."""
        index = self.groups.get(direction << 8 | proto)
        if index is None:
            return None
        return _first_match(index.levels[bisect_right(index.starts, key) - 1], family, remote)


def _first_match(levels: Levels, family: int, remote: int) -> bool | None:
    for allow, any_peer, v4, v6 in levels:
        if any_peer:
            return allow
        for shift, nets in v4 if family == 4 else v6:
            if remote >> shift in nets:
                return allow
    return None


def _key_ranges(rule: PolicyRule) -> list[tuple[int, int]]:
    if rule.ports is not None:
        return [(0, KEY_MAX)] if rule.ports == "all" else list(rule.ports)
    if rule.types is not None:
        if rule.types == "all":
            return [(0, KEY_MAX)]
        return [
            (t << 8, t << 8 | 0xFF) if code is None else (t << 8 | code, t << 8 | code)
            for t, code in rule.types
        ]
    return [(0, KEY_MAX)]


def _rank(rule: PolicyRule) -> int:
    against_default = rule.action == ("allow" if rule.direction == "in" else "block")
    return 2 * rule.priority + (1 if against_default else 0)


def _merge_levels(rules: list[PolicyRule]) -> Levels:
    by_rank: dict[int, list[PolicyRule]] = {}
    for r in rules:
        by_rank.setdefault(_rank(r), []).append(r)
    levels: list[Level] = []
    for rank in sorted(by_rank, reverse=True):
        group = by_rank[rank]
        allow = group[0].action == "allow"
        any_peer = False
        v4: dict[int, set[int]] = {}
        v6: dict[int, set[int]] = {}
        for r in group:
            if r.peers == "any":
                any_peer = True
                break
            for net in r.peers:
                bits = 32 if net.version == 4 else 128
                shift = bits - net.prefixlen
                (v4 if net.version == 4 else v6).setdefault(shift, set()).add(
                    int(net.network_address) >> shift
                )
        if any_peer:
            levels.append((allow, True, (), ()))
        else:
            levels.append(
                (
                    allow,
                    False,
                    tuple((s, frozenset(n)) for s, n in sorted(v4.items())),
                    tuple((s, frozenset(n)) for s, n in sorted(v6.items())),
                )
            )
    return tuple(levels)


def _build_index(rules: list[PolicyRule]) -> RangeIndex:
    spans = [(lo, hi, r) for r in rules for lo, hi in _key_ranges(r)]
    bounds = sorted(
        {0} | {lo for lo, _, _ in spans} | {hi + 1 for _, hi, _ in spans if hi < KEY_MAX}
    )
    covering: list[list[int]] = [[] for _ in bounds]
    for i, (lo, hi, _) in enumerate(spans):
        for seg in range(bisect_left(bounds, lo), bisect_right(bounds, hi)):
            covering[seg].append(i)
    starts: list[int] = []
    levels: list[Levels] = []
    shared: dict[frozenset[int], Levels] = {}
    for start, span_ids in zip(bounds, covering, strict=True):
        rule_ids = frozenset(id(spans[i][2]) for i in span_ids)
        lv = shared.get(rule_ids)
        if lv is None:
            unique = {id(spans[i][2]): spans[i][2] for i in span_ids}
            lv = shared[rule_ids] = _merge_levels(list(unique.values()))
        if levels and levels[-1] is lv:
            continue  # same as the previous segment: extend it
        starts.append(start)
        levels.append(lv)
    return RangeIndex(starts, levels, len(rules))


def compile_rules(rules: Iterable[PolicyRule]) -> CompiledRules:
    """Index one VNIC's effective rules (pure; see the module docstring)."""
    rules = tuple(rules)
    grouped: dict[int, list[PolicyRule]] = {}
    for r in rules:
        direction = IN if r.direction == "in" else OUT
        grouped.setdefault(direction << 8 | r.protocol_number, []).append(r)
    return CompiledRules({k: _build_index(v) for k, v in grouped.items()}, rules)


# --------------------------------------------------------------------------- one VNIC


def _ipv6_fragment(frame: bytes, pkt: Packet) -> Packet | None:
    """An IPv6 packet whose first header is a fragment header, read as its datagram's piece.

    The first fragment (offset 0) is parsed as if the fragment header were absent (so its
    ports and ICMP type are seen, as the kernel sees them after reassembly) and marked
    ``FRAG_FIRST``; a later one is ``FRAG_LATER`` with the header's next-header value as its
    protocol. ``ip_id`` is the 32-bit fragment identification. None: too short to read.
    """
    off = 18 if frame[12:14] == b"\x81\x00" else 14
    fh = off + 40
    if len(frame) < fh + 8:
        return None
    nexthdr = frame[fh]
    fragword = (frame[fh + 2] << 8) | frame[fh + 3]
    ident = int.from_bytes(frame[fh + 4 : fh + 8], "big")
    if fragword >> 3:
        return Packet(6, nexthdr, pkt.src, pkt.dst, pkt.hop_limit, FRAG_LATER, ident)
    payload = max(((frame[off + 4] << 8) | frame[off + 5]) - 8, 0)
    inner = (
        frame[: off + 4]
        + payload.to_bytes(2, "big")
        + bytes([nexthdr])
        + frame[off + 7 : fh]
        + frame[fh + 8 :]
    )
    first: Any = parse_frame(inner)
    if first.__class__ is not Packet:
        return None
    if fragword & 1:
        first.frag = FRAG_FIRST
        first.ip_id = ident
    return first


# --------------------------------------------------------------------------- one VNIC


def _mac_bytes(mac: bytes | str) -> bytes:
    return mac if isinstance(mac, bytes) else parse_mac(mac)


class VnicFirewall:
    """The firewall of one VNIC: compiled rules + connection state; the shim's ``Vnic.filter``.

    ``check(frame, direction)`` -> True to pass. ``install`` swaps in new rules (one attribute
    assignment) and drops tracked flows the new rules would not allow.
    """

    def __init__(
        self,
        mac: bytes | str,
        ips: Iterable[str] = (),
        rules: Iterable[PolicyRule] | CompiledRules = (),
        *,
        clock: Callable[[], float] = time.monotonic,
        max_flows: int = DEFAULT_MAX_FLOWS,
        timeouts: Timeouts | None = None,
    ) -> None:
        self.mac = _mac_bytes(mac)
        self.ips: tuple[str, ...] = tuple(ips)
        self.clock = clock
        self.conntrack = Conntrack(max_flows, timeouts, clock)
        self.counters: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self._rules = rules if isinstance(rules, CompiledRules) else compile_rules(rules)
        self._fragments: OrderedDict[tuple[bytes, bytes, int, int], float] = OrderedDict()
        self._dhcp_until = -1.0
        self.policy: VnicPolicy | None = None

    def __repr__(self) -> str:
        return (
            f"<VnicFirewall {format_mac(self.mac)} rules {len(self._rules.rules)} "
            f"flows {len(self.conntrack)}>"
        )

    @property
    def rules(self) -> tuple[PolicyRule, ...]:
        return self._rules.rules

    @property
    def compiled(self) -> CompiledRules:
        """The rules as compiled for matching (what `check` consults)."""
        return self._rules

    # ------------------------------------------------------------------ policy changes

    def install(
        self, rules: Iterable[PolicyRule] | CompiledRules, ips: Iterable[str] | None = None
    ) -> int:
        """Replace the rules; drop flows (and remembered fragments) they no longer allow.

        Returns the number of flows dropped.
        """
        compiled = rules if isinstance(rules, CompiledRules) else compile_rules(rules)
        self._rules = compiled
        if ips is not None:
            self.ips = tuple(ips)
        self._fragments.clear()

        def allowed(_key: FlowKey, flow: Flow) -> bool:
            direction, family, proto, remote, match_key = flow.first
            verdict = compiled.decide(direction, family, proto, remote, match_key)
            if verdict is None:
                return direction == OUT and proto not in (PROTO_AH, PROTO_ESP)
            return verdict

        return self.conntrack.retain(allowed)

    def decide(self, direction: int, family: int, proto: int, remote: int, key: int) -> bool:
        """The rules' verdict (default included) for a new flow; no state is consulted."""
        verdict = self._rules.decide(direction, family, proto, remote, key)
        return direction == OUT if verdict is None else verdict

    # ------------------------------------------------------------------ the data path

    def check(self, frame: bytes, direction: int) -> bool:
        pkt: Any = parse_frame(frame)
        counters = self.counters
        if pkt.__class__ is not Packet:
            if pkt == NOT_IP:
                counters["pass_not_ip"] += 1
                return True
            counters["drop_malformed"] += 1
            return False
        if pkt.proto == PROTO_FRAGMENT6 and pkt.family == 6:
            pkt = _ipv6_fragment(frame, pkt)
            if pkt is None:
                counters["drop_malformed"] += 1
                return False
        now = self.clock()
        proto = pkt.proto
        family = pkt.family
        if direction == IN:
            local = pkt.dst
            remote = pkt.src
            lport = pkt.dport
            rport = pkt.sport
        else:
            local = pkt.src
            remote = pkt.dst
            lport = pkt.sport
            rport = pkt.dport

        frag = pkt.frag
        if frag == FRAG_LATER:
            fkey = (pkt.src, pkt.dst, proto, pkt.ip_id)
            expires = self._fragments.get(fkey)
            if expires is not None and expires > now:
                counters["pass_fragment"] += 1
                return True
            counters["drop_fragment"] += 1
            return False

        conntrack = self.conntrack
        flow_key: FlowKey | None = None
        if proto in (PROTO_TCP, PROTO_UDP):
            flow_key = (proto, local, remote, lport, rport)
            flow = conntrack.lookup(flow_key, now)
            if flow is not None:
                conntrack.update(flow, proto, direction, pkt.flags, now)
                counters["pass_state"] += 1
                if frag == FRAG_FIRST:
                    self._remember_fragment(pkt, now)
                return True
            if (
                proto == PROTO_UDP
                and (
                    (family == 4 and pkt.sport == 67 and pkt.dport == 68)
                    or (family == 6 and pkt.sport == 547 and pkt.dport == 546)
                )
                and direction == IN
                and self._dhcp_until > now
            ):
                counters["pass_dhcp"] += 1
                if frag == FRAG_FIRST:
                    self._remember_fragment(pkt, now)
                return True
            match_key = pkt.dport
        elif proto == (PROTO_ICMP if family == 4 else PROTO_ICMP6):
            icmp_type = pkt.icmp_type
            if icmp_type in (
                ICMP4_ECHO_REQUEST,
                ICMP6_ECHO_REQUEST,
                ICMP4_ECHO_REPLY,
                ICMP6_ECHO_REPLY,
            ):
                ident = pkt.ident
                flow_key = (proto, local, remote, ident, ident)
                flow = conntrack.lookup(flow_key, now)
                if flow is not None:
                    request = icmp_type in (ICMP4_ECHO_REQUEST, ICMP6_ECHO_REQUEST)
                    if request == (direction == flow.origin):
                        conntrack.update(flow, proto, direction, 0, now)
                        counters["pass_state"] += 1
                        if frag == FRAG_FIRST:
                            self._remember_fragment(pkt, now)
                        return True
                if icmp_type not in (ICMP4_ECHO_REQUEST, ICMP6_ECHO_REQUEST):
                    flow_key = None  # replies never open a flow
            else:
                inner = pkt.inner
                if inner is not None:
                    # The quoted packet went the other way: key it from that direction.
                    p, s, d, sp, dp = inner
                    ikey = (p, d, s, dp, sp) if direction == OUT else (p, s, d, sp, dp)
                    if conntrack.lookup(ikey, now) is not None:
                        counters["pass_related"] += 1
                        if frag == FRAG_FIRST:
                            self._remember_fragment(pkt, now)
                        return True
                elif family == 6 and icmp_type in NDP_TYPES and pkt.hop_limit == 255:
                    counters["pass_ndp"] += 1
                    if frag == FRAG_FIRST:
                        self._remember_fragment(pkt, now)
                    return True
            match_key = icmp_type << 8 | pkt.icmp_code
        elif proto in (PROTO_AH, PROTO_ESP):
            flow_key = (proto, local, remote, 0, 0)
            flow = conntrack.lookup(flow_key, now)
            if flow is not None:
                conntrack.update(flow, proto, direction, 0, now)
                counters["pass_state"] += 1
                if frag == FRAG_FIRST:
                    self._remember_fragment(pkt, now)
                return True
            match_key = 0
        else:
            proto = -1  # no rule can name it: the default decides
            match_key = 0

        remote_int = int.from_bytes(remote, "big")
        index = self._rules.groups.get(direction << 8 | proto)
        verdict = (
            None
            if index is None
            else _first_match(
                index.levels[bisect_right(index.starts, match_key) - 1], family, remote_int
            )
        )
        if verdict is None:
            if direction == IN:
                counters["drop_default"] += 1
                return False
            counters["pass_default"] += 1
            if proto in (PROTO_AH, PROTO_ESP):
                flow_key = None  # the default outbound pass does not track these
        elif verdict:
            counters["pass_rule"] += 1
        else:
            counters["drop_rule"] += 1
            return False

        if flow_key is not None:
            first: FirstPacket = (direction, family, proto, remote_int, match_key)
            conntrack.create(flow_key, direction, first, pkt.flags, now)
            if (
                proto == PROTO_UDP
                and direction == OUT
                and (
                    (family == 4 and lport == 68 and rport == 67)
                    or (family == 6 and lport == 546 and rport == 547)
                )
            ):
                self._dhcp_until = now + conntrack.timeouts.udp
        if frag == FRAG_FIRST:
            self._remember_fragment(pkt, now)
        return True

    def _remember_fragment(self, pkt: Packet, now: float) -> None:
        table = self._fragments
        key = (pkt.src, pkt.dst, pkt.proto, pkt.ip_id)
        if key in table:
            del table[key]
        elif len(table) >= FRAGMENT_TABLE_SIZE:
            table.popitem(last=False)
        table[key] = now + FRAGMENT_TIMEOUT

    def metrics(self) -> dict[str, Any]:
        return {
            **self.counters,
            "flows": len(self.conntrack),
            "rules": len(self._rules.rules),
            **{f"conntrack_{k}": v for k, v in self.conntrack.counters.items()},
        }


# --------------------------------------------------------------------------- all VNICs


class FirewallTable:
    """Every VNIC firewall of one varpd, replaced as a whole when a new policy arrives.

    ``apply(policy)`` compiles every changed VNIC first (pure work, may be slow for a big
    policy) and then commits with plain assignments, none of which awaits: under trio no frame
    is filtered while a policy is half applied. A VNIC that stays in the policy keeps its
    ``VnicFirewall`` object and its flows (minus the ones the new rules refuse); a VNIC that
    leaves the policy stops being filtered and its state is forgotten.

    ``bind(vnic)`` ties a shim ``Vnic`` (anything with ``mac`` and ``filter``) to the table: its
    ``filter`` is set now and after every ``apply`` (None when its MAC is not in the policy, so
    an unfiltered VNIC pays nothing). ``unbind(vnic)`` clears it.
    """

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_flows: int = DEFAULT_MAX_FLOWS,
        timeouts: Timeouts | None = None,
    ) -> None:
        self.clock = clock
        self.max_flows = max_flows
        self.timeouts = timeouts
        self.policy: Policy | None = None
        self.firewalls: Mapping[bytes, VnicFirewall] = {}
        self.applied = 0
        self.flows_dropped = 0
        self._bound: dict[bytes, list[Any]] = {}

    @property
    def generation(self) -> int | None:
        return None if self.policy is None else self.policy.generation

    def get(self, mac: bytes | str) -> VnicFirewall | None:
        return self.firewalls.get(_mac_bytes(mac))

    def apply(self, policy: Policy) -> None:
        """Install ``policy`` (see the class docstring)."""
        old = self.firewalls
        staged: list[tuple[bytes, VnicPolicy, CompiledRules | None]] = []
        for vp in policy.vnics.values():
            mac = parse_mac(vp.mac)
            fw = old.get(mac)
            unchanged = fw is not None and fw.policy is not None and fw.policy.rules == vp.rules
            staged.append((mac, vp, None if unchanged else compile_rules(vp.rules)))
        # Commit: nothing below awaits or raises for a validated policy.
        new: dict[bytes, VnicFirewall] = {}
        for mac, vp, compiled in staged:
            fw = old.get(mac)
            if fw is None:
                assert compiled is not None
                fw = VnicFirewall(
                    mac,
                    vp.ips,
                    compiled,
                    clock=self.clock,
                    max_flows=self.max_flows,
                    timeouts=self.timeouts,
                )
            elif compiled is not None:
                self.flows_dropped += fw.install(compiled, vp.ips)
            else:
                fw.ips = vp.ips
            fw.policy = vp
            new[mac] = fw
        self.firewalls = new
        self.policy = policy
        self.applied += 1
        for mac, vnics in self._bound.items():
            fw = new.get(mac)
            for vnic in vnics:
                vnic.filter = fw

    def bind(self, vnic: Any) -> None:
        vnics = self._bound.setdefault(vnic.mac, [])
        if vnic not in vnics:
            vnics.append(vnic)
        vnic.filter = self.firewalls.get(vnic.mac)

    def unbind(self, vnic: Any) -> None:
        vnics = self._bound.get(vnic.mac, [])
        if vnic in vnics:
            vnics.remove(vnic)
            if not vnics:
                del self._bound[vnic.mac]
        vnic.filter = None

    def expire(self) -> int:
        """Sweep expired flows of every VNIC (call from a timer); returns how many went."""
        return sum(fw.conntrack.expire() for fw in self.firewalls.values())

    def metrics(self) -> dict[str, Any]:
        return {
            "generation": self.generation,
            "applied": self.applied,
            "vnics": len(self.firewalls),
            "flows_dropped_by_policy": self.flows_dropped,
            "per_vnic": {format_mac(mac): fw.metrics() for mac, fw in self.firewalls.items()},
        }
