"""Recursive-descent parser for every version (1-4) of the rule language.

The reference parser is a jison LALR(1) table. This one is hand-written but walks the same
states in the same order, so that it reports the same error at the same place:

- The lexer is asked for a token exactly when the LR parser would ask for its lookahead:
  right after the previous token was consumed (the only exception is the number after
  ``PRIORITY``, which is checked before the next token is lexed).
- Every point where the LR parser reduces is written as ``self._follow(SET)``: the lookahead
  must be in the LR state's lookahead set (else a syntax error listing that set), and only
  then does the element's semantic check run. So in ``ip 10.288.0.0 foo`` the syntax error on
  ``foo`` wins over the bad address, while in ``ip 10.288.0.0 TO`` the address is reported.
- The sets are those of the LALR states, merged lookaheads included, which is why after
  ``PORT all`` inside parentheses the error lists ``'EOF', 'PRIORITY', ')'``.

Syntax errors read ``Error at character N: 'TEXT', expected: LIST, found: KIND`` where N is the
column just past the last consumed token, TEXT the offending token as written, LIST the
state's terminals in the grammar's terminal order (``all any ip subnet tag vm`` in lower case,
the rest as named, e.g. ``'WORD'``) and KIND the offending terminal (``word`` in lower case,
the rest as named, e.g. ``EOF``, ``ALL``). Lexer errors come from :mod:`.lexer`.

Checks made while parsing (first failure wins, left to right): addresses, subnets (and with
``enforce_subnet_mask`` their host bits), VM uuids, ports and ranges, ICMP types and codes,
priority, and the version gates (``max_version``). Empty tag names and values are accepted,
as the reference accepts them.
"""

from __future__ import annotations

from .errors import FwruleError
from .lexer import Lexer, Token
from .model import CURRENT_VERSION, IcmpType, ParsedRule, PortRange, ProtoTarget, Target
from .validate import (
    check_icmp_code,
    check_icmp_type,
    check_ipv4,
    check_ipv6,
    check_port,
    check_port_order,
    check_priority,
    check_subnet,
    check_uuid,
)

# Terminal order of the reference grammar; "expected" lists are printed in this order.
_TERMINAL_ORDER = (
    "FROM",
    "TO",
    "EOF",
    "PRIORITY",
    "WORD",
    "(",
    ")",
    "OR",
    "ALL",
    "VMS",
    "ANY",
    "IP",
    "IPV4ADDR",
    "SUBNET",
    "CIDRSUFFIX",
    "IPV6ADDR",
    "VM",
    "TAG",
    "=",
    "STRING",
    "BLOCK",
    "ALLOW",
    "TCP",
    "UDP",
    "ICMP",
    "ICMP6",
    "AH",
    "ESP",
    "AND",
    "PORT",
    "PORTS",
    "-",
    ",",
    "TYPE",
    "CODE",
)
_RANK = {name: i for i, name in enumerate(_TERMINAL_ORDER)}
_LOWER_IN_EXPECTED = frozenset({"ALL", "ANY", "IP", "SUBNET", "TAG", "VM"})

# Lookahead sets of the LR states, named for where they occur.
_SIDE_START = frozenset({"(", "ALL", "ANY", "IP", "SUBNET", "VM", "TAG"})
_PAREN_START = frozenset({"ALL", "ANY", "IP", "SUBNET", "VM", "TAG"})
_TARGET_START = frozenset({"IP", "SUBNET", "VM", "TAG"})
_AFTER_SIDE = frozenset({"TO", "BLOCK", "ALLOW"})
_AFTER_TARGET = frozenset({"TO", ")", "OR", "BLOCK", "ALLOW"})
_AFTER_TAG_STRING = _AFTER_TARGET | {"="}
_IN_LIST = frozenset({")", "OR"})
_ADDRESS = frozenset({"IPV4ADDR", "IPV6ADDR"})
_TAG_STRING = frozenset({"WORD", "STRING"})
_ACTION = frozenset({"BLOCK", "ALLOW"})
_PROTOCOL = frozenset({"TCP", "UDP", "ICMP", "ICMP6", "AH", "ESP"})
_END = frozenset({"EOF", "PRIORITY"})
_PORT_START = frozenset({"(", "PORT", "PORTS"})
_TYPE_START = frozenset({"(", "TYPE"})
_NUMBER_OR_ALL = frozenset({"WORD", "ALL"})
_AFTER_NUMBER = frozenset({"EOF", "PRIORITY", ")", "AND"})
_AFTER_ALL = frozenset({"EOF", "PRIORITY", ")"})
_AFTER_TYPE = _AFTER_NUMBER | {"CODE"}
_AND_LIST = frozenset({")", "AND"})
_AFTER_RANGE_WORD = frozenset({"EOF", "PRIORITY", "-", ","})
_AFTER_RANGE = frozenset({"EOF", "PRIORITY", ","})


