"""SVP (the SDC VXLAN Protocol) v1 and v2: message types, encoder and a sans-I/O decoder.

Theory of operation
-------------------
SVP runs over a plain TCP stream (port 1296). The stream is a sequence of frames, each a
16-byte header followed by ``size`` body bytes. Every integer is big-endian::

    offset  0  u16  version    1, or 2 for the route extension
            2  u16  op         operation code (``Op``)
            4  u32  size       body length in bytes, header not counted
            8  u32  id         request id, chosen by the requester, echoed in the reply
           12  u32  crc        CRC-32 of the frame with these four bytes set to zero
           16  ...  body       ``size`` bytes, layout chosen by ``op``

The CRC is the ordinary zlib/IEEE CRC-32 computed over the 12 leading header bytes, four zero
bytes standing in for the CRC field, and then the whole body; it is stored big-endian.

Addresses are raw bytes all the way through this module: every IP is 16 bytes (IPv4 carried
as ``::ffff:a.b.c.d``), every MAC 6 bytes, every log entry id 16 bytes. No ``ipaddress``
object is built here; ``protocol.addr`` converts to and from text where people need it.
The request id is opaque: it is read as a big-endian u32 and written back the same way, so a
reply carries exactly the four bytes the request did, whatever byte order the peer meant.

Messages are frozen, slotted dataclasses, one per op. Each has ``id``, ``version`` (default 1;
2 for the v2-only route messages) and the body fields of its op; ``encode()`` returns the
whole frame with size and CRC filled in. Fixed-size messages are packed with one precompiled
``struct.Struct`` covering header and body (packed twice: once with a zero CRC to checksum it,
once with the CRC), which is the cheapest way CPython offers. ``encode_vl2_ack`` and
``encode_vl3_ack`` are the same encoders without a dataclass in between, for the server's
lookup path.

Decoder lifecycle
-----------------
``Decoder`` holds no socket. The owner feeds it whatever bytes arrive (``receive_data``, in
any split) and then calls ``next_message()`` until it returns ``None``, meaning "need more
bytes". Checks run in this order:

1. As soon as the 16 header bytes are buffered: the version must be one the decoder accepts
   (``UnsupportedVersion``); the op must exist in that version (``UnknownOp``; ops 0x0E/0x0F
   exist only in v2); the declared size must not exceed ``max_size`` (``OversizeFrame``) and
   must cover the op's fixed body (``ShortBody``). These fire before any body byte is awaited,
   so a peer cannot make the decoder buffer a huge body.
2. Once the whole frame is buffered: the CRC (``BadCRC``).
3. Then the body is parsed: a log entry of an unknown type, of a type the frame's version does
   not have, or cut short is ``BadLogEntry``; a LOG_RM whose size is not exactly
   ``4 + 16 * count`` is ``BadLength``. Bytes beyond a fixed-size body are ignored.

Every failure is a ``ProtocolError`` subclass with a ``kind`` string for metrics; nothing else
escapes (no ``struct.error``, ``IndexError``...). SVP has no way to resynchronise a stream, so
the first error poisons the decoder: every later ``next_message()`` raises the same error and
``receive_data()`` discards what it is given. The owner is expected to close the connection.
Acks decode like requests; refusing an op that makes no sense for a given peer is the
caller's business (see ``REQUEST_OPS`` / ``ACK_OPS``).

Invariants
----------
- ``decode_frame(m.encode()) == m`` for every valid message ``m``; and for every frame the
  decoder accepts whose body has no ignored trailing bytes or non-zero pad bytes,
  ``decode_frame(f).encode() == f``.
- Pad bytes are written as zero and ignored when read.
- The codec does no I/O and imports nothing from the rest of the project.
"""

import struct
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from enum import IntEnum
from typing import ClassVar

__all__ = [
    "ACK_OPS",
    "HEADER_SIZE",
    "LOG_ENTRY_SIZE",
    "MESSAGE_TYPES",
    "MIN_BODY_SIZE",
    "REPLY_OP",
    "REQUEST_OPS",
    "V2_OPS",
    "BadCRC",
    "BadLength",
    "BadLogEntry",
    "BulkAck",
    "BulkRequest",
    "BulkType",
    "Decoder",
    "LogAck",
    "LogEntry",
    "LogRemove",
    "LogRemoveAck",
    "LogRequest",
    "LogRouteEntry",
    "LogType",
    "LogVL2Entry",
    "LogVL3Entry",
    "Message",
    "Op",
    "OversizeFrame",
    "Ping",
    "Pong",
    "ProtocolError",
    "RouteAck",
    "RouteRequest",
    "ShortBody",
    "Shootdown",
    "Status",
    "UnknownOp",
    "UnsupportedVersion",
    "VL2Ack",
    "VL2Request",
    "VL3Ack",
    "VL3Request",
    "VL3Type",
    "decode_frame",
    "encode_frame",
    "encode_vl2_ack",
    "encode_vl3_ack",
    "encoded_size",
]


