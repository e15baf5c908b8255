"""The worked frames of spec/svp.md section 9, byte for byte, in both directions."""

import pytest

from protocol.addr import ip_to_wire, parse_mac
from protocol.svp import (
    Decoder,
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
    VL2Ack,
    VL2Request,
    VL3Ack,
    VL3Request,
    decode_frame,
)

MAC = parse_mac("00:0a:95:9d:68:16")
VNET = 12340
UL = ip_to_wire("192.168.1.1")
ZERO_IP = bytes(16)
ZERO_MAC = bytes(6)
ID1 = bytes.fromhex("11111111222243338444555555555555")
ID2 = bytes.fromhex("aaaaaaaabbbb4ccc8dddeeeeeeeeeeee")

# (row, message, frame hex exactly as printed in the spec; spaces and '|' are cosmetic)
SPEC_FRAMES = [
    (1, Ping(1), "0001 0001 00000000 00000001 b5b66088"),
    (2, Pong(1), "0001 0002 00000000 00000001 087c0c46"),
    (
        3,
        VL2Request(2, MAC, VNET),
        "0001 0003 0000000c 00000002 3f23290d | 000a959d6816 0000 00003034",
    ),
    (
        4,
        VL2Ack(2, 0, 4789, UL),
        "0001 0004 00000014 00000002 821f1b69 | 0000 12b5 00000000000000000000ffffc0a80101",
    ),
    (
        5,
        VL2Ack(3, 2, 0, ZERO_IP),
        "0001 0004 00000014 00000003 ee1db9a7 | 0002 0000 00000000000000000000000000000000",
    ),
    (
        6,
        VL3Request(4, ip_to_wire("10.0.0.1"), 1, VNET),
        "0001 0005 00000018 00000004 973ee421 | 00000000000000000000ffff0a000001 00000001 00003034",
    ),
    (
        7,
        VL3Request(5, ip_to_wire("fd00::1"), 2, VNET),
        "0001 0005 00000018 00000005 8b3e821d | fd000000000000000000000000000001 00000002 00003034",
    ),
    (
        8,
        VL3Ack(4, 0, MAC, 4789, UL),
        "0001 0006 0000001c 00000004 c2905248 | 00000000 000a959d6816 12b5 "
        "00000000000000000000ffffc0a80101",
    ),
    (
        9,
        VL3Ack(6, 2, ZERO_MAC, 0, ZERO_IP),
        "0001 0006 0000001c 00000006 2f551ae9 | 00000002 000000000000 0000 "
        "00000000000000000000000000000000",
    ),
    (
        10,
        LogRequest(7, 1024, UL),
        "0001 0009 00000014 00000007 0afbff04 | 00000400 00000000000000000000ffffc0a80101",
    ),
    (11, LogAck(7, 0, ()), "0001 000a 00000004 00000007 4ec3c3d3 | 00000000"),
    (
        12,
        LogAck(
            8,
            0,
            (
                LogVL2Entry(ID1, MAC, VNET),
                LogVL3Entry(ID2, ip_to_wire("10.0.0.1"), 5, VNET),
            ),
        ),
        "0001 000a 00000050 00000008 80a6f04b | 00000000 | 00000001 "
        "11111111222243338444555555555555 000a959d6816 0000 00003034 | 00000002 "
        "aaaaaaaabbbb4ccc8dddeeeeeeeeeeee 00000000000000000000ffff0a000001 0000 0005 00003034",
    ),
    (
        13,
        LogRemove(9, (ID1, ID2)),
        "0001 000b 00000024 00000009 07576458 | 00000002 11111111222243338444555555555555 "
        "aaaaaaaabbbb4ccc8dddeeeeeeeeeeee",
    ),
    (14, LogRemoveAck(9, 0), "0001 000c 00000004 00000009 2135af49 | 00000000"),
    (15, LogRemoveAck(13, 1), "0001 000c 00000004 0000000d 0bdeced3 | 00000001"),
    (16, Ping(1, version=2), "0002 0001 00000000 00000001 a4cb0af1"),
    (
        17,
        RouteRequest(10, VNET, 5, ip_to_wire("10.0.0.1"), ip_to_wire("10.1.0.7"), version=2),
        "0002 000e 00000028 0000000a 6b9f0854 | 00003034 0005 0000 "
        "00000000000000000000ffff0a000001 00000000000000000000ffff0a010007",
    ),
    (
        18,
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
            version=2,
        ),
        "0002 000f 00000030 0000000a 08359757 | 00000000 00000007 0000115c 0006 12b5 "
        "00000000000000000000ffffc0a80102 90b8d0000001 90b8d0000002 18 10 0000",
    ),
    (
        19,
        LogAck(
            11,
            0,
            (
                LogRouteEntry(
                    ID1,
                    VNET,
                    4444,
                    7,
                    ip_to_wire("10.0.0.0"),
                    ip_to_wire("10.1.0.0"),
                    5,
                    6,
                    120,
                    112,
                ),
            ),
            version=2,
        ),
        "0002 000a 0000004c 0000000b 9c851499 | 00000000 | 00000003 "
        "11111111222243338444555555555555 00003034 0000115c 00000007 "
        "00000000000000000000ffff0a000000 00000000000000000000ffff0a010000 0005 0006 78 70 0000",
    ),
]


def spec_bytes(text: str) -> bytes:
    return bytes.fromhex(text.replace("|", "").replace(" ", ""))


ROWS = [pytest.param(msg, spec_bytes(text), id=f"row{row}") for row, msg, text in SPEC_FRAMES]


def test_table_has_all_nineteen_rows():
    assert [row for row, _, _ in SPEC_FRAMES] == list(range(1, 20))


@pytest.mark.parametrize(("msg", "frame"), ROWS)
def test_encode_matches_spec_bytes(msg, frame):
    assert msg.encode() == frame


@pytest.mark.parametrize(("msg", "frame"), ROWS)
def test_decode_frame_gives_spec_message(msg, frame):
    assert decode_frame(frame) == msg


@pytest.mark.parametrize(("msg", "frame"), ROWS)
def test_decoder_gives_spec_message_and_leaves_nothing(msg, frame):
    decoder = Decoder()
    decoder.receive_data(frame)
    assert decoder.next_message() == msg
    assert decoder.next_message() is None
    assert decoder.buffered == 0


@pytest.mark.parametrize(("msg", "frame"), ROWS)
def test_decoded_spec_frame_reencodes_verbatim(msg, frame):
    assert decode_frame(frame).encode() == frame


def test_all_spec_frames_pipelined_in_one_feed():
    stream = b"".join(spec_bytes(text) for _, _, text in SPEC_FRAMES)
    decoder = Decoder()
    decoder.receive_data(stream)
    assert list(decoder) == [msg for _, msg, _ in SPEC_FRAMES]
    assert decoder.buffered == 0


def test_all_spec_frames_byte_by_byte_match_one_feed():
    stream = b"".join(spec_bytes(text) for _, _, text in SPEC_FRAMES)
    decoder = Decoder()
    got = []
    for i in range(len(stream)):
        decoder.receive_data(stream[i : i + 1])
        while (msg := decoder.next_message()) is not None:
            got.append(msg)
    assert got == [msg for _, msg, _ in SPEC_FRAMES]


def test_v2_frame_differs_from_v1_only_in_version_and_crc():
    v1 = Ping(1).encode()
    v2 = Ping(1, version=2).encode()
    assert v1[2:12] == v2[2:12]
    assert v1[:2] != v2[:2] and v1[12:] != v2[12:]
