"""The scapy layer against our codec: codec-built frames dissect, scapy-built frames decode."""

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether
from scapy.packet import Raw, raw

from protocol.addr import format_mac, ip_text, ip_to_wire, parse_mac
from protocol.svp import (
    BulkAck,
    BulkRequest,
    LogAck,
    LogRemove,
    LogRemoveAck,
    LogRequest,
    LogRouteEntry,
    LogVL2Entry,
    LogVL3Entry,
    Ping,
    Pong,
    RouteAck,
    RouteRequest,
    Shootdown,
    VL2Ack,
    VL2Request,
    VL3Ack,
    VL3Request,
    decode_frame,
)
from protocol.svp_scapy import (
    SVP,
    SVPBulkAck,
    SVPBulkRequest,
    SVPLogAck,
    SVPLogRemove,
    SVPLogRemoveAck,
    SVPLogRequest,
    SVPLogRouteEntry,
    SVPLogVL2Entry,
    SVPLogVL3Entry,
    SVPRouteAck,
    SVPRouteRequest,
    SVPShootdown,
    SVPVL2Ack,
    SVPVL2Request,
    SVPVL3Ack,
    SVPVL3Request,
)

MAC = parse_mac("00:0a:95:9d:68:16")
MAC_TEXT = "00:0a:95:9d:68:16"
UL = ip_to_wire("192.168.1.1")
IP10 = ip_to_wire("10.0.0.1")
ID1 = bytes.fromhex("11111111222243338444555555555555")
ID2 = bytes.fromhex("aaaaaaaabbbb4ccc8dddeeeeeeeeeeee")
ROUTE_ENTRY = LogRouteEntry(ID1, 12340, 4444, 7, IP10, UL, 5, 6, 120, 112)

# (codec message, the scapy packet that must be byte-identical to it)
PAIRS = [
    (Ping(1), SVP(op=1, id=1)),
    (Pong(1), SVP(op=2, id=1)),
    (VL2Request(2, MAC, 12340), SVP(id=2) / SVPVL2Request(mac=MAC_TEXT, vnetid=12340)),
    (VL2Ack(2, 0, 4789, UL), SVP(id=2) / SVPVL2Ack(status=0, port=4789, addr="::ffff:192.168.1.1")),
    (VL2Ack(3, 2, 0, bytes(16)), SVP(id=3) / SVPVL2Ack(status=2)),
    (VL3Request(4, IP10, 1, 12340), SVP(id=4) / SVPVL3Request(ip="::ffff:10.0.0.1", vnetid=12340)),
    (
        VL3Request(5, ip_to_wire("fd00::1"), 2, 12340),
        SVP(id=5) / SVPVL3Request(ip="fd00::1", type=2, vnetid=12340),
    ),
    (
        VL3Ack(4, 0, MAC, 4789, UL),
        SVP(id=4) / SVPVL3Ack(mac=MAC_TEXT, port=4789, addr="::ffff:192.168.1.1"),
    ),
    (BulkRequest(6, 2), SVP(id=6) / SVPBulkRequest(type=2)),
    (BulkAck(6, 4, 2, b"xyz"), SVP(id=6) / SVPBulkAck(status=4, type=2, data=b"xyz")),
    (LogRequest(7, 1024, UL), SVP(id=7) / SVPLogRequest(count=1024, ip="::ffff:192.168.1.1")),
    (LogAck(7, 0, ()), SVP(id=7) / SVPLogAck()),
    (
        LogAck(8, 0, (LogVL2Entry(ID1, MAC, 12340), LogVL3Entry(ID2, IP10, 5, 12340))),
        SVP(id=8)
        / SVPLogAck(
            entries=[
                SVPLogVL2Entry(id=ID1, mac=MAC_TEXT, vnetid=12340),
                SVPLogVL3Entry(id=ID2, ip="::ffff:10.0.0.1", vlan=5, vnetid=12340),
            ]
        ),
    ),
    (
        LogAck(11, 0, (ROUTE_ENTRY,), version=2),
        SVP(ver=2, id=11)
        / SVPLogAck(
            entries=[
                SVPLogRouteEntry(
                    id=ID1,
                    src_vnetid=12340,
                    dst_vnetid=4444,
                    dcid=7,
                    srcip="::ffff:10.0.0.1",
                    dstip="::ffff:192.168.1.1",
                    src_vlan=5,
                    dst_vlan=6,
                    src_prefixlen=120,
                    dst_prefixlen=112,
                )
            ]
        ),
    ),
    (LogRemove(9, (ID1, ID2)), SVP(id=9) / SVPLogRemove(ids=[ID1, ID2])),
    (LogRemove(9, ()), SVP(id=9) / SVPLogRemove()),
    (LogRemoveAck(13, 1), SVP(id=13) / SVPLogRemoveAck(status=1)),
    (Shootdown(14, MAC, 99), SVP(id=14) / SVPShootdown(mac=MAC_TEXT, vnetid=99)),
    (
        RouteRequest(10, 12340, 5, IP10, ip_to_wire("10.1.0.7")),
        SVP(ver=2, id=10)
        / SVPRouteRequest(vnetid=12340, vlan=5, srcip="::ffff:10.0.0.1", dstip="::ffff:10.1.0.7"),
    ),
    (
        RouteAck(
            10,
            0,
            7,
            4444,
            6,
            4789,
            ip_to_wire("192.168.1.2"),
            parse_mac("90:b8:d0:00:00:01"),
            parse_mac("90:b8:d0:00:00:02"),
            24,
            16,
        ),
        SVP(ver=2, id=10)
        / SVPRouteAck(
            dcid=7,
            vnetid=4444,
            vlan=6,
            port=4789,
            ul3ip="::ffff:192.168.1.2",
            srcmac="90:b8:d0:00:00:01",
            dstmac="90:b8:d0:00:00:02",
            src_prefixlen=24,
            dst_prefixlen=16,
        ),
    ),
]
IDS = [f"{type(m).__name__}-{i}" for i, (m, _) in enumerate(PAIRS)]