# --------------------------------------------------------------------------------------------
# Enumerations


class Op(IntEnum):
    UNKNOWN = 0x00
    PING = 0x01
    PONG = 0x02
    VL2_REQ = 0x03
    VL2_ACK = 0x04
    VL3_REQ = 0x05
    VL3_ACK = 0x06
    BULK_REQ = 0x07
    BULK_ACK = 0x08
    LOG_REQ = 0x09
    LOG_ACK = 0x0A
    LOG_RM = 0x0B
    LOG_RM_ACK = 0x0C
    SHOOTDOWN = 0x0D
    ROUTE_REQ = 0x0E
    ROUTE_ACK = 0x0F


class Status(IntEnum):
    OK = 0
    FATAL = 1
    NOTFOUND = 2
    BADL3TYPE = 3
    BADBULK = 4


class VL3Type(IntEnum):
    IP = 1  # IPv4, carried v4-mapped
    IPV6 = 2


class LogType(IntEnum):
    VL2 = 1
    VL3 = 2
    ROUTE = 3  # v2 only


class BulkType(IntEnum):
    VL2 = 1
    VL3 = 2


HEADER_SIZE = 16
LOG_ENTRY_SIZE: dict[LogType, int] = {LogType.VL2: 32, LogType.VL3: 44, LogType.ROUTE: 72}

#: Ops that exist only from version 2 on.
V2_OPS: frozenset[Op] = frozenset({Op.ROUTE_REQ, Op.ROUTE_ACK})
#: Ops a client sends to the server and expects one reply for. SHOOTDOWN (CN to CN, no reply)
#: is in neither set.
REQUEST_OPS: frozenset[Op] = frozenset(
    {Op.PING, Op.VL2_REQ, Op.VL3_REQ, Op.BULK_REQ, Op.LOG_REQ, Op.LOG_RM, Op.ROUTE_REQ}
)
#: Ops a server sends back.
ACK_OPS: frozenset[Op] = frozenset(
    {Op.PONG, Op.VL2_ACK, Op.VL3_ACK, Op.BULK_ACK, Op.LOG_ACK, Op.LOG_RM_ACK, Op.ROUTE_ACK}
)
#: The op of the reply to each request op.
REPLY_OP: dict[Op, Op] = {
    Op.PING: Op.PONG,
    Op.VL2_REQ: Op.VL2_ACK,
    Op.VL3_REQ: Op.VL3_ACK,
    Op.BULK_REQ: Op.BULK_ACK,
    Op.LOG_REQ: Op.LOG_ACK,
    Op.LOG_RM: Op.LOG_RM_ACK,
    Op.ROUTE_REQ: Op.ROUTE_ACK,
}
#: Smallest body each op needs (the fixed part; LOG_ACK, LOG_RM and BULK_ACK may be longer).
MIN_BODY_SIZE: dict[Op, int] = {
    Op.PING: 0,
    Op.PONG: 0,
    Op.VL2_REQ: 12,
    Op.VL2_ACK: 20,
    Op.VL3_REQ: 24,
    Op.VL3_ACK: 28,
    Op.BULK_REQ: 4,
    Op.BULK_ACK: 8,
    Op.LOG_REQ: 20,
    Op.LOG_ACK: 4,
    Op.LOG_RM: 4,
    Op.LOG_RM_ACK: 4,
    Op.SHOOTDOWN: 12,
    Op.ROUTE_REQ: 40,
    Op.ROUTE_ACK: 48,
}

_SUPPORTED_VERSIONS = frozenset({1, 2})


# --------------------------------------------------------------------------------------------
# Errors


class ProtocolError(Exception):
    """The peer broke the SVP framing or message rules; the stream cannot be trusted further."""

    kind: ClassVar[str] = "protocol"


class BadCRC(ProtocolError):
    kind = "bad_crc"


class UnknownOp(ProtocolError):
    kind = "unknown_op"


class ShortBody(ProtocolError):
    kind = "short_body"


class OversizeFrame(ProtocolError):
    kind = "oversize"


class UnsupportedVersion(ProtocolError):
    kind = "bad_version"


class BadLogEntry(ProtocolError):
    kind = "bad_log_entry"


class BadLength(ProtocolError):
    """A body whose length disagrees with a count it carries (LOG_RM), or a frame handed to
    ``decode_frame`` that is cut short or followed by extra bytes."""

    kind = "bad_length"


# --------------------------------------------------------------------------------------------
# Wire structs. ``_F_*`` cover header + body of fixed-size frames; ``_B_*`` bodies alone.

_HDR = struct.Struct(">HHIII")
_U32 = struct.Struct(">I")
_ZERO4 = b"\x00\x00\x00\x00"

