"""Which VNICs a rule names: tag matching, owner scoping, and the indexes that make it cheap.

Vocabulary (spec/fwrule.md §3.2-3.3):

- A rule *side* (FROM or TO) **names** a VNIC when one of its ``vm <uuid>`` targets is the
  VNIC's ``belongs_to_uuid``, one of its ``tag`` targets matches one of the VNIC's tags, or it
  says ``all vms``. ``ip``, ``subnet`` and ``any`` never name VNICs.
- Tag values are compared as **strings**, the way JavaScript's ``String()`` writes a JSON value:
  ``true`` -> ``"true"``, ``2`` -> ``"2"``, ``2.0`` -> ``"2"``, ``null`` -> ``"null"``. A bare
  ``tag name`` matches any value the VNIC has for that name (including ``false``, ``""`` and
  ``null``): only the key has to be present.
- A rule **selects** a VNIC (the VNIC gets entries from it) when a side names it and the owner
  check passes: a global rule selects VNICs of every owner (and of none); an owned rule only
  VNICs with exactly the same ``owner_uuid`` -- ``vm <uuid>`` targets included, so naming another
  customer's VM does nothing. A VNIC without an owner is only selected by global rules.
- A VNIC is a **peer** of a rule side when the side names it and the peer owner check passes:
  skipped only when both the rule and the VNIC have owners and they differ (a VNIC without an
  owner is a peer of everybody's rules, as fwadm treats remote VMs stored without an owner).
  Firewall-disabled VNICs are peers like any other.

:class:`FirewallModel` keeps every VNIC and rule in memory with the indexes that answer these
questions without scanning: rules by ``vm`` uuid, by bare tag name, by (tag name, value) and
the ``all vms`` set; VNICs by ``belongs_to_uuid``, tag name, (tag name, value), owner and compute
node. Candidates come from the indexes, then the exact test above filters them. The model is plain data (no I/O, no trio); the policy
service owns one and feeds it committed changes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from ipaddress import IPv4Network, IPv6Network, ip_network
from typing import Any

from portolan.model import Rule as StoredRule
from portolan.model import Vnic
from protocol.fwrule import Rule, Side, parse


def tag_text(value: Any) -> str:
    """A tag value as JavaScript's ``String(value)`` writes it (how fwadm compares tags)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "Infinity" if value > 0 else "-Infinity"
        if value.is_integer() and abs(value) < 1e21:
            return str(int(value))
        return repr(value)
    if isinstance(value, str):
        return value
    if isinstance(value, list | tuple):
        return ",".join("" if v is None else tag_text(v) for v in value)
    return "[object Object]"


def owner_selects(rule_owner: str | None, vnic_owner: str | None) -> bool:
    """Whether a rule of ``rule_owner`` (None: global) may select a VNIC of ``vnic_owner``."""
    return rule_owner is None or rule_owner == vnic_owner


def owner_admits_peer(rule_owner: str | None, vnic_owner: str | None) -> bool:
    """Whether a VNIC of ``vnic_owner`` may be a peer of a rule of ``rule_owner``."""
    return rule_owner is None or vnic_owner is None or rule_owner == vnic_owner


def side_names(side: Side, belongs_to: str | None, tags: dict[str, str]) -> bool:
    """Whether ``side`` names a VNIC with this ``belongs_to_uuid`` and string ``tags``."""
    if side.all_vms:
        return True
    if belongs_to is not None and belongs_to in side.vms:
        return True
    for name, value in side.tags:
        have = tags.get(name)
        if have is not None and (value is None or value == have):
            return True
    return False


@lru_cache(maxsize=65536)
def parse_stored(text: str) -> Rule:
    """Parse a stored (canonical, already validated) rule text; cached by text."""
    return parse(text)


@dataclass(frozen=True, slots=True)
class FwRule:
    """A stored rule with its parsed form, as the engine uses it."""

    stored: StoredRule
    rule: Rule

    @classmethod
    def of(cls, stored: StoredRule) -> FwRule:
        return cls(stored, parse_stored(stored.rule))

    @property
    def uuid(self) -> str:
        return self.stored.uuid

    @property
    def owner(self) -> str | None:
        return None if self.stored.is_global else self.stored.owner_uuid

    @property
    def enabled(self) -> bool:
        return self.stored.enabled

    @property
    def log(self) -> bool:
        return self.stored.log

    def names_tag(self, name: str, value: str | None = None) -> bool:
        """Whether either side mentions tag ``name`` (with ``value``, or bare, if given)."""
        for tag, tag_value in self.rule.tags:
            if tag == name and (value is None or tag_value is None or tag_value == value):
                return True
        return False


