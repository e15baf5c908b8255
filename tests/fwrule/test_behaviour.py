"""Lexer, parser-ordering, normalised-form and rule-object behaviour beyond the spec's tables."""

from __future__ import annotations

import os
import re

import pytest

from protocol.fwrule import (
    FwruleError,
    FwruleMultiError,
    IcmpType,
    ParsedRule,
    PortRange,
    Side,
    Target,
    canonicalize,
    create_rule,
    escape_tag,
    parse,
    parse_raw,
    tokenize,
)

V = "8a343ca8-b42a-4a27-a9c5-800f57d1e8ed"
W = "518908b6-8299-466d-8ea5-20a0ceff63ec"


def _error(text: str, **opts: object) -> str:
    with pytest.raises(FwruleError) as info:
        parse(text, **opts)  # type: ignore[arg-type]
    return info.value.message


# -- lexer -------------------------------------------------------------------------------------
def test_lexer_is_first_match_not_longest_match() -> None:
    kinds = [(t.kind, t.text) for t in tokenize("-1 20-40 all-web web-all tags vms2 porty")]
    assert kinds == [
        ("-", "-"),
        ("WORD", "1"),
        ("WORD", "20-40"),
        ("ALL", "all"),
        ("-", "-"),
        ("WORD", "web"),
        ("WORD", "web-all"),
        ("WORD", "tags"),
        ("WORD", "vms2"),
        ("WORD", "porty"),
        ("EOF", ""),
    ]


def test_keywords_are_all_upper_or_all_lower_only() -> None:
    assert [t.kind for t in tokenize("FROM from From fROM")] == [
        "FROM",
        "FROM",
        "WORD",
        "WORD",
        "EOF",
    ]


def test_addresses_and_suffixes_lex_as_their_own_tokens() -> None:
    kinds = [t.kind for t in tokenize("10.0.0.0 /8 fd00::1 FD00::1 ::")]
    # upper-case hex is not an address: FD00 is a WORD and the rest lexes as IPv6 "::1"
    assert kinds == ["IPV4ADDR", "CIDRSUFFIX", "IPV6ADDR", "WORD", "IPV6ADDR", "IPV6ADDR", "EOF"]


def test_whitespace_between_address_and_suffix_is_tolerated() -> None:
    assert parse("FROM subnet 10.0.0.0 /8 TO all vms ALLOW tcp PORT 1").from_side.subnets == (
        "10.0.0.0/8",
    )


def test_unicode_spaces_outside_quotes_separate_tokens_as_in_javascript() -> None:
    # issue 12: JavaScript's \s, as the reference (tests/fwrule/test_sdc_compat.py)
    assert canonicalize("FROM any\u00a0TO all vms ALLOW tcp PORT 1") == (
        "FROM any TO all vms ALLOW tcp PORT 1"
    )
    assert _error("FROM any\x85TO all vms ALLOW tcp PORT 1") == (
        "Error at character 8: '\x85TO all vms ALLOW tc', found: unexpected text"
    )


def test_error_columns_restart_after_a_line_break() -> None:
    assert _error("FROM any\nTO foo") == (
        "Error at character 2: 'foo', expected: '(', 'all', 'any', 'ip', 'subnet', 'vm', "
        "'tag', found: word"
    )


def test_lexer_error_text_drops_newlines_and_caps_the_offset() -> None:
    assert _error("FROM any TO all vms ALLOW tcp PORT 22 PRIORITY 5\n;x\ny") == (
        "Error at character 22: ';xy', found: unexpected text"
    )


def test_string_escapes_are_decoded() -> None:
    rule = parse(r'FROM tag "\"\\\/\(\)\b\f\n\r\t\u00e9\ud83d\ude00" TO all vms ALLOW tcp PORT 1')
    assert rule.from_side.tags == (('"\\/()\b\f\n\r\t\u00e9\U0001f600', None),)


def test_raw_control_characters_inside_quotes_are_allowed() -> None:
    rule = parse('FROM tag "a\nb\x01" TO all vms ALLOW tcp PORT 1')
    assert rule.text() == 'FROM tag "a\\nb\\u0001" TO all vms ALLOW tcp PORT 1'


