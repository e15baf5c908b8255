"""Property tests: every message type round-trips, and the decoder survives any input."""

import struct
import zlib

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.svp import (
    HEADER_SIZE,
    MESSAGE_TYPES,
    BulkAck,
    BulkRequest,
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
    ProtocolError,
    RouteAck,
    RouteRequest,
    Shootdown,
    VL2Ack,
    VL2Request,
    VL3Ack,
    VL3Request,
    decode_frame,
    encoded_size,
)

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFF_FFFF)
mac = st.binary(min_size=6, max_size=6)
ip16 = st.binary(min_size=16, max_size=16)
entry_id = st.binary(min_size=16, max_size=16)
both = st.sampled_from([1, 2])
v2 = st.just(2)

vl2_entry = st.builds(LogVL2Entry, entry_id, mac, u32)
vl3_entry = st.builds(LogVL3Entry, entry_id, ip16, u16, u32)
route_entry = st.builds(LogRouteEntry, entry_id, u32, u32, u32, ip16, ip16, u16, u16, u8, u8)
v1_entries = st.lists(st.one_of(vl2_entry, vl3_entry), max_size=12).map(tuple)
v2_entries = st.lists(st.one_of(vl2_entry, vl3_entry, route_entry), max_size=12).map(tuple)

STRATEGIES = {
    Ping: st.builds(Ping, u32, version=both),
    Pong: st.builds(Pong, u32, version=both),
    VL2Request: st.builds(VL2Request, u32, mac, u32, version=both),
    VL2Ack: st.builds(VL2Ack, u32, u16, u16, ip16, version=both),
    VL3Request: st.builds(VL3Request, u32, ip16, u32, u32, version=both),
    VL3Ack: st.builds(VL3Ack, u32, u32, mac, u16, ip16, version=both),
    BulkRequest: st.builds(BulkRequest, u32, u32, version=both),
    BulkAck: st.builds(BulkAck, u32, u32, u32, st.binary(max_size=64), version=both),
    LogRequest: st.builds(LogRequest, u32, u32, ip16, version=both),
    LogAck: st.one_of(
        st.builds(LogAck, u32, u32, v1_entries, version=both),
        st.builds(LogAck, u32, u32, v2_entries, version=v2),
    ),
    LogRemove: st.builds(LogRemove, u32, st.lists(entry_id, max_size=12).map(tuple), version=both),
    LogRemoveAck: st.builds(LogRemoveAck, u32, u32, version=both),
    Shootdown: st.builds(Shootdown, u32, mac, u32, version=both),
    RouteRequest: st.builds(RouteRequest, u32, u32, u16, ip16, ip16, version=v2),
    RouteAck: st.builds(RouteAck, u32, u32, u32, u32, u16, u16, ip16, mac, mac, u8, u8, version=v2),
}
messages = st.one_of(*STRATEGIES.values())


def test_there_is_a_strategy_for_every_message_type():
    assert set(STRATEGIES) == set(MESSAGE_TYPES.values())


@given(messages)
def test_encode_then_decode_gives_the_same_message(msg):
    assert decode_frame(msg.encode()) == msg


@given(messages)
def test_decode_then_encode_gives_the_same_bytes(msg):
    frame = msg.encode()
    assert decode_frame(frame).encode() == frame


@given(messages)
def test_encoded_header_declares_body_size_op_id_and_a_valid_crc(msg):
    frame = msg.encode()
    version, op, size, ident, crc = struct.unpack(">HHIII", frame[:HEADER_SIZE])
    assert (version, op, ident) == (msg.version, msg.OP, msg.id)
    assert size == len(frame) - HEADER_SIZE
    assert crc == zlib.crc32(frame[:12] + bytes(4) + frame[16:])


@given(st.one_of(v2_entries, v1_entries))
def test_log_ack_body_size_is_status_plus_encoded_entry_sizes(entries):
    ack = LogAck(1, 0, entries, version=2)
    assert len(ack.encode()) - HEADER_SIZE == ack.body_size == 4 + sum(map(encoded_size, entries))


def feed_in_chunks(decoder: Decoder, stream: bytes, cuts: list[int]):
    """Feed ``stream`` cut at ``cuts``, draining after every chunk. Returns (messages, error
    type or None); anything other than a ProtocolError propagates and fails the test."""
    out = []
    bounds = [0, *sorted(cuts), len(stream)]
    try:
        for start, end in zip(bounds, bounds[1:], strict=False):
            decoder.receive_data(stream[start:end])
            while (msg := decoder.next_message()) is not None:
                out.append(msg)
    except ProtocolError as exc:
        return out, type(exc)
    return out, None


