"""Decoder behaviour: each fault kind, poisoning, framing, and the encoder's own checks."""

import struct

import pytest

from protocol.addr import ip_to_wire, parse_mac
from protocol.svp import (
    ACK_OPS,
    HEADER_SIZE,
    LOG_ENTRY_SIZE,
    MESSAGE_TYPES,
    MIN_BODY_SIZE,
    REPLY_OP,
    REQUEST_OPS,
    V2_OPS,
    BadCRC,
    BadLength,
    BadLogEntry,
    Decoder,
    LogAck,
    LogRemove,
    LogRouteEntry,
    LogType,
    LogVL2Entry,
    LogVL3Entry,
    Op,
    OversizeFrame,
    Ping,
    ProtocolError,
    RouteAck,
    RouteRequest,
    Shootdown,
    ShortBody,
    UnknownOp,
    UnsupportedVersion,
    VL2Ack,
    VL2Request,
    VL3Ack,
    VL3Request,
    decode_frame,
    encode_frame,
    encode_vl2_ack,
    encode_vl3_ack,
    encoded_size,
)

MAC = parse_mac("00:0a:95:9d:68:16")
UL = ip_to_wire("192.168.1.1")
ID1 = bytes(range(16))


def decode_all(data: bytes, **kwargs) -> list:
    decoder = Decoder(**kwargs)
    decoder.receive_data(data)
    return list(decoder)


def expect_error(data: bytes, error: type[ProtocolError], kind: str, **kwargs) -> Decoder:
    decoder = Decoder(**kwargs)
    decoder.receive_data(data)
    with pytest.raises(error) as info:
        decoder.next_message()
    assert isinstance(info.value, ProtocolError)
    assert info.value.kind == kind
    return decoder


# --- error kinds ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "kind"),
    [
        (BadCRC, "bad_crc"),
        (UnknownOp, "unknown_op"),
        (ShortBody, "short_body"),
        (OversizeFrame, "oversize"),
        (UnsupportedVersion, "bad_version"),
        (BadLogEntry, "bad_log_entry"),
        (BadLength, "bad_length"),
    ],
)
def test_every_error_is_a_protocol_error_with_its_metric_kind(cls, kind):
    assert issubclass(cls, ProtocolError)
    assert cls.kind == kind


def test_corrupted_crc_field_is_bad_crc():
    frame = bytearray(Ping(1).encode())
    frame[15] ^= 0x01
    expect_error(bytes(frame), BadCRC, "bad_crc")


def test_corrupted_body_byte_is_bad_crc():
    frame = bytearray(VL2Request(2, MAC, 12340).encode())
    frame[-1] ^= 0x80
    expect_error(bytes(frame), BadCRC, "bad_crc")


def test_bad_crc_is_only_reported_once_the_whole_frame_is_in():
    frame = bytearray(VL2Request(2, MAC, 12340).encode())
    frame[20] ^= 0xFF
    decoder = Decoder()
    decoder.receive_data(bytes(frame[:-1]))
    assert decoder.next_message() is None
    decoder.receive_data(bytes(frame[-1:]))
    with pytest.raises(BadCRC):
        decoder.next_message()


@pytest.mark.parametrize(
    ("version", "op"),
    [(1, 0), (1, 0x7F), (1, 14), (1, 15), (2, 0), (2, 16), (2, 0x7F), (1, 0xFFFF)],
)
def test_unknown_op_is_rejected(version, op):
    expect_error(encode_frame(version, op, 1, bytes(48)), UnknownOp, "unknown_op")


def test_unknown_op_is_detected_from_the_header_alone():
    frame = encode_frame(1, 0x7F, 1, bytes(100))
    expect_error(frame[:HEADER_SIZE], UnknownOp, "unknown_op")


def test_short_vl2_request_of_size_4_is_short_body():
    expect_error(encode_frame(1, Op.VL2_REQ, 2, MAC[:4]), ShortBody, "short_body")


@pytest.mark.parametrize("op", [op for op, size in MIN_BODY_SIZE.items() if size > 0])
def test_every_op_with_a_body_rejects_one_byte_less_than_its_struct(op):
    frame = encode_frame(2, op, 1, bytes(MIN_BODY_SIZE[op] - 1))
    expect_error(frame, ShortBody, "short_body")


@pytest.mark.parametrize("op", list(MIN_BODY_SIZE))
def test_every_op_decodes_its_minimum_body(op):
    (msg,) = decode_all(encode_frame(2, op, 1, bytes(MIN_BODY_SIZE[op])))
    assert (msg.OP, msg.id, msg.version) == (op, 1, 2)


