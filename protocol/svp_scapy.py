"""Scapy dissector and builder for SVP (see ``protocol.svp`` for the wire format).

``SVP`` is the 16-byte header; the body is a separate layer chosen by ``op`` (PING and PONG
have none). The layers are bound to TCP port 1296 in both directions, so a capture of SVP
traffic dissects without further setup once this module is imported.

Building: leave ``size`` and ``crc`` as ``None`` and ``post_build`` fills them (size = body
bytes, CRC = zlib CRC-32 of the header with the CRC field zeroed followed by the body).
Several frames may be stacked, ``SVP()/SVPVL2Request()/SVP(op=1)``: each header counts only
the bytes up to the next ``SVP`` layer.

Dissecting: a header hands its body layer exactly ``size`` bytes; whatever follows in the
same buffer (pipelined frames in one TCP segment) is dissected as another ``SVP`` stacked
after it, so ``pkt[SVP:2]`` is the second frame. Bytes a body struct does not use show up as
``Raw`` after that body. Scapy here is a viewer: it neither checks CRCs nor refuses an op in
the wrong version; ``protocol.svp.Decoder`` is the validating parser.
"""

import struct
import zlib

from scapy.config import conf
from scapy.fields import (
    ByteField,
    FieldLenField,
    FieldListField,
    IntEnumField,
    IntField,
    IP6Field,
    MACField,
    PacketListField,
    ShortEnumField,
    ShortField,
    StrField,
    XIntField,
    XShortField,
    XStrFixedLenField,
)
from scapy.layers.inet import TCP
from scapy.packet import Packet, bind_layers

from protocol.svp import LOG_ENTRY_SIZE, BulkType, LogType, Op, Status, VL3Type

__all__ = [
    "SVP",
    "SVP_PORT",
    "SVPBulkAck",
    "SVPBulkRequest",
    "SVPLogAck",
    "SVPLogRemove",
    "SVPLogRemoveAck",
    "SVPLogRequest",
    "SVPLogRouteEntry",
    "SVPLogVL2Entry",
    "SVPLogVL3Entry",
    "SVPRouteAck",
    "SVPRouteRequest",
    "SVPShootdown",
    "SVPVL2Ack",
    "SVPVL2Request",
    "SVPVL3Ack",
    "SVPVL3Request",
]

SVP_PORT = 1296

_OPS = {op.value: op.name for op in Op}
_STATUS = {s.value: s.name for s in Status}
_VL3_TYPES = {t.value: t.name for t in VL3Type}
_BULK_TYPES = {t.value: t.name for t in BulkType}
_LOG_TYPES = {t.value: t.name for t in LogType}
_ZERO_ID = b"\x00" * 16


class SVP(Packet):
    name = "SVP"
    fields_desc = [
        ShortField("ver", 1),
        ShortEnumField("op", 1, _OPS),
        IntField("size", None),
        XIntField("id", 0),
        XIntField("crc", None),
    ]

    def post_build(self, pkt: bytes, pay: bytes) -> bytes:
        # ``pay`` holds this frame's body and, if frames are stacked, the frames after it.
        nxt = self.payload.getlayer(SVP) if self.payload else None
        body_len = len(pay) - (len(bytes(nxt)) if nxt is not None else 0)
        if self.size is None:
            pkt = pkt[:4] + struct.pack(">I", body_len) + pkt[8:]
        if self.crc is None:
            crc = zlib.crc32(pkt[:12] + b"\x00\x00\x00\x00" + pay[:body_len])
            pkt = pkt[:12] + struct.pack(">I", crc) + pkt[16:]
        return pkt + pay

    def extract_padding(self, s: bytes) -> tuple[bytes, bytes]:
        return s[: self.size], s[self.size :]

    def dissect(self, s: bytes) -> None:
        # As Packet.dissect, except that bytes after this frame are the next frame rather
        # than padding.
        s = self.pre_dissect(s)
        s = self.do_dissect(s)
        s = self.post_dissect(s)
        body, rest = self.extract_padding(s)
        self.do_dissect_payload(body)
        if rest:
            nxt: Packet
            if len(rest) >= 16:
                try:
                    nxt = SVP(rest, _internal=1, _underlayer=self)
                except Exception:
                    nxt = conf.raw_layer(rest, _internal=1, _underlayer=self)
            else:
                nxt = conf.raw_layer(rest, _internal=1, _underlayer=self)
            self.add_payload(nxt)

    def mysummary(self) -> str:
        return self.sprintf("SVP v%SVP.ver% %SVP.op% id=%SVP.id% size=%SVP.size%")


class SVPVL2Request(Packet):
    name = "SVP VL2_REQ"
    fields_desc = [
        MACField("mac", "00:00:00:00:00:00"),
        XShortField("pad", 0),
        IntField("vnetid", 0),
    ]


class SVPVL2Ack(Packet):
    name = "SVP VL2_ACK"
    fields_desc = [
        ShortEnumField("status", 0, _STATUS),  # u16 in this message only
        ShortField("port", 0),
        IP6Field("addr", "::"),
    ]


class SVPVL3Request(Packet):
    name = "SVP VL3_REQ"
    fields_desc = [
        IP6Field("ip", "::"),
        IntEnumField("type", 1, _VL3_TYPES),
        IntField("vnetid", 0),
    ]


class SVPVL3Ack(Packet):
    name = "SVP VL3_ACK"
    fields_desc = [
        IntEnumField("status", 0, _STATUS),
        MACField("mac", "00:00:00:00:00:00"),
        ShortField("port", 0),
        IP6Field("addr", "::"),
    ]


class SVPBulkRequest(Packet):
    name = "SVP BULK_REQ"
    fields_desc = [IntEnumField("type", 1, _BULK_TYPES)]


