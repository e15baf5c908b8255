"""Ethernet / 802.1Q parsing and the ARP, NDP and DHCP frame helpers, sans I/O.

Pure ``struct`` code over ``bytes``: the overlay data path parses L2 headers with it, and
varpd's proxies (spec/varpd-overlay.md §3.5) validate requests and build replies with it.

- ``parse_l2(frame)`` gives dst, src, the 802.1Q tag (VLAN id, PCP) if present, the
  ethertype after the tag ("sap") and the header size (14, or 18 when tagged).
- ``add_vlan_tag`` / ``strip_vlan_tag`` move a frame between the untagged tenant side and the
  tagged overlay side.
- ARP: ``parse_arp``; ``check_arp_request`` applies the proxy's validation list (Ethernet/IPv4,
  request only, not gratuitous, fits in 1518 bytes); ``build_arp_reply`` rewrites a request
  into the reply the proxy injects, keeping the original L2 header and its VLAN tag;
  ``build_garp`` builds the gratuitous ARP request that VL3 shootdowns inject.
- NDP: ``parse_ndp_ns`` applies the NDP proxy's validation list (including illumos' loose
  type/code check); ``build_ndp_na`` answers it with a solicited+override Neighbor
  Advertisement carrying a Target Link-Layer Address option and a correct ICMPv6 checksum;
  ``build_unsolicited_na`` builds the all-nodes announcement that IPv6 VL3 shootdowns inject.
- DHCP: ``check_dhcp_client_broadcast`` / ``is_dhcp_client_broadcast`` recognise a broadcast
  IPv4 UDP 68 -> 67 datagram the DHCP proxy retargets (``set_dst_mac``) and resends.

Validation failures raise ``FrameError`` whose ``reason`` is a short token for counters.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

from protocol.addr import BROADCAST_MAC

ETH_P_IPV4 = 0x0800
ETH_P_ARP = 0x0806
ETH_P_8021Q = 0x8100
ETH_P_IPV6 = 0x86DD

ETHER_HEADER_SIZE = 14
VLAN_TAG_SIZE = 4
ETHERMAX = 1514
ETHERMAX_VLAN = 1518  # the largest frame varpd may inject or resend


DST_UNICAST = 0
DST_MULTICAST = 1
DST_BROADCAST = 2

ARP_REQUEST = 1
ARP_REPLY = 2
ARP_PACKET_SIZE = 28

IPPROTO_UDP = 17
IPPROTO_ICMPV6 = 58
ICMPV6_NS = 135
ICMPV6_NA = 136
NDP_OPT_SLLA = 1
NDP_OPT_TLLA = 2
NA_FLAG_ROUTER = 0x80000000
NA_FLAG_SOLICITED = 0x40000000
NA_FLAG_OVERRIDE = 0x20000000
ALL_NODES_MAC = b"\x33\x33\x00\x00\x00\x01"
ALL_NODES_IP6 = bytes.fromhex("ff020000000000000000000000000001")

DHCP_CLIENT_PORT = 68
DHCP_SERVER_PORT = 67
DHCP_MIN_PACKET = 20 + 8 + 300  # IPv4 + UDP + struct dhcp (incl. 60 option bytes)

_TAG = struct.Struct(">HH")
_ARP = struct.Struct(">HHBBH6s4s6s4s")
_IP6_HEADER = struct.Struct(">IHBB16s16s")


class FrameError(ValueError):
    """A frame that does not pass a parser's or proxy's checks; ``reason`` is a counter token."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


# --------------------------------------------------------------------------- L2


@dataclass(frozen=True, slots=True)
class L2Header:
    dst: bytes
    src: bytes
    vlan: int  # 0 when untagged
    pcp: int
    tagged: bool
    sap: int  # ethertype after any 802.1Q tag
    hdr_size: int  # 14 or 18

    @property
    def dst_type(self) -> int:
        return dst_type(self.dst)


def dst_type(mac: bytes) -> int:
    """DST_BROADCAST for ff:ff:ff:ff:ff:ff, DST_MULTICAST for group MACs, else DST_UNICAST."""
    if mac == BROADCAST_MAC:
        return DST_BROADCAST
    if mac[0] & 0x01:
        return DST_MULTICAST
    return DST_UNICAST


