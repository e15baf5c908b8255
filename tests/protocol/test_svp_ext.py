"""The SVP extension codec (protocol/svp_ext.py): byte-exact frames, decoding, and that frames
without the extension's magic keep their v1 meaning."""

from __future__ import annotations

import struct
import zlib

import pytest

from protocol.svp import (
    Decoder,
    LogAck,
    LogVL2Entry,
    Ping,
    Pong,
    ShortBody,
    UnknownOp,
    decode_frame,
    encode_frame,
)
from protocol.svp_ext import (
    CAP_LOG_WAIT,
    EXT_MAGIC,
    HELLO_PING_OPS,
    HELLO_PONG_OPS,
    LOG_WAIT_OPS,
    OP_LOG_WAIT,
    Hello,
    HelloAck,
    LogWait,
    decode_ext_frame,
)

CN_IP = bytes(10) + b"\xff\xff" + bytes([192, 168, 1, 1])


def hexframe(text: str) -> bytes:
    """Hex with spaces and '|' allowed; the CRC field is written as '________' and computed
    here with zlib over the frame with that field zeroed (spec/svp.md §3.1)."""
    raw = text.replace(" ", "").replace("|", "")
    frame = bytearray(bytes.fromhex(raw.replace("________", "00000000")))
    struct.pack_into(">I", frame, 12, zlib.crc32(bytes(frame)))
    return bytes(frame)


def test_hello_frame_is_a_ping_with_the_magic_body():
    want = hexframe("0001 0001 00000010 00000007 ________ | 50544c4e 0001 0000 00000001 00000000")
    assert Hello(7, CAP_LOG_WAIT).encode() == want
    assert want[16:20] == b"PTLN" and EXT_MAGIC == 0x50544C4E


def test_hello_ack_frame_is_a_pong_with_caps_and_max_wait():
    want = hexframe("0001 0002 00000010 00000007 ________ | 50544c4e 0001 0000 00000001 0000ea60")
    assert HelloAck(7, CAP_LOG_WAIT, 60000).encode() == want


def test_log_wait_frame_layout():
    want = hexframe(
        "0001 0109 00000018 00000009 ________ | 00000400 00000000000000000000ffffc0a80101 000061a8"
    )
    assert LogWait(9, 1024, CN_IP, 25000).encode() == want
    assert OP_LOG_WAIT == 0x0109


def test_v2_frames_differ_only_in_version():
    v1 = LogWait(3, 512, CN_IP, 100).encode()
    v2 = LogWait(3, 512, CN_IP, 100, version=2).encode()
    assert v2[:2] == b"\x00\x02" and v1[2:12] == v2[2:12] and v1[16:] == v2[16:]


@pytest.mark.parametrize(
    "msg, server",
    [
        (Hello(1, CAP_LOG_WAIT), True),
        (Hello(0xFFFFFFFF, 0, 5, version=2), True),
        (HelloAck(2, CAP_LOG_WAIT, 30000), False),
        (HelloAck(2, 0, 0, version=2), False),
        (LogWait(4, 1024, CN_IP, 25000), True),
        (LogWait(5, 4, bytes(16), 0, version=2), True),
    ],
)
def test_round_trip(msg, server):
    frame = msg.encode()
    assert decode_ext_frame(frame, server=server) == msg
    assert decode_ext_frame(frame, server=server).encode() == frame


def test_plain_ping_and_pong_stay_plain():
    assert decode_ext_frame(Ping(1).encode()) == Ping(1)
    assert decode_ext_frame(Pong(1).encode(), server=False) == Pong(1)
    # A body without the magic, or too short for a HELLO, is still a plain PING.
    other = encode_frame(1, 1, 5, b"\x00" * 16)
    assert decode_ext_frame(other) == Ping(5)
    short = encode_frame(1, 1, 6, struct.pack(">IH", EXT_MAGIC, 1))
    assert decode_ext_frame(short) == Ping(6)


def test_codec_without_the_extension_reads_hello_as_ping():
    """What a v1 server (or ours before the extension) sees: a PING, body ignored."""
    assert decode_frame(Hello(8, CAP_LOG_WAIT).encode()) == Ping(8)
    assert decode_frame(HelloAck(8, CAP_LOG_WAIT, 1).encode()) == Pong(8)


def test_log_wait_is_an_unknown_op_until_enabled():
    frame = LogWait(4, 1024, CN_IP, 1000).encode()
    with pytest.raises(UnknownOp):
        decode_frame(frame)
    dec = Decoder()
    dec.extend(HELLO_PING_OPS)
    dec.receive_data(Hello(1, CAP_LOG_WAIT).encode())
    assert dec.next_message() == Hello(1, CAP_LOG_WAIT)
    dec.receive_data(frame)
    with pytest.raises(UnknownOp):
        dec.next_message()
    dec2 = Decoder()
    dec2.extend({**HELLO_PING_OPS, **LOG_WAIT_OPS})
    dec2.receive_data(frame[:7])
    assert dec2.next_message() is None
    dec2.receive_data(frame[7:] + Ping(2).encode())
    assert dec2.next_message() == LogWait(4, 1024, CN_IP, 1000)
    assert dec2.next_message() == Ping(2)


def test_short_log_wait_is_short_body():
    dec = Decoder()
    dec.extend(LOG_WAIT_OPS)
    dec.receive_data(encode_frame(1, OP_LOG_WAIT, 1, bytes(20)))  # a LOG_REQ body, no wait
    with pytest.raises(ShortBody):
        dec.next_message()


def test_extended_decoder_keeps_v1_ops_and_version_checks():
    dec = Decoder(versions=frozenset({1}))
    dec.extend({**HELLO_PING_OPS, **LOG_WAIT_OPS})
    ack = LogAck(3, 0, (LogVL2Entry(bytes(range(16)), b"\x02" * 6, 7),))
    dec.receive_data(ack.encode())
    assert dec.next_message() == ack
    dec.receive_data(LogWait(4, 1024, CN_IP, 1, version=2).encode())
    with pytest.raises(Exception) as info:
        dec.next_message()
    assert info.value.kind == "bad_version"


def test_hello_reply_with_unknown_caps_and_longer_body_still_parses():
    body = struct.pack(">IHxxII", EXT_MAGIC, 2, 0xFFFF_FFFF, 10) + b"future"
    frame = encode_frame(1, 2, 11, body)
    assert decode_frame(frame, extra_ops=HELLO_PONG_OPS) == HelloAck(11, 0xFFFF_FFFF, 10)


@pytest.mark.parametrize("bad", [dict(ip=b"\x00" * 4), dict(wait_ms=-1), dict(count=2**32)])
def test_log_wait_refuses_bad_fields(bad):
    fields = dict(id=1, count=1024, ip=CN_IP, wait_ms=1)
    fields.update(bad)
    with pytest.raises(ValueError):
        LogWait(**fields).encode()
