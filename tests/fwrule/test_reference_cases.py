"""The test vectors of spec/fwrule-cases.md (sections A, B and C) as tables."""

from __future__ import annotations

import pytest

from protocol.fwrule import FwruleError, FwruleMultiError, create_rule, parse

V = "8a343ca8-b42a-4a27-a9c5-800f57d1e8ed"
W = "518908b6-8299-466d-8ea5-20a0ceff63ec"
U = "11111111-2222-3333-4444-555555555555"
OWNER = "930896af-bf8c-48d4-885c-6573a94b1853"


def _sub(text: str) -> str:
    return text.replace("{V}", V).replace("{W}", W)


# -- A. rule text -> canonical text ---------------------------------------------------------
CANONICAL = [
    ("A01", "from any to all vms allow tcp port 22", "FROM any TO all vms ALLOW tcp PORT 22"),
    (
        "A02",
        "FROM IP 1.2.3.4 TO TAG some-tag ALLOW TCP PORTS 80",
        'FROM ip 1.2.3.4 TO tag "some-tag" ALLOW tcp PORT 80',
    ),
    ("A03", "FROM any TO ALL vms ALLOW tcp PORT 80", "FROM any TO all vms ALLOW tcp PORT 80"),
    (
        "A04",
        "from ( any ) to ( all vms ) allow udp ports 50",
        "FROM any TO all vms ALLOW udp PORT 50",
    ),
    (
        "A05",
        "FROM (ip 10.0.0.2 OR ip 10.0.0.10 OR ip 9.0.0.1 OR ip 10.0.0.2) TO all vms ALLOW tcp port 22",
        "FROM (ip 10.0.0.10 OR ip 10.0.0.2 OR ip 9.0.0.1) TO all vms ALLOW tcp PORT 22",
    ),
    (
        "A06",
        "FROM (tag b OR tag a = 2 OR tag a = 10 OR vm {W} OR vm {V} OR subnet 10.0.0.0/8 "
        "OR ip fd00::1 OR ip 10.1.1.1) TO all vms ALLOW tcp port 22",
        'FROM (ip 10.1.1.1 OR ip fd00::1 OR subnet 10.0.0.0/8 OR tag "a" = "10" OR tag "a" = "2" '
        'OR tag "b" OR vm {W} OR vm {V}) TO all vms ALLOW tcp PORT 22',
    ),
    (
        "A07",
        "FROM (tag some-tag OR tag some-tag = value0) TO (tag some-tag = value OR "
        "tag some-tag = value2) ALLOW tcp PORT 80",
        'FROM tag "some-tag" TO (tag "some-tag" = "value" OR tag "some-tag" = "value2") '
        "ALLOW tcp PORT 80",
    ),
    (
        "A08",
        "FROM tag a=b TO tag c ALLOW udp port 53",
        'FROM tag "a" = "b" TO tag "c" ALLOW udp PORT 53',
    ),
    (
        "A09",
        'FROM (tag "tag one" = "some value" OR tag "tag two" = "another value")TO ip 8.8.8.8 '
        "BLOCK udp PORT 53",
        'FROM (tag "tag one" = "some value" OR tag "tag two" = "another value") TO ip 8.8.8.8 '
        "BLOCK udp PORT 53",
    ),
    (
        "A10",
        r'FROM (tag "\"" = "\)" OR tag "\n" = "\b") TO tag "\(" BLOCK udp PORT 53',
        r'FROM (tag "\n" = "\b" OR tag "\"" = "\)") TO tag "\(" BLOCK udp PORT 53',
    ),
    (
        "A11",
        r'FROM tag "\u2603" = "snow\u00a0man" TO tag "\/x" BLOCK udp PORT 53',
        'FROM tag "\u2603" = "snow\\u00A0man" TO tag "/x" BLOCK udp PORT 53',
    ),
    (
        "A12",
        'FROM tag 1 = 0010 TO tag "tcp" = "PORT" ALLOW udp PORT 53',
        'FROM tag "1" = "0010" TO tag "tcp" = "PORT" ALLOW udp PORT 53',
    ),
    ("A13", "FROM tag A TO tag a ALLOW tcp PORT 80", 'FROM tag "A" TO tag "a" ALLOW tcp PORT 80'),
    (
        "A14",
        "FROM ip 10.88.88.1 TO tag tag2 ALLOW tcp (PORT 1002 AND PORT 10 AND PORT 1052 AND "
        "PORT 80 AND PORT 30245 AND PORT 6)",
        'FROM ip 10.88.88.1 TO tag "tag2" ALLOW tcp (PORT 6 AND PORT 10 AND PORT 80 AND '
        "PORT 1002 AND PORT 1052 AND PORT 30245)",
    ),
    (
        "A15",
        "FROM ip 10.88.88.1 TO tag tag2 ALLOW tcp PORTS 1002, 20-40, 10, 1052, 80, 30245, 6 - 11",
        'FROM ip 10.88.88.1 TO tag "tag2" ALLOW tcp PORTS 6 - 11, 10, 20 - 40, 80, 1002, 1052, '
        "30245",
    ),
    (
        "A16",
        "FROM any TO all vms ALLOW tcp PORTS 80,443",
        "FROM any TO all vms ALLOW tcp (PORT 80 AND PORT 443)",
    ),
    (
        "A17",
        "FROM ip 10.88.88.1 TO tag tag2 ALLOW tcp PORTS 50-50",
        'FROM ip 10.88.88.1 TO tag "tag2" ALLOW tcp PORTS 50 - 50',
    ),
    (
        "A18",
        'FROM ip 10.88.88.1 TO tag "tag2" ALLOW tcp ( PORT all )',
        'FROM ip 10.88.88.1 TO tag "tag2" ALLOW tcp PORT all',
    ),
    (
        "A19",
        "FROM any TO all vms ALLOW tcp PORTS 80, 80, 1-100",
        "FROM any TO all vms ALLOW tcp PORTS 1 - 100, 80, 80",
    ),
    (
        "A20",
        "FROM any TO vm {V} ALLOW icmp (TYPE 8 CODE 0 AND TYPE 3 CODE 11 AND TYPE 40 AND "
        "TYPE 3 CODE 1 AND TYPE 30 AND TYPE 3 CODE 5)",
        "FROM any TO vm {V} ALLOW icmp (TYPE 3 CODE 1 AND TYPE 3 CODE 5 AND TYPE 3 CODE 11 AND "
        "TYPE 8 CODE 0 AND TYPE 30 AND TYPE 40)",
    ),
    (
        "A20-icmp6",
        "FROM any TO vm {V} ALLOW icmp6 (TYPE 136 CODE 0 AND TYPE 128 CODE 11 AND TYPE 135 AND "
        "TYPE 128 CODE 1)",
        "FROM any TO vm {V} ALLOW icmp6 (TYPE 128 CODE 1 AND TYPE 128 CODE 11 AND TYPE 135 AND "
        "TYPE 136 CODE 0)",
    ),
    (
        "A21",
        "FROM any TO all vms ALLOW icmp6 ( TYPE ALL )",
        "FROM any TO all vms ALLOW icmp6 TYPE all",
    ),
    (
        "A22",
        "FROM all vms TO all vms BLOCK tcp port 22 PRIORITY 0",
        "FROM all vms TO all vms BLOCK tcp PORT 22",
    ),
    (
        "A23",
        "FROM all vms TO all vms ALLOW tcp PORT 80 PRIORITY 007",
        "FROM all vms TO all vms ALLOW tcp PORT 80 PRIORITY 7",
    ),
    (
        "A24",
        "FROM all vms TO all vms BLOCK tcp port 22 priority 100",
        "FROM all vms TO all vms BLOCK tcp PORT 22 PRIORITY 100",
    ),
    ("A25", "from ANY to ALL VMS allow AH", "FROM any TO all vms ALLOW ah"),
    ("A25-esp", "from any to all vms block esp", "FROM any TO all vms BLOCK esp"),
    (
        "A26",
        "FROM tag a TO tag b ALLOW udp PORTS 1 - 9 PRIORITY 10",
        'FROM tag "a" TO tag "b" ALLOW udp PORTS 1 - 9 PRIORITY 10',
    ),
    (
        "A27",
        "FROM ip fd00:0:0:0:0:0:0:1 TO all vms ALLOW udp port 53",
        "FROM ip fd00:0:0:0:0:0:0:1 TO all vms ALLOW udp PORT 53",
    ),
    (
        "A28",
        "FROM vm {V} TO (subnet fd00::/64 OR subnet 10.0.0.0/8) BLOCK udp PORT 53",
        "FROM vm {V} TO (subnet 10.0.0.0/8 OR subnet fd00::/64) BLOCK udp PORT 53",
    ),
    (
        "A29",
        "FROM subnet 10.1.2.3/8 TO all vms ALLOW udp port 53",
        "FROM subnet 10.1.2.3/8 TO all vms ALLOW udp PORT 53",
    ),
    ("A30", "FROM vm {V} TO vm {V} ALLOW tcp PORT 80", "FROM vm {V} TO vm {V} ALLOW tcp PORT 80"),
]


