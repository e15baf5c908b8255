"""The two shapes a parsed rule takes: the raw parse and the normalised :class:`Rule`.

:class:`ParsedRule` is what the grammar produced, in source order with duplicates (the
reference's ``parse()`` output). :func:`build_rule` runs the post-parse checks on it, in the
reference's order, and returns the normalised :class:`Rule`:

1. protocol targets (ports or ICMP types) at most 24, or 8 when ``max_version < 4``; counted
   with duplicates;
2. at most 24 targets per side, counted before de-duplication, ``to`` side checked first;
3. an ``icmp`` rule may only name IPv4 addresses and subnets, an ``icmp6`` rule only IPv6;
4. the rule must select VMs somewhere (a ``vm``, a ``tag`` or ``all vms`` on either side).

Normalisation (what makes two rules with the same meaning compare equal):

- each side keeps five sorted, de-duplicated groups: wildcards (``any``/``vmall``), ips,
  subnets, tags, vms. ips/subnets/vms sort as plain strings and are never re-formatted
  (``fd00:0:0:0:0:0:0:1`` stays as typed, ``10.0.0.10`` sorts before ``10.0.0.2``);
- tags are ``(name, value)`` pairs, ``value`` ``None`` for a bare ``tag name``; a bare tag
  absorbs every valued tag of the same name on that side; names, then values, sort by UTF-16
  code units (JavaScript's order; it differs from Python's only outside the BMP);
- ports sort by port number or range start, stably, and are never de-duplicated;
- ICMP types sort numerically by (type, code) with a type without code before the same type
  with codes; never de-duplicated;
- ``priority`` is 0 when not written.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal, NamedTuple

from .errors import FwruleError
from .lexer import utf16_key

MAX_TARGETS_PER_SIDE = 24
MAX_PROTOCOL_TARGETS = 24
OLD_MAX_PROTOCOL_TARGETS = 8
CURRENT_VERSION = 4

PROTOCOLS: tuple[str, ...] = ("tcp", "udp", "icmp", "icmp6", "ah", "esp")
ACTIONS: tuple[str, ...] = ("allow", "block")
#: IP protocol numbers of the rule protocols (icmp6 is ICMPv6's next-header value).
PROTOCOL_NUMBERS: dict[str, int] = {
    "icmp": 1,
    "tcp": 6,
    "udp": 17,
    "esp": 50,
    "ah": 51,
    "icmp6": 58,
}


class PortRange(NamedTuple):
    """An inclusive port range ``start - end`` (``start <= end``; equal is allowed)."""

    start: int
    end: int


class IcmpType(NamedTuple):
    """An ICMP/ICMPv6 type with an optional code (``None`` matches every code)."""

    type: int
    code: int | None = None


Port = int | PortRange
ProtoTarget = int | PortRange | IcmpType | Literal["all"]


@dataclass(frozen=True, slots=True)
class Target:
    """One target as written: ``kind`` is ``wildcard``, ``ip``, ``subnet``, ``tag`` or ``vm``.

    ``value`` is ``any``/``vmall`` for wildcards, the address, ``addr/len``, the tag name or the
    VM uuid; ``tag_value`` is the value of ``tag name = value`` (``None`` otherwise).
    """

    kind: str
    value: str
    tag_value: str | None = None


@dataclass(frozen=True, slots=True)
class ParsedRule:
    """The grammar's output, before the post-parse checks: targets in source order."""

    from_targets: tuple[Target, ...]
    to_targets: tuple[Target, ...]
    action: str
    protocol: str
    targets: tuple[ProtoTarget, ...]
    priority: int | None = None


def _sorted_tags(pairs: Iterable[tuple[str, str | None]]) -> tuple[tuple[str, str | None], ...]:
    values: dict[str, set[str] | None] = {}
    for name, value in pairs:
        if value is None:
            values[name] = None
        elif name not in values:
            values[name] = {value}
        else:
            existing = values[name]
            if existing is not None:
                existing.add(value)
    out: list[tuple[str, str | None]] = []
    for name in sorted(values, key=utf16_key):
        vals = values[name]
        if vals is None:
            out.append((name, None))
        else:
            out.extend((name, v) for v in sorted(vals, key=utf16_key))
    return tuple(out)