def test_oversize_is_detected_with_only_the_header_fed():
    header = encode_frame(1, Op.LOG_ACK, 7, b"")[:12]
    header = header[:4] + struct.pack(">I", 1 << 20) + header[8:] + bytes(4)
    decoder = expect_error(header, OversizeFrame, "oversize")
    assert decoder.buffered == 0


def test_size_limit_is_configurable_and_inclusive():
    entries = tuple(LogVL2Entry(ID1, MAC, n) for n in range(3))
    frame = LogAck(1, 0, entries).encode()  # body 4 + 3 * 32 = 100
    assert decode_all(frame, max_size=100) == [LogAck(1, 0, entries)]
    expect_error(frame, OversizeFrame, "oversize", max_size=99)


def test_default_limit_is_64_kib():
    body_ok = encode_frame(1, Op.BULK_ACK, 1, bytes(65536))
    assert len(decode_all(body_ok)) == 1
    expect_error(encode_frame(1, Op.BULK_ACK, 1, bytes(65537))[:16], OversizeFrame, "oversize")


@pytest.mark.parametrize("version", [0, 3, 99, 0xFFFF])
def test_unsupported_version_is_rejected(version):
    expect_error(encode_frame(version, Op.PING, 1, b""), UnsupportedVersion, "bad_version")


def test_a_decoder_limited_to_v1_rejects_v2_frames():
    expect_error(Ping(1, version=2).encode(), UnsupportedVersion, "bad_version", versions={1})
    assert decode_all(Ping(1).encode(), versions={1}) == [Ping(1)]


@pytest.mark.parametrize(
    "body",
    [
        struct.pack(">I", 2) + ID1,  # says two ids, carries one
        struct.pack(">I", 0) + ID1,  # says none, carries one
        struct.pack(">I", 1) + ID1 + b"\x00",  # one byte too many
        struct.pack(">I", 0xFFFFFFFF) + ID1,
    ],
)
def test_log_rm_size_must_be_exactly_4_plus_16_per_id(body):
    expect_error(encode_frame(1, Op.LOG_RM, 9, body), BadLength, "bad_length")


def test_log_rm_without_a_count_word_is_short_body():
    expect_error(encode_frame(1, Op.LOG_RM, 9, b"\x00\x00"), ShortBody, "short_body")


def test_empty_log_rm_is_valid():
    assert decode_all(LogRemove(9, ()).encode()) == [LogRemove(9, ())]


VL2_ENTRY = LogVL2Entry(ID1, MAC, 12340).encode()
ROUTE_ENTRY = LogRouteEntry(ID1, 1, 2, 3, UL, UL, 4, 5, 120, 112).encode()


@pytest.mark.parametrize(
    ("version", "entries"),
    [
        (1, struct.pack(">I", 0) + bytes(28)),  # type 0
        (1, struct.pack(">I", 4) + bytes(68)),  # type 4
        (2, struct.pack(">I", 0xFFFFFFFF) + bytes(68)),
        (1, VL2_ENTRY[:-1]),  # VL2 entry cut short
        (1, VL2_ENTRY + b"\x00\x00"),  # trailing bytes, no room for a type word
        (1, VL2_ENTRY + struct.pack(">I", 2) + bytes(20)),  # VL3 entry cut short
        (2, ROUTE_ENTRY[:50]),  # ROUTE entry cut short
        (1, ROUTE_ENTRY),  # ROUTE entries do not exist in version 1
    ],
    ids=["type0", "type4", "typemax", "vl2-cut", "trailing", "vl3-cut", "route-cut", "route-v1"],
)
def test_bad_log_entries_are_rejected(version, entries):
    frame = encode_frame(version, Op.LOG_ACK, 8, bytes(4) + entries)
    expect_error(frame, BadLogEntry, "bad_log_entry")


def test_route_entry_in_a_v2_log_ack_is_fine():
    (msg,) = decode_all(encode_frame(2, Op.LOG_ACK, 8, bytes(4) + ROUTE_ENTRY + VL2_ENTRY))
    assert [type(e) for e in msg.entries] == [LogRouteEntry, LogVL2Entry]


# --- poisoning -----------------------------------------------------------------------------


def test_after_an_error_the_decoder_stays_poisoned():
    decoder = expect_error(encode_frame(3, Op.PING, 1, b""), UnsupportedVersion, "bad_version")
    assert decoder.error is not None and decoder.error.kind == "bad_version"
    decoder.receive_data(Ping(2).encode())
    assert decoder.buffered == 0
    for _ in range(3):
        with pytest.raises(UnsupportedVersion):
            decoder.next_message()


