"""Ethernet frames the in-process demo's guests send, and the summary it reads back.

Sans I/O: builders for an ICMP echo and a UDP datagram over IPv4 (checksums computed with
`protocol.ethernet.inet_checksum`), and `summarize`, which tells what a frame is (ARP
request/reply/gratuitous, echo request/reply, UDP, other) by parsing it by hand, no scapy.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from ipaddress import IPv4Address

from protocol.addr import format_mac
from protocol.ethernet import (
    ARP_REQUEST,
    ETH_P_ARP,
    build_l2_header,
    inet_checksum,
    parse_arp,
)

ETH_P_IP = 0x0800


def ms(seconds: float) -> str:
    """Milliseconds, with the precision a reader needs."""
    value = seconds * 1000
    return f"{value:.2f} ms" if value < 10 else f"{value:.0f} ms"


def _ipv4_packet(src: str, dst: str, proto: int, payload: bytes, ident: int) -> bytes:
    header = struct.pack(
        ">BBHHHBBH4s4s",
        0x45,
        0,
        20 + len(payload),
        ident & 0xFFFF,
        0x4000,
        64,
        proto,
        0,
        IPv4Address(src).packed,
        IPv4Address(dst).packed,
    )
    header = header[:10] + struct.pack(">H", inet_checksum(header)) + header[12:]
    return header + payload


def icmp_echo(
    src_mac: bytes, dst_mac: bytes, src: str, dst: str, seq: int, *, reply: bool = False
) -> bytes:
    """An Ethernet/IPv4 ICMP echo request (or reply), identifier 0x7070."""
    body = b"portolan demo payload"
    icmp = struct.pack(">BBHHH", 0 if reply else 8, 0, 0, 0x7070, seq) + body
    icmp = icmp[:2] + struct.pack(">H", inet_checksum(icmp)) + icmp[4:]
    return build_l2_header(dst_mac, src_mac, ETH_P_IP) + _ipv4_packet(src, dst, 1, icmp, seq)


def udp_frame(src_mac: bytes, dst_mac: bytes, src: str, dst: str, sport: int, dport: int) -> bytes:
    """An Ethernet/IPv4/UDP frame (checksum 0: allowed over IPv4)."""
    data = b"hello through the overlay"
    udp = struct.pack(">HHHH", sport, dport, 8 + len(data), 0) + data
    return build_l2_header(dst_mac, src_mac, ETH_P_IP) + _ipv4_packet(src, dst, 17, udp, sport)


@dataclass(frozen=True)
class Summary:
    """What the demo needs to know about a frame (parsed by hand, no scapy)."""

    kind: str  # arp-request | arp-reply | garp | echo-request | echo-reply | udp | other
    src_mac: bytes
    dst_mac: bytes
    src_ip: str = ""
    dst_ip: str = ""
    detail: str = ""


def summarize(frame: bytes) -> Summary:
    dst, src = frame[:6], frame[6:12]
    ethertype = int.from_bytes(frame[12:14], "big") if len(frame) >= 14 else 0
    if ethertype == ETH_P_ARP:
        try:
            arp = parse_arp(frame)
        except ValueError:
            return Summary("other", src, dst, detail="malformed ARP")
        if arp.gratuitous:
            kind = "garp"
        else:
            kind = "arp-request" if arp.op == ARP_REQUEST else "arp-reply"
        return Summary(
            kind, src, dst, str(arp.sender_ip), str(arp.target_ip), format_mac(arp.sender_mac)
        )
    if ethertype == ETH_P_IP and len(frame) >= 34:
        ihl = (frame[14] & 0x0F) * 4
        proto = frame[23]
        sip = str(IPv4Address(frame[26:30]))
        dip = str(IPv4Address(frame[30:34]))
        l4 = frame[14 + ihl :]
        if proto == 1 and len(l4) >= 8:
            kind = {8: "echo-request", 0: "echo-reply"}.get(l4[0], "other")
            seq = int.from_bytes(l4[6:8], "big")
            return Summary(kind, src, dst, sip, dip, f"seq {seq}")
        if proto == 17 and len(l4) >= 8:
            sport, dport = struct.unpack_from(">HH", l4)
            return Summary("udp", src, dst, sip, dip, f"{sport}>{dport}")
        return Summary("other", src, dst, sip, dip, f"IP proto {proto}")
    return Summary("other", src, dst, detail=f"ethertype {ethertype:#06x}")