_F_EMPTY = _HDR
_F_VL2_REQ = struct.Struct(">HHIII6s2xI")
_F_VL2_ACK = struct.Struct(">HHIIIHH16s")
_F_VL3_REQ = struct.Struct(">HHIII16sII")
_F_VL3_ACK = struct.Struct(">HHIIII6sH16s")
_F_U32 = struct.Struct(">HHIIII")  # BULK_REQ, LOG_RM_ACK
_F_LOG_REQ = struct.Struct(">HHIIII16s")
_F_SHOOTDOWN = _F_VL2_REQ
_F_ROUTE_REQ = struct.Struct(">HHIIIIH2x16s16s")
_F_ROUTE_ACK = struct.Struct(">HHIIIIIIHH16s6s6sBB2x")

_B_VL2_REQ = struct.Struct(">6s2xI")
_B_VL2_ACK = struct.Struct(">HH16s")
_B_VL3_REQ = struct.Struct(">16sII")
_B_VL3_ACK = struct.Struct(">I6sH16s")
_B_BULK_ACK = struct.Struct(">II")
_B_LOG_REQ = struct.Struct(">I16s")
_B_ROUTE_REQ = struct.Struct(">IH2x16s16s")
_B_ROUTE_ACK = struct.Struct(">IIIHH16s6s6sBB2x")

_E_VL2 = struct.Struct(">I16s6s2xI")
_E_VL3 = struct.Struct(">I16s16s2xHI")
_E_ROUTE = struct.Struct(">I16sIII16s16sHHBB2x")

assert _E_VL2.size == 32 and _E_VL3.size == 44 and _E_ROUTE.size == 72
assert _F_ROUTE_ACK.size == 16 + 48 and _F_ROUTE_REQ.size == 16 + 40


def _crc(header12: bytes, body: bytes) -> int:
    return zlib.crc32(body, zlib.crc32(_ZERO4, zlib.crc32(header12)))


def _seal(fs: struct.Struct, version: int, op: int, id: int, *fields: object) -> bytes:
    """Pack a fixed-size frame: once with CRC 0 to checksum it, once with the CRC."""
    size = fs.size - HEADER_SIZE
    try:
        crc = zlib.crc32(fs.pack(version, op, size, id, 0, *fields))
        return fs.pack(version, op, size, id, crc, *fields)
    except struct.error as exc:
        raise ValueError(f"cannot encode {Op(op).name}: {exc}") from None


def encode_frame(version: int, op: int, id: int, body: bytes) -> bytes:
    """A frame with any version/op/body (size and CRC filled in). No validation of the body:
    for building odd frames in tests and tools; messages use their ``encode()``."""
    try:
        head = struct.pack(">HHII", version, op, len(body), id)
    except struct.error as exc:
        raise ValueError(f"cannot encode header: {exc}") from None
    return head + _U32.pack(_crc(head, body)) + body


def _need(value: bytes, length: int, what: str) -> None:
    if type(value) is not bytes or len(value) != length:
        raise ValueError(f"{what} must be {length} bytes, got {value!r}")


def _need_v2(version: int, what: str) -> None:
    if version < 2:
        raise ValueError(f"{what} needs SVP version 2, not {version}")


def encode_vl2_ack(id: int, version: int, status: int, port: int, addr: bytes) -> bytes:
    """VL2_ACK frame without building a ``VL2Ack`` (the server's hot path)."""
    if len(addr) != 16:
        raise ValueError(f"addr must be 16 bytes, got {addr!r}")
    try:
        crc = zlib.crc32(_F_VL2_ACK.pack(version, 4, 20, id, 0, status, port, addr))
        return _F_VL2_ACK.pack(version, 4, 20, id, crc, status, port, addr)
    except struct.error as exc:
        raise ValueError(f"cannot encode VL2_ACK: {exc}") from None


def encode_vl3_ack(id: int, version: int, status: int, mac: bytes, port: int, addr: bytes) -> bytes:
    """VL3_ACK frame without building a ``VL3Ack`` (the server's hot path)."""
    if len(addr) != 16 or len(mac) != 6:
        raise ValueError(f"mac/addr must be 6/16 bytes, got {mac!r}, {addr!r}")
    try:
        crc = zlib.crc32(_F_VL3_ACK.pack(version, 6, 28, id, 0, status, mac, port, addr))
        return _F_VL3_ACK.pack(version, 6, 28, id, crc, status, mac, port, addr)
    except struct.error as exc:
        raise ValueError(f"cannot encode VL3_ACK: {exc}") from None


# --------------------------------------------------------------------------------------------
# Log entries (the body of LOG_ACK)


@dataclass(frozen=True, slots=True)
class LogVL2Entry:
    """Invalidate ``mac`` in ``vnet_id``."""

    TYPE: ClassVar[LogType] = LogType.VL2
    entry_id: bytes
    mac: bytes
    vnet_id: int

    def encode(self) -> bytes:
        _need(self.entry_id, 16, "entry_id")
        _need(self.mac, 6, "mac")
        try:
            return _E_VL2.pack(1, self.entry_id, self.mac, self.vnet_id)
        except struct.error as exc:
            raise ValueError(f"cannot encode VL2 log entry: {exc}") from None