@dataclass(frozen=True, slots=True)
class VnicView:
    """A VNIC with its tags as strings and its address as a /32 or /128 (computed once)."""

    vnic: Vnic
    tags: dict[str, str]
    net: IPv4Network | IPv6Network | None

    @classmethod
    def of(cls, vnic: Vnic) -> VnicView:
        try:
            net: IPv4Network | IPv6Network | None = ip_network(vnic.ip)
        except ValueError:
            net = None
        return cls(vnic, {str(k): tag_text(v) for k, v in (vnic.tags or {}).items()}, net)

    @property
    def mac(self) -> bytes:
        return self.vnic.mac

    def named_by(self, side: Side) -> bool:
        return side_names(side, self.vnic.belongs_to_uuid, self.tags)


def _add(index: dict[Any, set[Any]], key: Any, item: Any) -> None:
    index.setdefault(key, set()).add(item)


def _discard(index: dict[Any, set[Any]], key: Any, item: Any) -> None:
    items = index.get(key)
    if items is not None:
        items.discard(item)
        if not items:
            del index[key]


class _RuleIndex:
    """Rules of one owner (or the global rules), by what they name."""

    __slots__ = ("all_vms", "by_tag", "by_tagval", "by_vm")

    def __init__(self) -> None:
        self.by_vm: dict[str, set[str]] = {}
        self.by_tag: dict[str, set[str]] = {}  # bare tags
        self.by_tagval: dict[tuple[str, str], set[str]] = {}
        self.all_vms: set[str] = set()

    def empty(self) -> bool:
        return not (self.by_vm or self.by_tag or self.by_tagval or self.all_vms)


class _VnicIndex:
    """VNICs of one owner (or without an owner), by what rules can name them by."""

    __slots__ = ("all", "by_belongs", "by_tag", "by_tagval")

    def __init__(self) -> None:
        self.all: set[bytes] = set()
        self.by_belongs: dict[str, set[bytes]] = {}
        self.by_tag: dict[str, set[bytes]] = {}
        self.by_tagval: dict[tuple[str, str], set[bytes]] = {}


