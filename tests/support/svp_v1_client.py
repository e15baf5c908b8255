"""A v1 SVP client as strict as illumos varpd (spec/svp.md §6.4), for tests.

"An illumos varpd keeps working" (CONVENTIONS) is shown by talking to the server through this
client: every reply must have version 1, one of the ack ops the request asked for, an id that
is outstanding (compared as raw bytes, as varpd does), the exact size of its op (VL2_ACK 20,
VL3_ACK 28, LOG_RM_ACK 4; LOG_ACK at least 4 and at most the request's ``count``) and a
correct CRC. Anything else raises `StrictReplyError`, which is where varpd would reset the
connection.

PING/PONG are outside what varpd sends; ``allow_ping=True`` lets tests use them with the same
checks (PONG: size 0).
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from typing import Any

import trio

from protocol.svp import Message, Op, decode_frame

_HDR = struct.Struct(">HHIII")
_EXACT_SIZE = {Op.PONG: 0, Op.VL2_ACK: 20, Op.VL3_ACK: 28, Op.LOG_RM_ACK: 4}
_REPLY = {
    Op.VL2_REQ: Op.VL2_ACK,
    Op.VL3_REQ: Op.VL3_ACK,
    Op.LOG_REQ: Op.LOG_ACK,
    Op.LOG_RM: Op.LOG_RM_ACK,
    Op.PING: Op.PONG,
}


class StrictReplyError(AssertionError):
    """A reply a v1 varpd would reject (it would reset the connection)."""


class StrictV1Client:
    """Sends v1 requests on a trio stream and checks every reply like varpd's svp_conn.c."""

    def __init__(self, stream: trio.abc.Stream, *, allow_ping: bool = False) -> None:
        self.stream = stream
        self.allow_ping = allow_ping
        self._buf = bytearray()
        # raw id bytes -> (expected reply op, LOG_REQ count or None)
        self._outstanding: dict[bytes, tuple[Op, int | None]] = {}

    def _register(self, msg: Any) -> None:
        if msg.version != 1:
            raise ValueError("a v1 client sends version 1 only")
        op = Op(msg.OP)
        if op not in _REPLY or (op is Op.PING and not self.allow_ping):
            raise ValueError(f"varpd never sends {op.name}")
        raw_id = struct.pack(">I", msg.id)
        if raw_id in self._outstanding:
            raise ValueError(f"id {msg.id:#x} is already outstanding")
        self._outstanding[raw_id] = (_REPLY[op], msg.count if op is Op.LOG_REQ else None)

    async def send(self, msgs: Sequence[Any]) -> None:
        """Write all requests in one send (pipelined)."""
        for msg in msgs:
            self._register(msg)
        await self.stream.send_all(b"".join(m.encode() for m in msgs))

    async def receive(self) -> Message:
        """The next reply, after every §6.4 check."""
        while True:
            if len(self._buf) >= 16:
                size = _HDR.unpack_from(self._buf, 0)[2]
                if len(self._buf) >= 16 + size:
                    frame = bytes(self._buf[: 16 + size])
                    del self._buf[: 16 + size]
                    return self._check(frame)
            data = await self.stream.receive_some(65536)
            if not data:
                raise StrictReplyError("server closed the connection with replies outstanding")
            self._buf += data

    def _check(self, frame: bytes) -> Message:
        version, op, size, _id, crc = _HDR.unpack_from(frame, 0)
        if version != 1:
            raise StrictReplyError(f"reply version {version}, a v1 client needs 1")
        expected = self._outstanding.pop(frame[8:12], None)
        if expected is None:
            raise StrictReplyError(f"reply id {frame[8:12].hex()} is not outstanding")
        want_op, count = expected
        if op != want_op:
            raise StrictReplyError(f"reply op {op:#x}, expected {want_op.name}")
        if want_op in _EXACT_SIZE and size != _EXACT_SIZE[want_op]:
            raise StrictReplyError(f"{want_op.name} size {size}, must be {_EXACT_SIZE[want_op]}")
        if want_op is Op.LOG_ACK and not 4 <= size <= (count or 0):
            raise StrictReplyError(f"LOG_ACK size {size} outside 4..{count}")
        computed = zlib.crc32(frame[:12] + b"\0\0\0\0" + frame[16:])
        if computed != crc:
            raise StrictReplyError(f"CRC {crc:#010x} but the frame gives {computed:#010x}")
        return decode_frame(frame)

    async def request(self, msg: Any) -> Message:
        await self.send([msg])
        return await self.receive()

    async def pipeline(self, msgs: Sequence[Any]) -> list[Message]:
        """Send every request in one write; return the replies in the order they arrived."""
        await self.send(msgs)
        return [await self.receive() for _ in msgs]

    @property
    def outstanding(self) -> int:
        return len(self._outstanding)