@dataclass(frozen=True, slots=True)
class LogVL3Entry:
    """Re-resolve ``ip`` in ``vnet_id`` and announce it on ``vlan``."""

    TYPE: ClassVar[LogType] = LogType.VL3
    entry_id: bytes
    ip: bytes
    vlan: int
    vnet_id: int

    def encode(self) -> bytes:
        _need(self.entry_id, 16, "entry_id")
        _need(self.ip, 16, "ip")
        try:
            return _E_VL3.pack(2, self.entry_id, self.ip, self.vlan, self.vnet_id)
        except struct.error as exc:
            raise ValueError(f"cannot encode VL3 log entry: {exc}") from None


@dataclass(frozen=True, slots=True)
class LogRouteEntry:
    """A fabric route changed (v2 only). Prefix lengths are in IPv6 terms (v4 /24 -> 120)."""

    TYPE: ClassVar[LogType] = LogType.ROUTE
    entry_id: bytes
    src_vnet_id: int
    dst_vnet_id: int
    dc_id: int
    src_ip: bytes
    dst_ip: bytes
    src_vlan: int
    dst_vlan: int
    src_prefixlen: int
    dst_prefixlen: int

    def encode(self) -> bytes:
        _need(self.entry_id, 16, "entry_id")
        _need(self.src_ip, 16, "src_ip")
        _need(self.dst_ip, 16, "dst_ip")
        try:
            return _E_ROUTE.pack(
                3,
                self.entry_id,
                self.src_vnet_id,
                self.dst_vnet_id,
                self.dc_id,
                self.src_ip,
                self.dst_ip,
                self.src_vlan,
                self.dst_vlan,
                self.src_prefixlen,
                self.dst_prefixlen,
            )
        except struct.error as exc:
            raise ValueError(f"cannot encode ROUTE log entry: {exc}") from None


LogEntry = LogVL2Entry | LogVL3Entry | LogRouteEntry


def encoded_size(entry: LogEntry) -> int:
    """Bytes ``entry`` takes in a LOG_ACK body."""
    return LOG_ENTRY_SIZE[entry.TYPE]


# --------------------------------------------------------------------------------------------
# Messages


@dataclass(frozen=True, slots=True)
class Ping:
    OP: ClassVar[Op] = Op.PING
    id: int
    version: int = 1

    def encode(self) -> bytes:
        return _seal(_F_EMPTY, self.version, self.OP, self.id)


@dataclass(frozen=True, slots=True)
class Pong:
    OP: ClassVar[Op] = Op.PONG
    id: int
    version: int = 1

    def encode(self) -> bytes:
        return _seal(_F_EMPTY, self.version, self.OP, self.id)


@dataclass(frozen=True, slots=True)
class VL2Request:
    OP: ClassVar[Op] = Op.VL2_REQ
    id: int
    mac: bytes
    vnet_id: int
    version: int = 1

    def encode(self) -> bytes:
        _need(self.mac, 6, "mac")
        return _seal(_F_VL2_REQ, self.version, self.OP, self.id, self.mac, self.vnet_id)


@dataclass(frozen=True, slots=True)
class VL2Ack:
    """Status is a u16 in this message only."""

    OP: ClassVar[Op] = Op.VL2_ACK
    id: int
    status: int
    port: int
    addr: bytes
    version: int = 1

    def encode(self) -> bytes:
        return encode_vl2_ack(self.id, self.version, self.status, self.port, self.addr)


@dataclass(frozen=True, slots=True)
class VL3Request:
    OP: ClassVar[Op] = Op.VL3_REQ
    id: int
    ip: bytes
    ip_type: int
    vnet_id: int
    version: int = 1

    def encode(self) -> bytes:
        _need(self.ip, 16, "ip")
        return _seal(
            _F_VL3_REQ, self.version, self.OP, self.id, self.ip, self.ip_type, self.vnet_id
        )


@dataclass(frozen=True, slots=True)
class VL3Ack:
    OP: ClassVar[Op] = Op.VL3_ACK
    id: int
    status: int
    mac: bytes
    port: int
    addr: bytes
    version: int = 1

    def encode(self) -> bytes:
        return encode_vl3_ack(self.id, self.version, self.status, self.mac, self.port, self.addr)


@dataclass(frozen=True, slots=True)
class BulkRequest:
    OP: ClassVar[Op] = Op.BULK_REQ
    id: int
    bulk_type: int
    version: int = 1

    def encode(self) -> bytes:
        return _seal(_F_U32, self.version, self.OP, self.id, self.bulk_type)