class FirewallModel:
    """Every VNIC and rule, indexed for selection and peer resolution (see module docstring).

    Indexes are partitioned by owner (``None``: global rules / owner-less VNICs), so finding
    the rules of a VNIC only looks at its owner's and the global rules, and resolving an owned
    rule's side only at its owner's (and, for peers, owner-less) VNICs.
    """

    def __init__(self, vnics: Iterable[Vnic] = (), rules: Iterable[StoredRule] = ()) -> None:
        self.vnics: dict[bytes, VnicView] = {}
        self.rules: dict[str, FwRule] = {}
        self._v: dict[str | None, _VnicIndex] = {}
        self._v_by_cn: dict[str, set[bytes]] = {}
        self._r: dict[str | None, _RuleIndex] = {}
        for v in vnics:
            self.put_vnic(v)
        for r in rules:
            self.put_rule(r)

    # -- VNICs ------------------------------------------------------------------------------
    def put_vnic(self, vnic: Vnic) -> VnicView:
        self.remove_vnic(vnic.mac)
        view = VnicView.of(vnic)
        mac = vnic.mac
        self.vnics[mac] = view
        idx = self._v.get(vnic.owner_uuid)
        if idx is None:
            idx = self._v[vnic.owner_uuid] = _VnicIndex()
        idx.all.add(mac)
        if vnic.belongs_to_uuid is not None:
            _add(idx.by_belongs, vnic.belongs_to_uuid, mac)
        for name, value in view.tags.items():
            _add(idx.by_tag, name, mac)
            _add(idx.by_tagval, (name, value), mac)
        _add(self._v_by_cn, vnic.cn_uuid, mac)
        return view

    def remove_vnic(self, mac: bytes) -> VnicView | None:
        view = self.vnics.pop(mac, None)
        if view is None:
            return None
        vnic = view.vnic
        idx = self._v[vnic.owner_uuid]
        idx.all.discard(mac)
        if vnic.belongs_to_uuid is not None:
            _discard(idx.by_belongs, vnic.belongs_to_uuid, mac)
        for name, value in view.tags.items():
            _discard(idx.by_tag, name, mac)
            _discard(idx.by_tagval, (name, value), mac)
        if not idx.all:
            del self._v[vnic.owner_uuid]
        _discard(self._v_by_cn, vnic.cn_uuid, mac)
        return view

    def vnics_on_cn(self, cn_uuid: str) -> list[VnicView]:
        return [self.vnics[m] for m in sorted(self._v_by_cn.get(cn_uuid, ()))]

    def cns(self) -> set[str]:
        return set(self._v_by_cn)

    # -- rules ------------------------------------------------------------------------------
    def put_rule(self, stored: StoredRule) -> FwRule:
        self.remove_rule(stored.uuid)
        r = FwRule.of(stored)
        self.rules[r.uuid] = r
        idx = self._r.get(r.owner)
        if idx is None:
            idx = self._r[r.owner] = _RuleIndex()
        for vm in r.rule.vms:
            _add(idx.by_vm, vm, r.uuid)
        for name, value in r.rule.tags:
            if value is None:
                _add(idx.by_tag, name, r.uuid)
            else:
                _add(idx.by_tagval, (name, value), r.uuid)
        if r.rule.all_vms:
            idx.all_vms.add(r.uuid)
        return r

    def remove_rule(self, uuid: str) -> FwRule | None:
        r = self.rules.pop(uuid, None)
        if r is None:
            return None
        idx = self._r[r.owner]
        for vm in r.rule.vms:
            _discard(idx.by_vm, vm, uuid)
        for name, value in r.rule.tags:
            if value is None:
                _discard(idx.by_tag, name, uuid)
            else:
                _discard(idx.by_tagval, (name, value), uuid)
        idx.all_vms.discard(uuid)
        if idx.empty():
            del self._r[r.owner]
        return r

    def _candidate_rules(self, view: VnicView, owners: Iterable[str | None]) -> list[FwRule]:
        found: set[str] = set()
        belongs = view.vnic.belongs_to_uuid
        for owner in owners:
            idx = self._r.get(owner)
            if idx is None:
                continue
            found |= idx.all_vms
            if belongs is not None:
                found |= idx.by_vm.get(belongs, set())
            for name, value in view.tags.items():
                found |= idx.by_tag.get(name, set())
                found |= idx.by_tagval.get((name, value), set())
        return [self.rules[uuid] for uuid in sorted(found)]

    def rules_selecting(self, view: VnicView, *, include_disabled: bool = False) -> list[FwRule]:
        """Rules that select the VNIC (owner-scoped), sorted by uuid."""
        owner = view.vnic.owner_uuid
        owners = (None,) if owner is None else (owner, None)
        return [
            r
            for r in self._candidate_rules(view, owners)
            if (include_disabled or r.enabled)
            and (view.named_by(r.rule.from_side) or view.named_by(r.rule.to_side))
        ]

    def rules_with_peer(self, view: VnicView) -> list[tuple[FwRule, bool, bool]]:
        """Enabled rules that have the VNIC as a peer: ``(rule, on FROM side, on TO side)``."""
        owner = view.vnic.owner_uuid
        owners = list(self._r) if owner is None else [owner, None]
        out = []
        for r in self._candidate_rules(view, owners):
            if not r.enabled:
                continue
            on_from = view.named_by(r.rule.from_side)
            on_to = view.named_by(r.rule.to_side)
            if on_from or on_to:
                out.append((r, on_from, on_to))
        return out

    # -- VNICs named by a side ----------------------------------------------------------------
    def vnics_on_side(self, side: Side, rule_owner: str | None, *, peer: bool) -> list[VnicView]:
        """VNICs ``side`` names, owner-scoped for selection (``peer=False``) or as peers."""
        if rule_owner is None:
            parts = list(self._v.values())
        else:
            keys: tuple[str | None, ...] = (rule_owner, None) if peer else (rule_owner,)
            parts = [self._v[k] for k in keys if k in self._v]
        found: set[bytes] = set()
        for idx in parts:
            if side.all_vms:
                found |= idx.all
                continue
            for vm in side.vms:
                found |= idx.by_belongs.get(vm, set())
            for name, value in side.tags:
                if value is None:
                    found |= idx.by_tag.get(name, set())
                else:
                    found |= idx.by_tagval.get((name, value), set())
        return [self.vnics[mac] for mac in found]

    def vnics_selected(self, rule: FwRule) -> list[VnicView]:
        """VNICs on either side of ``rule`` (owner-scoped selection), sorted by MAC."""
        found: dict[bytes, VnicView] = {}
        for side in (rule.rule.from_side, rule.rule.to_side):
            for view in self.vnics_on_side(side, rule.owner, peer=False):
                found[view.mac] = view
        return [found[m] for m in sorted(found)]


def rules_naming_vnic(rules: Iterable[FwRule], vnic: Vnic) -> list[FwRule]:
    """The rules that apply to ``vnic`` (disabled ones included), without an index: the
    owner's rules and global rules whose either side names it."""
    view = VnicView.of(vnic)
    return [
        r
        for r in rules
        if owner_selects(r.owner, vnic.owner_uuid)
        and (view.named_by(r.rule.from_side) or view.named_by(r.rule.to_side))
    ]


__all__ = [
    "FirewallModel",
    "FwRule",
    "VnicView",
    "owner_admits_peer",
    "owner_selects",
    "parse_stored",
    "rules_naming_vnic",
    "side_names",
    "tag_text",
]