def _sorted_set(items: Iterable[str]) -> tuple[str, ...]:
    return tuple(sorted(set(items), key=utf16_key))


@dataclass(frozen=True, slots=True)
class Side:
    """One side (FROM or TO) of a normalised rule."""

    wildcards: tuple[str, ...] = ()
    ips: tuple[str, ...] = ()
    subnets: tuple[str, ...] = ()
    tags: tuple[tuple[str, str | None], ...] = ()
    vms: tuple[str, ...] = ()

    @classmethod
    def from_targets(cls, targets: Iterable[Target]) -> Side:
        targets = tuple(targets)
        return cls(
            wildcards=_sorted_set(t.value for t in targets if t.kind == "wildcard"),
            ips=_sorted_set(t.value for t in targets if t.kind == "ip"),
            subnets=_sorted_set(t.value for t in targets if t.kind == "subnet"),
            tags=_sorted_tags((t.value, t.tag_value) for t in targets if t.kind == "tag"),
            vms=_sorted_set(t.value for t in targets if t.kind == "vm"),
        )

    @property
    def any(self) -> bool:
        """``any``: every address (selects no VM by itself)."""
        return "any" in self.wildcards

    @property
    def all_vms(self) -> bool:
        """``all vms``: every VM (of the rule's owner, for owned rules)."""
        return "vmall" in self.wildcards

    @property
    def tag_names(self) -> tuple[str, ...]:
        """Every tag name mentioned on this side, sorted, each once."""
        return tuple(dict.fromkeys(name for name, _ in self.tags))

    @property
    def selects_vms(self) -> bool:
        """True when this side picks VMs (``vm``, ``tag`` or ``all vms``)."""
        return self.all_vms or bool(self.tags) or bool(self.vms)

    def tag_values(self, name: str) -> tuple[str, ...] | None:
        """Values this side names for tag ``name``: ``None`` if any value matches (bare tag),
        ``()`` if the tag is not mentioned."""
        values: list[str] = []
        for tag, value in self.tags:
            if tag == name:
                if value is None:
                    return None
                values.append(value)
        return tuple(values)

    def count(self) -> int:
        """Number of distinct targets on this side."""
        return (
            len(self.wildcards) + len(self.ips) + len(self.subnets) + len(self.tags) + len(self.vms)
        )


@dataclass(frozen=True, slots=True)
class Rule:
    """A checked, normalised rule (the language part only; see ``FirewallRule`` for the
    payload fields).

    ``ports`` is set for tcp/udp: ``"all"`` or a tuple of ints and :class:`PortRange`.
    ``types`` is set for icmp/icmp6: ``"all"`` or a tuple of :class:`IcmpType`.
    Both are ``None`` for ah/esp, which always match the whole protocol.
    """

    from_side: Side
    to_side: Side
    action: str
    protocol: str
    ports: tuple[Port, ...] | Literal["all"] | None = None
    types: tuple[IcmpType, ...] | Literal["all"] | None = None
    priority: int = 0

    # -- text ---------------------------------------------------------------------------
    def text(self) -> str:
        """Canonical text (see :mod:`protocol.fwrule.canonical`)."""
        from .canonical import canonical_text

        return canonical_text(self)

    def __str__(self) -> str:
        return self.text()

    # -- both sides merged ----------------------------------------------------------------
    @property
    def sides(self) -> tuple[Side, Side]:
        return (self.from_side, self.to_side)

    @property
    def all_vms(self) -> bool:
        """``all vms`` appears on either side."""
        return self.from_side.all_vms or self.to_side.all_vms

    @property
    def ips(self) -> tuple[str, ...]:
        return _sorted_set(self.from_side.ips + self.to_side.ips)

    @property
    def subnets(self) -> tuple[str, ...]:
        return _sorted_set(self.from_side.subnets + self.to_side.subnets)

    @property
    def tags(self) -> tuple[tuple[str, str | None], ...]:
        """Tags of both sides, a bare tag on either side absorbing valued ones."""
        return _sorted_tags(self.from_side.tags + self.to_side.tags)

    @property
    def tag_names(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(name for name, _ in self.tags))

    @property
    def vms(self) -> tuple[str, ...]:
        return _sorted_set(self.from_side.vms + self.to_side.vms)

    @property
    def wildcards(self) -> tuple[str, ...]:
        return _sorted_set(self.from_side.wildcards + self.to_side.wildcards)

    # -- protocol targets -----------------------------------------------------------------
    @property
    def protocol_number(self) -> int:
        return PROTOCOL_NUMBERS[self.protocol]

    @property
    def proto_targets(self) -> tuple[ProtoTarget, ...]:
        """Ports or types as one tuple; ``("all",)`` for all ports/types and for ah/esp."""
        targets = self.ports if self.protocol in ("tcp", "udp") else self.types
        if targets is None or targets == "all":
            return ("all",)
        return targets

    def port_ranges(self) -> tuple[tuple[int, int], ...]:
        """tcp/udp destination ports as inclusive ``(start, end)`` pairs (``all`` is 1-65535)."""
        if self.ports is None:
            return ()
        if self.ports == "all":
            return ((1, 65535),)
        return tuple((p, p) if isinstance(p, int) else (p.start, p.end) for p in self.ports)

    def matches_port(self, port: int) -> bool:
        """Whether a tcp/udp destination port is covered by this rule's ports."""
        return any(start <= port <= end for start, end in self.port_ranges())

    def matches_icmp(self, icmp_type: int, icmp_code: int) -> bool:
        """Whether an ICMP (type, code) is covered; a type without code matches every code."""
        if self.types is None:
            return False
        if self.types == "all":
            return True
        return any(t.type == icmp_type and t.code in (None, icmp_code) for t in self.types)


