"""Canonical rule text: the one spelling of a rule, byte-identical to sdc-fwrule's ``text()``.

Built from the normalised :class:`~protocol.fwrule.model.Rule`, never from the input string::

    FROM <side> TO <side> <ALLOW|BLOCK> <protocol><clause>[ PRIORITY n]

- A side is its targets joined by `` OR ``, in parentheses only when there are two or more,
  in the order wildcards, ips, subnets, tags, vms (each group already sorted). ``any``,
  ``all vms``, ``ip X``, ``subnet X``, ``vm X``; tags are always quoted: ``tag "n"`` or
  ``tag "n" = "v"`` (see :func:`quote_tag`).
- Upper-case keywords: ``FROM TO ALLOW BLOCK PORT PORTS AND OR TYPE CODE PRIORITY``; lower
  case: target keywords, protocol names and the word ``all``.
- tcp/udp: ``PORT all``; ``PORTS a - b, n, ...`` as soon as one target is a range; else
  ``PORT n`` or ``(PORT a AND PORT b ...)``. icmp/icmp6: ``TYPE all``, ``TYPE t``,
  ``TYPE t CODE c`` or ``(TYPE a AND TYPE b CODE c ...)``. ah/esp: nothing.
- ``PRIORITY n`` only when n > 0.

ICMP order (spec quirk 2): numeric by (type, code), a type without code before the same type
with codes. The reference's comparator is inconsistent only for lists mixing coded and
uncoded entries of one type, which it leaves in an engine-dependent order; we always sort.

Parsing canonical text gives back an equal :class:`Rule`, and its canonical text is the same
string (canonical text is a fixed point).
"""

from __future__ import annotations

from .model import IcmpType, PortRange, Rule, Side

_SHORT_ESCAPES = {
    '"': '\\"',
    "(": "\\(",
    ")": "\\)",
    "\\": "\\\\",
    "\b": "\\b",
    "\t": "\\t",
    "\n": "\\n",
    "\f": "\\f",
    "\r": "\\r",
}
_UNICODE_ESCAPED = frozenset(
    [chr(c) for c in range(0x20) if chr(c) not in _SHORT_ESCAPES]
    + ["\x7f", "\x85", "\xa0", "\u1680", "\u180e"]
    + [chr(c) for c in range(0x2000, 0x200E)]
    + ["\u2028", "\u2029", "\u202f", "\u205f", "\u2060", "\u3000", "\ufeff"]
)


def escape_tag(text: str) -> str:
    """Escape a tag name or value for use between double quotes.

    ``"`` ``(`` ``)`` ``\\`` get a backslash; BS, TAB, LF, FF, CR become ``\\b \\t \\n \\f
    \\r``; other C0 controls, DEL, U+0085, U+00A0, U+1680, U+180E, U+2000-U+200D, U+2028,
    U+2029, U+202F, U+205F, U+2060, U+3000 and U+FEFF become ``\\uXXXX`` (upper-case hex);
    everything else, ``/`` included, is written as is. A lone surrogate (only possible from a
    lone ``\\uD8xx`` escape) is also written as ``\\uXXXX`` so the text stays valid UTF-8.
    """
    out: list[str] = []
    for ch in text:
        if ch in _SHORT_ESCAPES:
            out.append(_SHORT_ESCAPES[ch])
        elif ch in _UNICODE_ESCAPED or 0xD800 <= ord(ch) <= 0xDFFF:
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    return "".join(out)


def quote_tag(text: str) -> str:
    """``text`` escaped and wrapped in double quotes."""
    return f'"{escape_tag(text)}"'


def side_text(side: Side) -> str:
    """One side of a rule, parenthesised when it has more than one target."""
    parts: list[str] = []
    parts.extend("all vms" if w == "vmall" else w for w in side.wildcards)
    parts.extend(f"ip {ip}" for ip in side.ips)
    parts.extend(f"subnet {subnet}" for subnet in side.subnets)
    for name, value in side.tags:
        if value is None:
            parts.append(f"tag {quote_tag(name)}")
        else:
            parts.append(f"tag {quote_tag(name)} = {quote_tag(value)}")
    parts.extend(f"vm {vm}" for vm in side.vms)
    joined = " OR ".join(parts)
    return f"({joined})" if len(parts) > 1 else joined


def _ports_text(ports: tuple[int | PortRange, ...] | str) -> str:
    if ports == "all":
        return " PORT all"
    assert not isinstance(ports, str)
    if any(isinstance(p, PortRange) for p in ports):
        items = (f"{p.start} - {p.end}" if isinstance(p, PortRange) else str(p) for p in ports)
        return " PORTS " + ", ".join(items)
    joined = " AND PORT ".join(str(p) for p in ports)
    return f" (PORT {joined})" if len(ports) > 1 else f" PORT {joined}"


def _types_text(types: tuple[IcmpType, ...] | str) -> str:
    if types == "all":
        return " TYPE all"
    assert not isinstance(types, str)
    items = [f"{t.type}" if t.code is None else f"{t.type} CODE {t.code}" for t in types]
    joined = " AND TYPE ".join(items)
    return f" (TYPE {joined})" if len(items) > 1 else f" TYPE {joined}"


def canonical_text(rule: Rule) -> str:
    """The canonical text of a normalised rule."""
    if rule.ports is not None:
        clause = _ports_text(rule.ports)
    elif rule.types is not None:
        clause = _types_text(rule.types)
    else:
        clause = ""
    priority = f" PRIORITY {rule.priority}" if rule.priority > 0 else ""
    return (
        f"FROM {side_text(rule.from_side)} TO {side_text(rule.to_side)} "
        f"{rule.action.upper()} {rule.protocol}{clause}{priority}"
    )