@pytest.mark.parametrize(
    ("case", "text", "canonical"), CANONICAL, ids=[row[0] for row in CANONICAL]
)
def test_rule_text_canonicalises_like_the_reference(case: str, text: str, canonical: str) -> None:
    rule = parse(_sub(text))
    assert rule.text() == _sub(canonical)
    # and the canonical text is a fixed point
    assert parse(rule.text()) == rule
    assert parse(rule.text()).text() == rule.text()


# -- B. rule text -> error -------------------------------------------------------------------
def _ips(n: int, dup: bool = False) -> str:
    ips = [f"10.0.0.{i}" for i in range(1, n + 1)] + (["10.0.0.1"] if dup else [])
    return "FROM (" + " OR ".join(f"ip {ip}" for ip in ips) + ") TO all vms ALLOW tcp PORT 22"


def _ports(n: int) -> str:
    ports = " AND ".join(f"port {10 + i}" for i in range(n))
    return f"FROM any TO all vms ALLOW tcp ( {ports} )"


def _types(n: int, proto: str = "icmp") -> str:
    types = " AND ".join(f"TYPE {i}" for i in range(n))
    return f"FROM any TO all vms ALLOW {proto} ( {types} )"


_T = "FROM tag foo TO {} ALLOW udp port 53"
_P = "FROM ip 10.0.0.1 TO all vms ALLOW {}"

