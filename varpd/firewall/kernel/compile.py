"""Policy -> nftables objects (pure): what the kernel tables hold for a policy and a port map.

Nothing here does I/O. ``compile_policy(policy)`` turns every VNIC of a ``protocol.fwpolicy``
policy into a ``VnicObjects`` (its two chains' rules, its peer sets, its counters), and
``TableLayout`` writes the nftables JSON commands that build the tables from scratch
(``full``) or move them from one compiled state to the next (``diff``). The applier
(``applier.py``) sends one command list as one transaction.

Layout (``T`` is the table name, ``<m>`` ``v`` + a VNIC's MAC as 12 hex digits)::

    table bridge T                                   the filter (ports are known here)
      map out_ports  ifname : verdict                VNIC port -> jump out_<m>
      map in_ports   ifname : verdict                VNIC port -> jump in_<m>
      set dhcp       ifname, dynamic, timeout 60 s   ports with a recent DHCP request
      counter generation                             "packets" = policy generation
      chain forward  hook forward, priority -100, policy accept
        ether type != { ip, ip6 } accept             ARP and non-IP: never filtered
        meta mark & STATE == STATE  clear, accept    tracked flow (set by the inet glue)
        icmpv6 type 133..137 ip6 hoplimit 255 accept neighbour discovery
        iifname vmap @out_ports                      the sender's outbound chain (return = pass)
        udp 68->67 / 546->547: update @dhcp { iifname }
        udp 67->68 / 547->546, oifname @dhcp: accept DHCP answers to a recent request
        oifname vmap @in_ports                       the receiver's inbound chain
      chain out_<m>: rules by rank, each "counter; return|drop"; then "counter; return"
      chain in_<m>:  rules by rank, each "counter; accept|drop"; then "counter; drop"
      set <m>_<dir>_<rule>_<4|6>: the peers of one rule (interval set of prefixes)
      counter <m>_<in|out>_<pass|drop>_<rule|default>

    table inet T_ct                                  conntrack glue (never changes)
      chain pre  hook prerouting, priority -150 (after conntrack), bridged packets only:
        clear STATE|RULE; set STATE for: established tcp/udp, established icmp(v6) echo,
        established ah/esp whose ct mark has CT_RULE (by the first header: ``ip
        protocol``, ``ip6 nexthdr``, as the engine reads it), related
      chain post hook postrouting, priority 0 (before confirm):
        meta mark & RULE: ct mark |= CT_RULE, clear RULE

Why two tables: the filter must see bridge ports, which only the ``bridge`` family hooks do
(the ``inet`` hooks that ``br_netfilter`` runs for bridged packets see the bridge device as
both input and output). Connection state must come from conntrack, which the ``bridge``
family can only consult with ``CONFIG_NF_CONNTRACK_BRIDGE``; kernels built without it (ours)
refuse ``ct`` in a bridge table. So conntrack runs where ``br_netfilter`` puts it, in the
inet hooks of bridged traffic (which also reassemble fragments before anything judges them),
and the glue hands its verdict to the bridge chain in two bits of the packet mark. The glue
table is created once with the filter and never changes; every policy update touches the
bridge table only. The ``netdev`` family was not an option: it has no conntrack at all.

Rules: ``rank = 2 * priority + (1 if the action is against the default)``; rules are
emitted highest rank first, so the first match is the engine's winner (equal ranks share
one action). A rule becomes one nftables rule per address family it can match: ``ip
protocol``/``ip6 nexthdr`` (the first header, as the Python engine reads it), the remote
address against the rule's peer set (``saddr`` inbound, ``daddr`` outbound; absent for
``any``), then the key: ``th dport`` against an anonymous set of ports and ranges, ``icmp
type`` (codes: ``icmp type . icmp code`` pairs). An ALLOW of ah/esp also sets RULE so the
glue marks the flow as tracked by a rule (the engine tracks only those).

Peer sets are named after (VNIC, direction, rule uuid, family), so when a tag or vm target
gains or loses addresses only that set is flushed and refilled; the chains stay. Prefixes
are collapsed first (``ipaddress.collapse_addresses``) so the interval set never sees an
overlap. A rule whose peers collapse to a single address or prefix (``FROM ip``, ``FROM
subnet``, a tag with one member) matches it inline, without a set: the kernel finds a named
set by walking the table's list of sets, once per rule that refers to one and once per set
created, so a transaction with N named sets costs O(N^2) in the kernel (10,000 sets: about
7 s of system time; measured). A peer change of such a rule (a tag that gains its second
member) rewrites that VNIC's chain instead of a set, still in one transaction.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network, collapse_addresses
from typing import Any

from protocol.fwpolicy import Policy, PolicyRule, VnicPolicy

Json = dict[str, Any]

#: packet-mark bits the glue and the filter share (the rest of the mark is left alone)
MARK_STATE = 0x10000000  # this packet belongs to a flow the firewall tracks: pass
MARK_RULE = 0x20000000  # an ALLOW rule passed this ah/esp packet: track its flow
CT_MARK_RULE = 0x20000000  # ct mark: the flow was opened by an ah/esp ALLOW rule
MASK32 = 0xFFFFFFFF

DHCP_TIMEOUT = 60
NDP_TYPES = (133, 134, 135, 136, 137)
COUNTER_KINDS = {
    "in": ("pass_rule", "drop_rule", "drop_default"),
    "out": ("pass_rule", "drop_rule", "pass_default"),
}
PROTO = {"tcp": 6, "udp": 17, "icmp": 1, "icmp6": 58, "ah": 51, "esp": 50}


def vnic_id(mac: str) -> str:
    """``02:00:00:00:00:01`` -> ``v020000000001`` (chain, set and counter names use it; the
    leading letter keeps the names valid in nft's own syntax, so ``nft list`` output can be
    read back)."""
    return "v" + mac.replace(":", "").lower()


def counter_name(mac: str, direction: str, kind: str) -> str:
    return f"{vnic_id(mac)}_{direction}_{kind}"


def _rule_key(uuid: str) -> str:
    if re.fullmatch(r"[0-9A-Za-z-]{1,40}", uuid):
        return uuid.replace("-", "").lower()
    return hashlib.sha1(uuid.encode()).hexdigest()[:20]


# --------------------------------------------------------------------------- expressions


def _payload(protocol: str, fld: str) -> Json:
    return {"payload": {"protocol": protocol, "field": fld}}


def _meta(key: str) -> Json:
    return {"meta": {"key": key}}


def _match(left: Json, right: Any, op: str = "==") -> Json:
    return {"match": {"op": op, "left": left, "right": right}}


def _mark_has(bits: int) -> Json:
    return _match({"&": [_meta("mark"), bits]}, bits)


def _mark_set(bits: int) -> Json:
    return {"mangle": {"key": _meta("mark"), "value": {"|": [_meta("mark"), bits]}}}


def _mark_clear(bits: int) -> Json:
    return {"mangle": {"key": _meta("mark"), "value": {"&": [_meta("mark"), MASK32 & ~bits]}}}


def _one_or_set(items: list[Any]) -> Any:
    return items[0] if len(items) == 1 else {"set": items}


def _port_match(ports: Any) -> list[Json]:
    if ports == "all":
        return []
    items: list[Any] = [lo if lo == hi else {"range": [lo, hi]} for lo, hi in sorted(ports)]
    return [_match(_payload("th", "dport"), _one_or_set(items))]


def _icmp_matches(proto: str, types: Any) -> list[list[Json]]:
    """One match list per nftables rule: whole types in one, (type, code) pairs in another."""
    if types == "all":
        return [[]]
    whole = sorted({t for t, c in types if c is None})
    pairs = sorted({(t, c) for t, c in types if c is not None and t not in whole})
    out: list[list[Json]] = []
    if whole:
        out.append([_match(_payload(proto, "type"), _one_or_set(list(whole)))])
    if pairs:
        if len(pairs) == 1:
            t, c = pairs[0]
            out.append([_match(_payload(proto, "type"), t), _match(_payload(proto, "code"), c)])
        else:
            out.append(
                [
                    _match(
                        {"concat": [_payload(proto, "type"), _payload(proto, "code")]},
                        {"set": [{"concat": [t, c]} for t, c in pairs]},
                    )
                ]
            )
    return out


def _element(net: IPv4Network | IPv6Network) -> Any:
    if net.prefixlen == net.max_prefixlen:
        return str(net.network_address)
    return {"prefix": {"addr": str(net.network_address), "len": net.prefixlen}}


# --------------------------------------------------------------------------- one VNIC


@dataclass(frozen=True)
class PeerSet:
    name: str
    family: int  # 4 or 6
    elements: tuple[Any, ...]

    @property
    def type(self) -> str:
        return "ipv4_addr" if self.family == 4 else "ipv6_addr"


@dataclass
class VnicObjects:
    """What the bridge table holds for one firewalled VNIC (ports are not part of it)."""

    mac: str
    rules_in: list[list[Json]] = field(default_factory=list)
    rules_out: list[list[Json]] = field(default_factory=list)
    sets: dict[str, PeerSet] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return vnic_id(self.mac)

    @property
    def chain_in(self) -> str:
        return f"in_{self.id}"

    @property
    def chain_out(self) -> str:
        return f"out_{self.id}"

    def counters(self) -> list[str]:
        return [
            counter_name(self.mac, d, kind) for d, kinds in COUNTER_KINDS.items() for kind in kinds
        ]


def rank(rule: PolicyRule) -> int:
    """The engine's order: higher wins; at equal priority the action against the default."""
    against = rule.action == ("allow" if rule.direction == "in" else "block")
    return 2 * rule.priority + (1 if against else 0)


