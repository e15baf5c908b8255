"""MAC and IP address helpers shared by every codec.

On the wire every IP is 16 bytes (IPv4 as the IPv4-mapped IPv6 address ``::ffff:a.b.c.d``) and
every MAC 6 raw bytes. Text forms: MACs are printed lower-case and zero-padded; on input the
non-padded illumos form (``0:a:95:9d:68:16``) and ``-`` separators are accepted too.
"""

from __future__ import annotations

import ipaddress
from ipaddress import IPv4Address, IPv6Address

V4_MAPPED_PREFIX = b"\x00" * 10 + b"\xff\xff"
UNSPECIFIED = b"\x00" * 16
BROADCAST_MAC = b"\xff" * 6
ZERO_MAC = b"\x00" * 6


def parse_mac(text: str) -> bytes:
    """Parse a MAC address written with ``:`` or ``-`` separators, padded or not."""
    if not isinstance(text, str):
        raise ValueError(f"MAC address must be a string, not {type(text).__name__}")
    sep = ":" if ":" in text else "-"
    parts = text.strip().split(sep)
    if len(parts) != 6:
        raise ValueError(f"invalid MAC address {text!r}: expected six groups of hex digits")
    out = bytearray()
    for part in parts:
        if not 1 <= len(part) <= 2 or any(c not in "0123456789abcdefABCDEF" for c in part):
            raise ValueError(f"invalid MAC address {text!r}: bad group {part!r}")
        out.append(int(part, 16))
    return bytes(out)


def format_mac(mac: bytes) -> str:
    """Format 6 raw bytes as ``aa:bb:cc:dd:ee:ff``."""
    if len(mac) != 6:
        raise ValueError(f"a MAC address is 6 bytes, got {len(mac)}")
    return ":".join(f"{b:02x}" for b in mac)


def mac_to_int(mac: bytes) -> int:
    return int.from_bytes(mac, "big")


def int_to_mac(value: int) -> bytes:
    return value.to_bytes(6, "big")


def is_multicast_mac(mac: bytes) -> bool:
    return bool(mac[0] & 0x01)


def parse_ip(text: str | IPv4Address | IPv6Address) -> IPv4Address | IPv6Address:
    """Parse an IP address; an IPv4-mapped IPv6 address comes back as IPv4."""
    ip = ipaddress.ip_address(text) if not isinstance(text, IPv4Address | IPv6Address) else text
    if isinstance(ip, IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def ip_to_wire(ip: str | IPv4Address | IPv6Address) -> bytes:
    """16 wire bytes for an IP: IPv6 as is, IPv4 as IPv4-mapped IPv6."""
    addr = parse_ip(ip)
    if isinstance(addr, IPv4Address):
        return V4_MAPPED_PREFIX + addr.packed
    return addr.packed


def ip_from_wire(data: bytes) -> IPv4Address | IPv6Address:
    """The IP carried in 16 wire bytes; v4-mapped addresses are returned as IPv4."""
    if len(data) != 16:
        raise ValueError(f"a wire IP is 16 bytes, got {len(data)}")
    if data[:12] == V4_MAPPED_PREFIX:
        return IPv4Address(data[12:])
    return IPv6Address(data)


def ip_text(data: bytes) -> str:
    return str(ip_from_wire(data))
