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


def _v4_leading_zeros_ok(text: str) -> bool:
    """Dotted quad whose octets may carry leading zeros (``09.0.0.0``), each 0-255."""
    parts = text.split(".")
    return len(parts) == 4 and all(_DIGITS.match(p) and int(p) <= 255 for p in parts)


def subnet_network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """The network a ``subnet`` target's text (as the rule keeps it) means, host bits
    cleared. Leading zeros in IPv4 octets and in the prefix length are decimal, as in the
    reference (``09.0.0.0/024`` is ``9.0.0.0/24``); ValueError for text that is not a subnet.
    """
    addr, sep, plen_text = text.strip().partition("/")
    if not sep or not _DIGITS.match(plen_text) or len(plen_text) > 3:
        raise ValueError(f"{text!r} is not a subnet")
    if _v4_leading_zeros_ok(addr):
        addr = ".".join(str(int(p)) for p in addr.split("."))
    return ipaddress.ip_network(f"{addr}/{int(plen_text)}", strict=False)


def check_subnet(text: str, *, enforce_mask: bool) -> str:
    """``addr/len``: address, then prefix length for the family, then (optionally) host bits.

    As in the reference, leading zeros are accepted in IPv4 octets and in the prefix length
    (``09.0.0.0/24``, ``10.1.1.1/012``) and read as decimal; the text is kept as written
    (canonical text does not rewrite subnets). ``ip`` still refuses leading zeros, as the
    reference does. `subnet_network` gives the network such text means.
    """
    addr, _, plen_text = text.partition("/")
    if _v4_leading_zeros_ok(addr):
        bits = 32
    elif is_ipv6(addr):
        bits = 128
    else:
        raise _fail(f'Subnet "{text}" is invalid (bad address component)')
    plen = _number(plen_text, 0, bits)
    if plen is None:
        raise _fail(f'Subnet "{text}" is invalid (bad prefix length)')
    if enforce_mask and subnet_network(text).network_address != _address_of(addr):
        raise _fail(f'Subnet "{text}" is invalid (bits set to right of mask)')
    return text


def _address_of(addr: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    if _v4_leading_zeros_ok(addr):
        return ipaddress.IPv4Address(".".join(str(int(p)) for p in addr.split(".")))
    return ipaddress.IPv6Address(addr)


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