def parse_l2(frame: bytes | bytearray | memoryview) -> L2Header:
    """Parse the Ethernet header, with an optional 802.1Q tag."""
    if len(frame) < ETHER_HEADER_SIZE:
        raise FrameError("short", f"a {len(frame)}-byte frame has no complete Ethernet header")
    (ethertype,) = struct.unpack_from(">H", frame, 12)
    if ethertype != ETH_P_8021Q:
        return L2Header(
            bytes(frame[0:6]), bytes(frame[6:12]), 0, 0, False, ethertype, ETHER_HEADER_SIZE
        )
    if len(frame) < ETHER_HEADER_SIZE + VLAN_TAG_SIZE:
        raise FrameError("short", f"a {len(frame)}-byte frame has a truncated 802.1Q tag")
    tci, sap = _TAG.unpack_from(frame, 14)
    return L2Header(bytes(frame[0:6]), bytes(frame[6:12]), tci & 0x0FFF, tci >> 13, True, sap, 18)


def vlan_of(frame: bytes | bytearray | memoryview) -> int:
    """The VLAN id of a frame, 0 if it is untagged (or too short to say)."""
    if len(frame) >= 18 and frame[12] == 0x81 and frame[13] == 0x00:
        return ((frame[14] << 8) | frame[15]) & 0x0FFF
    return 0


def add_vlan_tag(frame: bytes | bytearray | memoryview, vlan: int, pcp: int = 0) -> bytes:
    """Insert an 802.1Q tag (TPID 0x8100) after the MAC addresses."""
    if not 0 <= vlan <= 4095:
        raise ValueError(f"a VLAN id is 12 bits (0..4095), got {vlan}")
    if not 0 <= pcp <= 7:
        raise ValueError(f"an 802.1Q priority is 3 bits (0..7), got {pcp}")
    if len(frame) < ETHER_HEADER_SIZE:
        raise FrameError("short", f"a {len(frame)}-byte frame has no complete Ethernet header")
    return bytes(frame[:12]) + _TAG.pack(ETH_P_8021Q, (pcp << 13) | vlan) + bytes(frame[12:])


def strip_vlan_tag(frame: bytes | bytearray | memoryview) -> bytes:
    """Remove an outer 802.1Q tag if there is one; untagged frames come back unchanged."""
    if len(frame) >= 18 and frame[12] == 0x81 and frame[13] == 0x00:
        return bytes(frame[:12]) + bytes(frame[16:])
    return bytes(frame)


def build_l2_header(dst: bytes, src: bytes, sap: int, vlan: int = 0, pcp: int = 0) -> bytes:
    """An Ethernet header, tagged when ``vlan`` (or ``pcp``) is not 0."""
    if vlan or pcp:
        return dst + src + _TAG.pack(ETH_P_8021Q, (pcp << 13) | vlan) + struct.pack(">H", sap)
    return dst + src + struct.pack(">H", sap)


def set_dst_mac(frame: bytes | bytearray | memoryview, mac: bytes) -> bytes:
    """A copy of ``frame`` with its Ethernet destination replaced (the DHCP proxy's rewrite)."""
    if len(mac) != 6:
        raise ValueError(f"a MAC address is 6 bytes, got {len(mac)}")
    return mac + bytes(frame[6:])


def _ipv4(value: str | IPv4Address | bytes) -> bytes:
    if isinstance(value, bytes | bytearray):
        if len(value) != 4:
            raise ValueError(f"an IPv4 address is 4 bytes, got {len(value)}")
        return bytes(value)
    return IPv4Address(value).packed


def _ipv6(value: str | IPv6Address | bytes) -> bytes:
    if isinstance(value, bytes | bytearray):
        if len(value) != 16:
            raise ValueError(f"an IPv6 address is 16 bytes, got {len(value)}")
        return bytes(value)
    return IPv6Address(value).packed


# --------------------------------------------------------------------------- ARP


@dataclass(frozen=True, slots=True)
class ArpPacket:
    l2: L2Header
    htype: int
    ptype: int
    hlen: int
    plen: int
    op: int
    sender_mac: bytes
    sender_ip: IPv4Address
    target_mac: bytes
    target_ip: IPv4Address

    @property
    def gratuitous(self) -> bool:
        return self.sender_ip == self.target_ip


