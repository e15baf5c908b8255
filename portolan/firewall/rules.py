"""Rule CRUD on the store, through the Directory's transactions.

A rule is validated by ``protocol.fwrule.create_rule(payload, enforce_global=True,
enforce_subnet_mask=True)`` (FWAPI's options) and stored in the ``rules`` table as its
**canonical** text plus uuid, owner (NULL and ``is_global`` for a global rule), enabled, log,
description, ``version`` (the store's change counter at the last change: it grows on every
change) and ``created`` (ISO 8601, UTC).

Writes run as one Directory write transaction (``Directory.write``: the change counter, the
rows, commit, then the Directory's subscribers), returning a :class:`RuleChange` -- an
``IndexChange`` that changes no lookup mapping but carries the rules it put or removed, which
is how the policy service hears about them.

Payload fields: ``rule`` (text), ``uuid`` (create only; generated when absent), ``owner_uuid``
or ``global: true`` (exactly one), ``enabled`` (default false), ``log`` (default false),
``description`` (<= 255 characters; ``null`` in an update removes it). Any other field is a
422 ``UnknownParameters``. An update merges the given fields over the stored rule (giving
``owner_uuid`` drops ``global`` and the other way round; the uuid cannot change); an update
that changes nothing returns the rule as it is, version unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from portolan.errors import INVALID, MISSING, Conflict, FieldError, InvalidParameters, NotFound
from portolan.index import IndexChange
from portolan.model import Rule
from portolan.model import Vnic as VnicModel
from portolan.service import NoChange
from protocol.fwrule import FirewallRule, FwruleError, FwruleMultiError, create_rule

from .selection import FwRule, rules_naming_vnic

#: payload fields a client may send
RULE_FIELDS = frozenset({"rule", "uuid", "owner_uuid", "global", "enabled", "log", "description"})
UNKNOWN = "UnknownParameters"
DUPLICATE = "Duplicate"


@dataclass(frozen=True, slots=True)
class RuleChange(IndexChange):
    """A committed rules change: no lookup mapping moves, but subscribers learn the rules."""

    rules_put: tuple[Rule, ...] = ()
    rules_removed: tuple[str, ...] = ()


def _field_errors(err: FwruleError) -> list[FieldError]:
    errs = err.errors if isinstance(err, FwruleMultiError) else [err]
    return [FieldError(e.field, INVALID, e.message) for e in errs]


def validate(payload: Mapping[str, Any]) -> FirewallRule:
    """Check a complete payload; raise ``InvalidParameters`` (422) naming every bad field, with
    the rule language's own messages (``message`` is the parser's/first error's text)."""
    unknown = sorted(str(k) for k in payload if k not in RULE_FIELDS)
    if unknown:
        raise InvalidParameters(
            [FieldError(k, UNKNOWN, f"unknown parameter {k!r}") for k in unknown],
            f"Unknown parameters: {', '.join(unknown)}",
        )
    if payload.get("global") in (False, "false") and "owner_uuid" not in payload:
        raise InvalidParameters(
            [FieldError("owner_uuid", MISSING, "owner_uuid required")], "owner_uuid required"
        )
    try:
        return create_rule(dict(payload), enforce_global=True, enforce_subnet_mask=True)
    except FwruleError as err:
        raise InvalidParameters(_field_errors(err), err.message) from None


def _payload_of(r: Rule) -> dict[str, Any]:
    out: dict[str, Any] = {"rule": r.rule, "uuid": r.uuid, "enabled": r.enabled, "log": r.log}
    if r.is_global:
        out["global"] = True
    else:
        out["owner_uuid"] = r.owner_uuid
    if r.description is not None:
        out["description"] = r.description
    return out


def merge(stored: Rule, changes: Mapping[str, Any]) -> dict[str, Any]:
    """The payload of ``stored`` with ``changes`` applied (update semantics)."""
    payload = _payload_of(stored)
    if "uuid" in changes and changes["uuid"] != stored.uuid:
        raise InvalidParameters([FieldError("uuid", INVALID, "uuid cannot be changed")])
    for key, value in changes.items():
        if key == "uuid":
            continue
        if key == "description" and value is None:
            payload.pop("description", None)
            continue
        payload[key] = value
    if "owner_uuid" in changes and "global" not in changes:
        payload.pop("global", None)
    elif (
        "global" in changes
        and "owner_uuid" not in changes
        and changes["global"]
        in (
            True,
            "true",
        )
    ):
        payload.pop("owner_uuid", None)
    return payload