ERRORS = [
    ("E01", "", {}, "Error at character 0: '', expected: 'FROM', found: EOF"),
    (
        "E02",
        "From any TO all vms ALLOW tcp port 22",
        {},
        "Error at character 0: 'From', expected: 'FROM', found: word",
    ),
    (
        "E03",
        "FROM any TO all vms ALLOW Tcp port 22",
        {},
        "Error at character 25: 'Tcp', expected: 'TCP', 'UDP', 'ICMP', 'ICMP6', 'AH', 'ESP', "
        "found: word",
    ),
    (
        "E04",
        "FROM foo TO ip 8.8.8.8 ALLOW udp port 53",
        {},
        "Error at character 4: 'foo', expected: '(', 'all', 'any', 'ip', 'subnet', 'vm', 'tag', "
        "found: word",
    ),
    (
        "E05",
        "FROM ip 10.99.99.99.254 TO tag smartdc_role ALLOW tcp port 22",
        {},
        "Error at character 19: '.254 TO tag smartdc_', found: unexpected text",
    ),
    (
        "E06",
        "FROM (all vms OR tag one) TO ip 10.0.0.1 ALLOW udp port 53",
        {},
        "Error at character 13: 'OR', expected: ')', found: OR",
    ),
    (
        "E07",
        "FROM tag one TO (all vms OR tag two) ALLOW udp port 53",
        {},
        "Error at character 24: 'OR', expected: ')', found: OR",
    ),
    (
        "E08",
        "FROM (any OR tag one) TO ip 10.0.0.1 ALLOW udp port 53",
        {},
        "Error at character 9: 'OR', expected: ')', found: OR",
    ),
    (
        "E09",
        "FROM ip 10.0.0.1 TO all vms ALLOW TCP (port ALL AND port 53)",
        {},
        "Error at character 47: 'AND', expected: 'EOF', 'PRIORITY', ')', found: AND",
    ),
    (
        "E10",
        "FROM ip 10.0.0.1 TO all vms ALLOW TCP (port 53 AND port ALL)",
        {},
        "Error at character 55: 'ALL', expected: 'WORD', found: ALL",
    ),
    (
        "E11",
        "FROM any TO any DENY tcp PORT 80",
        {},
        "Error at character 15: 'DENY', expected: 'TO', 'BLOCK', 'ALLOW', found: word",
    ),
    ("E12a", "FROM any TO any ALLOW tcp port 22", {}, "rule does not affect VMs"),
    (
        "E12b",
        "FROM ip 10.8.0.1 TO subnet 10.9.0.0/16 ALLOW TCP port 53",
        {},
        "rule does not affect VMs",
    ),
    ("E12c", "FROM ip 10.9.0.1 TO any ALLOW TCP port 53", {}, "rule does not affect VMs"),
    ("E13a", _T.format("ip 10.288.0.0"), {}, 'IPv4 address "10.288.0.0" is invalid'),
    ("E13b", _T.format("ip 0.0.0.0"), {}, 'IPv4 address "0.0.0.0" is invalid'),
    ("E13c", _T.format("ip 255.255.255.255"), {}, 'IPv4 address "255.255.255.255" is invalid'),
    ("E13d", _T.format("ip 010.0.0.1"), {}, 'IPv4 address "010.0.0.1" is invalid'),
    (
        "E14a",
        _T.format("subnet 10.8.0.0/5"),
        {"enforce_subnet_mask": True},
        'Subnet "10.8.0.0/5" is invalid (bits set to right of mask)',
    ),
    (
        "E14b",
        _T.format("subnet fd00::/2"),
        {"enforce_subnet_mask": True},
        'Subnet "fd00::/2" is invalid (bits set to right of mask)',
    ),
    (
        "E15a",
        _T.format("subnet 10.350.0.0/24"),
        {},
        'Subnet "10.350.0.0/24" is invalid (bad address component)',
    ),
    (
        "E15b",
        _T.format("subnet fd005::/64"),
        {},
        'Subnet "fd005::/64" is invalid (bad address component)',
    ),
    (
        "E15c",
        _T.format("subnet 10.8.0.0/33"),
        {},
        'Subnet "10.8.0.0/33" is invalid (bad prefix length)',
    ),
    (
        "E15d",
        _T.format("subnet fd00::/130"),
        {},
        'Subnet "fd00::/130" is invalid (bad prefix length)',
    ),
    ("E16", _T.format("ip fd00::12345"), {}, 'IPv6 address "fd00::12345" is invalid'),
    (
        "E17",
        "FROM ip FD00::1 TO all vms ALLOW udp port 53",
        {},
        "Error at character 7: 'FD00', expected: 'IPV4ADDR', 'IPV6ADDR', found: word",
    ),
    (
        "E18a",
        "FROM ip 10.0.0.1/32 TO all vms ALLOW udp port 53",
        {},
        "Error at character 16: '/32', expected: 'TO', ')', 'OR', 'BLOCK', 'ALLOW', "
        "found: CIDRSUFFIX",
    ),
    (
        "E18b",
        "FROM subnet 10.0.0.0 TO all vms ALLOW udp port 53",
        {},
        "Error at character 20: 'TO', expected: 'CIDRSUFFIX', found: TO",
    ),
    ("E19a", _P.format("udp port 0"), {}, 'Port number "0" is invalid'),
    ("E19b", _P.format("udp port 65537"), {}, 'Port number "65537" is invalid'),
    ("E20", _P.format("tcp ports 1-20-30"), {}, '"1-20-30" is not a valid port number or range'),
    ("E21a", _P.format("tcp ports 20-bar"), {}, 'Port number "bar" is invalid'),
    ("E21b", _P.format("tcp ports bar-20"), {}, 'Port number "bar" is invalid'),
    ("E21c", _P.format("tcp PORTS 22-"), {}, 'Port number "" is invalid'),
    (
        "E22",
        _P.format("tcp ports 20 - 10"),
        {},
        "The end of the range (10) cannot be less than the start (20)",
    ),
    (
        "E23a",
        "FROM vm asdf TO subnet 10.8.0.0/24 ALLOW udp port 50",
        {},
        'UUID "asdf" is invalid',
    ),
    (
        "E23b",
        f"FROM vm {V.upper()} TO subnet 10.8.0.0/24 ALLOW udp port 50",
        {},
        f'UUID "{V.upper()}" is invalid',
    ),
    ("E24a", _P.format("tcp PORT 80 PRIORITY 101"), {}, 'Priority level "101" is invalid'),
    (
        "E24b",
        _P.format("tcp PORT 80 PRIORITY immediate"),
        {},
        'Priority level "immediate" is invalid',
    ),
    ("E24c", _P.format("tcp PORT 80 PRIORITY 0101"), {}, 'Priority level "0101" is invalid'),
    ("E24d", _P.format("tcp PORT 80 PRIORITY 1e1"), {}, 'Priority level "1e1" is invalid'),
    (
        "E24e",
        _P.format("tcp PORT 80 PRIORITY -1"),
        {},
        "Error at character 54: '-', expected: 'WORD', found: -",
    ),
    (
        "E24f",
        _P.format("tcp PORT 80 PRIORITY 72.1"),
        {},
        "Error at character 23: '.1', found: unexpected text",
    ),
    (
        "E24g",
        _P.format('tcp PORT 80 PRIORITY "world"'),
        {},
        "Error at character 54: '\"world\"', expected: 'WORD', found: STRING",
    ),
    ("E25a", _ips(25), {}, "maximum of 24 targets allowed per side"),
    ("E25b", _ips(24, dup=True), {}, "maximum of 24 targets allowed per side"),
    ("E26a", _ports(25), {}, "maximum of 24 ports allowed"),
    ("E26b", _ports(9), {"max_version": 3}, "maximum of 8 ports allowed"),
    ("E26c", _types(25), {}, "maximum of 24 types allowed"),
    ("E26d", _types(9, "icmp6"), {"max_version": 3}, "maximum of 8 types allowed"),
    (
        "E27a",
        "FROM all vms TO ip fd00::45 BLOCK ICMP TYPE 8",
        {},
        "rule affects ICMPv4 but contains a non-IPv4 address",
    ),
    (
        "E27b",
        "FROM all vms TO subnet fe80::/64 BLOCK ICMP TYPE 8",
        {},
        "rule affects ICMPv4 but contains a non-IPv4 subnet",
    ),
    (
        "E27c",
        "FROM all vms TO ip 1.2.3.4 BLOCK ICMP6 TYPE 128",
        {},
        "rule affects ICMPv6 but contains a non-IPv6 address",
    ),
    (
        "E27d",
        "FROM all vms TO subnet 10.0.0.0/8 BLOCK ICMP6 TYPE 128",
        {},
        "rule affects ICMPv6 but contains a non-IPv6 subnet",
    ),
    ("E28a", _P.format("ICMP TYPE 260"), {}, 'ICMP type "260" is invalid'),
    ("E28b", _P.format("ICMP TYPE 8 CODE 270"), {}, 'ICMP code "270" is invalid'),
    (
        "E28c",
        _P.format("ICMP6 TYPE 260").replace("10.0.0.1", "fd00::1"),
        {},
        'ICMP type "260" is invalid',
    ),
    (
        "E28d",
        _P.format("ICMP6 TYPE 8 CODE 270").replace("10.0.0.1", "fd00::1"),
        {},
        'ICMP code "270" is invalid',
    ),
    (
        "E29a",
        _P.format("TCP PORTS 20-30"),
        {"max_version": 1},
        "The rule uses a feature (port ranges) newer than this API allows",
    ),
    (
        "E29b",
        "FROM ip fd00::1 TO all vms ALLOW tcp PORT 80",
        {"max_version": 2},
        "The rule uses a feature (IPv6) newer than this API allows",
    ),
    (
        "E29c",
        "FROM subnet fd00::/64 TO all vms ALLOW tcp PORT 80",
        {"max_version": 2},
        "The rule uses a feature (IPv6) newer than this API allows",
    ),
    (
        "E29d",
        "FROM any TO all vms ALLOW icmp6 TYPE 135",
        {"max_version": 2},
        "The rule uses a feature (IPv6) newer than this API allows",
    ),
    (
        "E29e",
        "FROM any TO all vms ALLOW icmp TYPE ALL",
        {"max_version": 2},
        "The rule uses a feature (all ICMP types) newer than this API allows",
    ),
    (
        "E29f",
        "FROM any TO all vms ALLOW tcp PORT 80 PRIORITY 1",
        {"max_version": 3},
        "The rule uses a feature (priority levels) newer than this API allows",
    ),
    (
        "E29g",
        "FROM any TO all vms ALLOW ah",
        {"max_version": 3},
        "The rule uses a feature (AH) newer than this API allows",
    ),
    (
        "E29h",
        "FROM any TO all vms ALLOW esp",
        {"max_version": 3},
        "The rule uses a feature (ESP) newer than this API allows",
    ),
    (
        "E29i",
        "FROM any TO all vms ALLOW tcp PORTS 80",
        {"max_version": 1},
        "The rule uses a feature (port ranges) newer than this API allows",
    ),
    (
        "E30a",
        "FROM tag all TO tag c ALLOW udp port 53",
        {},
        "Error at character 8: 'all', expected: 'WORD', 'STRING', found: ALL",
    ),
    (
        "E30b",
        "FROM tag all-web TO tag c ALLOW udp port 53",
        {},
        "Error at character 8: 'all', expected: 'WORD', 'STRING', found: ALL",
    ),
    (
        "E31a",
        "FROM tag 'a' TO tag c ALLOW udp port 53",
        {},
        "Error at character 9: ''a' TO tag c ALLOW u', found: unexpected text",
    ),
    (
        "E31b",
        "FROM tag a.b TO tag c ALLOW udp port 53",
        {},
        "Error at character 10: '.b TO tag c ALLOW ud', found: unexpected text",
    ),
    (
        "E31c",
        r'FROM tag "a\qb" TO tag c ALLOW udp port 53',
        {},
        "Error at character 9: '\"a\\qb\" TO tag c ALLO', found: unexpected text",
    ),
    (
        "E32",
        "FROM all vms TO all vms BLOCK tcp port 22 # comment",
        {},
        "Error at character 23: '# comment', found: unexpected text",
    ),
    (
        "E33",
        "FROM any TO all vms ALLOW tcp",
        {},
        "Error at character 29: '', expected: '(', 'PORT', 'PORTS', found: EOF",
    ),
    (
        "E34",
        "FROM any TO all vms ALLOW ah PORT 50",
        {},
        "Error at character 28: 'PORT', expected: 'EOF', 'PRIORITY', found: PORT",
    ),
    (
        "E35a",
        _P.format("icmp TYPE 8 CODE all"),
        {},
        "Error at character 50: 'all', expected: 'WORD', found: ALL",
    ),
    (
        "E35b",
        _P.format("tcp PORTS all"),
        {},
        "Error at character 43: 'all', expected: 'WORD', found: ALL",
    ),
    (
        "E35c",
        _P.format("tcp (PORT 80 OR PORT 443)"),
        {},
        "Error at character 46: 'OR', expected: 'EOF', 'PRIORITY', ')', 'AND', found: OR",
    ),
    (
        "E35d",
        _P.format("tcp PORTS 80 443"),
        {},
        "Error at character 46: '443', expected: 'EOF', 'PRIORITY', '-', ',', found: word",
    ),
]


