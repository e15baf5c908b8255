"""The SmartDataCenter firewall rule language (fwrule), in pure Python.

What this package owns: turning rule text such as ::

    FROM (tag "role" = "www" OR ip 10.0.0.1) TO all vms ALLOW tcp PORTS 80, 8000 - 8100

into a checked, normalised :class:`Rule`; writing a rule back as canonical text identical to
sdc-fwrule's ``text()``; and the rule object around it (uuid, owner, enabled, log, ...) with
the reference's payload validation. No I/O, nothing imported from portolan or varpd. Deciding
which VNICs a rule applies to, and enforcing it, is portolan's and varpd's business; this
package only exposes what they need (see "For the enforcement code" below).

Theory of operation
-------------------
text ──► lexer ──► parser ──► post-parse checks ──► Rule ──► canonical text
          (lexer.py) (parser.py)    (model.build_rule)   (model.py)  (canonical.py)

1. **Lexer** (:mod:`.lexer`): first-match in the reference's rule order (not longest-match);
   keywords only all-upper or all-lower; double-quoted strings with ``\\" \\\\ \\/ \\( \\) \\b
   \\f \\n \\r \\t \\uXXXX`` escapes; IPv4/IPv6 addresses, ``/len`` suffixes, WORDs. Lazy, so
   an unlexable character is reported only when the parser reaches it.
2. **Parser** (:mod:`.parser`): hand-written recursive descent that visits the states of the
   reference's LALR table in the same order. Syntax errors name the position, the token, what
   was expected and what was found, with the reference's exact wording. Element checks
   (addresses, subnets, uuids, ports, ranges, ICMP numbers, priority) and the version gates
   (``max_version``) run where the reference runs them. Output: :class:`ParsedRule`.
3. **Post-parse checks** (:func:`build_rule`): protocol-target limit (24, or 8 when
   ``max_version < 4``), 24 targets per side, ICMP address families, "rule does not affect
   VMs" - in that order.
4. **Normalised form** (:class:`Rule`, :class:`Side`): sorted, de-duplicated target groups,
   tag absorption, sorted ports/types, priority defaulting to 0.
5. **Canonical text** (:func:`canonical_text`, ``Rule.text()``).

Rule objects (:mod:`.rule`): :func:`create_rule` validates a payload, collecting field errors
in the reference's order, and returns a :class:`FirewallRule` whose ``serialize()`` gives the
API shape.

Invariants
----------
- Every failure, for any input string or payload, is a :class:`FwruleError` (a
  ``ValueError``) with ``field`` and ``message``; several payload errors together are a
  :class:`FwruleMultiError` with ``errors``. No other exception escapes ``parse``/``create_rule``.
- ``parse(r.text()) == r`` for every ``Rule`` r produced by ``parse``, and ``text`` is
  idempotent: canonical text is a fixed point.
- ``Rule``/``Side``/``FirewallRule`` are frozen and hashable; equal rules mean the same thing.
- Side targets are sorted by UTF-16 code units (JavaScript's order) so canonical text is
  byte-identical to the reference even for tags outside the BMP.

For the enforcement code
------------------------
``rule.from_side`` / ``rule.to_side`` each have ``any``, ``all_vms``, ``ips``, ``subnets``,
``tags`` (tuple of ``(name, value | None)``), ``tag_names``, ``tag_values(name)``, ``vms``,
``selects_vms``; the rule has the same groups merged over both sides (``rule.tags``,
``rule.vms``, ``rule.all_vms``, ...), ``action``, ``protocol`` (``protocol_number``),
``priority``, ``ports`` (``"all"`` or ints and :class:`PortRange`), ``types`` (``"all"`` or
:class:`IcmpType`), ``port_ranges()``, ``matches_port()``, ``matches_icmp()``.

Decisions on the spec's open questions (spec/fwrule.md section 7)
----------------------------------------------------------------
1. Empty input: ``Error at character 0: '', expected: 'FROM', found: EOF`` (the reference's
   current code; its test's "found: empty string" is stale). A payload whose ``rule`` is
   missing or empty is ``No rule specified``.
2. ICMP type order: numeric by (type, code), a type without a code before the same type with
   codes, always (the reference leaves mixed lists in an engine-dependent order).
   Also not copied from the reference's oddities: ``tag "__proto__"`` is an ordinary tag.
   Copied from the reference, since issue 12 (rules sdc-fwrule accepts must be accepted, with
   the same canonical text, or rules written for Triton fail here): every character of
   JavaScript's ``\\s`` separates tokens (NBSP, U+2003, U+3000, U+FEFF, ...); ``subnet``
   accepts leading zeros in IPv4 octets and in the prefix length (``09.0.0.0/24``,
   ``10.1.1.1/012``), reads them as decimal (`validate.subnet_network`) and keeps the text
   as written; ``ip`` still refuses them, as the reference does. (Earlier we refused all
   three to keep rule text unambiguous; compatibility won.)
6. Limits: 24 targets per side and 24 ports/types (8 when ``max_version < 4``), as the
   reference's code enforces (its docs say 32 / 8).
7. ``enabled``, ``log`` and ``global`` accept the strings ``"true"``/``"false"`` and are
   coerced to booleans; ``serialize()`` always returns real booleans.
8. Empty tags are accepted as sdc-fwrule accepts them, with its canonical text: ``tag ""``
   names the tag whose name is empty, ``tag "a" = ""`` matches a VNIC whose tag ``a`` is the
   empty string (exactly that value, never "any value": FWAPI's storage widened it, which we
   do not copy). Until issue 12 both were refused; refusing rules the reference accepts broke
   rule sets moved from Triton, and an exact-value reading is as safe as any other value.
"""

