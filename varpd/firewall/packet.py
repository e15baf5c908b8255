"""Fast parse of the fields the firewall needs from an Ethernet frame.

``parse_frame(frame)`` returns a ``Packet`` for IPv4/IPv6, ``NOT_IP`` for any other ethertype
(ARP, LLDP, ...: below the firewall), or ``MALFORMED`` when an IP packet is too short to
classify (truncated IP header, a transport header cut short, a bad IPv4 IHL). It reads only
fixed offsets with slicing and ``int.from_bytes``; no scapy, no struct objects per packet.

- L2: an optional 802.1Q tag is skipped (the shim hands the firewall untagged tenant frames,
  but a tagged one parses the same).
- IPv4: IHL honoured (options skipped). ``frag`` is ``FRAG_NONE``, ``FRAG_FIRST`` (MF set,
  offset 0: ports are parsed as usual and must be complete) or ``FRAG_LATER`` (offset > 0: no
  transport header). ``ip_id`` is the IPv4 identification, so the engine can make later
  fragments follow their first fragment's verdict.
- IPv6: only the fixed 40-byte header is read. If its next header is tcp/udp/icmpv6 the
  transport header is parsed; any other value (hop-by-hop, routing, fragment, destination
  options, AH 51, ESP 50, ...) becomes the packet's protocol with no ports: such packets match
  only rules of that protocol number (ah/esp), otherwise they get the default verdict.
- TCP/UDP: source and destination ports; TCP flags byte.
- ICMP/ICMPv6: type and code; echo request/reply carry ``ident`` (the echo identifier); an
  error message (v4 types 3, 4, 5, 11, 12; v6 types 1..4) carries ``inner``, the flow of the
  packet it quotes: ``(proto, src, dst, sport, dport)`` of the embedded header (ports are the
  echo identifier twice for an embedded echo; ``None`` if the quote is unusable).

Addresses are raw bytes (4 or 16); the engine turns the remote one into an int only when it
has to consult rules.
"""

from __future__ import annotations

from typing import Final

ETH_IPV4: Final = 0x0800
ETH_IPV6: Final = 0x86DD
ETH_VLAN: Final = 0x8100

PROTO_ICMP: Final = 1
PROTO_TCP: Final = 6
PROTO_UDP: Final = 17
PROTO_ESP: Final = 50
PROTO_AH: Final = 51
PROTO_ICMP6: Final = 58

TCP_FIN: Final = 0x01
TCP_SYN: Final = 0x02
TCP_RST: Final = 0x04
TCP_ACK: Final = 0x10

FRAG_NONE: Final = 0
FRAG_FIRST: Final = 1
FRAG_LATER: Final = 2

ICMP4_ECHO_REQUEST: Final = 8
ICMP4_ECHO_REPLY: Final = 0
ICMP6_ECHO_REQUEST: Final = 128
ICMP6_ECHO_REPLY: Final = 129
ICMP4_ERRORS: Final = frozenset({3, 4, 5, 11, 12})
ICMP6_ERRORS: Final = frozenset({1, 2, 3, 4})

NOT_IP: Final = 0
MALFORMED: Final = 1

_from = int.from_bytes


class Packet:
    """What the firewall reads from one IP packet; see the module docstring."""

    __slots__ = (
        "family",
        "proto",
        "src",
        "dst",
        "sport",
        "dport",
        "flags",
        "icmp_type",
        "icmp_code",
        "ident",
        "ip_id",
        "frag",
        "hop_limit",
        "inner",
    )

    def __init__(
        self,
        family: int,
        proto: int,
        src: bytes,
        dst: bytes,
        hop_limit: int,
        frag: int = FRAG_NONE,
        ip_id: int = 0,
    ) -> None:
        self.family = family
        self.proto = proto
        self.src = src
        self.dst = dst
        self.hop_limit = hop_limit
        self.frag = frag
        self.ip_id = ip_id
        self.ident = 0
        self.sport = 0
        self.dport = 0
        self.flags = 0
        self.icmp_type = -1
        self.icmp_code = -1
        self.inner: tuple[int, bytes, bytes, int, int] | None = None

    def __repr__(self) -> str:
        return (
            f"<Packet v{self.family} proto {self.proto} {self.src.hex()}:{self.sport} -> "
            f"{self.dst.hex()}:{self.dport} flags {self.flags:#x} icmp "
            f"{self.icmp_type}/{self.icmp_code} frag {self.frag}>"
        )


