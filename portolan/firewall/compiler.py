"""The per-compute-node policy compiler: rules + VNICs -> ``protocol.fwpolicy`` documents.

For one firewall-enabled VNIC V and each **enabled** rule R that selects V
(:mod:`.selection`: a side names V and R is global or has V's owner):

- V named on R's FROM side -> an ``out`` entry whose peers are R's TO side;
- V named on R's TO side -> an ``in`` entry whose peers are R's FROM side;
- both -> both entries (``FROM all vms TO all vms``: V is its own peer too).

Peers of a side: ``any`` -> ``"any"`` (nothing else on that side matters); ``ip``/``subnet`` as
prefixes (/32 or /128 for an address); ``vm``/``tag``/``all vms`` -> the IP of every VNIC the
side names, on **every** compute node, owner-scoped as peers (skipped only when rule and VNIC
both have owners that differ), firewall flag irrelevant. icmp rules keep only IPv4 peers,
icmp6 rules only IPv6; an entry left with no peer can match nothing and is dropped.

No-op elimination (spec §3.4): at priority 0 an ``out`` ALLOW and an ``in`` BLOCK only restate
the defaults (outbound allowed, inbound blocked) and are left out; from priority 1 on they
are kept, because they may override lower-priority rules.

Entries of a VNIC are sorted by (priority descending, rule uuid, direction) and peers by
(family, address, prefix length), so equal inputs always give equal documents: the policy
service compares documents to decide whether a generation changes.
"""

from __future__ import annotations

from collections.abc import Iterable
from ipaddress import IPv4Network, IPv6Network, ip_network
from typing import Any, Literal

from portolan.model import Rule as StoredRule
from portolan.model import Vnic
from protocol.addr import format_mac
from protocol.fwpolicy import Policy, PolicyRule, VnicPolicy
from protocol.fwrule import Side
from protocol.fwrule.validate import subnet_network

from .selection import FirewallModel, FwRule, VnicView

Network = IPv4Network | IPv6Network
Peers = Literal["any"] | tuple[Network, ...]
#: what one compile pass shares between VNICs: (rule uuid, "from"/"to") -> resolved peers
#: (None: no peer left), and (rule uuid, "in"/"out", "entry") -> the finished entry
PeerCache = dict[tuple[str, ...], Any]


def _net(text: str) -> Network | None:
    try:
        # subnet_network reads leading zeros as the rule language does (09.0.0.0/024)
        return subnet_network(text) if "/" in text else ip_network(text.strip(), strict=False)
    except ValueError:
        return None


def _peer_key(n: Network) -> tuple[int, int, int]:
    return (n.version, int(n.network_address), n.prefixlen)


def resolve_peers(model: FirewallModel, rule: FwRule, side: Side) -> Peers | None:
    """The peers of ``side`` for ``rule``; None when no address is left (entry dropped)."""
    if side.any:
        return "any"
    nets: set[Network] = set()
    for text in (*side.ips, *side.subnets):
        net = _net(text)
        if net is not None:
            nets.add(net)
    for view in model.vnics_on_side(side, rule.owner, peer=True):
        if view.net is not None:
            nets.add(view.net)
    protocol = rule.rule.protocol
    if protocol == "icmp":
        nets = {n for n in nets if n.version == 4}
    elif protocol == "icmp6":
        nets = {n for n in nets if n.version == 6}
    if not nets:
        return None
    return tuple(sorted(nets, key=_peer_key))


def _entry(rule: FwRule, direction: Literal["in", "out"], peers: Peers) -> PolicyRule:
    r = rule.rule
    ports = types = None
    if r.protocol in ("tcp", "udp"):
        ports = "all" if r.ports == "all" else r.port_ranges()
    elif r.protocol in ("icmp", "icmp6"):
        if r.types == "all" or r.types is None:
            types = "all"
        else:
            types = tuple((t.type, t.code) for t in r.types)
    return PolicyRule(
        uuid=rule.uuid,
        direction=direction,
        action=r.action,  # type: ignore[arg-type]
        priority=r.priority,
        protocol=r.protocol,
        ports=ports,  # type: ignore[arg-type]
        types=types,  # type: ignore[arg-type]
        peers=peers,
        log=rule.log,
    )


def _entry_key(e: PolicyRule) -> tuple[int, str, str]:
    return (-e.priority, e.uuid, e.direction)


def compile_vnic(
    model: FirewallModel, view: VnicView, cache: PeerCache | None = None
) -> VnicPolicy | None:
    """The policy of one VNIC, or None when its firewall is off (it is then not filtered)."""
    vnic = view.vnic
    if not vnic.firewall_enabled:
        return None
    cache = {} if cache is None else cache
    entries: list[PolicyRule] = []
    for rule in model.rules_selecting(view):
        r = rule.rule
        for direction, mine, other, other_name in (
            ("out", r.from_side, r.to_side, "to"),
            ("in", r.to_side, r.from_side, "from"),
        ):
            if not view.named_by(mine):
                continue
            if r.priority == 0 and (
                (direction == "out" and r.action == "allow")
                or (direction == "in" and r.action == "block")
            ):
                continue  # no-op: the default already does this
            entry_key = (rule.uuid, direction, "entry")
            entry = cache.get(entry_key)
            if entry is None:
                key = (rule.uuid, other_name)
                if key not in cache:
                    cache[key] = resolve_peers(model, rule, other)
                peers = cache[key]
                entry = cache[entry_key] = (
                    False if peers is None else _entry(rule, direction, peers)  # type: ignore[arg-type]
                )
            if entry is not False:
                entries.append(entry)
    entries.sort(key=_entry_key)
    return VnicPolicy(
        mac=format_mac(vnic.mac), ips=(vnic.ip,), vnet_id=vnic.vnet_id, rules=tuple(entries)
    )


def compile_cn(
    model: FirewallModel, cn_uuid: str, generation: int = 0, cache: PeerCache | None = None
) -> Policy:
    """The whole policy document of one compute node."""
    cache = {} if cache is None else cache
    vnics: dict[str, VnicPolicy] = {}
    for view in model.vnics_on_cn(cn_uuid):
        vp = compile_vnic(model, view, cache)
        if vp is not None:
            vnics[vp.mac] = vp
    return Policy(cn_uuid=cn_uuid, generation=generation, vnics=vnics)


def compile_all(
    vnics: Iterable[Vnic], rules: Iterable[StoredRule], generation: int = 0
) -> dict[str, Policy]:
    """Every compute node's policy from plain lists (tools, tests)."""
    model = FirewallModel(vnics, rules)
    cache: PeerCache = {}
    return {cn: compile_cn(model, cn, generation, cache) for cn in sorted(model.cns())}


__all__ = ["PeerCache", "compile_all", "compile_cn", "compile_vnic", "resolve_peers"]