def _row(fr: FirewallRule, version: int, created: str) -> Rule:
    return Rule(
        uuid=fr.uuid,
        rule=fr.text,
        owner_uuid=fr.owner_uuid,
        is_global=fr.owner_uuid is None,
        enabled=fr.enabled,
        description=fr.description,
        log=fr.log,
        version=version,
        created=created,
    )


def _same(a: Rule, b: Rule) -> bool:
    return (a.rule, a.owner_uuid, a.is_global, a.enabled, a.description, a.log) == (
        b.rule,
        b.owner_uuid,
        b.is_global,
        b.enabled,
        b.description,
        b.log,
    )


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _body(body: Any) -> Mapping[str, Any]:
    if not isinstance(body, Mapping):
        raise InvalidParameters([FieldError("body", INVALID, "the body must be a JSON object")])
    return body


# -- operations ---------------------------------------------------------------------------------


async def create(directory: Any, body: Mapping[str, Any]) -> Rule:
    """Validate and store a new rule (201); 409 Conflict when the uuid exists."""
    fr = validate(_body(body))

    def fn(tx: Any, version: int) -> tuple[Rule, RuleChange]:
        if tx.get_rule(fr.uuid) is not None:
            raise Conflict(
                f"rule {fr.uuid} already exists",
                [FieldError("uuid", DUPLICATE, f"rule {fr.uuid} already exists")],
            )
        row = _row(fr, version, _now())
        tx.put_rule(row)
        return row, RuleChange(version, rules_put=(row,))

    return await directory.write(fn)


async def get(directory: Any, uuid: str) -> Rule:
    r = await directory.read(lambda tx: tx.get_rule(uuid))
    if r is None:
        raise NotFound("rule", uuid)
    return r


async def list_all(directory: Any) -> list[Rule]:
    return await directory.read(lambda tx: tx.list_rules())


async def update(directory: Any, uuid: str, body: Mapping[str, Any]) -> Rule:
    """Merge ``body`` over the stored rule; 404 when missing; the version grows."""
    changes = _body(body)
    unknown = sorted(str(k) for k in changes if k not in RULE_FIELDS)
    if unknown:
        validate(changes)  # raises UnknownParameters

    def fn(tx: Any, version: int) -> tuple[Rule, RuleChange]:
        stored = tx.get_rule(uuid)
        if stored is None:
            raise NotFound("rule", uuid)
        fr = validate(merge(stored, changes))
        row = _row(fr, version, stored.created)
        if _same(row, stored):
            raise NoChange(stored)
        tx.put_rule(row)
        return row, RuleChange(version, rules_put=(row,))

    return await directory.write(fn)


async def delete(directory: Any, uuid: str) -> None:
    def fn(tx: Any, version: int) -> tuple[None, RuleChange]:
        if not tx.delete_rule(uuid):
            raise NotFound("rule", uuid)
        return None, RuleChange(version, rules_removed=(uuid,))

    await directory.write(fn)


# -- filters ------------------------------------------------------------------------------------


def parse_tag_filter(text: str) -> tuple[str, str | None]:
    """``name`` or ``name=value``."""
    name, sep, value = text.partition("=")
    return name, (value if sep else None)


def filter_rules(
    rules: Iterable[Rule],
    *,
    owner_uuid: str | None = None,
    enabled: bool | None = None,
    is_global: bool | None = None,
    tags: Iterable[tuple[str, str | None]] = (),
    vnic: VnicModel | None = None,
) -> list[Rule]:
    """The rules passing every given filter (AND); several tags match any of them."""
    tag_list = list(tags)
    out: list[FwRule] = []
    for r in rules:
        if owner_uuid is not None and r.owner_uuid != owner_uuid:
            continue
        if enabled is not None and r.enabled != enabled:
            continue
        if is_global is not None and r.is_global != is_global:
            continue
        fw = FwRule.of(r)
        if tag_list and not any(fw.names_tag(n, v) for n, v in tag_list):
            continue
        out.append(fw)
    if vnic is not None:
        out = rules_naming_vnic(out, vnic)
    return [f.stored for f in out]


def rule_json(r: Rule) -> dict[str, Any]:
    """The API shape of a rule."""
    return r.to_json()


__all__ = [
    "RULE_FIELDS",
    "RuleChange",
    "create",
    "delete",
    "filter_rules",
    "get",
    "list_all",
    "merge",
    "parse_tag_filter",
    "rule_json",
    "update",
    "validate",
]