def compile_vnic(vp: VnicPolicy) -> VnicObjects:
    """The chains and peer sets of one VNIC (see the module docstring)."""
    obj = VnicObjects(vp.mac)
    names: set[str] = set()
    ordered = sorted(vp.rules, key=rank, reverse=True)  # stable: policy order within a rank
    for rule in ordered:
        direction = rule.direction
        remote = "saddr" if direction == "in" else "daddr"
        families = {"icmp": (4,), "icmp6": (6,)}.get(rule.protocol, (4, 6))
        base = f"{obj.id}_{direction}_{_rule_key(rule.uuid)}"
        while base in names:
            base += "x"
        names.add(base)
        if rule.protocol in ("tcp", "udp"):
            keys = [_port_match(rule.ports)]
        elif rule.protocol in ("icmp", "icmp6"):
            keys = _icmp_matches("icmp" if rule.protocol == "icmp" else "icmpv6", rule.types)
        else:
            keys = [[]]
        allow = rule.action == "allow"
        counter = counter_name(vp.mac, direction, ("pass" if allow else "drop") + "_rule")
        if allow:
            verdict: Json = {"accept": None} if direction == "in" else {"return": None}
        else:
            verdict = {"drop": None}
        tail: list[Json] = []
        if allow and rule.protocol in ("ah", "esp"):
            tail.append(_mark_set(MARK_RULE))
        tail += [{"counter": counter}, verdict]
        for family in families:
            l3 = "ip" if family == 4 else "ip6"
            proto_match = _match(
                _payload(l3, "protocol" if family == 4 else "nexthdr"), PROTO[rule.protocol]
            )
            peer: list[Json] = []
            if rule.peers != "any":
                nets = [n for n in rule.peers if n.version == family]
                if not nets:
                    continue
                elements = tuple(_element(n) for n in collapse_addresses(nets))  # type: ignore[arg-type]
                if len(elements) == 1:  # one address or prefix: inline (see the docstring)
                    peer = [_match(_payload(l3, remote), elements[0])]
                else:
                    name = f"{base}_{family}"
                    obj.sets[name] = PeerSet(name, family, elements)
                    peer = [_match(_payload(l3, remote), f"@{name}")]
            for key in keys:
                expr = [proto_match, *peer, *key, *tail]
                (obj.rules_in if direction == "in" else obj.rules_out).append(expr)
    return obj