@dataclass(frozen=True, slots=True)
class BulkAck:
    """``data`` is everything after the type word (its format was never defined)."""

    OP: ClassVar[Op] = Op.BULK_ACK
    id: int
    status: int
    bulk_type: int
    data: bytes = b""
    version: int = 1

    def encode(self) -> bytes:
        if type(self.data) is not bytes:
            raise ValueError("data must be bytes")
        try:
            body = _B_BULK_ACK.pack(self.status, self.bulk_type) + self.data
        except struct.error as exc:
            raise ValueError(f"cannot encode BULK_ACK: {exc}") from None
        return encode_frame(self.version, self.OP, self.id, body)


@dataclass(frozen=True, slots=True)
class LogRequest:
    """``count``: most bytes of log data the client accepts; ``ip``: its underlay IP."""

    OP: ClassVar[Op] = Op.LOG_REQ
    id: int
    count: int
    ip: bytes
    version: int = 1

    def encode(self) -> bytes:
        _need(self.ip, 16, "ip")
        return _seal(_F_LOG_REQ, self.version, self.OP, self.id, self.count, self.ip)


@dataclass(frozen=True, slots=True)
class LogAck:
    OP: ClassVar[Op] = Op.LOG_ACK
    id: int
    status: int
    entries: tuple[LogEntry, ...] = ()
    version: int = 1

    def __post_init__(self) -> None:
        if type(self.entries) is not tuple:
            object.__setattr__(self, "entries", tuple(self.entries))

    def encode(self) -> bytes:
        parts = []
        for entry in self.entries:
            if not isinstance(entry, LogVL2Entry | LogVL3Entry | LogRouteEntry):
                raise ValueError(f"not a log entry: {entry!r}")
            if entry.TYPE is LogType.ROUTE:
                _need_v2(self.version, "a ROUTE log entry")
            parts.append(entry.encode())
        try:
            status = _U32.pack(self.status)
        except struct.error as exc:
            raise ValueError(f"cannot encode LOG_ACK: {exc}") from None
        return encode_frame(self.version, self.OP, self.id, status + b"".join(parts))

    @property
    def body_size(self) -> int:
        """Body bytes: the status word plus every entry (what LOG_REQ's count bounds)."""
        return 4 + sum(LOG_ENTRY_SIZE[e.TYPE] for e in self.entries)


@dataclass(frozen=True, slots=True)
class LogRemove:
    OP: ClassVar[Op] = Op.LOG_RM
    id: int
    ids: tuple[bytes, ...]
    version: int = 1

    def __post_init__(self) -> None:
        if type(self.ids) is not tuple:
            object.__setattr__(self, "ids", tuple(self.ids))

    def encode(self) -> bytes:
        for entry_id in self.ids:
            _need(entry_id, 16, "each log id")
        return encode_frame(
            self.version, self.OP, self.id, _U32.pack(len(self.ids)) + b"".join(self.ids)
        )


@dataclass(frozen=True, slots=True)
class LogRemoveAck:
    OP: ClassVar[Op] = Op.LOG_RM_ACK
    id: int
    status: int
    version: int = 1

    def encode(self) -> bytes:
        return _seal(_F_U32, self.version, self.OP, self.id, self.status)


@dataclass(frozen=True, slots=True)
class Shootdown:
    OP: ClassVar[Op] = Op.SHOOTDOWN
    id: int
    mac: bytes
    vnet_id: int
    version: int = 1

    def encode(self) -> bytes:
        _need(self.mac, 6, "mac")
        return _seal(_F_SHOOTDOWN, self.version, self.OP, self.id, self.mac, self.vnet_id)


@dataclass(frozen=True, slots=True)
class RouteRequest:
    """v2 only, hence ``version`` defaults to 2 here."""

    OP: ClassVar[Op] = Op.ROUTE_REQ
    id: int
    vnet_id: int
    vlan: int
    src_ip: bytes
    dst_ip: bytes
    version: int = 2

    def encode(self) -> bytes:
        _need_v2(self.version, "ROUTE_REQ")
        _need(self.src_ip, 16, "src_ip")
        _need(self.dst_ip, 16, "dst_ip")
        return _seal(
            _F_ROUTE_REQ,
            self.version,
            14,
            self.id,
            self.vnet_id,
            self.vlan,
            self.src_ip,
            self.dst_ip,
        )


@dataclass(frozen=True, slots=True)
class RouteAck:
    """v2 only. Prefix lengths are in IPv4 terms for IPv4 subnets (unlike the log entry)."""

    OP: ClassVar[Op] = Op.ROUTE_ACK
    id: int
    status: int
    dc_id: int
    vnet_id: int
    vlan: int
    port: int
    addr: bytes
    src_mac: bytes
    dst_mac: bytes
    src_prefixlen: int
    dst_prefixlen: int
    version: int = 2

    def encode(self) -> bytes:
        _need_v2(self.version, "ROUTE_ACK")
        _need(self.addr, 16, "addr")
        _need(self.src_mac, 6, "src_mac")
        _need(self.dst_mac, 6, "dst_mac")
        return _seal(
            _F_ROUTE_ACK,
            self.version,
            15,
            self.id,
            self.status,
            self.dc_id,
            self.vnet_id,
            self.vlan,
            self.port,
            self.addr,
            self.src_mac,
            self.dst_mac,
            self.src_prefixlen,
            self.dst_prefixlen,
        )