# -- the order in which errors win -------------------------------------------------------------
def test_syntax_error_after_an_element_wins_over_the_element_check() -> None:
    assert _error("FROM ip 10.288.0.0 foo") == (
        "Error at character 18: 'foo', expected: 'TO', ')', 'OR', 'BLOCK', 'ALLOW', found: word"
    )
    assert _error("FROM ip 10.288.0.0 TO foo") == 'IPv4 address "10.288.0.0" is invalid'


def test_lexer_error_after_an_element_wins_over_the_element_check() -> None:
    assert _error("FROM ip 10.288.0.0 ;") == ("Error at character 19: ';', found: unexpected text")


def test_priority_is_checked_before_the_next_token_is_lexed() -> None:
    assert _error("FROM any TO all vms ALLOW tcp PORT 1 PRIORITY 101 ;") == (
        'Priority level "101" is invalid'
    )
    assert _error("FROM any TO all vms ALLOW tcp PORT 1 PRIORITY 5 foo") == (
        "Error at character 47: 'foo', expected: 'EOF', found: word"
    )


def test_single_target_side_reports_side_follow_set() -> None:
    assert _error("FROM ip 1.2.3.4 ) TO") == (
        "Error at character 15: ')', expected: 'TO', 'BLOCK', 'ALLOW', found: )"
    )
    assert _error("FROM any ALLOW") == "Error at character 8: 'ALLOW', expected: 'TO', found: ALLOW"


def test_second_equals_in_a_tag_is_reported_after_the_value() -> None:
    assert _error("FROM tag a = b = c") == (
        "Error at character 14: '=', expected: 'TO', ')', 'OR', 'BLOCK', 'ALLOW', found: ="
    )


def test_port_checks_precede_the_version_gate_for_ports() -> None:
    assert _error("FROM any TO all vms ALLOW tcp PORTS 0", max_version=1) == (
        'Port number "0" is invalid'
    )


def test_all_icmp_types_gate_precedes_the_icmp6_gate() -> None:
    assert _error("FROM any TO all vms ALLOW icmp6 TYPE all", max_version=2) == (
        "The rule uses a feature (all ICMP types) newer than this API allows"
    )


def test_post_parse_checks_run_in_reference_order() -> None:
    many_targets = "(" + " OR ".join(f"ip fd00::{i}" for i in range(1, 26)) + ")"
    many_types = "(" + " AND ".join(f"TYPE {i}" for i in range(25)) + ")"
    # ports/types limit before targets limit before family before "affects VMs"
    assert _error(f"FROM {many_targets} TO any ALLOW icmp {many_types}") == (
        "maximum of 24 types allowed"
    )
    assert _error(f"FROM {many_targets} TO any ALLOW icmp TYPE 8") == (
        "maximum of 24 targets allowed per side"
    )
    assert _error("FROM ip fd00::1 TO any ALLOW icmp TYPE 8") == (
        "rule affects ICMPv4 but contains a non-IPv4 address"
    )


def test_max_version_must_be_a_known_version() -> None:
    with pytest.raises(ValueError):
        parse("FROM any TO all vms ALLOW tcp PORT 1", max_version=5)


def test_non_string_rule_text_is_a_fwrule_error() -> None:
    with pytest.raises(FwruleError):
        parse(42)  # type: ignore[arg-type]


# -- decisions ---------------------------------------------------------------------------------
def test_empty_tag_values_and_names_are_accepted() -> None:
    # issue 12: as the reference accepts them (tests/fwrule/test_sdc_compat.py)
    assert canonicalize('FROM tag a = "" TO all vms ALLOW tcp PORT 1') == (
        'FROM tag "a" = "" TO all vms ALLOW tcp PORT 1'
    )
    assert canonicalize('FROM tag "" TO all vms ALLOW tcp PORT 1') == (
        'FROM tag "" TO all vms ALLOW tcp PORT 1'
    )


def test_subnet_leading_zeros_are_accepted_and_kept() -> None:
    # issue 12: as the reference accepts them (tests/fwrule/test_sdc_compat.py)
    assert parse("FROM subnet 010.0.0.0/8 TO all vms ALLOW tcp PORT 1").from_side.subnets == (
        "010.0.0.0/8",
    )
    assert parse("FROM subnet 10.0.0.0/08 TO all vms ALLOW tcp PORT 1").from_side.subnets == (
        "10.0.0.0/08",
    )
    assert parse("FROM subnet 0.0.0.0/0 TO all vms ALLOW tcp PORT 1").from_side.subnets == (
        "0.0.0.0/0",
    )