@pytest.mark.parametrize(("case", "text", "opts", "message"), ERRORS, ids=[r[0] for r in ERRORS])
def test_bad_rule_text_fails_with_the_reference_message(
    case: str, text: str, opts: dict, message: str
) -> None:
    with pytest.raises(FwruleError) as info:
        parse(text, **opts)
    assert info.value.field == "rule"
    assert info.value.message == message
    assert str(info.value) == message


def test_subnet_with_host_bits_is_fine_without_mask_enforcement() -> None:
    assert parse(_T.format("subnet 10.8.0.0/5")).to_side.subnets == ("10.8.0.0/5",)
    assert parse(_T.format("subnet fd00::/2")).to_side.subnets == ("fd00::/2",)


def test_version_gates_admit_features_of_their_own_version() -> None:
    assert parse(_P.format("TCP PORTS 20-30"), max_version=2).ports == ((20, 30),)
    assert parse("FROM ip fd00::1 TO all vms ALLOW tcp PORT 80", max_version=3)
    assert parse(_ports(8), max_version=3)
    assert parse(_ports(24), max_version=4)
    assert parse(_types(24), max_version=4)


# -- C. payloads -------------------------------------------------------------------------------
VALID = "FROM ip 1.2.3.4 TO tag some-tag ALLOW tcp PORT 80"
VALID_TEXT = 'FROM ip 1.2.3.4 TO tag "some-tag" ALLOW tcp PORT 80'