def test_messages_before_a_fault_are_delivered_then_the_fault_raises():
    decoder = Decoder()
    decoder.receive_data(Ping(1).encode() + Ping(2).encode() + encode_frame(1, 0, 3, b""))
    assert decoder.next_message() == Ping(1)
    assert decoder.next_message() == Ping(2)
    with pytest.raises(UnknownOp):
        decoder.next_message()


# --- framing -------------------------------------------------------------------------------


def test_partial_header_and_partial_body_need_more_bytes():
    frame = VL3Request(4, ip_to_wire("10.0.0.1"), 1, 12340).encode()
    decoder = Decoder()
    assert decoder.next_message() is None
    decoder.receive_data(frame[:10])
    assert decoder.next_message() is None
    assert decoder.buffered == 10
    decoder.receive_data(frame[10:30])
    assert decoder.next_message() is None
    assert decoder.buffered == 30
    decoder.receive_data(frame[30:])
    assert decoder.next_message() == VL3Request(4, ip_to_wire("10.0.0.1"), 1, 12340)
    assert decoder.buffered == 0


def test_pipelined_frames_in_one_feed_with_a_partial_tail():
    msgs = [Ping(1), VL2Request(2, MAC, 1), VL2Ack(2, 0, 4789, UL), LogRemove(3, (ID1,))]
    stream = b"".join(m.encode() for m in msgs)
    tail = VL2Request(9, MAC, 2).encode()
    decoder = Decoder()
    decoder.receive_data(stream + tail[:7])
    assert list(decoder) == msgs
    assert decoder.buffered == 7
    decoder.receive_data(tail[7:])
    assert list(decoder) == [VL2Request(9, MAC, 2)]


def test_empty_feed_is_harmless():
    decoder = Decoder()
    decoder.receive_data(b"")
    assert decoder.next_message() is None


def test_decoder_accepts_bytearray_and_memoryview_input():
    frame = Ping(7).encode()
    decoder = Decoder()
    decoder.receive_data(bytearray(frame[:5]))
    decoder.receive_data(memoryview(frame)[5:])
    assert decoder.next_message() == Ping(7)


def test_body_longer_than_the_struct_is_ignored():
    frame = encode_frame(1, Op.VL2_REQ, 2, MAC + b"\x00\x00" + struct.pack(">I", 12340) + b"junk")
    assert decode_all(frame) == [VL2Request(2, MAC, 12340)]
    assert decode_all(encode_frame(1, Op.PING, 5, b"extra")) == [Ping(5)]


def test_pad_bytes_are_ignored_on_input():
    frame = encode_frame(1, Op.VL2_REQ, 2, MAC + b"\xab\xcd" + struct.pack(">I", 12340))
    assert decode_all(frame) == [VL2Request(2, MAC, 12340)]


def test_ack_ops_decode_like_requests():
    frames = [VL2Ack(1, 2, 0, bytes(16)), VL3Ack(2, 0, MAC, 4789, UL), LogAck(3, 0, ())]
    assert decode_all(b"".join(m.encode() for m in frames)) == frames


def test_shootdown_decodes():
    assert decode_all(Shootdown(4, MAC, 77).encode()) == [Shootdown(4, MAC, 77)]


def test_request_id_is_copied_verbatim():
    # varpd writes its ids in host order: id 1 on x86 is 01 00 00 00 on the wire.
    request = VL2Request(0x01000000, MAC, 5).encode()
    assert request[8:12] == b"\x01\x00\x00\x00"
    (msg,) = decode_all(request)
    assert msg.id == 0x01000000
    reply = encode_vl2_ack(msg.id, msg.version, 0, 4789, UL)
    assert reply[8:12] == b"\x01\x00\x00\x00"
    assert Ping(0xFFFFFFFF).encode()[8:12] == b"\xff\xff\xff\xff"


def test_v4_addresses_travel_v4_mapped():
    frame = VL3Request(1, ip_to_wire("10.0.0.1"), 1, 5).encode()
    assert frame[16:32] == bytes(10) + b"\xff\xff" + bytes([10, 0, 0, 1])


# --- decode_frame --------------------------------------------------------------------------


def test_decode_frame_rejects_truncated_and_trailing_bytes():
    frame = VL2Request(2, MAC, 1).encode()
    for bad in (frame[:10], frame[:-1], frame + b"\x00"):
        with pytest.raises(BadLength):
            decode_frame(bad)