def parse_arp(frame: bytes | bytearray | memoryview) -> ArpPacket:
    """Parse an Ethernet ARP frame (any op) without the proxy's policy checks."""
    l2 = parse_l2(frame)
    if l2.sap != ETH_P_ARP:
        raise FrameError("not_arp", f"ethertype {l2.sap:#06x} is not ARP (0x0806)")
    if len(frame) - l2.hdr_size < ARP_PACKET_SIZE:
        raise FrameError(
            "short", f"ARP packet of {len(frame) - l2.hdr_size} bytes is shorter than 28"
        )
    htype, ptype, hlen, plen, op, sha, spa, tha, tpa = _ARP.unpack_from(frame, l2.hdr_size)
    return ArpPacket(l2, htype, ptype, hlen, plen, op, sha, IPv4Address(spa), tha, IPv4Address(tpa))


def check_arp_request(frame: bytes | bytearray | memoryview) -> ArpPacket:
    """Parse an ARP frame and apply the proxy-ARP checks of spec §3.5; raises FrameError."""
    if len(frame) > ETHERMAX_VLAN:
        raise FrameError("too_big", f"a {len(frame)}-byte frame exceeds {ETHERMAX_VLAN} bytes")
    arp = parse_arp(frame)
    if arp.htype != 1:
        raise FrameError("bad_htype", f"ARP hardware type {arp.htype} is not Ethernet (1)")
    if arp.ptype != ETH_P_IPV4:
        raise FrameError("bad_ptype", f"ARP protocol type {arp.ptype:#06x} is not IPv4")
    if arp.hlen != 6:
        raise FrameError("bad_hlen", f"ARP hardware length {arp.hlen} is not 6")
    if arp.plen != 4:
        raise FrameError("bad_plen", f"ARP protocol length {arp.plen} is not 4")
    if arp.op != ARP_REQUEST:
        raise FrameError("not_request", f"ARP op {arp.op} is not a request (1)")
    if arp.gratuitous:
        raise FrameError("gratuitous", f"gratuitous ARP for {arp.target_ip} is not proxied")
    return arp


def build_arp_reply(request_frame: bytes | bytearray | memoryview, answer_mac: bytes) -> bytes:
    """Rewrite a valid ARP request into the proxy's reply ("``answer_mac`` is at target IP").

    The original L2 header, 802.1Q tag and any trailing padding are kept; Ethernet dst becomes
    the requester, Ethernet src and the ARP sender become ``answer_mac``, the IPs swap.
    """
    if len(answer_mac) != 6:
        raise ValueError(f"a MAC address is 6 bytes, got {len(answer_mac)}")
    arp = check_arp_request(request_frame)
    out = bytearray(request_frame)
    out[0:6] = arp.l2.src
    out[6:12] = answer_mac
    struct.pack_into(
        ">HHBBH6s4s6s4s",
        out,
        arp.l2.hdr_size,
        1,
        ETH_P_IPV4,
        6,
        4,
        ARP_REPLY,
        answer_mac,
        arp.target_ip.packed,
        arp.sender_mac,
        arp.sender_ip.packed,
    )
    return bytes(out)


def build_arp(
    op: int,
    sender_mac: bytes,
    sender_ip: str | IPv4Address | bytes,
    target_mac: bytes,
    target_ip: str | IPv4Address | bytes,
    *,
    src: bytes | None = None,
    dst: bytes = BROADCAST_MAC,
    vlan: int = 0,
) -> bytes:
    """A complete Ethernet/IPv4 ARP frame (no padding); Ethernet src defaults to the sender."""
    header = build_l2_header(dst, src if src is not None else sender_mac, ETH_P_ARP, vlan)
    body = _ARP.pack(
        1, ETH_P_IPV4, 6, 4, op, sender_mac, _ipv4(sender_ip), target_mac, _ipv4(target_ip)
    )
    return header + body


def build_garp(
    mac: bytes, ip: str | IPv4Address | bytes, vlan: int = 0, dst: bytes = BROADCAST_MAC
) -> bytes:
    """The gratuitous ARP request varpd injects after a VL3 shootdown (libvarpd_inject_arp).

    Sender = (mac, ip), target IP = ip, target HW = ff:ff:ff:ff:ff:ff; tagged when vlan != 0.
    """
    return build_arp(ARP_REQUEST, mac, ip, BROADCAST_MAC, ip, src=mac, dst=dst, vlan=vlan)


# --------------------------------------------------------------------------- checksums