def _port_key(port: Port) -> int:
    return port if isinstance(port, int) else port.start


def _type_key(entry: IcmpType) -> tuple[int, int]:
    return (entry.type, -1 if entry.code is None else entry.code)


def _fail(message: str) -> FwruleError:
    return FwruleError("rule", message)


def build_rule(parsed: ParsedRule, *, max_version: int = CURRENT_VERSION) -> Rule:
    """Run the post-parse checks on ``parsed`` and return the normalised :class:`Rule`."""
    protocol = parsed.protocol
    is_icmp = protocol in ("icmp", "icmp6")

    limit = OLD_MAX_PROTOCOL_TARGETS if max_version < 4 else MAX_PROTOCOL_TARGETS
    if len(parsed.targets) > limit:
        raise _fail(f"maximum of {limit} {'types' if is_icmp else 'ports'} allowed")

    for targets in (parsed.to_targets, parsed.from_targets):
        if len(targets) > MAX_TARGETS_PER_SIDE:
            raise _fail(f"maximum of {MAX_TARGETS_PER_SIDE} targets allowed per side")

    ports: tuple[Port, ...] | Literal["all"] | None = None
    types: tuple[IcmpType, ...] | Literal["all"] | None = None
    if protocol in ("tcp", "udp"):
        if "all" in parsed.targets:
            ports = "all"
        else:
            ports = tuple(sorted(parsed.targets, key=_port_key))  # type: ignore[arg-type]
    elif is_icmp:
        if "all" in parsed.targets:
            types = "all"
        else:
            types = tuple(sorted(parsed.targets, key=_type_key))  # type: ignore[arg-type]

    rule = Rule(
        from_side=Side.from_targets(parsed.from_targets),
        to_side=Side.from_targets(parsed.to_targets),
        action=parsed.action,
        protocol=protocol,
        ports=ports,
        types=types,
        priority=parsed.priority or 0,
    )

    if is_icmp:
        v6 = protocol == "icmp6"
        family = "IPv6" if v6 else "IPv4"
        version = "ICMPv6" if v6 else "ICMPv4"
        if any((":" in ip) != v6 for ip in rule.ips):
            raise _fail(f"rule affects {version} but contains a non-{family} address")
        if any((":" in subnet) != v6 for subnet in rule.subnets):
            raise _fail(f"rule affects {version} but contains a non-{family} subnet")

    if not (rule.from_side.selects_vms or rule.to_side.selects_vms):
        raise _fail("rule does not affect VMs")
    return rule
