"""Firewall rule objects: a rule's text plus the payload fields around it.

:func:`create_rule` validates an API/fwadm payload and returns a frozen :class:`FirewallRule`.
Field errors are collected in this order, then raised as one :class:`FwruleError` or a
:class:`FwruleMultiError` (``first of N errors: ...``):

``rule`` (missing or empty: ``No rule specified``; else any parse error), ``uuid``
(``Invalid rule UUID``), ``owner_uuid`` (``Invalid owner UUID``), ``enabled``, ``log``
(``<name> must be true or false``), ``created_by``, ``description`` (``<name> must be a
string``, ``<name> must be shorter than 255 characters`` when longer than 255), and with
``enforce_global``: ``global must be true or false``, ``cannot specify both global and
owner_uuid`` (field ``global``), ``owner_uuid required`` (field ``owner_uuid``).
Only when all fields are good do the post-parse checks of the rule text run (limits, ICMP
address families, ``rule does not affect VMs``).

A field that is present is validated even when its value is ``None`` (as in the reference,
where ``"owner_uuid": null`` is an invalid owner, not a global rule).

Booleans (spec quirk 7): ``enabled``, ``log`` and ``global`` accept ``True``/``False`` and the
strings ``"true"``/``"false"``, and the strings are **coerced** to booleans; the reference keeps
the string and serialises it back.
"""

from __future__ import annotations

import os
import time
import uuid as uuid_mod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import FwruleError, raise_collected
from .lexer import utf16_len
from .model import CURRENT_VERSION, ParsedRule, Rule, build_rule
from .parser import parse_raw
from .validate import is_uuid

#: Fields :meth:`FirewallRule.serialize` can return, in output order.
FIELDS: tuple[str, ...] = (
    "created_by",
    "description",
    "enabled",
    "global",
    "log",
    "owner_uuid",
    "rule",
    "uuid",
    "version",
)
MAX_STRING_LENGTH = 255
_STRING_FIELDS = ("created_by", "description")


def generate_version() -> str:
    """A fresh rule version: ``<epoch milliseconds>.<pid zero-padded to 6 digits>``."""
    return f"{time.time_ns() // 1_000_000}.{os.getpid():06d}"


def _bool(value: object) -> bool | None:
    """``True``/``False`` or ``"true"``/``"false"`` as a bool; ``None`` when invalid."""
    if isinstance(value, bool):
        return value
    if value == "true":
        return True
    if value == "false":
        return False
    return None


@dataclass(frozen=True, slots=True)
class FirewallRule:
    """A validated firewall rule with its payload fields.

    ``owner_uuid`` is ``None`` for a global rule (``is_global`` is then true). ``text`` is the
    canonical text of ``rule`` (the parsed, normalised rule).
    """

    uuid: str
    version: str
    owner_uuid: str | None
    enabled: bool
    log: bool
    description: str | None
    created_by: str | None
    rule: Rule
    text: str

    @property
    def is_global(self) -> bool:
        return self.owner_uuid is None

    def serialize(self, fields: Iterable[str] | None = None) -> dict[str, Any]:
        """The API shape: ``created_by?, description?, enabled, global? (only when true), log,
        owner_uuid?, rule (canonical text), uuid, version``, optionally only ``fields``."""
        wanted = FIELDS if fields is None else tuple(f for f in FIELDS if f in set(fields))
        out: dict[str, Any] = {}
        for name in wanted:
            if name == "rule":
                out["rule"] = self.text
            elif name == "global":
                if self.is_global:
                    out["global"] = True
            else:
                value = getattr(self, name)
                if value is not None:
                    out[name] = value
        return out

    def __str__(self) -> str:
        owner = f",{self.owner_uuid}" if self.owner_uuid else ""
        enabled = "true" if self.enabled else "false"
        return f"[{self.uuid},{enabled}{owner}] {self.text}"


def create_rule(
    payload: Mapping[str, Any],
    *,
    max_version: int = CURRENT_VERSION,
    enforce_subnet_mask: bool = False,
    enforce_global: bool = False,
) -> FirewallRule:
    """Validate ``payload`` and build a :class:`FirewallRule` (see the module docstring).

    ``payload["rule"]`` may also be a :class:`~protocol.fwrule.model.ParsedRule` (the raw
    parse of a text already parsed elsewhere); it then still goes through the post-parse
    checks. A missing ``uuid`` is generated (v4), a missing or empty ``version`` too.
    """
    errors: list[FwruleError] = []
    parsed: ParsedRule | None = None

    text = payload.get("rule")
    if not text:
        errors.append(FwruleError("rule", "No rule specified"))
    elif isinstance(text, ParsedRule):
        parsed = text
    elif not isinstance(text, str):
        errors.append(FwruleError("rule", "rule must be a string"))
    else:
        try:
            parsed = parse_raw(
                text, max_version=max_version, enforce_subnet_mask=enforce_subnet_mask
            )
        except FwruleError as err:
            errors.append(err)

    if "uuid" in payload:
        rule_uuid = payload["uuid"]
        if not is_uuid(rule_uuid):
            errors.append(FwruleError("uuid", "Invalid rule UUID"))
    else:
        rule_uuid = str(uuid_mod.uuid4())

    version = payload.get("version")
    version = str(version) if version else generate_version()

    owner_uuid = payload.get("owner_uuid")
    if "owner_uuid" in payload and not is_uuid(owner_uuid):
        errors.append(FwruleError("owner_uuid", "Invalid owner UUID"))

    flags: dict[str, bool] = {}
    for name in ("enabled", "log"):
        value = _bool(payload.get(name, False))
        if value is None:
            errors.append(FwruleError(name, f"{name} must be true or false"))
        flags[name] = bool(value)

    strings: dict[str, str | None] = {}
    for name in _STRING_FIELDS:
        value = payload.get(name)
        strings[name] = None
        if name not in payload:
            continue
        if not isinstance(value, str):
            errors.append(FwruleError(name, f"{name} must be a string"))
        elif utf16_len(value) > MAX_STRING_LENGTH:
            errors.append(
                FwruleError(name, f"{name} must be shorter than {MAX_STRING_LENGTH} characters")
            )
        else:
            strings[name] = value

    if enforce_global:
        has_global = "global" in payload
        if has_global:
            raw_global = payload["global"]
            global_flag = _bool(raw_global)
            if global_flag is None:
                errors.append(FwruleError("global", "global must be true or false"))
                global_flag = bool(raw_global)
            if global_flag and "owner_uuid" in payload:
                errors.append(FwruleError("global", "cannot specify both global and owner_uuid"))
        elif "owner_uuid" not in payload:
            errors.append(FwruleError("owner_uuid", "owner_uuid required"))

    raise_collected(errors)
    assert parsed is not None

    rule = build_rule(parsed, max_version=max_version)
    return FirewallRule(
        uuid=rule_uuid,
        version=version,
        owner_uuid=owner_uuid,
        enabled=flags["enabled"],
        log=flags["log"],
        description=strings["description"],
        created_by=strings["created_by"],
        rule=rule,
        text=rule.text(),
    )
