"""Portolan's negotiated SVP extension: a HELLO capability exchange and LOG_WAIT (held LOG_REQ).

Theory of operation
-------------------
SVP v1 has no server push, so a v1 varpd learns of shootdowns by polling LOG_REQ. This module
adds, for our own varpd and our own portolan only, a way to *wait* for shootdowns instead:

1. **HELLO** is a PING (op 0x01) whose body carries the extension's magic. The reply is a PONG
   (op 0x02) with the same layout, naming the capabilities the server grants. Both bodies::

       offset 0  u32  magic        0x50544c4e ("PTLN")
              4  u16  ext_version  1
              6  u16  pad          0
              8  u32  caps         bit 0 = CAP_LOG_WAIT; other bits reserved (send 0)
             12  u32  max_wait_ms  request: 0 (reserved); reply: the longest hold the server
                                   grants a LOG_WAIT (0 when LOG_WAIT is not granted)

   Every SVP server answers a PING: the reference server and portolan before this extension
   ignore body bytes beyond what an op needs, so they send their usual empty PONG, which the
   client reads as "no extension". An unmodified illumos varpd never sends PING at all, and an
   empty PING (what other clients send) still gets the empty PONG, byte for byte.

2. **LOG_WAIT** (op 0x0109, i.e. 0x0100 | LOG_REQ; valid only on a connection whose HELLO was
   granted CAP_LOG_WAIT, an unknown op everywhere else) is a LOG_REQ with a wait::

       offset 0  u32  count        as LOG_REQ: the largest LOG_ACK body the client accepts
              4  ip[16]            as LOG_REQ: the requesting CN's underlay IP (v4-mapped)
             20  u32  wait_ms      how long the server may hold the request

   The reply is an ordinary LOG_ACK (op 0x0A) carrying the request's id and version, with the
   LOG_REQ rules for its body. The server answers at once when the CN has entries; otherwise
   it holds the request until an entry for that CN is written or ``min(wait_ms, max_wait_ms)``
   passes, then answers (an empty LOG_ACK after a timeout). A held LOG_WAIT does not hold back
   the connection: replies to requests sent after it may arrive before its LOG_ACK (the client
   matches replies by id, as varpd always has).

Everything here is sans I/O, like `protocol.svp`: frozen dataclasses with ``encode()``, and
parsers that plug into `protocol.svp.Decoder.extend` / ``decode_frame(extra_ops=...)``:
``HELLO_PING_OPS`` (a server's PING parser that also recognises a HELLO), ``HELLO_PONG_OPS``
(a client's PONG parser that also recognises a HELLO reply) and ``LOG_WAIT_OPS`` (enabled by a
server once CAP_LOG_WAIT was granted on that connection).

Invariants
----------
- ``decode(m.encode()) == m`` for every message here (with the tables above).
- A PING/PONG body that is shorter than 16 bytes or lacks the magic is a plain `Ping`/`Pong`:
  the extension never changes what a frame without the magic means.
- Op numbers and the magic do not collide with spec/svp.md (ops 0x00-0x0F, versions 1-2).
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from protocol.svp import HEADER_SIZE, Message, Op, Ping, Pong, decode_frame

__all__ = [
    "CAP_LOG_WAIT",
    "EXT_MAGIC",
    "EXT_VERSION",
    "HELLO_PING_OPS",
    "HELLO_PONG_OPS",
    "HELLO_SIZE",
    "LOG_WAIT_OPS",
    "LOG_WAIT_SIZE",
    "OP_LOG_WAIT",
    "Hello",
    "HelloAck",
    "LogWait",
    "decode_ext_frame",
]

EXT_MAGIC = 0x50544C4E  # "PTLN"
EXT_VERSION = 1
CAP_LOG_WAIT = 0x1
#: All capabilities this codec knows.
KNOWN_CAPS = CAP_LOG_WAIT
OP_LOG_WAIT = 0x0100 | Op.LOG_REQ  # 0x0109
HELLO_SIZE = 16
LOG_WAIT_SIZE = 24

_B_HELLO = struct.Struct(">IHxxII")
_F_HELLO = struct.Struct(">HHIII" + "IHxxII")
_F_LOG_WAIT = struct.Struct(">HHIII" + "I16sI")
_B_LOG_WAIT = struct.Struct(">I16sI")
assert _B_HELLO.size == HELLO_SIZE and _B_LOG_WAIT.size == LOG_WAIT_SIZE


def _seal(fs: struct.Struct, version: int, op: int, id: int, *fields: object) -> bytes:
    size = fs.size - HEADER_SIZE
    try:
        crc = zlib.crc32(fs.pack(version, op, size, id, 0, *fields))
        return fs.pack(version, op, size, id, crc, *fields)
    except struct.error as exc:
        raise ValueError(f"cannot encode op {op:#x}: {exc}") from None


def _encode_hello(msg: Hello | HelloAck) -> bytes:
    return _seal(
        _F_HELLO,
        msg.version,
        msg.OP,
        msg.id,
        EXT_MAGIC,
        EXT_VERSION,
        msg.caps,
        msg.max_wait_ms,
    )


@dataclass(frozen=True, slots=True)
class Hello:
    """Client -> server: a PING carrying the capabilities the client would use."""

    OP: ClassVar[Op] = Op.PING
    id: int
    caps: int
    max_wait_ms: int = 0
    version: int = 1

    def encode(self) -> bytes:
        return _encode_hello(self)


@dataclass(frozen=True, slots=True)
class HelloAck:
    """Server -> client: a PONG naming the capabilities granted on this connection (the same
    body as `Hello`)."""

    OP: ClassVar[Op] = Op.PONG
    id: int
    caps: int
    max_wait_ms: int = 0
    version: int = 1

    def encode(self) -> bytes:
        return _encode_hello(self)


@dataclass(frozen=True, slots=True)
class LogWait:
    """A LOG_REQ the server may hold up to ``wait_ms`` until the CN has an entry."""

    OP: ClassVar[int] = OP_LOG_WAIT
    id: int
    count: int
    ip: bytes
    wait_ms: int
    version: int = 1

    def encode(self) -> bytes:
        if type(self.ip) is not bytes or len(self.ip) != 16:
            raise ValueError(f"ip must be 16 bytes, got {self.ip!r}")
        return _seal(
            _F_LOG_WAIT, self.version, OP_LOG_WAIT, self.id, self.count, self.ip, self.wait_ms
        )


def _hello_fields(frame: bytes, size: int) -> tuple[int, int] | None:
    """(caps, max_wait_ms) when the body is a HELLO body, else None."""
    if size < HELLO_SIZE:
        return None
    magic, ext_version, caps, max_wait_ms = _B_HELLO.unpack_from(frame, HEADER_SIZE)
    if magic != EXT_MAGIC or ext_version < 1:
        return None
    # A later ext_version keeps this layout first; bits we do not know are dropped.
    return caps, max_wait_ms


def _p_ping_or_hello(frame: bytes, size: int, version: int, id: int) -> Any:
    fields = _hello_fields(frame, size)
    if fields is None:
        return Ping(id, version)
    return Hello(id, fields[0], fields[1], version)


def _p_pong_or_hello_ack(frame: bytes, size: int, version: int, id: int) -> Any:
    fields = _hello_fields(frame, size)
    if fields is None:
        return Pong(id, version)
    return HelloAck(id, fields[0], fields[1], version)


def _p_log_wait(frame: bytes, size: int, version: int, id: int) -> Any:
    count, ip, wait_ms = _B_LOG_WAIT.unpack_from(frame, HEADER_SIZE)
    return LogWait(id, count, ip, wait_ms, version)


#: For a server's decoder from the start: PING also recognises a HELLO.
HELLO_PING_OPS: Mapping[int, tuple[int, Any]] = {int(Op.PING): (0, _p_ping_or_hello)}
#: For a client reading replies: PONG also recognises a HELLO reply.
HELLO_PONG_OPS: Mapping[int, tuple[int, Any]] = {int(Op.PONG): (0, _p_pong_or_hello_ack)}
#: For a server's decoder once CAP_LOG_WAIT was granted on the connection.
LOG_WAIT_OPS: Mapping[int, tuple[int, Any]] = {OP_LOG_WAIT: (LOG_WAIT_SIZE, _p_log_wait)}


def decode_ext_frame(
    frame: bytes, *, versions: frozenset[int] = frozenset({1, 2}), server: bool = True
) -> Message | Hello | HelloAck | LogWait:
    """Decode one whole frame with the extension's ops (tests, tools). ``server=True``: PING
    may be a HELLO and LOG_WAIT is known; ``server=False``: PONG may be a HELLO reply."""
    extra = {**HELLO_PING_OPS, **LOG_WAIT_OPS} if server else dict(HELLO_PONG_OPS)
    return decode_frame(frame, versions=versions, extra_ops=extra)