from __future__ import annotations

from .canonical import canonical_text, escape_tag, quote_tag
from .errors import FwruleError, FwruleMultiError
from .lexer import KEYWORDS, Token, tokenize
from .model import (
    ACTIONS,
    CURRENT_VERSION,
    MAX_PROTOCOL_TARGETS,
    MAX_TARGETS_PER_SIDE,
    PROTOCOLS,
    IcmpType,
    ParsedRule,
    PortRange,
    Rule,
    Side,
    Target,
    build_rule,
)
from .parser import parse_raw
from .rule import FIELDS, FirewallRule, create_rule, generate_version
from .validate import subnet_network


def parse(
    text: str, *, max_version: int = CURRENT_VERSION, enforce_subnet_mask: bool = False
) -> Rule:
    """Parse and check rule text; return the normalised :class:`Rule`.

    ``max_version`` (1-4) rejects features newer than that language version;
    ``enforce_subnet_mask`` rejects subnets with host bits set (FWAPI turns it on).
    Raises :class:`FwruleError` with field ``"rule"``.
    """
    return build_rule(
        parse_raw(text, max_version=max_version, enforce_subnet_mask=enforce_subnet_mask),
        max_version=max_version,
    )


def canonicalize(
    text: str, *, max_version: int = CURRENT_VERSION, enforce_subnet_mask: bool = False
) -> str:
    """Shorthand for ``parse(text, ...).text()``: the canonical text of rule text."""
    return parse(text, max_version=max_version, enforce_subnet_mask=enforce_subnet_mask).text()


__all__ = [
    "ACTIONS",
    "CURRENT_VERSION",
    "FIELDS",
    "KEYWORDS",
    "MAX_PROTOCOL_TARGETS",
    "MAX_TARGETS_PER_SIDE",
    "PROTOCOLS",
    "FirewallRule",
    "FwruleError",
    "FwruleMultiError",
    "IcmpType",
    "ParsedRule",
    "PortRange",
    "Rule",
    "Side",
    "Target",
    "Token",
    "build_rule",
    "canonical_text",
    "canonicalize",
    "create_rule",
    "escape_tag",
    "generate_version",
    "parse",
    "parse_raw",
    "quote_tag",
    "subnet_network",
    "tokenize",
]