def test_p01_empty_payload_has_no_rule() -> None:
    with pytest.raises(FwruleError) as info:
        create_rule({})
    assert (info.value.field, info.value.message) == ("rule", "No rule specified")


def test_p02_all_bad_fields_are_collected_in_order() -> None:
    payload = {
        "rule": "invalid",
        "uuid": "invalid",
        "owner_uuid": "invalid",
        "enabled": "invalid",
        "log": "invalid",
    }
    with pytest.raises(FwruleMultiError) as info:
        create_rule(payload)
    err = info.value
    first = "Error at character 0: 'invalid', expected: 'FROM', found: word"
    assert err.message == f"first of 5 errors: {first}"
    assert [(e.field, e.message) for e in err.errors] == [
        ("rule", first),
        ("uuid", "Invalid rule UUID"),
        ("owner_uuid", "Invalid owner UUID"),
        ("enabled", "enabled must be true or false"),
        ("log", "log must be true or false"),
    ]


def test_p03_global_rule_serializes_in_api_shape() -> None:
    rule = create_rule({"rule": VALID, "uuid": U, "version": "1.000001"})
    assert rule.serialize() == {
        "enabled": False,
        "global": True,
        "log": False,
        "rule": VALID_TEXT,
        "uuid": U,
        "version": "1.000001",
    }
    assert list(rule.serialize()) == ["enabled", "global", "log", "rule", "uuid", "version"]