def inet_checksum(data: bytes | bytearray | memoryview) -> int:
    """The Internet (one's complement) checksum of ``data``."""
    if len(data) % 2:
        data = bytes(data) + b"\x00"
    total = sum(struct.unpack(f">{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def icmpv6_checksum(src: bytes, dst: bytes, icmp: bytes | bytearray | memoryview) -> int:
    """ICMPv6 checksum over the IPv6 pseudo-header and ``icmp`` (checksum field zeroed)."""
    pseudo = src + dst + struct.pack(">IxxxB", len(icmp), IPPROTO_ICMPV6)
    return inet_checksum(pseudo + bytes(icmp))


# --------------------------------------------------------------------------- NDP


@dataclass(frozen=True, slots=True)
class NeighborSolicitation:
    l2: L2Header
    src_ip: IPv6Address
    dst_ip: IPv6Address
    hop_limit: int
    icmp_type: int
    icmp_code: int
    target: IPv6Address
    source_lla: bytes


def _is_ndp_destination(ip: bytes) -> bool:
    # Solicited-node (ff02::1:ffXX:XXXX) is itself link-local scope; illumos accepts any
    # link-local-scope multicast (ffX2::/16) "liberally".
    return ip[0] == 0xFF and (ip[1] & 0x0F) == 0x02


def parse_ndp_ns(frame: bytes | bytearray | memoryview) -> NeighborSolicitation:
    """Parse a Neighbor Solicitation and apply the proxy-NDP checks of spec §3.5."""
    frame = bytes(frame)
    if len(frame) > ETHERMAX_VLAN:
        raise FrameError("too_big", f"a {len(frame)}-byte frame exceeds {ETHERMAX_VLAN} bytes")
    l2 = parse_l2(frame)
    if l2.dst[:2] != b"\x33\x33":
        raise FrameError("not_ipv6_multicast", "NDP proxying needs a 33:33:xx:xx:xx:xx dst MAC")
    if l2.sap != ETH_P_IPV6:
        raise FrameError("not_ipv6", f"ethertype {l2.sap:#06x} is not IPv6 (0x86dd)")
    off = l2.hdr_size
    if len(frame) - off < 40 + 24:
        raise FrameError("short", f"IPv6 packet of {len(frame) - off} bytes is too short for NS")
    vtf, plen, nxt, hlim, src, dst = _IP6_HEADER.unpack_from(frame, off)
    if vtf >> 28 != 6:
        raise FrameError("bad_version", f"IP version {vtf >> 28} is not 6")
    if nxt != IPPROTO_ICMPV6:
        raise FrameError("not_icmpv6", f"next header {nxt} is not ICMPv6 (58)")
    if not _is_ndp_destination(dst):
        raise FrameError("bad_ip_dst", f"{IPv6Address(dst)} is not link-local-scope multicast")
    if plen > len(frame) - off - 40:
        raise FrameError("truncated", f"IPv6 payload length {plen} exceeds the captured bytes")
    icmp = off + 40
    icmp_type, icmp_code = frame[icmp], frame[icmp + 1]
    # illumos' quirk, kept: only a frame that is neither type 135 nor code 0 is refused.
    if icmp_type != ICMPV6_NS and icmp_code != 0:
        raise FrameError("not_ns", f"ICMPv6 type {icmp_type} code {icmp_code} is not an NS")
    target = IPv6Address(frame[icmp + 8 : icmp + 24])
    if target.is_multicast or target.ipv4_mapped is not None or target.is_loopback:
        raise FrameError("bad_target", f"NS target {target} cannot be proxied")
    slla = None
    pos, end = icmp + 24, icmp + max(plen, 24)
    while pos + 2 <= end:
        opt_type, opt_len = frame[pos], frame[pos + 1]
        if opt_len == 0:
            raise FrameError("zero_length_option", "NDP option with length 0")
        if pos + opt_len * 8 > end:
            break
        if opt_type == NDP_OPT_SLLA and slla is None:
            slla = frame[pos + 2 : pos + 8]
        pos += opt_len * 8
    if slla is None:
        raise FrameError("no_slla", "NS without a Source Link-Layer Address option")
    return NeighborSolicitation(
        l2,
        IPv6Address(src),
        IPv6Address(dst),
        hlim,
        icmp_type,
        icmp_code,
        target,
        slla,
    )


def build_ndp_na(
    ns_frame: bytes | bytearray | memoryview,
    target: str | IPv6Address | bytes | None,
    answer_mac: bytes,
) -> bytes:
    """Answer a valid NS with a Neighbor Advertisement: ``target`` is at ``answer_mac``.

    The NS's L2 header and VLAN tag are kept (dst = the soliciting MAC, src = answer_mac); the
    IPv6 header is copied with the hop limit kept, dst = the NS source, src = target; the NA has
    flags Solicited|Override, the target (``None`` = the NS's target) and a TLLA option.
    """
    if len(answer_mac) != 6:
        raise ValueError(f"a MAC address is 6 bytes, got {len(answer_mac)}")
    ns = parse_ndp_ns(ns_frame)
    target16 = ns.target.packed if target is None else _ipv6(target)
    frame = bytes(ns_frame)
    off = ns.l2.hdr_size
    l2 = ns.l2.src + answer_mac + frame[12:off]
    src_ip, dst_ip = target16, ns.src_ip.packed
    na = _neighbor_advert(NA_FLAG_SOLICITED | NA_FLAG_OVERRIDE, target16, answer_mac, dst_ip)
    (vtf,) = struct.unpack_from(">I", frame, off)
    ip6 = _IP6_HEADER.pack(vtf, len(na), IPPROTO_ICMPV6, ns.hop_limit, src_ip, dst_ip)
    return l2 + ip6 + na


def build_unsolicited_na(mac: bytes, ip16: bytes, vlan: int = 0) -> bytes:
    """An unsolicited Neighbor Advertisement (RFC 4861 §7.2.6): ``ip16`` is at ``mac``.

    What VL3 shootdowns inject for IPv6: to all-nodes (ff02::1, 33:33:00:00:00:01), hop limit
    255, flags Override only, with a Target Link-Layer Address option; tagged when ``vlan``.
    """
    na = _neighbor_advert(NA_FLAG_OVERRIDE, ip16, mac, ALL_NODES_IP6)
    ip6 = _IP6_HEADER.pack(6 << 28, len(na), IPPROTO_ICMPV6, 255, ip16, ALL_NODES_IP6)
    return build_l2_header(ALL_NODES_MAC, mac, ETH_P_IPV6, vlan) + ip6 + na


def _neighbor_advert(flags: int, target16: bytes, mac: bytes, dst_ip: bytes) -> bytes:
    """An ICMPv6 NA from ``target16`` to ``dst_ip`` with a TLLA option, checksum filled in."""
    na = bytearray(
        struct.pack(">BBHI16sBB6s", ICMPV6_NA, 0, 0, flags, target16, NDP_OPT_TLLA, 1, mac)
    )
    struct.pack_into(">H", na, 2, icmpv6_checksum(target16, dst_ip, na))
    return bytes(na)


# --------------------------------------------------------------------------- DHCP


def check_dhcp_client_broadcast(frame: bytes | bytearray | memoryview) -> L2Header:
    """Apply the proxy-DHCP checks of spec §3.5 (broadcast IPv4 UDP 68 -> 67); raises."""
    if len(frame) > ETHERMAX_VLAN:
        raise FrameError("too_big", f"a {len(frame)}-byte frame exceeds {ETHERMAX_VLAN} bytes")
    l2 = parse_l2(frame)
    if l2.sap != ETH_P_IPV4:
        raise FrameError("not_ipv4", f"ethertype {l2.sap:#06x} is not IPv4")
    if l2.dst != BROADCAST_MAC:
        raise FrameError("not_broadcast", "DHCP proxying needs a broadcast dst MAC")
    off = l2.hdr_size
    if len(frame) - off < DHCP_MIN_PACKET:
        raise FrameError(
            "short", f"IPv4 packet of {len(frame) - off} bytes is shorter than {DHCP_MIN_PACKET}"
        )
    version, proto = frame[off] >> 4, frame[off + 9]
    # illumos' quirk, kept: refused only when it is neither IPv4 nor UDP.
    if version != 4 and proto != IPPROTO_UDP:
        raise FrameError("not_udp", f"IP version {version} protocol {proto} is not IPv4/UDP")
    udp = off + (frame[off] & 0x0F) * 4 if version == 4 else off + 20
    sport, dport = struct.unpack_from(">HH", frame, udp)
    if sport != DHCP_CLIENT_PORT or dport != DHCP_SERVER_PORT:
        raise FrameError("bad_ports", f"UDP {sport} -> {dport} is not DHCP client 68 -> 67")
    return l2


def is_dhcp_client_broadcast(frame: bytes | bytearray | memoryview) -> bool:
    """True when ``frame`` is a DHCP client broadcast the DHCP proxy would retarget."""
    try:
        check_dhcp_client_broadcast(frame)
    except (FrameError, struct.error):
        return False
    return True