Message = (
    Ping
    | Pong
    | VL2Request
    | VL2Ack
    | VL3Request
    | VL3Ack
    | BulkRequest
    | BulkAck
    | LogRequest
    | LogAck
    | LogRemove
    | LogRemoveAck
    | Shootdown
    | RouteRequest
    | RouteAck
)

MESSAGE_TYPES: dict[Op, type] = {
    cls.OP: cls
    for cls in (
        Ping,
        Pong,
        VL2Request,
        VL2Ack,
        VL3Request,
        VL3Ack,
        BulkRequest,
        BulkAck,
        LogRequest,
        LogAck,
        LogRemove,
        LogRemoveAck,
        Shootdown,
        RouteRequest,
        RouteAck,
    )
}


# --------------------------------------------------------------------------------------------
# Body parsers: (frame, size, version, id) -> message. ``frame`` is the whole frame (bytes),
# the body starts at offset 16 and is ``size`` bytes long; the minimum size was checked.

_Parser = Callable[[bytes, int, int, int], Message]


def _p_ping(frame: bytes, size: int, version: int, id: int) -> Message:
    return Ping(id, version)


def _p_pong(frame: bytes, size: int, version: int, id: int) -> Message:
    return Pong(id, version)


# The two lookups the server decodes most skip the generated frozen ``__init__`` (which goes
# through object.__setattr__ per field) and fill the slots through their descriptors: about
# half the cost. Every field is set, and neither class has a __post_init__.
_new = object.__new__
_vl2r_id = VL2Request.id.__set__  # type: ignore[attr-defined]
_vl2r_mac = VL2Request.mac.__set__  # type: ignore[attr-defined]
_vl2r_vnet = VL2Request.vnet_id.__set__  # type: ignore[attr-defined]
_vl2r_ver = VL2Request.version.__set__  # type: ignore[attr-defined]
_vl3r_id = VL3Request.id.__set__  # type: ignore[attr-defined]
_vl3r_ip = VL3Request.ip.__set__  # type: ignore[attr-defined]
_vl3r_type = VL3Request.ip_type.__set__  # type: ignore[attr-defined]
_vl3r_vnet = VL3Request.vnet_id.__set__  # type: ignore[attr-defined]
_vl3r_ver = VL3Request.version.__set__  # type: ignore[attr-defined]


def _p_vl2_req(frame: bytes, size: int, version: int, id: int) -> Message:
    mac, vnet_id = _B_VL2_REQ.unpack_from(frame, 16)
    msg = _new(VL2Request)
    _vl2r_id(msg, id)
    _vl2r_mac(msg, mac)
    _vl2r_vnet(msg, vnet_id)
    _vl2r_ver(msg, version)
    return msg


def _p_vl2_ack(frame: bytes, size: int, version: int, id: int) -> Message:
    status, port, addr = _B_VL2_ACK.unpack_from(frame, 16)
    return VL2Ack(id, status, port, addr, version)


def _p_vl3_req(frame: bytes, size: int, version: int, id: int) -> Message:
    ip, ip_type, vnet_id = _B_VL3_REQ.unpack_from(frame, 16)
    msg = _new(VL3Request)
    _vl3r_id(msg, id)
    _vl3r_ip(msg, ip)
    _vl3r_type(msg, ip_type)
    _vl3r_vnet(msg, vnet_id)
    _vl3r_ver(msg, version)
    return msg


def _p_vl3_ack(frame: bytes, size: int, version: int, id: int) -> Message:
    status, mac, port, addr = _B_VL3_ACK.unpack_from(frame, 16)
    return VL3Ack(id, status, mac, port, addr, version)


def _p_bulk_req(frame: bytes, size: int, version: int, id: int) -> Message:
    return BulkRequest(id, _U32.unpack_from(frame, 16)[0], version)


def _p_bulk_ack(frame: bytes, size: int, version: int, id: int) -> Message:
    status, bulk_type = _B_BULK_ACK.unpack_from(frame, 16)
    return BulkAck(id, status, bulk_type, frame[24 : 16 + size], version)


def _p_log_req(frame: bytes, size: int, version: int, id: int) -> Message:
    count, ip = _B_LOG_REQ.unpack_from(frame, 16)
    return LogRequest(id, count, ip, version)