class SVPBulkAck(Packet):
    name = "SVP BULK_ACK"
    fields_desc = [
        IntEnumField("status", 0, _STATUS),
        IntEnumField("type", 1, _BULK_TYPES),
        StrField("data", b""),
    ]


class SVPLogRequest(Packet):
    name = "SVP LOG_REQ"
    fields_desc = [IntField("count", 1024), IP6Field("ip", "::")]


class _LogEntry(Packet):
    def extract_padding(self, s: bytes) -> tuple[bytes, bytes]:
        return b"", s  # the rest belongs to the next entry


class SVPLogVL2Entry(_LogEntry):
    name = "SVP log VL2 entry"
    fields_desc = [
        IntEnumField("type", 1, _LOG_TYPES),
        XStrFixedLenField("id", _ZERO_ID, 16),
        MACField("mac", "00:00:00:00:00:00"),
        XShortField("pad", 0),
        IntField("vnetid", 0),
    ]


class SVPLogVL3Entry(_LogEntry):
    name = "SVP log VL3 entry"
    fields_desc = [
        IntEnumField("type", 2, _LOG_TYPES),
        XStrFixedLenField("id", _ZERO_ID, 16),
        IP6Field("ip", "::"),
        XShortField("pad", 0),
        ShortField("vlan", 0),
        IntField("vnetid", 0),
    ]


class SVPLogRouteEntry(_LogEntry):
    name = "SVP log ROUTE entry"
    fields_desc = [
        IntEnumField("type", 3, _LOG_TYPES),
        XStrFixedLenField("id", _ZERO_ID, 16),
        IntField("src_vnetid", 0),
        IntField("dst_vnetid", 0),
        IntField("dcid", 0),
        IP6Field("srcip", "::"),
        IP6Field("dstip", "::"),
        ShortField("src_vlan", 0),
        ShortField("dst_vlan", 0),
        ByteField("src_prefixlen", 0),
        ByteField("dst_prefixlen", 0),
        XShortField("pad", 0),
    ]


_ENTRY_LAYERS: dict[int, type[Packet]] = {
    LogType.VL2: SVPLogVL2Entry,
    LogType.VL3: SVPLogVL3Entry,
    LogType.ROUTE: SVPLogRouteEntry,
}


def _next_entry(pkt: Packet, lst: list, cur: Packet | None, remain: bytes) -> type[Packet] | None:
    """Pick the next LOG_ACK entry layer from its type word; stop at anything unknown or cut
    short (those bytes then dissect as Raw)."""
    if len(remain) < 4:
        return None
    entry_type = struct.unpack(">I", remain[:4])[0]
    layer = _ENTRY_LAYERS.get(entry_type)
    if layer is None or len(remain) < LOG_ENTRY_SIZE[entry_type]:
        return None
    return layer


class SVPLogAck(Packet):
    name = "SVP LOG_ACK"
    fields_desc = [
        IntEnumField("status", 0, _STATUS),
        PacketListField("entries", [], next_cls_cb=_next_entry),
    ]


class SVPLogRemove(Packet):
    name = "SVP LOG_RM"
    fields_desc = [
        FieldLenField("count", None, count_of="ids", fmt="I"),
        # length_from (not count_from): a lying count cannot make dissection loop.
        FieldListField(
            "ids",
            [],
            XStrFixedLenField("id", _ZERO_ID, 16),
            length_from=lambda pkt: 16 * pkt.count,
        ),
    ]


class SVPLogRemoveAck(Packet):
    name = "SVP LOG_RM_ACK"
    fields_desc = [IntEnumField("status", 0, _STATUS)]


class SVPShootdown(Packet):
    name = "SVP SHOOTDOWN"
    fields_desc = [
        MACField("mac", "00:00:00:00:00:00"),
        XShortField("pad", 0),
        IntField("vnetid", 0),
    ]


class SVPRouteRequest(Packet):
    name = "SVP ROUTE_REQ"
    fields_desc = [
        IntField("vnetid", 0),
        ShortField("vlan", 0),
        XShortField("pad", 0),
        IP6Field("srcip", "::"),
        IP6Field("dstip", "::"),
    ]


class SVPRouteAck(Packet):
    name = "SVP ROUTE_ACK"
    fields_desc = [
        IntEnumField("status", 0, _STATUS),
        IntField("dcid", 0),
        IntField("vnetid", 0),
        ShortField("vlan", 0),
        ShortField("port", 0),
        IP6Field("ul3ip", "::"),
        MACField("srcmac", "00:00:00:00:00:00"),
        MACField("dstmac", "00:00:00:00:00:00"),
        ByteField("src_prefixlen", 0),
        ByteField("dst_prefixlen", 0),
        XShortField("pad", 0),
    ]


BODY_LAYERS: dict[Op, type[Packet]] = {
    Op.VL2_REQ: SVPVL2Request,
    Op.VL2_ACK: SVPVL2Ack,
    Op.VL3_REQ: SVPVL3Request,
    Op.VL3_ACK: SVPVL3Ack,
    Op.BULK_REQ: SVPBulkRequest,
    Op.BULK_ACK: SVPBulkAck,
    Op.LOG_REQ: SVPLogRequest,
    Op.LOG_ACK: SVPLogAck,
    Op.LOG_RM: SVPLogRemove,
    Op.LOG_RM_ACK: SVPLogRemoveAck,
    Op.SHOOTDOWN: SVPShootdown,
    Op.ROUTE_REQ: SVPRouteRequest,
    Op.ROUTE_ACK: SVPRouteAck,
}

for _op, _layer in BODY_LAYERS.items():
    bind_layers(SVP, _layer, op=int(_op))
bind_layers(TCP, SVP, dport=SVP_PORT)
bind_layers(TCP, SVP, sport=SVP_PORT)