def compile_policy(policy: Policy) -> dict[str, VnicObjects]:
    """Every VNIC of the policy, keyed by canonical MAC text."""
    return {mac: compile_vnic(vp) for mac, vp in policy.vnics.items()}


# --------------------------------------------------------------------------- commands


class TableLayout:
    """Writes the JSON commands for table ``name`` (bridge) and ``name_ct`` (inet glue)."""

    def __init__(self, name: str = "portolan") -> None:
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]{0,40}", name):
            raise ValueError(f"bad nftables table name {name!r}")
        self.name = name
        self.ct_name = f"{name}_ct"

    # -- small builders
    def _obj(self, **kw: Any) -> Json:
        return {"family": "bridge", "table": self.name, **kw}

    def _rule(self, chain: str, expr: list[Json], family: str = "bridge") -> Json:
        table = self.name if family == "bridge" else self.ct_name
        return {"add": {"rule": {"family": family, "table": table, "chain": chain, "expr": expr}}}

    def generation(self, generation: int) -> list[Json]:
        """Replace the ``generation`` counter (its packet count is the policy generation)."""
        return [
            {"delete": {"counter": self._obj(name="generation")}},
            {
                "add": {
                    "counter": {**self._obj(name="generation"), "packets": generation, "bytes": 0}
                }
            },
        ]

    def skeleton(self) -> list[Json]:
        """Both tables, empty of VNICs (preceded by deleting whatever was there)."""
        b = {"family": "bridge", "name": self.name}
        i = {"family": "inet", "name": self.ct_name}
        cmds: list[Json] = [
            {"add": {"table": b}},
            {"delete": {"table": b}},
            {"add": {"table": i}},
            {"delete": {"table": i}},
            {"add": {"table": b}},
            {"add": {"table": i}},
            {"add": {"counter": {**self._obj(name="generation"), "packets": 0, "bytes": 0}}},
            {"add": {"map": {**self._obj(name="out_ports"), "type": "ifname", "map": "verdict"}}},
            {"add": {"map": {**self._obj(name="in_ports"), "type": "ifname", "map": "verdict"}}},
            {
                "add": {
                    "set": {
                        **self._obj(name="dhcp"),
                        "type": "ifname",
                        "flags": ["timeout"],
                        "timeout": DHCP_TIMEOUT,
                    }
                }
            },
            {
                "add": {
                    "chain": {
                        **self._obj(name="forward"),
                        "type": "filter",
                        "hook": "forward",
                        "prio": -100,
                        "policy": "accept",
                    }
                }
            },
        ]
        fwd = "forward"
        ether_type = _payload("ether", "type")
        cmds += [
            self._rule(fwd, [_match(ether_type, {"set": ["ip", "ip6"]}, "!="), {"accept": None}]),
            self._rule(fwd, [_mark_has(MARK_STATE), _mark_clear(MARK_STATE), {"accept": None}]),
            self._rule(
                fwd,
                [
                    _match(_payload("ip6", "nexthdr"), 58),
                    _match(_payload("icmpv6", "type"), {"set": list(NDP_TYPES)}),
                    _match(_payload("ip6", "hoplimit"), 255),
                    {"accept": None},
                ],
            ),
            self._rule(fwd, [{"vmap": {"key": _meta("iifname"), "data": "@out_ports"}}]),
        ]
        for l3, pfield, proto, client, server in (
            ("ip", "protocol", 17, 68, 67),
            ("ip6", "nexthdr", 17, 546, 547),
        ):
            udp = [_match(_payload(l3, pfield), proto)]
            cmds.append(
                self._rule(
                    fwd,
                    [
                        *udp,
                        _match(_payload("udp", "sport"), client),
                        _match(_payload("udp", "dport"), server),
                        {"set": {"op": "update", "elem": _meta("iifname"), "set": "@dhcp"}},
                    ],
                )
            )
        for l3, pfield, proto, client, server in (
            ("ip", "protocol", 17, 68, 67),
            ("ip6", "nexthdr", 17, 546, 547),
        ):
            cmds.append(
                self._rule(
                    fwd,
                    [
                        _match(_payload(l3, pfield), proto),
                        _match(_payload("udp", "sport"), server),
                        _match(_payload("udp", "dport"), client),
                        _match(_meta("oifname"), "@dhcp"),
                        {"accept": None},
                    ],
                )
            )
        cmds.append(self._rule(fwd, [{"vmap": {"key": _meta("oifname"), "data": "@in_ports"}}]))
        cmds += self._glue()
        return cmds

    def _glue(self) -> list[Json]:
        inet = {"family": "inet", "table": self.ct_name}
        cmds: list[Json] = [
            {
                "add": {
                    "chain": {
                        **inet,
                        "name": "pre",
                        "type": "filter",
                        "hook": "prerouting",
                        "prio": -150,
                        "policy": "accept",
                    }
                }
            },
            {
                "add": {
                    "chain": {
                        **inet,
                        "name": "post",
                        "type": "filter",
                        "hook": "postrouting",
                        "prio": 0,
                        "policy": "accept",
                    }
                }
            },
        ]
        bridged = _match(_meta("iifkind"), "bridge")
        established = _match({"ct": {"key": "state"}}, "established", "in")
        state = _mark_set(MARK_STATE)
        ct_rule = _match({"&": [{"ct": {"key": "mark"}}, CT_MARK_RULE]}, CT_MARK_RULE)
        pre: list[list[Json]] = [[bridged, _mark_clear(MARK_STATE | MARK_RULE)]]
        # the first header decides, as in the engine (IPv6: the fixed header's next header)
        for l3, pfield, icmp, echo in (
            ("ip", "protocol", "icmp", [0, 8]),
            ("ip6", "nexthdr", "icmpv6", [128, 129]),
        ):
            first = _payload(l3, pfield)
            pre += [
                [bridged, established, _match(first, {"set": [6, 17]}), state],
                [
                    bridged,
                    established,
                    _match(first, 1 if l3 == "ip" else 58),
                    _match(_payload(icmp, "type"), {"set": echo}),
                    state,
                ],
                [bridged, established, _match(first, {"set": [50, 51]}), ct_rule, state],
            ]
        pre.append([bridged, _match({"ct": {"key": "state"}}, "related", "in"), state])
        for expr in pre:
            cmds.append(self._rule("pre", expr, "inet"))
        cmds.append(
            self._rule(
                "post",
                [
                    _mark_has(MARK_RULE),
                    {
                        "mangle": {
                            "key": {"ct": {"key": "mark"}},
                            "value": {"|": [{"ct": {"key": "mark"}}, CT_MARK_RULE]},
                        }
                    },
                    _mark_clear(MARK_RULE),
                ],
                "inet",
            )
        )
        return cmds

    # -- per VNIC
    def _add_set(self, s: PeerSet) -> list[Json]:
        return [
            {
                "add": {
                    "set": {
                        **self._obj(name=s.name),
                        "type": s.type,
                        "flags": ["interval"],
                        "elem": list(s.elements),
                    }
                }
            }
        ]

    def _fill_chain(self, chain: str, rules: list[list[Json]], tail: list[Json]) -> list[Json]:
        return [self._rule(chain, expr) for expr in rules] + [self._rule(chain, tail)]

    def _chain_bodies(self, v: VnicObjects) -> list[Json]:
        return self._fill_chain(
            v.chain_in,
            v.rules_in,
            [{"counter": counter_name(v.mac, "in", "drop_default")}, {"drop": None}],
        ) + self._fill_chain(
            v.chain_out,
            v.rules_out,
            [{"counter": counter_name(v.mac, "out", "pass_default")}, {"return": None}],
        )

    def add_vnic(self, v: VnicObjects) -> list[Json]:
        cmds: list[Json] = [{"add": {"counter": self._obj(name=c)}} for c in v.counters()]
        for s in v.sets.values():
            cmds += self._add_set(s)
        cmds += [
            {"add": {"chain": self._obj(name=v.chain_in)}},
            {"add": {"chain": self._obj(name=v.chain_out)}},
        ]
        return cmds + self._chain_bodies(v)

    def update_vnic(self, old: VnicObjects, new: VnicObjects) -> tuple[list[Json], list[Json]]:
        """(commands before the port maps change, commands after: deleting unused sets)."""
        first: list[Json] = []
        for name, s in new.sets.items():
            was = old.sets.get(name)
            if was is None:
                first += self._add_set(s)
            elif was.elements != s.elements:
                first.append({"flush": {"set": self._obj(name=name)}})
                first.append(
                    {"add": {"element": {**self._obj(name=name), "elem": list(s.elements)}}}
                )
        if old.rules_in != new.rules_in:
            first.append({"flush": {"chain": self._obj(name=new.chain_in)}})
            first += self._fill_chain(
                new.chain_in,
                new.rules_in,
                [{"counter": counter_name(new.mac, "in", "drop_default")}, {"drop": None}],
            )
        if old.rules_out != new.rules_out:
            first.append({"flush": {"chain": self._obj(name=new.chain_out)}})
            first += self._fill_chain(
                new.chain_out,
                new.rules_out,
                [{"counter": counter_name(new.mac, "out", "pass_default")}, {"return": None}],
            )
        later = [
            {"delete": {"set": self._obj(name=name)}} for name in old.sets if name not in new.sets
        ]
        return first, later

    def remove_vnic(self, v: VnicObjects) -> list[Json]:
        cmds: list[Json] = []
        for chain in (v.chain_in, v.chain_out):
            cmds.append({"flush": {"chain": self._obj(name=chain)}})
            cmds.append({"delete": {"chain": self._obj(name=chain)}})
        cmds += [{"delete": {"set": self._obj(name=name)}} for name in v.sets]
        cmds += [{"delete": {"counter": self._obj(name=c)}} for c in v.counters()]
        return cmds

    def port_elements(self, op: str, mac: str, port: str) -> list[Json]:
        cid = vnic_id(mac)
        if op == "add":
            pairs = (("in_ports", f"in_{cid}"), ("out_ports", f"out_{cid}"))
            return [
                {
                    "add": {
                        "element": {**self._obj(name=m), "elem": [[port, {"jump": {"target": c}}]]}
                    }
                }
                for m, c in pairs
            ]
        return [
            {"delete": {"element": {**self._obj(name=m), "elem": [port]}}}
            for m in ("in_ports", "out_ports")
        ]

    # -- whole transactions
    def full(
        self, vnics: Mapping[str, VnicObjects], ports: Mapping[str, str], generation: int
    ) -> list[Json]:
        """Replace both tables with the given state (one transaction)."""
        cmds = self.skeleton()
        for v in vnics.values():
            cmds += self.add_vnic(v)
        for mac, port in sorted(ports.items()):
            if mac in vnics:
                cmds += self.port_elements("add", mac, port)
        return cmds + self.generation(generation)

    def diff(
        self,
        old: Mapping[str, VnicObjects],
        old_ports: Mapping[str, str],
        new: Mapping[str, VnicObjects],
        new_ports: Mapping[str, str],
        generation: int | None,
    ) -> list[Json]:
        """The commands that move the bridge table from (old, old_ports) to (new, new_ports).

        Returns ``[]`` when nothing changes. Order inside the transaction: new and changed
        objects first, then the port maps, then what is no longer used.
        """
        cmds: list[Json] = []
        later: list[Json] = []
        for mac, v in new.items():
            was = old.get(mac)
            if was is None:
                cmds += self.add_vnic(v)
            else:
                first, after = self.update_vnic(was, v)
                cmds += first
                later += after
        live_old = {m: p for m, p in old_ports.items() if m in old}
        live_new = {m: p for m, p in new_ports.items() if m in new}
        for mac, port in sorted(live_old.items()):
            if live_new.get(mac) != port:
                cmds += self.port_elements("delete", mac, port)
        for mac, port in sorted(live_new.items()):
            if live_old.get(mac) != port:
                cmds += self.port_elements("add", mac, port)
        for mac, v in old.items():
            if mac not in new:
                cmds += self.remove_vnic(v)
        cmds += later
        if cmds and generation is not None:
            cmds += self.generation(generation)
        return cmds


def peer_count(vnics: Iterable[VnicObjects]) -> int:
    return sum(len(s.elements) for v in vnics for s in v.sets.values())