@st.composite
def stream_and_cuts(draw, stream_strategy):
    stream = draw(stream_strategy)
    cuts = draw(st.lists(st.integers(0, len(stream)), max_size=12))
    return stream, cuts


@given(st.lists(messages, max_size=8), st.data())
def test_any_split_of_a_pipelined_stream_yields_the_same_messages(msgs, data):
    stream = b"".join(m.encode() for m in msgs)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=20))
    decoder = Decoder()
    assert feed_in_chunks(decoder, stream, cuts) == (msgs, None)
    assert decoder.buffered == 0


@given(st.lists(messages, min_size=1, max_size=4))
def test_byte_by_byte_feed_yields_the_same_messages_as_one_feed(msgs):
    stream = b"".join(m.encode() for m in msgs)
    one = feed_in_chunks(Decoder(), stream, [])
    each = feed_in_chunks(Decoder(), stream, list(range(len(stream))))
    assert one == each == (msgs, None)


def assert_split_invariant(stream: bytes, cuts: list[int], max_size: int) -> None:
    whole = feed_in_chunks(Decoder(max_size=max_size), stream, [])
    split = feed_in_chunks(Decoder(max_size=max_size), stream, cuts)
    assert whole == split
    for msg in whole[0]:
        assert type(msg) in MESSAGE_TYPES.values()


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(stream_and_cuts(st.binary(max_size=400)), st.sampled_from([0, 16, 100, 65536]))
def test_random_bytes_yield_only_messages_or_protocol_errors(sc, max_size):
    assert_split_invariant(*sc, max_size)


@st.composite
def mutated_frames(draw):
    """Valid frames, damaged in a few places; the CRC is usually recomputed afterwards so the
    damage reaches the header and body checks instead of stopping at the CRC."""
    frames = bytearray(
        b"".join(m.encode() for m in draw(st.lists(messages, min_size=1, max_size=3)))
    )
    for _ in range(draw(st.integers(1, 4))):
        how = draw(st.sampled_from(["flip", "set", "cut", "insert", "delete", "size"]))
        pos = draw(st.integers(0, max(len(frames) - 1, 0)))
        if how == "flip" and frames:
            frames[pos] ^= 1 << draw(st.integers(0, 7))
        elif how == "set" and frames:
            frames[pos] = draw(u8)
        elif how == "cut":
            del frames[pos:]
        elif how == "insert":
            frames[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif how == "delete":
            del frames[pos : pos + draw(st.integers(1, 8))]
        elif how == "size" and len(frames) >= 8:
            frames[4:8] = struct.pack(">I", draw(st.integers(0, 200)))
    if draw(st.booleans()) and len(frames) >= HEADER_SIZE:
        size = struct.unpack(">I", frames[4:8])[0]
        body = bytes(frames[16 : 16 + size])
        crc = zlib.crc32(bytes(frames[:12]) + bytes(4) + body)
        frames[12:16] = struct.pack(">I", crc)
    return bytes(frames)


@settings(max_examples=600, suppress_health_check=[HealthCheck.too_slow])
@given(stream_and_cuts(mutated_frames()), st.sampled_from([64, 65536]))
def test_mutated_frames_yield_only_messages_or_protocol_errors(sc, max_size):
    assert_split_invariant(*sc, max_size)


@settings(max_examples=300)
@given(mutated_frames())
def test_decode_frame_raises_only_protocol_errors(frame):
    try:
        msg = decode_frame(frame)
    except ProtocolError:
        return
    assert type(msg) in MESSAGE_TYPES.values()


@given(stream_and_cuts(mutated_frames()))
def test_a_poisoned_decoder_keeps_raising_the_same_error(sc):
    stream, cuts = sc
    decoder = Decoder()
    _, error = feed_in_chunks(decoder, stream, cuts)
    if error is None:
        return
    for _ in range(2):
        decoder.receive_data(Ping(1).encode())
        try:
            decoder.next_message()
        except ProtocolError as exc:
            assert type(exc) is error
        else:
            raise AssertionError("poisoned decoder returned normally")
        assert decoder.buffered == 0
