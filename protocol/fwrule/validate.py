"""Checks on single elements of a rule (addresses, numbers, UUIDs) and their messages.

Each ``check_*`` function raises :class:`~protocol.fwrule.errors.FwruleError` with field
``"rule"`` and the reference's exact message, or returns the value in the form the rule keeps.
"""

from __future__ import annotations

import ipaddress
import re

from .errors import FwruleError

UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_DIGITS = re.compile(r"^[0-9]+$")
_V4_OCTET = re.compile(r"^(?:0|[1-9][0-9]{0,2})$")


def is_uuid(value: object) -> bool:
    """A lower-case, hyphenated UUID (the only spelling the language and payloads accept)."""
    return isinstance(value, str) and UUID_RE.match(value) is not None


def is_ipv4(text: str) -> bool:
    """Dotted quad, every octet 0-255 written without leading zeros."""
    parts = text.split(".")
    return len(parts) == 4 and all(_V4_OCTET.match(p) and int(p) <= 255 for p in parts)


def is_ipv6(text: str) -> bool:
    """Any IPv6 text form (the lexer already limits it to lower-case hex and colons)."""
    if "%" in text or "." in text:
        return False
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def _fail(message: str) -> FwruleError:
    return FwruleError("rule", message)


def check_ipv4(text: str) -> str:
    if not is_ipv4(text) or text in ("0.0.0.0", "255.255.255.255"):
        raise _fail(f'IPv4 address "{text}" is invalid')
    return text


def check_ipv6(text: str) -> str:
    if not is_ipv6(text):
        raise _fail(f'IPv6 address "{text}" is invalid')
    return text


def check_subnet(text: str, *, enforce_mask: bool) -> str:
    """``addr/len``: address, then prefix length for the family, then (optionally) host bits.

    Stricter than the reference in one place: a leading zero in an IPv4 octet or in the
    prefix length (``010.0.0.0/8``, ``/08``) is a bad component here, as it already is for
    ``ip``; the reference accepts and keeps such text.
    """
    addr, _, plen_text = text.partition("/")
    if is_ipv4(addr):
        bits = 32
    elif is_ipv6(addr):
        bits = 128
    else:
        raise _fail(f'Subnet "{text}" is invalid (bad address component)')
    if not _DIGITS.match(plen_text) or (len(plen_text) > 1 and plen_text[0] == "0"):
        raise _fail(f'Subnet "{text}" is invalid (bad prefix length)')
    plen = _number(plen_text, 0, bits)
    if plen is None:
        raise _fail(f'Subnet "{text}" is invalid (bad prefix length)')
    if enforce_mask:
        try:
            ipaddress.ip_network(text, strict=True)
        except ValueError:
            raise _fail(f'Subnet "{text}" is invalid (bits set to right of mask)') from None
    return text


def check_uuid(text: str) -> str:
    if not is_uuid(text):
        raise _fail(f'UUID "{text}" is invalid')
    return text


def _number(text: str, low: int, high: int) -> int | None:
    # the length cap keeps int() away from huge digit strings (it refuses over 4300 digits)
    if not _DIGITS.match(text) or len(text.lstrip("0")) > len(str(high)):
        return None
    value = int(text)
    return value if low <= value <= high else None


def check_port(text: str) -> int:
    value = _number(text, 1, 65535)
    if value is None:
        raise _fail(f'Port number "{text}" is invalid')
    return value


def check_port_order(start: int, end: int) -> None:
    if end < start:
        raise _fail(f"The end of the range ({end}) cannot be less than the start ({start})")


def check_icmp_type(text: str) -> int:
    value = _number(text, 0, 255)
    if value is None:
        raise _fail(f'ICMP type "{text}" is invalid')
    return value


def check_icmp_code(text: str) -> int:
    value = _number(text, 0, 255)
    if value is None:
        raise _fail(f'ICMP code "{text}" is invalid')
    return value


def check_priority(text: str) -> int:
    value = _number(text, 0, 100)
    if value is None:
        raise _fail(f'Priority level "{text}" is invalid')
    return value