def test_decode_frame_honours_versions_and_limit():
    with pytest.raises(UnsupportedVersion):
        decode_frame(Ping(1, version=2).encode(), versions=frozenset({1}))
    with pytest.raises(OversizeFrame):
        decode_frame(LogRemove(1, (ID1,)).encode(), max_size=8)


# --- encoder -------------------------------------------------------------------------------


def test_fast_path_encoders_match_the_dataclasses():
    assert encode_vl2_ack(9, 2, 0, 4789, UL) == VL2Ack(9, 0, 4789, UL, version=2).encode()
    assert encode_vl3_ack(9, 1, 2, MAC, 1, UL) == VL3Ack(9, 2, MAC, 1, UL).encode()


@pytest.mark.parametrize(
    "build",
    [
        lambda: VL2Request(1, MAC[:5], 1),
        lambda: VL2Request(1, MAC, 1 << 32),
        lambda: VL2Request(-1, MAC, 1),
        lambda: VL2Ack(1, 0x10000, 0, UL),
        lambda: VL2Ack(1, 0, 0, UL[:4]),
        lambda: VL3Request(1, "10.0.0.1", 1, 1),
        lambda: VL3Ack(1, 0, MAC, 70000, UL),
        lambda: LogRemove(1, (b"short",)),
        lambda: LogAck(1, 0, (LogVL3Entry(ID1, UL[:15], 0, 0),)),
        lambda: LogAck(1, 0, (LogRouteEntry(ID1, 1, 2, 3, UL, UL, 4, 5, 6, 7),)),
        lambda: LogAck(1, 0, ("not an entry",)),
        lambda: RouteRequest(1, 1, 1, UL, UL, version=1),
        lambda: RouteAck(1, 0, 0, 0, 0, 0, UL, MAC, MAC, 256, 0),
        lambda: Ping(1, version=0x10000),
    ],
)
def test_encoding_invalid_fields_raises_value_error(build):
    with pytest.raises(ValueError):
        build().encode()


def test_route_messages_default_to_version_2():
    assert RouteRequest(1, 1, 1, UL, UL).version == 2
    assert decode_frame(RouteRequest(1, 1, 1, UL, UL).encode()).version == 2


def test_lists_are_stored_as_tuples():
    assert LogRemove(1, [ID1]).ids == (ID1,)
    assert LogAck(1, 0, [LogVL2Entry(ID1, MAC, 1)]).entries == (LogVL2Entry(ID1, MAC, 1),)
    hash(LogRemove(1, [ID1]))


def test_messages_are_frozen():
    with pytest.raises(AttributeError):
        Ping(1).id = 2  # type: ignore[misc]


def test_encode_frame_builds_arbitrary_frames():
    frame = encode_frame(7, 0x7F, 3, b"abc")
    assert frame[:12] == struct.pack(">HHII", 7, 0x7F, 3, 3) and frame[16:] == b"abc"


# --- exported tables -----------------------------------------------------------------------


def test_message_types_cover_every_op_but_unknown():
    assert set(MESSAGE_TYPES) == set(Op) - {Op.UNKNOWN}
    for op, cls in MESSAGE_TYPES.items():
        assert (op, cls) == (cls.OP, cls)


def test_request_and_ack_op_sets():
    assert not REQUEST_OPS & ACK_OPS
    everything = REQUEST_OPS | ACK_OPS
    assert everything == set(Op) - {Op.UNKNOWN, Op.SHOOTDOWN}
    assert set(REPLY_OP) == REQUEST_OPS and set(REPLY_OP.values()) == ACK_OPS
    assert sorted(V2_OPS) == [Op.ROUTE_REQ, Op.ROUTE_ACK]


def test_log_entry_sizes():
    assert LOG_ENTRY_SIZE == {LogType.VL2: 32, LogType.VL3: 44, LogType.ROUTE: 72}
    entries = [
        LogVL2Entry(ID1, MAC, 1),
        LogVL3Entry(ID1, UL, 2, 3),
        LogRouteEntry(ID1, 1, 2, 3, UL, UL, 4, 5, 6, 7),
    ]
    for entry in entries:
        assert encoded_size(entry) == len(entry.encode()) == LOG_ENTRY_SIZE[entry.TYPE]


def test_decoder_rejects_unknown_versions_in_its_configuration():
    with pytest.raises(ValueError):
        Decoder(versions=frozenset({1, 3}))
    with pytest.raises(ValueError):
        Decoder(versions=frozenset())
