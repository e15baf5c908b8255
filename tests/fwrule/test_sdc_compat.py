"""Rules sdc-fwrule accepts are accepted here with the same canonical text (issue 12, item 16):
empty tag names and values, leading zeros in subnets, and JavaScript whitespace between
tokens. The expected texts are what the reference's ``text()`` writes for these rules."""

from __future__ import annotations

import ipaddress

import pytest

from protocol.fwrule import FwruleError, canonicalize, create_rule, parse, subnet_network
from protocol.fwrule.lexer import JS_WHITESPACE, tokenize

OWNER = "930896af-bf8c-48d4-885c-6573a94b1853"

# Every character JavaScript's \s matches beyond the ASCII spaces.
JS_UNICODE_SPACES = [
    "\u00a0",
    "\u1680",
    *[chr(c) for c in range(0x2000, 0x200B)],
    "\u2028",
    "\u2029",
    "\u202f",
    "\u205f",
    "\u3000",
    "\ufeff",
]


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ('FROM tag "" TO all vms ALLOW tcp PORT 80', 'FROM tag "" TO all vms ALLOW tcp PORT 80'),
        (
            'FROM tag "a" = "" TO all vms ALLOW tcp PORT 80',
            'FROM tag "a" = "" TO all vms ALLOW tcp PORT 80',
        ),
        ('FROM any TO tag "" = "" BLOCK udp PORT 53', 'FROM any TO tag "" = "" BLOCK udp PORT 53'),
        # an empty value is one value among others, absorbed by the bare tag
        (
            'FROM (tag a = "" OR tag a = "x") TO all vms ALLOW tcp PORT 1',
            'FROM (tag "a" = "" OR tag "a" = "x") TO all vms ALLOW tcp PORT 1',
        ),
        (
            'FROM (tag a = "" OR tag a) TO all vms ALLOW tcp PORT 1',
            'FROM tag "a" TO all vms ALLOW tcp PORT 1',
        ),
    ],
)
def test_empty_tag_names_and_values_are_accepted(text: str, canonical: str) -> None:
    assert canonicalize(text) == canonical
    assert canonicalize(canonical) == canonical


def test_empty_tag_value_means_exactly_the_empty_string() -> None:
    rule = parse('FROM tag "a" = "" TO all vms ALLOW tcp PORT 80')
    assert rule.from_side.tags == (("a", ""),)
    assert rule.from_side.tag_values("a") == ("",)
    assert parse('FROM tag "" TO all vms ALLOW tcp PORT 80').from_side.tag_names == ("",)


@pytest.mark.parametrize(
    ("subnet", "network"),
    [
        ("10.1.1.1/012", "10.0.0.0/12"),
        ("09.0.0.0/24", "9.0.0.0/24"),
        ("010.000.001.000/024", "10.0.1.0/24"),
        ("10.0.0.0/08", "10.0.0.0/8"),
        ("fd00::/064", "fd00::/64"),
        ("0.0.0.0/00", "0.0.0.0/0"),
    ],
)
def test_subnet_leading_zeros_are_accepted_and_kept_as_written(subnet: str, network: str) -> None:
    text = f"FROM subnet {subnet} TO all vms ALLOW tcp PORT 22"
    rule = parse(text)
    assert rule.from_side.subnets == (subnet,)
    assert rule.text() == text
    assert subnet_network(subnet) == ipaddress.ip_network(network)


def test_subnet_leading_zeros_still_obey_range_and_mask_checks() -> None:
    for bad, why in (
        ("0256.0.0.0/8", "found: word"),  # four digits do not lex as an octet
        ("10.0.0.0/033", "bad prefix length"),
        ("fd00::/0129", "found: word"),  # the suffix lexes as /012, then 9
    ):
        with pytest.raises(FwruleError) as exc:
            parse(f"FROM subnet {bad} TO all vms ALLOW tcp PORT 22")
        assert why in exc.value.message
    with pytest.raises(FwruleError, match="bits set to right of mask"):
        parse("FROM subnet 10.1.1.1/012 TO all vms ALLOW tcp PORT 22", enforce_subnet_mask=True)
    assert parse("FROM subnet 09.0.0.0/024 TO all vms ALLOW tcp PORT 22", enforce_subnet_mask=True)
    # FWAPI's options (the API's create path): accepted, text kept.
    rule = create_rule(
        {"rule": "FROM subnet 09.0.0.0/024 TO all vms ALLOW tcp PORT 22", "owner_uuid": OWNER},
        enforce_global=True,
        enforce_subnet_mask=True,
    )
    assert rule.serialize()["rule"] == "FROM subnet 09.0.0.0/024 TO all vms ALLOW tcp PORT 22"


def test_ip_targets_still_refuse_leading_zeros_like_the_reference() -> None:
    with pytest.raises(FwruleError, match='IPv4 address "010.0.0.1" is invalid'):
        parse("FROM ip 010.0.0.1 TO all vms ALLOW tcp PORT 22")


@pytest.mark.parametrize("space", JS_UNICODE_SPACES, ids=lambda c: f"U+{ord(c):04X}")
def test_javascript_whitespace_separates_tokens(space: str) -> None:
    text = space.join(
        ["FROM", "(tag", '"a"', "=", '"b"', "OR", "subnet", "10.0.0.0/8)", "TO", "all", "vms"]
        + ["ALLOW", "tcp", "PORTS", "80,", "443", "PRIORITY", "3"]
    )
    assert canonicalize(space + text + space) == (
        'FROM (subnet 10.0.0.0/8 OR tag "a" = "b") TO all vms ALLOW tcp '
        "(PORT 80 AND PORT 443) PRIORITY 3"
    )


def test_whitespace_is_exactly_javascripts_class() -> None:
    # Python's str.isspace/\s take these; JavaScript's \s does not, nor does the reference.
    for not_space in ("\x1c", "\x1f", "\x85", "\u180e", "\u200b"):
        with pytest.raises(FwruleError, match="unexpected text"):
            parse(f"FROM any{not_space}TO all vms ALLOW tcp PORT 1")
    for ch in JS_UNICODE_SPACES:
        assert [t.kind for t in tokenize(f"any{ch}all")] == ["ANY", "ALL", "EOF"]
    assert "\ufeff" in JS_WHITESPACE and "\u3000" in JS_WHITESPACE


def test_unicode_spaces_inside_quotes_stay_part_of_the_tag() -> None:
    rule = parse('FROM tag "a\u00a0b" TO all vms ALLOW tcp PORT 1')
    assert rule.from_side.tag_names == ("a\u00a0b",)
    assert rule.text() == 'FROM tag "a\\u00A0b" TO all vms ALLOW tcp PORT 1'