def _quoted(
    proto_outer: int, data: bytes, off: int, end: int
) -> tuple[int, bytes, bytes, int, int] | None:
    """The flow of the IP header (plus 8 bytes) that an ICMP error quotes at ``off``."""
    if proto_outer == PROTO_ICMP:
        if end - off < 28 or data[off] >> 4 != 4:
            return None
        ihl = (data[off] & 0x0F) * 4
        if ihl < 20 or end - off < ihl + 8:
            return None
        proto = data[off + 9]
        src = data[off + 12 : off + 16]
        dst = data[off + 16 : off + 20]
        l4 = off + ihl
        icmp_echo_types = (ICMP4_ECHO_REQUEST, ICMP4_ECHO_REPLY)
    else:
        if end - off < 48 or data[off] >> 4 != 6:
            return None
        proto = data[off + 6]
        src = data[off + 8 : off + 24]
        dst = data[off + 24 : off + 40]
        l4 = off + 40
        icmp_echo_types = (ICMP6_ECHO_REQUEST, ICMP6_ECHO_REPLY)
    if proto in (PROTO_TCP, PROTO_UDP):
        return (
            proto,
            src,
            dst,
            _from(data[l4 : l4 + 2], "big"),
            _from(data[l4 + 2 : l4 + 4], "big"),
        )
    if proto == proto_outer and data[l4] in icmp_echo_types:
        ident = _from(data[l4 + 4 : l4 + 6], "big")
        return (proto, src, dst, ident, ident)
    return None


def parse_frame(frame: bytes) -> Packet | int:
    """Parse an Ethernet frame; ``Packet``, ``NOT_IP`` or ``MALFORMED``."""
    if len(frame) < 14:
        return MALFORMED
    ethertype = (frame[12] << 8) | frame[13]
    off = 14
    if ethertype == ETH_VLAN:
        if len(frame) < 18:
            return MALFORMED
        ethertype = (frame[16] << 8) | frame[17]
        off = 18
    end = len(frame)
    if ethertype == ETH_IPV4:
        if end - off < 20 or frame[off] >> 4 != 4:
            return MALFORMED
        ihl = (frame[off] & 0x0F) * 4
        total = (frame[off + 2] << 8) | frame[off + 3]
        if ihl < 20 or total < ihl or end - off < ihl:
            return MALFORMED
        if off + total < end:
            end = off + total  # Ethernet padding is not payload
        fragword = (frame[off + 6] << 8) | frame[off + 7]
        if fragword & 0x1FFF:
            frag = FRAG_LATER
        elif fragword & 0x2000:
            frag = FRAG_FIRST
        else:
            frag = FRAG_NONE
        proto = frame[off + 9]
        pkt = Packet(
            4,
            proto,
            frame[off + 12 : off + 16],
            frame[off + 16 : off + 20],
            frame[off + 8],
            frag,
            (frame[off + 4] << 8) | frame[off + 5],
        )
        if frag == FRAG_LATER:
            return pkt
        l4 = off + ihl
        icmp = PROTO_ICMP
    elif ethertype == ETH_IPV6:
        if end - off < 40 or frame[off] >> 4 != 6:
            return MALFORMED
        payload = (frame[off + 4] << 8) | frame[off + 5]
        if off + 40 + payload < end:
            end = off + 40 + payload
        proto = frame[off + 6]
        pkt = Packet(
            6, proto, frame[off + 8 : off + 24], frame[off + 24 : off + 40], frame[off + 7]
        )
        l4 = off + 40
        icmp = PROTO_ICMP6
    else:
        return NOT_IP

    if proto == PROTO_TCP:
        if end - l4 < 20:
            return MALFORMED
        pkt.sport = (frame[l4] << 8) | frame[l4 + 1]
        pkt.dport = (frame[l4 + 2] << 8) | frame[l4 + 3]
        pkt.flags = frame[l4 + 13]
    elif proto == PROTO_UDP:
        if end - l4 < 8:
            return MALFORMED
        pkt.sport = (frame[l4] << 8) | frame[l4 + 1]
        pkt.dport = (frame[l4 + 2] << 8) | frame[l4 + 3]
    elif proto == icmp:
        if end - l4 < 8:
            return MALFORMED
        t = frame[l4]
        pkt.icmp_type = t
        pkt.icmp_code = frame[l4 + 1]
        if icmp == PROTO_ICMP:
            if t in (ICMP4_ECHO_REQUEST, ICMP4_ECHO_REPLY):
                pkt.ident = (frame[l4 + 4] << 8) | frame[l4 + 5]
            elif t in ICMP4_ERRORS:
                pkt.inner = _quoted(icmp, frame, l4 + 8, end)
        else:
            if t in (ICMP6_ECHO_REQUEST, ICMP6_ECHO_REPLY):
                pkt.ident = (frame[l4 + 4] << 8) | frame[l4 + 5]
            elif t in ICMP6_ERRORS:
                pkt.inner = _quoted(icmp, frame, l4 + 8, end)
    return pkt