def test_icmp_types_sort_numerically_with_uncoded_type_first() -> None:
    assert canonicalize("FROM any TO all vms ALLOW icmp (TYPE 8 CODE 0 AND TYPE 3 AND TYPE 8)") == (
        "FROM any TO all vms ALLOW icmp (TYPE 3 AND TYPE 8 AND TYPE 8 CODE 0)"
    )


def test_tags_sort_by_utf16_code_units_like_javascript() -> None:
    rule = parse('FROM (tag "\uff5e" OR tag "\U0001f600") TO all vms ALLOW tcp PORT 1')
    assert [name for name, _ in rule.from_side.tags] == ["\U0001f600", "\uff5e"]


def test_lone_surrogates_are_written_as_escapes() -> None:
    assert escape_tag("a\ud800") == "a\\uD800"
    text = canonicalize(r'FROM tag "\ud800" TO all vms ALLOW tcp PORT 1')
    assert text == 'FROM tag "\\uD800" TO all vms ALLOW tcp PORT 1'
    text.encode("utf-8")


def test_proto_property_tag_is_an_ordinary_tag() -> None:
    assert canonicalize("FROM tag __proto__ TO all vms ALLOW tcp PORT 1") == (
        'FROM tag "__proto__" TO all vms ALLOW tcp PORT 1'
    )


# -- raw parse and normalised form -------------------------------------------------------------
def test_raw_parse_keeps_source_order_and_duplicates() -> None:
    raw = parse_raw(
        f"FROM (ip 10.0.0.2 OR ip 10.0.0.2 OR tag a = 1 OR vm {V}) TO any "
        "BLOCK tcp PORTS 80, 20-30 PRIORITY 010"
    )
    assert raw == ParsedRule(
        from_targets=(
            Target("ip", "10.0.0.2"),
            Target("ip", "10.0.0.2"),
            Target("tag", "a", "1"),
            Target("vm", V),
        ),
        to_targets=(Target("wildcard", "any"),),
        action="block",
        protocol="tcp",
        targets=(80, PortRange(20, 30)),
        priority=10,
    )
    assert parse_raw("FROM all vms TO any ALLOW icmp TYPE 8 CODE 0").targets == (IcmpType(8, 0),)
    assert parse_raw("FROM all vms TO any ALLOW ah").targets == ("all",)
    assert parse_raw("FROM all vms TO any ALLOW ah").priority is None


def test_side_accessors_for_the_enforcement_code() -> None:
    rule = parse(
        f"FROM (tag role OR tag role = db OR tag env = prod OR tag env = dev OR vm {W}) "
        "TO all vms ALLOW tcp PORT 5432"
    )
    side = rule.from_side
    assert side.tags == (("env", "dev"), ("env", "prod"), ("role", None))
    assert side.tag_names == ("env", "role")
    assert side.tag_values("role") is None
    assert side.tag_values("env") == ("dev", "prod")
    assert side.tag_values("nope") == ()
    assert side.vms == (W,)
    assert side.selects_vms and not side.any and not side.all_vms
    assert rule.to_side.all_vms and rule.all_vms
    assert rule.vms == (W,)
    assert rule.tag_names == ("env", "role")


def test_merged_tags_absorb_across_sides() -> None:
    rule = parse("FROM tag a = 1 TO tag a ALLOW tcp PORT 1")
    assert rule.from_side.tags == (("a", "1"),)
    assert rule.tags == (("a", None),)


def test_port_and_icmp_matching_helpers() -> None:
    rule = parse("FROM any TO all vms ALLOW tcp PORTS 80, 8000-8100")
    assert rule.ports == (80, PortRange(8000, 8100))
    assert rule.port_ranges() == ((80, 80), (8000, 8100))
    assert rule.matches_port(8050) and rule.matches_port(80) and not rule.matches_port(81)
    assert parse("FROM any TO all vms ALLOW udp PORT all").port_ranges() == ((1, 65535),)
    icmp = parse("FROM any TO all vms ALLOW icmp (TYPE 8 CODE 0 AND TYPE 3)")
    assert icmp.types == (IcmpType(3, None), IcmpType(8, 0))
    assert icmp.matches_icmp(3, 13) and icmp.matches_icmp(8, 0) and not icmp.matches_icmp(8, 1)
    assert icmp.protocol_number == 1 and icmp.port_ranges() == ()
    esp = parse("FROM any TO all vms ALLOW esp")
    assert esp.ports is None and esp.types is None and esp.proto_targets == ("all",)
    assert esp.protocol_number == 50