def test_p04_owned_rule_serializes_without_global() -> None:
    payload = {
        "rule": VALID,
        "uuid": U,
        "version": "1.000001",
        "owner_uuid": OWNER,
        "enabled": True,
        "description": "d",
        "created_by": "fwadm",
    }
    rule = create_rule(payload)
    ser = rule.serialize()
    assert ser == {
        "created_by": "fwadm",
        "description": "d",
        "enabled": True,
        "log": False,
        "owner_uuid": OWNER,
        "rule": VALID_TEXT,
        "uuid": U,
        "version": "1.000001",
    }
    assert list(ser)[0] == "created_by"
    assert str(rule) == f"[{U},true,{OWNER}] {VALID_TEXT}"
    assert rule.serialize(["rule", "uuid"]) == {"rule": VALID_TEXT, "uuid": U}


GLOBAL_ERRORS = [
    ("P05", {"rule": VALID}, "owner_uuid", "owner_uuid required"),
    (
        "P06",
        {"rule": VALID, "global": True, "owner_uuid": OWNER},
        "global",
        "cannot specify both global and owner_uuid",
    ),
    ("P07", {"rule": VALID, "global": "asdf"}, "global", "global must be true or false"),
]


@pytest.mark.parametrize(
    ("case", "payload", "field", "message"), GLOBAL_ERRORS, ids=[r[0] for r in GLOBAL_ERRORS]
)
def test_enforce_global_errors(case: str, payload: dict, field: str, message: str) -> None:
    with pytest.raises(FwruleError) as info:
        create_rule(payload, enforce_global=True)
    assert (info.value.field, info.value.message) == (field, message)