def _one(kind: str) -> frozenset[str]:
    return frozenset({kind})


def _show_expected(kind: str) -> str:
    return f"'{kind.lower()}'" if kind in _LOWER_IN_EXPECTED else f"'{kind}'"


class _Parser:
    def __init__(self, text: str, max_version: int, enforce_subnet_mask: bool) -> None:
        self._lexer = Lexer(text)
        self._lookahead: Token | None = None
        self._col = 0  # column just past the last consumed token
        self._max_version = max_version
        self._enforce_mask = enforce_subnet_mask

    # -- token plumbing ------------------------------------------------------------------
    def _peek(self) -> Token:
        if self._lookahead is None:
            self._lookahead = self._lexer.next_token()
        return self._lookahead

    def _take(self) -> Token:
        token = self._peek()
        self._lookahead = None
        self._col = token.end_col
        return token

    def _follow(self, allowed: frozenset[str]) -> Token:
        """Check the lookahead against an LR state's set; return it without consuming it."""
        token = self._peek()
        if token.kind not in allowed:
            expected = ", ".join(_show_expected(k) for k in sorted(allowed, key=_RANK.__getitem__))
            found = "word" if token.kind == "WORD" else token.kind
            raise FwruleError(
                "rule",
                f"Error at character {self._col}: '{token.text}', expected: {expected}, "
                f"found: {found}",
            )
        return token

    def _expect(self, allowed: frozenset[str]) -> Token:
        self._follow(allowed)
        return self._take()

    def _gate(self, version: int, feature: str) -> None:
        if version > self._max_version:
            raise FwruleError(
                "rule", f"The rule uses a feature ({feature}) newer than this API allows"
            )

    # -- rule ----------------------------------------------------------------------------
    def rule(self) -> ParsedRule:
        self._expect(_one("FROM"))
        from_targets = self._side()
        self._expect(_one("TO"))
        to_targets = self._side()
        action = self._expect(_ACTION).kind.lower()
        self._follow(_PROTOCOL)
        protocol, targets = self._protocol()
        self._follow(_END)
        priority: int | None = None
        if self._take().kind == "PRIORITY":
            word = self._expect(_one("WORD"))
            priority = check_priority(word.value)
            self._expect(_one("EOF"))
            self._gate(4, "priority levels")
        return ParsedRule(from_targets, to_targets, action, protocol, targets, priority)

    # -- sides and targets ---------------------------------------------------------------
    def _side(self) -> tuple[Target, ...]:
        first = self._expect(_SIDE_START)
        if first.kind == "ANY":
            self._follow(_AFTER_SIDE)
            return (Target("wildcard", "any"),)
        if first.kind == "ALL":
            self._expect(_one("VMS"))
            self._follow(_AFTER_SIDE)
            return (Target("wildcard", "vmall"),)
        if first.kind != "(":
            target = self._target(first)
            self._follow(_AFTER_SIDE)
            return (target,)
        inner = self._expect(_PAREN_START)
        if inner.kind == "ANY":
            self._expect(_one(")"))
            self._follow(_AFTER_SIDE)
            return (Target("wildcard", "any"),)
        if inner.kind == "ALL":
            self._expect(_one("VMS"))
            self._expect(_one(")"))
            self._follow(_AFTER_SIDE)
            return (Target("wildcard", "vmall"),)
        targets = [self._target(inner)]
        while self._follow(_IN_LIST).kind == "OR":
            self._take()
            targets.append(self._target(self._expect(_TARGET_START)))
        self._take()  # ")"
        self._follow(_AFTER_SIDE)
        return tuple(targets)

    def _target(self, keyword: Token) -> Target:
        """Parse the rest of a target whose keyword (IP, SUBNET, VM, TAG) was consumed."""
        if keyword.kind == "IP":
            addr = self._expect(_ADDRESS)
            self._follow(_AFTER_TARGET)
            if addr.kind == "IPV6ADDR":
                self._gate(3, "IPv6")
                return Target("ip", check_ipv6(addr.value))
            return Target("ip", check_ipv4(addr.value))
        if keyword.kind == "SUBNET":
            addr = self._expect(_ADDRESS)
            suffix = self._expect(_one("CIDRSUFFIX"))
            self._follow(_AFTER_TARGET)
            if addr.kind == "IPV6ADDR":
                self._gate(3, "IPv6")
            text = addr.value + suffix.value
            return Target("subnet", check_subnet(text, enforce_mask=self._enforce_mask))
        if keyword.kind == "VM":
            word = self._expect(_one("WORD"))
            self._follow(_AFTER_TARGET)
            return Target("vm", check_uuid(word.value))
        # TAG
        name = self._expect(_TAG_STRING).value
        value: str | None = None
        if self._follow(_AFTER_TAG_STRING).kind == "=":
            self._take()
            value = self._expect(_TAG_STRING).value
            self._follow(_AFTER_TAG_STRING)
            self._follow(_AFTER_TARGET)
        return Target("tag", name, value)

    # -- protocols -----------------------------------------------------------------------
    def _protocol(self) -> tuple[str, tuple[ProtoTarget, ...]]:
        proto = self._take()
        name = proto.kind.lower()
        if proto.kind in ("AH", "ESP"):
            self._follow(_END)
            self._gate(4, proto.kind)
            return name, ("all",)
        if proto.kind in ("TCP", "UDP"):
            return name, self._ports()
        targets = self._types()
        if proto.kind == "ICMP6":
            self._follow(_END)
            self._gate(3, "IPv6")
        return name, targets

    def _ports(self) -> tuple[ProtoTarget, ...]:
        first = self._expect(_PORT_START)
        if first.kind == "PORTS":
            ranges = [self._port_range()]
            while self._follow(_AFTER_RANGE).kind == ",":
                self._take()
                ranges.append(self._port_range())
            self._gate(2, "port ranges")
            return tuple(ranges)
        if first.kind == "PORT":
            value = self._expect(_NUMBER_OR_ALL)
            if value.kind == "ALL":
                self._follow(_AFTER_ALL)
                return ("all",)
            self._follow(_AFTER_NUMBER)
            return (check_port(value.value),)
        # "(" PORT ...
        self._expect(_one("PORT"))
        value = self._expect(_NUMBER_OR_ALL)
        if value.kind == "ALL":
            self._follow(_AFTER_ALL)
            self._expect(_one(")"))
            return ("all",)
        self._follow(_AFTER_NUMBER)
        ports: list[ProtoTarget] = [check_port(value.value)]
        while self._follow(_AND_LIST).kind == "AND":
            self._take()
            self._expect(_one("PORT"))
            word = self._expect(_one("WORD"))
            self._follow(_AFTER_NUMBER)
            ports.append(check_port(word.value))
        self._take()  # ")"
        return tuple(ports)

    def _port_range(self) -> int | PortRange:
        start = self._expect(_one("WORD"))
        if self._follow(_AFTER_RANGE_WORD).kind == "-":
            self._take()
            end = self._expect(_one("WORD"))
            self._follow(_AFTER_RANGE)
            low, high = check_port(start.value), check_port(end.value)
            check_port_order(low, high)
            return PortRange(low, high)
        return _compact_range(start.value)

    def _types(self) -> tuple[ProtoTarget, ...]:
        first = self._expect(_TYPE_START)
        if first.kind == "(":
            self._expect(_one("TYPE"))
        value = self._expect(_NUMBER_OR_ALL)
        if value.kind == "ALL":
            self._follow(_AFTER_ALL)
            self._gate(3, "all ICMP types")
            if first.kind == "(":
                self._expect(_one(")"))
            return ("all",)
        types: list[ProtoTarget] = [self._icmp_type(value)]
        if first.kind == "TYPE":
            return tuple(types)
        while self._follow(_AND_LIST).kind == "AND":
            self._take()
            self._expect(_one("TYPE"))
            types.append(self._icmp_type(self._expect(_one("WORD"))))
        self._take()  # ")"
        return tuple(types)

    def _icmp_type(self, word: Token) -> IcmpType:
        """``TYPE n [CODE c]`` after the number ``word`` was consumed."""
        self._follow(_AFTER_TYPE)
        icmp_type = check_icmp_type(word.value)
        if self._peek().kind != "CODE":
            return IcmpType(icmp_type)
        self._take()
        code = self._expect(_one("WORD"))
        self._follow(_AFTER_NUMBER)
        return IcmpType(icmp_type, check_icmp_code(code.value))


def _compact_range(word: str) -> int | PortRange:
    """A ``PORTS`` element written as one WORD: ``80`` or ``20-40``."""
    parts = word.split("-")
    if len(parts) == 1:
        return check_port(parts[0])
    if len(parts) == 2:
        low, high = check_port(parts[0]), check_port(parts[1])
        check_port_order(low, high)
        return PortRange(low, high)
    raise FwruleError("rule", f'"{word}" is not a valid port number or range')


def parse_raw(
    text: str, *, max_version: int = CURRENT_VERSION, enforce_subnet_mask: bool = False
) -> ParsedRule:
    """Parse rule text into its raw form (source order, duplicates kept).

    Runs the checks made while parsing but not the post-parse checks (limits, ICMP address
    families, "rule does not affect VMs"); :func:`protocol.fwrule.parse` does both.
    Raises :class:`FwruleError` (field ``"rule"``) and nothing else for any string.
    """
    if not isinstance(text, str):
        raise FwruleError("rule", "rule must be a string")
    if max_version not in (1, 2, 3, 4):
        raise ValueError(f"max_version must be 1, 2, 3 or 4, not {max_version!r}")
    return _Parser(text, max_version, enforce_subnet_mask).rule()