def test_rules_are_hashable_values() -> None:
    a = parse("FROM any TO all vms ALLOW tcp PORTS 22")
    b = parse("from (any) to (all vms) allow tcp port 22")
    assert a == b and hash(a) == hash(b)
    assert len({a, b}) == 1
    assert Side(wildcards=("vmall",)).count() == 1


# -- rule objects ------------------------------------------------------------------------------
VALID = "FROM any TO all vms ALLOW tcp PORT 22"


def test_uuid_and_version_are_generated_when_absent() -> None:
    rule = create_rule({"rule": VALID})
    assert re.fullmatch(
        r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", rule.uuid
    )
    ms, pid = rule.version.split(".")
    assert ms.isdigit() and len(ms) >= 13
    assert pid == f"{os.getpid():06d}"
    assert rule.enabled is False and rule.log is False and rule.is_global


def test_upper_case_rule_uuid_is_invalid() -> None:
    with pytest.raises(FwruleError) as info:
        create_rule({"rule": VALID, "uuid": V.upper()})
    assert (info.value.field, info.value.message) == ("uuid", "Invalid rule UUID")


def test_present_but_null_owner_is_invalid() -> None:
    with pytest.raises(FwruleError) as info:
        create_rule({"rule": VALID, "owner_uuid": None})
    assert info.value.field == "owner_uuid"


def test_empty_rule_text_in_a_payload_is_no_rule() -> None:
    with pytest.raises(FwruleError) as info:
        create_rule({"rule": ""})
    assert info.value.message == "No rule specified"


def test_post_parse_checks_run_only_after_field_checks() -> None:
    with pytest.raises(FwruleError) as info:
        create_rule({"rule": "FROM any TO any ALLOW tcp PORT 1", "enabled": "yes"})
    assert (info.value.field, info.value.message) == ("enabled", "enabled must be true or false")
    with pytest.raises(FwruleError) as info:
        create_rule({"rule": "FROM any TO any ALLOW tcp PORT 1"})
    assert info.value.message == "rule does not affect VMs"


def test_options_reach_the_parser() -> None:
    text = (
        "FROM any TO all vms ALLOW tcp "
        + "("
        + " AND ".join(f"PORT {p}" for p in range(1, 10))
        + ")"
    )
    with pytest.raises(FwruleError, match="maximum of 8 ports allowed"):
        create_rule({"rule": text}, max_version=3)
    with pytest.raises(FwruleError, match="bits set to right of mask"):
        create_rule(
            {"rule": "FROM subnet 10.0.0.1/8 TO all vms ALLOW tcp PORT 1"}, enforce_subnet_mask=True
        )


def test_multi_error_keeps_sub_errors_and_json_shape() -> None:
    with pytest.raises(FwruleMultiError) as info:
        create_rule({"uuid": "x", "created_by": 1})
    err = info.value
    assert [e.field for e in err.errors] == ["rule", "uuid", "created_by"]
    assert err.message == "first of 3 errors: No rule specified"
    assert err.errors[1].to_json() == {
        "field": "uuid",
        "code": "InvalidParameter",
        "message": "Invalid rule UUID",
    }
    assert isinstance(err, ValueError)


def test_parsed_rule_can_be_given_instead_of_text() -> None:
    raw = parse_raw(VALID)
    assert create_rule({"rule": raw}).text == VALID


def test_numbers_too_long_for_int_are_invalid_not_a_crash() -> None:
    huge = "9" * 5000  # past Python's 4300-digit limit for int()
    assert (
        _error(f"FROM any TO all vms ALLOW tcp PORT {huge}") == f'Port number "{huge}" is invalid'
    )
    assert _error(f"FROM any TO all vms ALLOW icmp TYPE {huge}") == f'ICMP type "{huge}" is invalid'
