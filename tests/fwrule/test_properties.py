"""Property tests: random valid rules round-trip; truncated and garbage input fail cleanly."""

from __future__ import annotations

import ipaddress
import string
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.fwrule import KEYWORDS, FwruleError, create_rule, parse

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEW = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

_KEYWORD_SPELLINGS = {k for kw in KEYWORDS for k in (kw, kw.lower())}


# -- a tiny rule AST and a renderer with random spelling ---------------------------------------
@dataclass
class TargetAst:
    kind: str  # ip4 ip6 subnet4 subnet6 tag vm
    value: str
    tag_value: str | None = None


@dataclass
class RuleAst:
    from_side: str | list[TargetAst]  # "any", "vmall" or targets
    to_side: str | list[TargetAst]
    action: str
    protocol: str
    clause: list  # protocol clause description, see _clause()
    priority: int | None
    style: dict = field(default_factory=dict)


def _unquoted_ok(text: str) -> bool:
    if (
        not text
        or text[0] == "-"
        or any(c not in string.ascii_letters + string.digits + "_-" for c in text)
    ):
        return False
    head = text.split("-", 1)[0]
    return head not in _KEYWORD_SPELLINGS


@st.composite
def tag_texts(draw: st.DrawFn) -> str:
    return draw(
        st.one_of(
            st.text(alphabet=string.ascii_letters + string.digits + "_-", min_size=1, max_size=8),
            st.sampled_from(["all", "TCP", "port", "a b", "x.y", "\u2603", "\U0001f600", "tab\t"]),
            st.text(min_size=1, max_size=6),
        )
    )