def over_tcp(payload: bytes, **ports) -> Ether:
    """What a capture gives back: the bytes dissected from the Ethernet layer up."""
    return Ether(raw(Ether() / IP() / TCP(**ports) / Raw(payload)))


@pytest.mark.parametrize(("msg", "pkt"), PAIRS, ids=IDS)
def test_scapy_built_frame_is_byte_identical_to_the_codec(msg, pkt):
    assert raw(pkt) == msg.encode()


@pytest.mark.parametrize(("msg", "pkt"), PAIRS, ids=IDS)
def test_scapy_built_frame_decodes_with_the_codec(msg, pkt):
    assert decode_frame(raw(pkt)) == msg


@pytest.mark.parametrize(("msg", "pkt"), PAIRS, ids=IDS)
@pytest.mark.parametrize("ports", [{"dport": 1296}, {"sport": 1296, "dport": 40000}])
def test_codec_frame_dissects_over_tcp_1296(msg, pkt, ports):
    frame = msg.encode()
    got = over_tcp(frame, **ports)
    header = got[SVP]
    assert (header.ver, header.op, header.size, header.id) == (
        msg.version,
        msg.OP,
        len(frame) - 16,
        msg.id,
    )
    assert header.crc == int.from_bytes(frame[12:16], "big")
    if pkt.payload:
        assert type(header.payload) is type(pkt.payload)
    else:
        assert not header.payload
    assert raw(header) == frame


def test_vl2_fields_dissect():
    got = over_tcp(VL2Request(2, MAC, 12340).encode(), dport=1296)
    assert got[SVPVL2Request].mac == MAC_TEXT and got[SVPVL2Request].vnetid == 12340
    got = over_tcp(VL2Ack(2, 0, 4789, UL).encode(), sport=1296)
    ack = got[SVPVL2Ack]
    assert (ack.status, ack.port, ack.addr) == (0, 4789, "::ffff:192.168.1.1")


def test_vl3_ack_fields_dissect():
    ack = over_tcp(VL3Ack(4, 2, MAC, 4789, UL).encode(), sport=1296)[SVPVL3Ack]
    assert (ack.status, ack.mac, ack.port, ip_text(UL)) == (2, MAC_TEXT, 4789, "192.168.1.1")
    assert ack.addr == "::ffff:192.168.1.1"