def test_enforce_global_accepts_global_or_owner() -> None:
    assert create_rule({"rule": VALID, "global": True}, enforce_global=True).is_global
    assert create_rule({"rule": VALID, "global": "true"}, enforce_global=True).is_global
    owned = create_rule({"rule": VALID, "owner_uuid": OWNER}, enforce_global=True)
    assert not owned.is_global and owned.owner_uuid == OWNER
    both = create_rule({"rule": VALID, "global": "false", "owner_uuid": OWNER}, enforce_global=True)
    assert both.owner_uuid == OWNER


STRING_ERRORS = [
    (field, value, message)
    for field in ("created_by", "description")
    for value, message in (
        ({}, f"{field} must be a string"),
        (["asdf"], f"{field} must be a string"),
        (42, f"{field} must be a string"),
        ("a" * 256, f"{field} must be shorter than 255 characters"),
    )
]


@pytest.mark.parametrize(("field", "value", "message"), STRING_ERRORS)
def test_p08_string_fields_must_be_short_strings(field: str, value: object, message: str) -> None:
    with pytest.raises(FwruleError) as info:
        create_rule({"rule": VALID, field: value})
    assert (info.value.field, info.value.message) == (field, message)


def test_p08_string_of_255_characters_is_accepted() -> None:
    assert create_rule({"rule": VALID, "description": "a" * 255}).description == "a" * 255


@pytest.mark.parametrize(("value", "expected"), [("true", True), ("false", False), (True, True)])
def test_p09_boolean_strings_are_coerced(value: object, expected: bool) -> None:
    rule = create_rule({"rule": VALID, "enabled": value, "log": value})
    assert rule.enabled is expected
    assert rule.log is expected
    assert rule.serialize()["enabled"] is expected