def _p_log_ack(frame: bytes, size: int, version: int, id: int) -> Message:
    status = _U32.unpack_from(frame, 16)[0]
    entries: list[LogEntry] = []
    off = 20
    end = 16 + size
    while off < end:
        left = end - off
        if left < 4:
            raise BadLogEntry(
                f"log entry at body offset {off - 16}: {left} bytes, no room for type"
            )
        etype = _U32.unpack_from(frame, off)[0]
        if etype == 1:
            if left < 32:
                raise BadLogEntry(
                    f"VL2 log entry at body offset {off - 16} cut short ({left} < 32)"
                )
            _, eid, mac, vnet_id = _E_VL2.unpack_from(frame, off)
            entries.append(LogVL2Entry(eid, mac, vnet_id))
            off += 32
        elif etype == 2:
            if left < 44:
                raise BadLogEntry(
                    f"VL3 log entry at body offset {off - 16} cut short ({left} < 44)"
                )
            _, eid, ip, vlan, vnet_id = _E_VL3.unpack_from(frame, off)
            entries.append(LogVL3Entry(eid, ip, vlan, vnet_id))
            off += 44
        elif etype == 3 and version >= 2:
            if left < 72:
                raise BadLogEntry(
                    f"ROUTE log entry at body offset {off - 16} cut short ({left} < 72)"
                )
            entries.append(LogRouteEntry(*_E_ROUTE.unpack_from(frame, off)[1:]))
            off += 72
        else:
            raise BadLogEntry(
                f"log entry at body offset {off - 16}: type {etype} unknown in version {version}"
            )
    return LogAck(id, status, tuple(entries), version)


def _p_log_rm(frame: bytes, size: int, version: int, id: int) -> Message:
    count = _U32.unpack_from(frame, 16)[0]
    if size != 4 + 16 * count:
        raise BadLength(f"LOG_RM of {count} ids needs a {4 + 16 * count}-byte body, got {size}")
    return LogRemove(id, tuple(frame[o : o + 16] for o in range(20, 20 + 16 * count, 16)), version)


def _p_log_rm_ack(frame: bytes, size: int, version: int, id: int) -> Message:
    return LogRemoveAck(id, _U32.unpack_from(frame, 16)[0], version)


def _p_shootdown(frame: bytes, size: int, version: int, id: int) -> Message:
    mac, vnet_id = _B_VL2_REQ.unpack_from(frame, 16)
    return Shootdown(id, mac, vnet_id, version)


def _p_route_req(frame: bytes, size: int, version: int, id: int) -> Message:
    vnet_id, vlan, src_ip, dst_ip = _B_ROUTE_REQ.unpack_from(frame, 16)
    return RouteRequest(id, vnet_id, vlan, src_ip, dst_ip, version)


def _p_route_ack(frame: bytes, size: int, version: int, id: int) -> Message:
    return RouteAck(id, *_B_ROUTE_ACK.unpack_from(frame, 16), version)


_PARSERS: dict[int, _Parser] = {
    1: _p_ping,
    2: _p_pong,
    3: _p_vl2_req,
    4: _p_vl2_ack,
    5: _p_vl3_req,
    6: _p_vl3_ack,
    7: _p_bulk_req,
    8: _p_bulk_ack,
    9: _p_log_req,
    10: _p_log_ack,
    11: _p_log_rm,
    12: _p_log_rm_ack,
    13: _p_shootdown,
    14: _p_route_req,
    15: _p_route_ack,
}
# (minimum body size, parser) per op, one table per version.
_V1_OPS: dict[int, tuple[int, _Parser]] = {
    op: (MIN_BODY_SIZE[Op(op)], fn) for op, fn in _PARSERS.items() if Op(op) not in V2_OPS
}
_V2_OPS: dict[int, tuple[int, _Parser]] = {
    op: (MIN_BODY_SIZE[Op(op)], fn) for op, fn in _PARSERS.items()
}
_OPS_BY_VERSION = {1: _V1_OPS, 2: _V2_OPS}


def _check_header(
    version: int,
    op: int,
    size: int,
    versions: frozenset[int],
    max_size: int | None,
    extra_ops: Mapping[int, tuple[int, _Parser]] | None = None,
) -> _Parser:
    """Header-only checks; returns the body parser. ``extra_ops`` (op -> (minimum body size,
    parser)) adds or replaces ops in every accepted version (protocol extensions)."""
    if version not in versions:
        raise UnsupportedVersion(f"SVP version {version} not accepted (want {sorted(versions)})")
    entry = extra_ops.get(op) if extra_ops else None
    if entry is None:
        entry = _OPS_BY_VERSION[version].get(op)
    if entry is None:
        raise UnknownOp(f"op {op:#x} does not exist in SVP version {version}")
    if max_size is not None and size > max_size:
        raise OversizeFrame(f"declared body size {size} exceeds the limit of {max_size}")
    if size < entry[0]:
        name = Op(op).name if op in _V2_OPS else f"op {op:#x}"
        raise ShortBody(f"{name} needs a body of {entry[0]} bytes, frame declares {size}")
    return entry[1]