@st.composite
def render_string(draw: st.DrawFn, text: str) -> str:
    """Render a tag name/value: bare WORD when possible (sometimes), else quoted and escaped."""
    if _unquoted_ok(text) and draw(st.booleans()):
        return text
    out = []
    for ch in text:
        code = ord(ch)
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch in "/()" and draw(st.booleans()):
            out.append("\\" + ch)
        elif ch in "\b\f\n\r\t" and draw(st.booleans()):
            out.append("\\" + {"\b": "b", "\f": "f", "\n": "n", "\r": "r", "\t": "t"}[ch])
        elif draw(st.integers(0, 4)) == 0:
            if code > 0xFFFF:
                hi = 0xD800 + ((code - 0x10000) >> 10)
                lo = 0xDC00 + ((code - 0x10000) & 0x3FF)
                out.append(f"\\u{hi:04x}\\u{lo:04X}")
            elif not 0xD800 <= code <= 0xDFFF:
                out.append(f"\\u{code:04x}" if draw(st.booleans()) else f"\\u{code:04X}")
            else:
                out.append(f"\\u{code:04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


UUIDS = st.uuids(version=4).map(str)


@st.composite
def targets(draw: st.DrawFn, family: str | None) -> TargetAst:
    kinds = ["tag", "vm"]
    if family in (None, "4"):
        kinds += ["ip4", "subnet4"]
    if family in (None, "6"):
        kinds += ["ip6", "subnet6"]
    kind = draw(st.sampled_from(kinds))
    if kind == "ip4":
        addr = draw(st.integers(1, 2**32 - 2))
        return TargetAst(kind, str(ipaddress.IPv4Address(addr)))
    if kind == "ip6":
        addr = ipaddress.IPv6Address(draw(st.integers(0, 2**128 - 1)))
        text = addr.exploded if draw(st.booleans()) else str(addr)
        return TargetAst(kind, text.lower())
    if kind == "subnet4":
        plen = draw(st.integers(0, 32))
        net = ipaddress.IPv4Network((draw(st.integers(0, 2**32 - 1)), plen), strict=False)
        return TargetAst(kind, f"{net.network_address}/{plen}")
    if kind == "subnet6":
        plen = draw(st.integers(0, 128))
        net = ipaddress.IPv6Network((draw(st.integers(0, 2**128 - 1)), plen), strict=False)
        return TargetAst(kind, f"{net.network_address}/{plen}")
    if kind == "vm":
        return TargetAst(kind, draw(UUIDS))
    name = draw(tag_texts())
    value = draw(st.one_of(st.none(), tag_texts()))
    return TargetAst(kind, name, value)


@st.composite
def sides(draw: st.DrawFn, family: str | None) -> str | list[TargetAst]:
    choice = draw(st.integers(0, 5))
    if choice == 0:
        return "any"
    if choice == 1:
        return "vmall"
    return draw(st.lists(targets(family), min_size=1, max_size=5))


@st.composite
def clauses(draw: st.DrawFn, protocol: str) -> list:
    if protocol in ("ah", "esp"):
        return []
    if protocol in ("tcp", "udp"):
        form = draw(st.sampled_from(["port", "all", "list", "ports"]))
        port = st.integers(1, 65535)
        if form == "port":
            return ["port", draw(port)]
        if form == "all":
            return ["all"]
        if form == "list":
            return ["list", draw(st.lists(port, min_size=1, max_size=6))]
        ranges = st.one_of(port, st.tuples(port, port).map(lambda p: (min(p), max(p))))
        return ["ports", draw(st.lists(ranges, min_size=1, max_size=6))]
    form = draw(st.sampled_from(["type", "all", "list"]))
    entry = st.tuples(st.integers(0, 255), st.one_of(st.none(), st.integers(0, 255)))
    if form == "all":
        return ["all"]
    if form == "type":
        return ["list", [draw(entry)]]
    return ["list", draw(st.lists(entry, min_size=1, max_size=6))]


@st.composite
def rule_asts(draw: st.DrawFn) -> RuleAst:
    protocol = draw(st.sampled_from(["tcp", "udp", "icmp", "icmp6", "ah", "esp"]))
    family = {"icmp": "4", "icmp6": "6"}.get(protocol)
    from_side = draw(sides(family))
    to_side = draw(sides(family))

    def selects(side: str | list[TargetAst]) -> bool:
        return side == "vmall" or (
            isinstance(side, list) and any(t.kind in ("tag", "vm") for t in side)
        )

    if not (selects(from_side) or selects(to_side)):
        to_side = "vmall"
    return RuleAst(
        from_side=from_side,
        to_side=to_side,
        action=draw(st.sampled_from(["allow", "block"])),
        protocol=protocol,
        clause=draw(clauses(protocol)),
        priority=draw(st.one_of(st.none(), st.integers(0, 100))),
    )


@st.composite
def rendered(draw: st.DrawFn, ast: RuleAst) -> str:
    """Render ``ast`` as text with random keyword case, spacing and optional parentheses."""
    ws = st.sampled_from([" ", "  ", "\t", "\n", " \r\n "])
    opt_ws = st.sampled_from(["", " ", "\n"])

    def kw(word: str) -> str:
        return word.upper() if draw(st.booleans()) else word.lower()

    def sp() -> str:
        return draw(ws)

    def osp() -> str:
        return draw(opt_ws)

    def paren(inner: str, force: bool) -> str:
        if force or draw(st.booleans()):
            return "(" + osp() + inner + osp() + ")"
        return inner

    def target(t: TargetAst) -> str:
        if t.kind in ("ip4", "ip6"):
            return kw("ip") + sp() + t.value
        if t.kind in ("subnet4", "subnet6"):
            addr, plen = t.value.split("/")
            return kw("subnet") + sp() + addr + osp() + "/" + plen
        if t.kind == "vm":
            return kw("vm") + sp() + t.value
        text = kw("tag") + sp() + draw(render_string(t.value))
        if t.tag_value is not None:
            text += osp() + "=" + osp() + draw(render_string(t.tag_value))
        return text

    def side(s: str | list[TargetAst]) -> str:
        if s == "any":
            return paren(kw("any"), False)
        if s == "vmall":
            return paren(kw("all") + sp() + kw("vms"), False)
        assert isinstance(s, list)
        joined = (sp() + kw("or") + sp()).join(target(t) for t in s)
        return paren(joined, len(s) > 1)

    def clause(c: list) -> str:
        if not c:
            return ""
        if ast.protocol in ("tcp", "udp"):
            if c[0] == "port":
                return sp() + kw("port") + sp() + str(c[1])
            if c[0] == "all":
                return sp() + paren(kw("port") + sp() + kw("all"), False)
            if c[0] == "list":
                inner = (sp() + kw("and") + sp()).join(kw("port") + sp() + str(p) for p in c[1])
                return sp() + paren(inner, len(c[1]) > 1)
            items = []
            for p in c[1]:
                if isinstance(p, int):
                    items.append(str(p))
                else:
                    dash = draw(st.sampled_from(["-", " - ", " -", "\t-\n"]))
                    items.append(f"{p[0]}{dash}{p[1]}")
            return sp() + kw("ports") + sp() + (osp() + "," + osp()).join(items)
        if c[0] == "all":
            return sp() + paren(kw("type") + sp() + kw("all"), False)
        entries = []
        for t, code in c[1]:
            e = kw("type") + sp() + str(t)
            if code is not None:
                e += sp() + kw("code") + sp() + str(code)
            entries.append(e)
        inner = (sp() + kw("and") + sp()).join(entries)
        return sp() + paren(inner, len(entries) > 1)

    def num(n: int) -> str:
        return "0" * draw(st.integers(0, 2)) + str(n)

    text = osp() + kw("from") + sp() + side(ast.from_side) + sp() + kw("to") + sp()
    text += side(ast.to_side) + sp() + kw(ast.action) + sp() + kw(ast.protocol) + clause(ast.clause)
    if ast.priority is not None:
        text += sp() + kw("priority") + sp() + num(ast.priority)
    return text + osp()


@st.composite
def valid_rule_texts(draw: st.DrawFn) -> tuple[RuleAst, str]:
    ast = draw(rule_asts())
    return ast, draw(rendered(ast))


def _expected_side(s: str | list[TargetAst]) -> tuple[set, set, set, set, set]:
    if s == "any":
        return {"any"}, set(), set(), set(), set()
    if s == "vmall":
        return {"vmall"}, set(), set(), set(), set()
    assert isinstance(s, list)
    bare = {t.value for t in s if t.kind == "tag" and t.tag_value is None}
    tags = {(t.value, t.tag_value) for t in s if t.kind == "tag" and t.value not in bare}
    tags |= {(name, None) for name in bare}
    return (
        set(),
        {t.value for t in s if t.kind in ("ip4", "ip6")},
        {t.value for t in s if t.kind in ("subnet4", "subnet6")},
        tags,
        {t.value for t in s if t.kind == "vm"},
    )


@SETTINGS
@given(valid_rule_texts())
def test_random_valid_rules_round_trip_through_canonical_text(case: tuple[RuleAst, str]) -> None:
    ast, text = case
    rule = parse(text)
    canonical = rule.text()
    again = parse(canonical)
    assert again == rule
    assert again.text() == canonical

    # the parse means what the AST says
    for side, expected in ((rule.from_side, ast.from_side), (rule.to_side, ast.to_side)):
        wildcards, ips, subnets, tags, vms = _expected_side(expected)
        assert set(side.wildcards) == wildcards
        assert set(side.ips) == ips and len(side.ips) == len(ips)
        assert set(side.subnets) == subnets
        assert set(side.tags) == tags and len(side.tags) == len(tags)
        assert set(side.vms) == vms
    assert rule.action == ast.action
    assert rule.protocol == ast.protocol
    assert rule.priority == (ast.priority or 0)
    if ast.clause and ast.clause[0] == "all":
        assert rule.proto_targets == ("all",)
    elif ast.protocol in ("tcp", "udp"):
        expected_ports = [ast.clause[1]] if ast.clause[0] == "port" else ast.clause[1]
        assert sorted(rule.port_ranges()) == sorted(
            (p, p) if isinstance(p, int) else tuple(p) for p in expected_ports
        )
    elif ast.protocol in ("icmp", "icmp6"):
        expected_types = sorted(ast.clause[1], key=lambda e: (e[0], -1 if e[1] is None else e[1]))
        assert list(rule.types) == expected_types


@FEW
@given(valid_rule_texts())
def test_random_valid_rules_make_valid_payloads(case: tuple[RuleAst, str]) -> None:
    _, text = case
    created = create_rule({"rule": text, "enabled": True})
    assert create_rule(created.serialize()).serialize() == created.serialize()


# -- truncation --------------------------------------------------------------------------------
V = "8a343ca8-b42a-4a27-a9c5-800f57d1e8ed"
TRUNCATION_RULES = [
    "FROM any TO all vms ALLOW tcp PORT 22",
    "from any to all vms allow tcp port all",
    "FROM (any) TO (all vms) ALLOW udp (PORT all)",
    f"FROM vm {V} TO any BLOCK tcp PORT 25",
    f"FROM (vm {V} OR tag web) TO any BLOCK udp (PORT 53 AND PORT 5353)",
    "FROM ip 10.0.0.1 TO tag role = www ALLOW tcp PORTS 80, 443, 8000-8100",
    "FROM subnet 10.0.0.0/8 TO tag role ALLOW tcp PORTS 1 - 1024 PRIORITY 10",
    'FROM tag "a b" = "c\\"d" TO all vms ALLOW tcp PORT 1',
    'FROM tag "\\u2603" TO tag "x\\(y\\)" BLOCK udp PORT 9',
    "FROM ip fd00::1 TO all vms ALLOW icmp6 TYPE 128 CODE 0",
    "FROM subnet fd00::/64 TO all vms ALLOW icmp6 (TYPE 135 AND TYPE 136)",
    "FROM any TO all vms ALLOW icmp TYPE all",
    "FROM any TO all vms ALLOW icmp (TYPE all)",
    "FROM any TO all vms ALLOW icmp TYPE 8 CODE 0",
    "FROM any TO all vms ALLOW ah",
    "FROM any TO all vms BLOCK esp PRIORITY 100",
    "FROM all vms TO all vms BLOCK tcp port 22 priority 5",
    "FROM (ip 1.2.3.4 OR ip 5.6.7.8 OR subnet 9.0.0.0/8) TO tag x ALLOW udp PORT 53",
    "FROM tag a=b TO tag c=d ALLOW tcp PORTS 20 -40",
    "FROM tag 1 = 0010 TO tag tcp_ = PORTs ALLOW udp PORT 53",
    "FROM any TO (tag a OR tag a = 1 OR tag b = 2) ALLOW tcp (PORT 1 AND PORT 2 AND PORT 3)",
    "FROM all vms TO ip 8.8.8.8 ALLOW udp PORTS 53",
    "FROM ip 10.0.0.1 TO vm " + V + " ALLOW tcp (PORT all)",
    "FROM any TO all vms ALLOW icmp6 (TYPE 1 CODE 2 AND TYPE 3)",
    "  FROM any TO all vms ALLOW tcp PORT 65535  ",
    'FROM tag "e" = x TO all vms ALLOW tcp PORT 1',
    "FROM (tag web-all OR tag x-1) TO all vms ALLOW tcp PORT 80",
    "FROM ip 10.0.0.1 TO tag x ALLOW tcp PORTS 50-50, 1-65535",
    "FROM any TO all vms ALLOW udp PORT 1 PRIORITY 0",
    "FROM any\nTO all vms\r\nALLOW\ttcp PORT 8080",
]


@pytest.mark.parametrize("text", TRUNCATION_RULES)
def test_truncated_rules_fail_with_fwrule_errors(text: str) -> None:
    parse(text)  # the whole rule is valid
    for cut in range(len(text)):
        prefix = text[:cut]
        try:
            parse(prefix)
        except FwruleError as err:
            assert err.field == "rule"
            continue
        # A prefix can only be a complete rule when the cut falls after a complete number
        # at the very end (PORT 2 of PORT 22, PORTS 80 of PORTS 80, 443, ...) or just before
        # the optional PRIORITY clause.
        rest = text[cut:].strip().lower()
        assert prefix.rstrip()[-1].isdigit() or rest.startswith("priority"), prefix


@pytest.mark.parametrize("text", TRUNCATION_RULES)
def test_rules_missing_their_last_token_fail(text: str) -> None:
    tokens = text.split()
    for n in range(len(tokens)):
        prefix = " ".join(tokens[:n])
        if n and tokens[n - 1][-1].isdigit() and not tokens[n - 1].startswith("/"):
            continue  # may legitimately be a complete rule
        if tokens[n].lower() == "priority":
            continue
        with pytest.raises(FwruleError):
            parse(prefix)


# -- garbage -----------------------------------------------------------------------------------
_SOUP = st.sampled_from(
    sorted(_KEYWORD_SPELLINGS)
    + ["(", ")", ",", "=", "-", "/24", "1.2.3.4", "fd00::1", '"x y"', '"\\q"', "80", "20-40"]
    + ["tag", "web", V, "999999", "#", "'", "\u00a0", "\U0001f600", "\n", ".", ":"]
)


@SETTINGS
@given(st.text(max_size=60))
def test_random_text_only_raises_fwrule_errors(text: str) -> None:
    try:
        parse(text)
    except FwruleError as err:
        assert err.field == "rule" and err.message


@SETTINGS
@given(st.lists(_SOUP, max_size=25), st.sampled_from([" ", "", "\n"]))
def test_random_token_soup_only_raises_fwrule_errors(words: list[str], sep: str) -> None:
    for max_version in (1, 4):
        try:
            parse(sep.join(words), max_version=max_version, enforce_subnet_mask=True)
        except FwruleError as err:
            assert err.message


_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.text(max_size=5),
    st.lists(st.integers(), max_size=2),
)


@SETTINGS
@given(
    st.dictionaries(
        st.sampled_from(
            [
                "rule",
                "uuid",
                "owner_uuid",
                "enabled",
                "log",
                "global",
                "description",
                "created_by",
                "version",
            ]
        ),
        _VALUES,
    ),
    st.booleans(),
)
def test_random_payloads_only_raise_fwrule_errors(payload: dict, enforce_global: bool) -> None:
    try:
        create_rule(payload, enforce_global=enforce_global)
    except FwruleError as err:
        assert err.field and err.message