def test_log_ack_entries_dissect_as_a_packet_list():
    msg = LogAck(
        8, 0, (LogVL2Entry(ID1, MAC, 1), LogVL3Entry(ID2, IP10, 5, 2), ROUTE_ENTRY), version=2
    )
    entries = over_tcp(msg.encode(), sport=1296)[SVPLogAck].entries
    assert [type(e) for e in entries] == [SVPLogVL2Entry, SVPLogVL3Entry, SVPLogRouteEntry]
    assert (entries[0].id, entries[0].mac, entries[0].vnetid) == (ID1, MAC_TEXT, 1)
    assert (entries[1].ip, entries[1].vlan, entries[1].vnetid) == ("::ffff:10.0.0.1", 5, 2)
    route = entries[2]
    assert (route.src_vnetid, route.dst_vnetid, route.dcid) == (12340, 4444, 7)
    assert (route.src_vlan, route.dst_vlan, route.src_prefixlen, route.dst_prefixlen) == (
        5,
        6,
        120,
        112,
    )


def test_log_rm_ids_dissect():
    body = over_tcp(LogRemove(9, (ID1, ID2)).encode(), dport=1296)[SVPLogRemove]
    assert body.count == 2 and body.ids == [ID1, ID2]


def test_route_ack_fields_dissect():
    msg = PAIRS[-1][0]
    ack = over_tcp(msg.encode(), sport=1296)[SVPRouteAck]
    assert (ack.dcid, ack.vnetid, ack.vlan, ack.port) == (7, 4444, 6, 4789)
    assert parse_mac(ack.srcmac) == msg.src_mac and format_mac(msg.dst_mac) == ack.dstmac
    assert (ack.src_prefixlen, ack.dst_prefixlen) == (24, 16)


def test_several_frames_in_one_segment_dissect_in_turn():
    msgs = [Ping(1), VL2Request(2, MAC, 12340), LogRemove(3, (ID1,)), Pong(4)]
    got = over_tcp(b"".join(m.encode() for m in msgs), dport=1296)
    headers = [got[SVP:i] for i in range(1, 5)]
    assert [(h.op, h.id) for h in headers] == [(m.OP, m.id) for m in msgs]
    assert got[SVPVL2Request].vnetid == 12340
    assert got[SVPLogRemove].ids == [ID1]
    assert got.getlayer(SVP, 5) is None


def test_a_truncated_trailing_frame_does_not_break_dissection():
    stream = Ping(1).encode() + VL2Request(2, MAC, 1).encode()[:10]
    got = over_tcp(stream, dport=1296)
    assert got[SVP].op == 1
    assert got[Raw].load == stream[16:]


def test_stacked_scapy_frames_get_their_own_size_and_crc():
    built = raw(SVP(id=1) / SVPVL2Request(mac=MAC_TEXT, vnetid=7) / SVP(op=1, id=2))
    assert built == VL2Request(1, MAC, 7).encode() + Ping(2).encode()


def test_explicit_size_and_crc_are_kept():
    built = raw(SVP(op=1, id=1, size=0, crc=0xDEADBEEF))
    assert built[12:16] == bytes.fromhex("deadbeef")


def test_spec_row_12_dissects_from_its_hex():
    frame = bytes.fromhex(
        "0001000a000000500000000880a6f04b00000000"
        "0000000111111111222243338444555555555555000a959d6816000000003034"
        "00000002aaaaaaaabbbb4ccc8dddeeeeeeeeeeee00000000000000000000ffff0a00000100000005"
        "00003034"
    )
    pkt = SVP(frame)
    assert pkt.crc == 0x80A6F04B and len(pkt[SVPLogAck].entries) == 2
    assert raw(pkt) == frame


@given(
    st.builds(
        VL2Request,
        st.integers(0, 2**32 - 1),
        st.binary(min_size=6, max_size=6),
        st.integers(0, 2**32 - 1),
    ),
    st.builds(
        LogRemove,
        st.integers(0, 2**32 - 1),
        st.lists(st.binary(min_size=16, max_size=16), max_size=5).map(tuple),
    ),
)
def test_dissect_then_rebuild_is_identity(req, rm):
    for msg in (req, rm):
        frame = msg.encode()
        pkt = SVP(frame)
        assert raw(pkt) == frame
        assert decode_frame(raw(pkt)) == msg