def _check_crc(frame: bytes, stored: int) -> None:
    # Header bytes 0..11, four zero bytes for the CRC field, then the body.
    computed = zlib.crc32(frame[16:], zlib.crc32(_ZERO4, zlib.crc32(frame[:12])))
    if computed != stored:
        raise BadCRC(f"frame CRC {stored:#010x} but contents give {computed:#010x}")


def decode_frame(
    frame: bytes,
    *,
    versions: frozenset[int] = _SUPPORTED_VERSIONS,
    max_size: int | None = None,
    extra_ops: Mapping[int, tuple[int, _Parser]] | None = None,
) -> Message:
    """Decode exactly one whole frame. Raises ``ProtocolError`` subclasses only; a frame cut
    short or followed by extra bytes is ``BadLength``. ``extra_ops`` as for `Decoder.extend`."""
    frame = bytes(frame)
    if len(frame) < HEADER_SIZE:
        raise BadLength(f"a frame is at least {HEADER_SIZE} bytes, got {len(frame)}")
    version, op, size, id, crc = _HDR.unpack_from(frame, 0)
    parse = _check_header(version, op, size, versions, max_size, extra_ops)
    if len(frame) != HEADER_SIZE + size:
        raise BadLength(f"frame declares {size} body bytes but carries {len(frame) - HEADER_SIZE}")
    _check_crc(frame, crc)
    return parse(frame, size, version, id)


class Decoder:
    """Incremental SVP decoder for one byte stream (one TCP connection). See the module
    docstring for the order of checks and the poisoning rule."""

    __slots__ = ("_buf", "_error", "_extra", "_max_size", "_table", "_versions")

    def __init__(self, max_size: int = 65536, versions: frozenset[int] = _SUPPORTED_VERSIONS):
        if max_size < 0:
            raise ValueError("max_size must not be negative")
        versions = frozenset(versions)
        if not versions or not versions <= _SUPPORTED_VERSIONS:
            raise ValueError(f"versions must be a non-empty subset of {{1, 2}}, got {versions}")
        self._buf = bytearray()
        self._error: ProtocolError | None = None
        self._max_size = max_size
        self._versions = versions
        # (version << 16 | op) -> (minimum body size, parser), for the accepted versions only:
        # one dict lookup validates version and op together on the fast path.
        self._table = {
            (v << 16) | op: entry for v in versions for op, entry in _OPS_BY_VERSION[v].items()
        }
        self._extra: dict[int, tuple[int, _Parser]] = {}

    def extend(self, ops: Mapping[int, tuple[int, _Parser]]) -> None:
        """Accept more ops from now on (a negotiated protocol extension, `protocol.svp_ext`):
        ``ops`` maps an op number to (minimum body size, parser), in every accepted version;
        an op already known is replaced (e.g. a PING parser that also reads a body)."""
        self._extra.update(ops)
        for v in self._versions:
            for op, entry in ops.items():
                self._table[(v << 16) | op] = entry

    @property
    def buffered(self) -> int:
        """Bytes received and not yet returned as messages."""
        return len(self._buf)

    @property
    def error(self) -> ProtocolError | None:
        """The error that poisoned this decoder, if any."""
        return self._error

    def receive_data(self, data: bytes) -> None:
        """Buffer bytes from the stream (any split). Discarded once the decoder is poisoned."""
        if self._error is None:
            self._buf += data

    def next_message(self) -> Message | None:
        """The next whole message, or ``None`` when more bytes are needed."""
        if self._error is not None:
            raise self._error.with_traceback(None)
        buf = self._buf
        have = len(buf)
        if have < 16:
            return None
        version, op, size, id, crc = _HDR.unpack_from(buf, 0)
        try:
            entry = self._table.get((version << 16) | op)
            if entry is None or size > self._max_size or size < entry[0]:
                # Slow path: let the general check name the fault.
                _check_header(version, op, size, self._versions, self._max_size, self._extra)
                raise AssertionError("unreachable")  # pragma: no cover
            end = 16 + size
            if have < end:
                return None
            # Zero the CRC field in place: the frame copy is then exactly what the CRC covers
            # (parsers never read bytes 12..15), and one crc32 call checks it.
            buf[12:16] = _ZERO4
            if have == end:
                frame = bytes(buf)
                buf.clear()
            else:
                frame = bytes(buf[:end])
                del buf[:end]
            if zlib.crc32(frame) != crc:
                raise BadCRC(f"frame CRC {crc:#010x} but contents give {zlib.crc32(frame):#010x}")
            return entry[1](frame, size, version, id)
        except ProtocolError as exc:
            self._error = exc
            buf.clear()
            raise
        except Exception as exc:  # pragma: no cover - a parser bug must still look like this
            err = ProtocolError(f"undecodable frame: {exc!r}")
            self._error = err
            buf.clear()
            raise err from exc

    def __iter__(self) -> Iterator[Message]:
        """Every whole message buffered so far."""
        while (msg := self.next_message()) is not None:
            yield msg
