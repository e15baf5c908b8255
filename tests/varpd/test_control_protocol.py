from __future__ import annotations

import struct

import msgpack
import pytest

from protocol.control import (
    ControlProtocolError,
    Decoder,
    ErrorInfo,
    Reply,
    Request,
    decode_frame,
    encode,
    encode_reply,
    encode_request,
)


def test_request_round_trips() -> None:
    req = Request(7, "create", {"name": "o0", "props": {"direct/dest_port": "4789"}})
    assert decode_frame(encode(req)) == req


def test_replies_round_trip() -> None:
    ok = Reply(1, True, [{"name": "o0"}])
    err = Reply(2, False, error=ErrorInfo("invalid", "bad port", "direct/dest_port"))
    assert decode_frame(encode_reply(ok)) == ok
    assert decode_frame(encode_reply(err)) == err


def test_frame_is_big_endian_length_plus_msgpack_map() -> None:
    frame = encode_request(Request(1, "list"))
    (size,) = struct.unpack(">I", frame[:4])
    assert size == len(frame) - 4
    assert msgpack.unpackb(frame[4:]) == {"id": 1, "op": "list", "args": {}}


def test_decoder_is_incremental() -> None:
    frames = encode_request(Request(1, "list")) + encode_request(Request(2, "ping"))
    dec = Decoder()
    got = []
    for i in range(len(frames)):
        dec.receive_data(frames[i : i + 1])
        while (msg := dec.next_message()) is not None:
            got.append(msg)
    assert [m.id for m in got] == [1, 2]
    assert dec.buffered == 0


def test_oversize_frame_poisons_the_decoder() -> None:
    dec = Decoder(max_size=16)
    dec.receive_data(struct.pack(">I", 17))
    with pytest.raises(ControlProtocolError, match="exceeds"):
        dec.next_message()
    with pytest.raises(ControlProtocolError):
        dec.receive_data(b"x")


def test_encoder_refuses_an_oversize_message() -> None:
    with pytest.raises(ControlProtocolError):
        encode_request(Request(1, "set", {"props": {"x": "y" * 100}}), max_size=50)


@pytest.mark.parametrize(
    "obj",
    [
        [1, 2],
        {"op": "x"},
        {"id": "1", "op": "x"},
        {"id": 1},
        {"id": 1, "ok": "yes"},
        {"id": 1, "ok": False},
    ],
)
def test_malformed_messages_are_refused(obj: object) -> None:
    body = msgpack.packb(obj)
    with pytest.raises(ControlProtocolError):
        decode_frame(struct.pack(">I", len(body)) + body)


def test_garbage_is_refused() -> None:
    with pytest.raises(ControlProtocolError):
        decode_frame(struct.pack(">I", 2) + b"\xc1\xc1")
