"""VXLAN header encode/decode (RFC 7348 as illumos writes and reads it), sans I/O.

The header is 8 bytes, two big-endian 32-bit words::

    word0  flags   0x08000000 = the I bit ("VNI is valid"); everything else reserved
    word1  VNI << 8           the low 8 bits are reserved

Encap writes exactly ``0x08000000`` and ``vni << 8``. Decap is as permissive as the illumos
driver: a datagram shorter than 8 bytes is refused ("short"), one without the I bit is refused
("no_i_bit"), and every reserved bit, in either word, is ignored.

``flow_hash`` turns the inner frame's flow (MACs, VLAN, IPs, L4 protocol and ports) into a
stable 32-bit number, and ``source_port`` maps it into the ephemeral range, so that the outer
UDP source port differs per inner flow (ECMP/RSS spread, like illumos' UDP_HASH_VXLAN) but is
the same for every frame of one flow, in every process (CRC-32, not Python's salted hash()).
"""

from __future__ import annotations

import struct
from zlib import crc32

HEADER_SIZE = 8
FLAG_I = 0x08000000
VNI_MAX = (1 << 24) - 1
IANA_PORT = 4789
EPHEMERAL_LOW = 49152
EPHEMERAL_HIGH = 65535

_HEADER = struct.Struct(">II")
_ETH_8021Q = b"\x81\x00"
_ETH_IPV4 = b"\x08\x00"
_ETH_IPV6 = b"\x86\xdd"
_PORT_PROTOCOLS = frozenset({6, 17, 132, 136})  # TCP, UDP, SCTP, UDP-Lite


class VxlanError(ValueError):
    """A datagram that is not a usable VXLAN frame; ``reason`` names why (for counters)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def encode_header(vni: int) -> bytes:
    """The 8-byte header for ``vni`` (callers on the hot path compute it once per device)."""
    if not 0 <= vni <= VNI_MAX:
        raise ValueError(f"a VXLAN network id is 24 bits (0..{VNI_MAX}), got {vni}")
    return _HEADER.pack(FLAG_I, vni << 8)


def encode(vni: int, inner: bytes | bytearray | memoryview) -> bytes:
    """Prepend the VXLAN header for ``vni`` to the inner Ethernet frame."""
    return encode_header(vni) + bytes(inner)


def decode(datagram: bytes | bytearray | memoryview) -> tuple[int, bytes]:
    """Split a UDP payload into ``(vni, inner frame)``; raises ``VxlanError``."""
    if len(datagram) < HEADER_SIZE:
        raise VxlanError(
            "short", f"VXLAN datagram of {len(datagram)} bytes is shorter than the 8-byte header"
        )
    flags, word1 = _HEADER.unpack_from(datagram, 0)
    if not flags & FLAG_I:
        raise VxlanError("no_i_bit", f"VXLAN flags word {flags:#010x} lacks the I bit")
    return word1 >> 8, bytes(datagram[HEADER_SIZE:])


def flow_hash(frame: bytes | bytearray | memoryview) -> int:
    """A stable 32-bit hash of the inner frame's flow: MACs, VLAN tag, IPs, protocol, ports.

    A CRC-32 chained over the fields (no copies of the payload); frames too short to carry a
    field hash what they have, and nothing raises. IPv6 adds the flow label, which hosts set
    per flow for exactly this purpose; extension headers are not walked (no ports then).
    """
    if not isinstance(frame, bytes):
        frame = bytes(frame)
    if frame[12:14] == _ETH_8021Q:
        l3 = 18
        ethertype = frame[16:18]
    else:
        l3 = 14
        ethertype = frame[12:14]
    if ethertype == _ETH_IPV4 and len(frame) >= l3 + 20:
        first = frame[l3]
        proto = frame[l3 + 9]
        seed = crc32(frame[:l3], proto)
        # Ports only in the first fragment (offset 0); later fragments carry none.
        if proto in _PORT_PROTOCOLS and not (frame[l3 + 6] & 0x1F or frame[l3 + 7]):
            if first == 0x45:  # no IP options: addresses and ports are contiguous
                return crc32(frame[l3 + 12 : l3 + 24], seed)
            l4 = l3 + (first & 0x0F) * 4
            return crc32(frame[l4 : l4 + 4], crc32(frame[l3 + 12 : l3 + 20], seed))
        return crc32(frame[l3 + 12 : l3 + 20], seed)
    if ethertype == _ETH_IPV6 and len(frame) >= l3 + 40:
        nxt = frame[l3 + 6]
        seed = crc32(frame[:l3], nxt)
        seed = crc32(frame[l3 + 1 : l3 + 4], seed ^ 0x5A)  # flow label (with 4 TC bits)
        if nxt in _PORT_PROTOCOLS:
            return crc32(frame[l3 + 8 : l3 + 44], seed)
        return crc32(frame[l3 + 8 : l3 + 40], seed)
    return crc32(frame[:l3])


def source_port(hash_value: int) -> int:
    """Map a flow hash into the ephemeral port range 49152..65535."""
    folded = (hash_value ^ (hash_value >> 16)) & 0xFFFFFFFF
    return EPHEMERAL_LOW + folded % (EPHEMERAL_HIGH - EPHEMERAL_LOW + 1)
