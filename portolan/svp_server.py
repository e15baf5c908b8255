"""The SVP server: trio, one task per TCP connection, answers from the in-memory index.

Connection loop
---------------
Each connection is one task (``trio.serve_tcp``) running this loop::

    receive_some(64 KiB) -> lookup lane: a run of plain VL2_REQ / VL3_REQ frames, answered
                            straight from the bytes (one struct unpack, CRC, dict gets, encode)
                         -> Decoder: the next frame that is anything else (other ops, a frame
                            cut short, any doubt), then back to the lookup lane
                         -> one send_all of every reply of that receive, in request order

- The lookup lane is the hot path and duplicates only the layout of the two lookup requests:
  it takes a frame only when it is whole, of version 1 or 2, of exactly the op's body size,
  with a correct CRC. Everything else goes to `protocol.svp.Decoder`, the authority on framing
  and errors (a bad CRC in a VL2_REQ is reported by the Decoder, not the lane). The lane runs
  only at frame boundaries; while the Decoder holds a partial frame it gets every byte.

- Replies go out in the order the requests came in (varpd matches by id, portolan's own test
  client and MNX's rely on order). A reply carries its request's id verbatim and its version
  (1 or 2; CONVENTIONS "SVP server decisions").
- Replies are written whole: the replies produced from one receive are joined and written with
  one ``send_all``. The task does not read again until that write is done, so a client that
  does not read its replies stops being read from; TCP flow control pushes back on it and no
  reply queue grows without bound.
- The replies built but not yet sent are bounded too: once the Decoder path (BULK, PING,
  LOG...) has built ``REPLY_FLUSH_BYTES`` (64 KiB) of them, they are sent before the rest of
  the receive is parsed. A 20-byte BULK_REQ may get a reply of ``max_frame`` bytes, so one
  64 KiB read of BULK_REQs would otherwise build 3,276 of them (~200 MB) before the first send;
  now a client that never reads holds at most one receive (64 KiB), the lookup lane's replies
  to it (< 110 KiB: 28-byte requests, 36-44-byte replies) and 64 KiB + one reply of the rest.
- The decoder holds at most one partial frame between receives: its header checks reject a
  declared size over ``max_frame`` before the body is awaited, so a stalled client costs at
  most ``max_frame`` + 16 bytes. A frame not complete ``idle_timeout`` seconds after its first
  byte arrived closes the connection (``idle_timeout`` protocol error): the clock starts with
  the frame, not with the last byte, so a client trickling a byte a second cannot hold a
  partial frame (and its task and buffers) forever. A connection with no partial frame may stay
  idle forever, as portolan always allowed.
- Connections are capped (``max_connections``; ``portolan serve`` derives the default from the
  open-file limit, leaving room for the API, /metrics and the store). Past the cap a new
  connection is accepted and closed at once, counted in
  ``portolan_svp_connections_refused_total`` and logged at most once per 10 s, so the process
  never runs out of file descriptors because of SVP clients.

What is answered
----------------
- PING -> PONG.
- VL2_REQ -> VL2_ACK from ``index.vl2``: OK with underlay port and IP, or NOTFOUND, port 0,
  address ``::``.
- VL3_REQ -> VL3_ACK from ``index.vl3`` (the request's ip type is ignored, as the reference
  does): OK with MAC, underlay port and IP, or NOTFOUND with zeros.
- ROUTE_REQ (v2) -> ROUTE_ACK from ``index.route``; NOTFOUND with zeros when no route matches.
- LOG_REQ -> LOG_ACK: the requester's underlay IP must map to exactly one compute node
  (``index.cns_for_underlay_ip``), otherwise FATAL with no entries. The entries come from
  ``Directory.fetch_log`` (a store read in a worker thread), oldest first, as many as fit so
  that the whole LOG_ACK body, status word included, is at most ``count`` (the server checks
  the sizes again before it sends). (A ``count``
  under 4 still gets the 4-byte empty reply: there is nothing smaller to send.) A ``count`` too
  small for any entry (under 36) is answered OK and empty without reading the store, so such a
  LOG_REQ tells whether the IP is that of exactly one CN even while the store is down
  (``portolan log`` uses it to explain a FATAL).
- LOG_RM -> LOG_RM_ACK after ``Directory.remove_log`` (worker thread). Ids not in the log are
  ignored; ids need not belong to the requester (as the reference).
- Our extension (`protocol.svp_ext`, `portolan.svp_ext_session`): a PING whose body carries
  the extension's magic (HELLO) -> a PONG with the same layout granting LOG_WAIT; once granted,
  LOG_WAIT (op 0x0109) is a LOG_REQ the server may hold until the CN has an entry (or the wait
  passes). It runs as a task of the connection, so it never holds back the replies to later
  requests; everything else stays in request order. Any other PING gets the plain PONG.
- SHOOTDOWN is accepted and counted; it has no reply.
- BULK_REQ -> BULK_ACK in a format of ours (SVP never defined one), see below; an unknown bulk
  type gets BADBULK with empty data.

FATAL is sent only when our side fails (the store raised during LOG_REQ or LOG_RM), in the ack
type of the request, with zeroed fields.

Bulk format (ours)
------------------
BULK_ACK body: ``status u32 | type u32 | total u32 | records...``. ``total`` is the number of
mappings the index holds; the records are the first ones in the index's iteration order
(unspecified, stable while nothing changes), as many as fit in a frame of ``max_frame`` body
bytes. When fewer than ``total`` records came back the answer is partial: the client looks
the rest up one by one. Records:

- ``BulkType.VL2`` (1), 32 bytes: ``mac[6] pad[2] vnet_id u32 port u16 pad[2] ul3_ip[16]``.
- ``BulkType.VL3`` (2), 44 bytes: ``ip[16] vnet_id u32 mac[6] port u16 ul3_ip[16]``.

Malformed input
---------------
A frame the decoder refuses (other version, unknown op, short body, bad CRC, declared size
over the limit, a LOG_RM whose length disagrees with its count), or an ack op sent to the
server (``ack_op``), closes the connection at once; it is counted by kind in
``portolan_svp_protocol_errors_total`` (exact) and logged at most once per kind per 10 s
(`portolan.ratelimit.LogLimiter`; the line after a quiet spell says how many were left out).
Store failures under LOG_REQ/LOG_RM are logged the same way, as one line without traceback. Replies to the valid requests that came before it in
the same read are still sent. No error ever leaves a connection task: anything unexpected is
logged, counted as ``internal`` and closes that connection only; every other connection keeps
working. A client that resets with requests outstanding only loses its own connection.

What may block
--------------
Lookups are dict gets on the index: no I/O, no await. LOG_REQ/LOG_RM await the store in a
worker thread (the Directory's limiter); the connection waits, in order, the others do not.
"""

from __future__ import annotations

import logging
import struct
import time
import zlib
from collections.abc import Iterable
from functools import partial
from typing import Any

import trio

from portolan.index import vl3_key
from portolan.metrics import LATENCY_SAMPLE_EVERY, PortolanMetrics
from portolan.ratelimit import LogLimiter
from portolan.svp_ext_session import DEFAULT_MAX_LOG_WAIT, ExtSession, LogBatcher, LogWaitHub
from protocol.svp import (
    LOG_ENTRY_SIZE,
    BulkAck,
    BulkRequest,
    BulkType,
    Decoder,
    LogAck,
    LogRemove,
    LogRemoveAck,
    LogRequest,
    Ping,
    Pong,
    ProtocolError,
    RouteAck,
    RouteRequest,
    Shootdown,
    Status,
    VL2Request,
    VL3Request,
    encode_vl2_ack,
    encode_vl3_ack,
)

log = logging.getLogger("portolan.svp")

DEFAULT_PORT = 1296
DEFAULT_MAX_FRAME = 64 * 1024
DEFAULT_IDLE_TIMEOUT = 60.0
RECEIVE_SIZE = 64 * 1024
#: replies built by the Decoder path are sent once they reach this many bytes (see above)
REPLY_FLUSH_BYTES = 64 * 1024

ZERO_IP = bytes(16)
ZERO_MAC = bytes(6)

BULK_VL2_RECORD = struct.Struct(">6s2xIH2x16s")
BULK_VL3_RECORD = struct.Struct(">16sI6sH16s")
BULK_HEADER_SIZE = 12  # status, type, total

# The lookup lane's view of the two hot requests (spec/svp.md §2, §5): whole frames.
_HEAD = struct.Struct(">HHI")  # version, op, size
_HEAD_CRC = struct.Struct(">HHI4xI")  # version, op, size, (id), crc
_ZERO4 = bytes(4)
# Replies built by the lane: the header's first 8 bytes (version, op, size) by version, then
# the request's id, the CRC and the body, appended as separate pieces.
_VL2_ACK_HEAD = {v: _HEAD.pack(v, 4, 20) for v in (1, 2)}
_VL3_ACK_HEAD = {v: _HEAD.pack(v, 6, 28) for v in (1, 2)}
_VL2_NOTFOUND_BODY = struct.pack(">HH16s", int(Status.NOTFOUND), 0, bytes(16))
_VL3_NOTFOUND_BODY = struct.pack(">I6sH16s", int(Status.NOTFOUND), bytes(6), 0, bytes(16))
_VL2_NOTFOUND_ZBODY = _ZERO4 + _VL2_NOTFOUND_BODY
# CRC32 state after each reply's first 8 bytes: the id, zero CRC field and body follow
_VL2_ACK_HEAD_CRC = {v: zlib.crc32(h) for v, h in _VL2_ACK_HEAD.items()}
_VL3_ACK_HEAD_CRC = {v: zlib.crc32(h) for v, h in _VL3_ACK_HEAD.items()}
_V3_SLOT = struct.Struct(">I").unpack_from  # the CN slot in a VL3 index value (at offset 10)

_OK = int(Status.OK)
_SMALLEST_LOG_ACK = 4 + min(LOG_ENTRY_SIZE.values())  # status word + the smallest entry
_NOTFOUND = int(Status.NOTFOUND)
_FATAL = int(Status.FATAL)

# Metric keys, built once.
_VL2_OK = ("vl2", "ok")
_VL2_NOTFOUND = ("vl2", "notfound")
_VL3_OK = ("vl3", "ok")
_VL3_NOTFOUND = ("vl3", "notfound")
_STATUS_NAME = {_OK: "ok", _FATAL: "fatal", _NOTFOUND: "notfound", int(Status.BADBULK): "badbulk"}


class AckOpReceived(ProtocolError):
    """A client sent the server a reply op (PONG, VL2_ACK, ...)."""

    kind = "ack_op"


class SvpServer:
    """Answers SVP for one Directory. One object per listening portolan."""

    def __init__(
        self,
        directory: Any,
        *,
        metrics: PortolanMetrics | None = None,
        max_frame: int = DEFAULT_MAX_FRAME,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        max_connections: int | None = None,
        max_log_wait: float = DEFAULT_MAX_LOG_WAIT,
    ) -> None:
        self.directory = directory
        self.metrics = metrics if metrics is not None else PortolanMetrics()
        self.max_frame = max_frame
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections  # None: no cap
        self.connections_refused = 0
        self._log = LogLimiter(log)  # warnings about clients: one per kind per 10 s
        try:
            self.metrics.register(_ConnectionLimitCollector(self))
        except ValueError:  # a second server on the same metrics: the first one reports
            pass
        self._sample_every = LATENCY_SAMPLE_EVERY
        # Requests the Decoder hands over. Sync handlers return the reply frame (or None: no
        # reply); async ones may wait for the store.
        self._sync_handlers: dict[type, Any] = {
            VL2Request: self._vl2,
            VL3Request: self._vl3,
            Ping: self._ping,
            RouteRequest: self._route,
            BulkRequest: self._bulk,
            Shootdown: self._shootdown,
        }
        self._async_handlers = {
            LogRequest: self._log_request,
            LogRemove: self._log_remove,
        }
        # The negotiated extension (protocol.svp_ext): HELLO and held LOG_WAITs; 0 disables
        # LOG_WAIT (HELLO then grants nothing).
        self.max_log_wait = max_log_wait
        self._log_hub = LogWaitHub(directory)
        self._log_batcher = LogBatcher(directory)  # group commit: held reads and LOG_RM

    # ----------------------------------------------------------------------------------------
    # Listening

    async def serve(
        self,
        host: str,
        port: int = DEFAULT_PORT,
        *,
        task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on host:port until cancelled; `started` with the bound (host, port)."""
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(
                partial(trio.serve_tcp, self.handle_connection, port, host=host)
            )
            sockname = listeners[0].socket.getsockname()
            log.info("SVP listening on %s:%d", sockname[0], sockname[1])
            task_status.started((sockname[0], sockname[1]))

    async def handle_connection(self, stream: trio.SocketStream) -> None:
        """Serve one connection until the peer closes it or breaks the protocol."""
        metrics = self.metrics
        cap = self.max_connections
        if cap is not None and metrics.svp_connections_open >= cap:
            # Over the cap: accept-and-close, so the backlog does not fill and the descriptors
            # stay free for the API, /metrics and the store.
            self.connections_refused += 1
            self._log.warning(
                "over_limit",
                "SVP connection from %s refused: %d connections open, the limit is %d "
                "(--svp-max-connections); %d refused since start",
                _peer_name(stream),
                metrics.svp_connections_open,
                cap,
                self.connections_refused,
            )
            await trio.aclose_forcefully(stream)
            return
        metrics.svp_connections_open += 1
        metrics.svp_connections_accepted += 1
        peer = _peer_name(stream)
        try:
            await self._connection_loop(stream, peer)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.debug("SVP connection %s ended: %s", peer, exc)
        except Exception:
            metrics.svp_protocol_errors["internal"] += 1
            self._log.log(
                logging.ERROR,
                "internal",
                "SVP connection %s: internal error, closing it",
                peer,
                exc_info=True,
            )
        finally:
            metrics.svp_connections_open -= 1
            await trio.aclose_forcefully(stream)

    # ----------------------------------------------------------------------------------------
    # The connection loop (hot path)

    async def _connection_loop(self, stream: trio.SocketStream, peer: str) -> None:
        # Held LOG_WAITs (portolan.svp_ext_session) are tasks of this nursery: they end with
        # the connection, and their replies go out through ``ext.send_all`` between ours.
        async with trio.open_nursery() as nursery:
            ext = ExtSession(
                self._log_hub,
                stream,
                nursery,
                self._log_request,
                metrics=self.metrics,
                max_wait=self.max_log_wait,
                batcher=self._log_batcher,
                cns_for_ip=lambda ip: self.directory.index.cns_for_underlay_ip(ip),
            )
            try:
                await self._serve_requests(stream, peer, ext)
            finally:
                nursery.cancel_scope.cancel()

    async def _serve_requests(self, stream: trio.SocketStream, peer: str, ext: ExtSession) -> None:
        metrics = self.metrics
        decoder = Decoder(max_size=self.max_frame)
        ext.attach(decoder)
        lookup_lane = self._lookup_lane
        sync_handlers = ext.handlers(self._sync_handlers)
        async_handlers = self._async_handlers
        receive_some = stream.receive_some
        sample_every = self._sample_every
        batches = 0
        frame_deadline = 0.0  # when the partial frame the decoder holds must be complete
        while True:
            if decoder.buffered:
                # Mid-frame: the rest of it must come idle_timeout after its first byte.
                data = None
                with trio.move_on_at(frame_deadline):
                    data = await receive_some(RECEIVE_SIZE)
                if data is None:
                    metrics.svp_protocol_errors["idle_timeout"] += 1
                    self._log.warning(
                        "idle_timeout",
                        "SVP connection %s: frame not complete %gs after its first byte "
                        "(%d bytes held), closing",
                        peer,
                        self.idle_timeout,
                        decoder.buffered,
                    )
                    return
            else:
                data = await receive_some(RECEIVE_SIZE)
            if not data:
                return
            batches += 1
            started = time.perf_counter() if batches % sample_every == 0 else 0.0
            replies: list[bytes] = []
            failure: ProtocolError | None = None
            have = len(data)
            pos = 0
            held = decoder.buffered  # a frame begun in an earlier receive keeps its deadline
            pending = 0  # bytes of Decoder-path replies built and not yet sent
            try:
                while pos < have:
                    if decoder.buffered:
                        end = have  # finishing a frame begun earlier: the decoder takes it all
                    else:
                        pos = lookup_lane(data, pos, replies)
                        if pos >= have:
                            break
                        end = _frame_end(data, pos)
                    decoder.receive_data(data[pos:end])
                    pos = end
                    while (msg := decoder.next_message()) is not None:
                        held = 0  # the frame held before this receive (if any) is done
                        cls = type(msg)
                        if (handler := sync_handlers.get(cls)) is not None:
                            reply = handler(msg)
                            if reply is None:
                                continue
                        elif (async_handler := async_handlers.get(cls)) is not None:
                            reply = await async_handler(msg)
                        else:
                            raise AckOpReceived(
                                f"{msg.OP.name} is a reply; a server only takes requests"
                            )
                        replies.append(reply)
                        pending += len(reply)
                        if pending >= REPLY_FLUSH_BYTES:
                            # Send before building more (BULK_ACKs are up to max_frame each):
                            # a client that does not read holds this task here, not memory.
                            await ext.send_all(b"".join(replies))
                            replies.clear()
                            pending = 0
            except ProtocolError as exc:
                failure = exc
            if replies:
                await ext.send_all(b"".join(replies) if len(replies) > 1 else replies[0])
            if failure is not None:
                metrics.svp_protocol_errors[failure.kind] += 1
                self._log.warning(
                    failure.kind, "SVP connection %s: %s (%s), closing", peer, failure, failure.kind
                )
                return
            if decoder.buffered and not held:
                # A new partial frame: its first byte came with this receive.
                frame_deadline = trio.current_time() + self.idle_timeout
            if started:
                metrics.svp_lookup_seconds.observe(time.perf_counter() - started)

    def _lookup_lane(self, data: bytes, pos: int, replies: list[bytes]) -> int:
        """Answer the run of plain VL2_REQ/VL3_REQ frames starting at ``pos``; return where
        it stopped. Only whole frames of version 1 or 2, of exactly the op's body size and
        with a correct CRC are taken; anything else (other ops, a frame cut short, any doubt)
        is left for the Decoder, which is the authority on framing and errors.

        The index is probed with the request body itself (``LookupIndex.wire_tables``): a hit
        is one record of the index's flat table found by a slice of the frame (the dict only
        when the probe ends on an empty record) and a list index giving the CN's precomputed
        reply body; the reply is appended as pieces: the 8 constant header bytes (version, op,
        size), the request's id copied verbatim, the CRC and the body."""
        have = len(data)
        counts = self.metrics.svp_requests
        vl2, flat2, vl2_body, vl2_zbody, vl3, flat3, tail_of = self.directory.index.wire_tables()
        buf2, mask2, wrap2, rec2 = flat2.buf, flat2.mask, flat2.end - 1, flat2.rec.unpack_from
        buf3, mask3, end3, rec3 = flat3.buf, flat3.mask, flat3.end, flat3.rec.unpack_from
        crc32 = zlib.crc32
        ok2 = nf2 = ok3 = nf3 = 0
        append = replies.append
        try:
            while have - pos >= 16:
                version, op, size, crc = _HEAD_CRC.unpack_from(data, pos)
                if version != 1 and version != 2:
                    break
                if op == 3 and size == 12:
                    end = pos + 28
                    if end > have:
                        break
                    if (
                        crc32(data[pos + 16 : end], crc32(_ZERO4, crc32(data[pos : pos + 12])))
                        != crc
                    ):
                        break
                    key = data[pos + 16 : end]
                    off = (hash(key) & mask2) << 4  # 16-byte records
                    while True:
                        k, state, slot = rec2(buf2, off)
                        if k == key and state == 1:
                            break
                        if state == 0:  # not in the flat table: the dict is the authority
                            slot = vl2.get(key)
                            if slot is None and key[6:8] != b"\x00\x00":  # pad is not in keys
                                slot = vl2.get(key[:6] + b"\x00\x00" + key[8:])
                            break
                        off = (off + 16) & wrap2
                    body = vl2_body[slot] if slot is not None else None
                    if body is None:
                        body, zbody = _VL2_NOTFOUND_BODY, _VL2_NOTFOUND_ZBODY
                        nf2 += 1
                    else:
                        zbody = vl2_zbody[slot]
                        ok2 += 1
                    rid = data[pos + 8 : pos + 12]
                    append(_VL2_ACK_HEAD[version])
                    append(rid)
                    append(crc32(zbody, crc32(rid, _VL2_ACK_HEAD_CRC[version])).to_bytes(4, "big"))
                    append(body)
                elif op == 5 and size == 24:
                    end = pos + 40
                    if end > have:
                        break
                    if (
                        crc32(data[pos + 16 : end], crc32(_ZERO4, crc32(data[pos : pos + 12])))
                        != crc
                    ):
                        break
                    key = data[pos + 16 : end]
                    off = (hash(key) & mask3) * 40  # 40-byte records
                    while True:
                        k, state, head, slot = rec3(buf3, off)  # head: status 0, mac
                        if k == key and state == 1:
                            break
                        if state == 0:  # not in the flat table: the dict is the authority
                            held = vl3.get(key)
                            if held is None:  # the ip type is ignored: try the canonical one
                                canon = vl3_key(key[:16], 0)[:20] + key[20:]
                                if canon != key:
                                    held = vl3.get(canon)
                            if held is None:
                                head = None
                            else:
                                head, slot = held[:10], _V3_SLOT(held, 10)[0]
                            break
                        off += 40
                        if off == end3:
                            off = 0
                    tail = tail_of[slot] if head is not None else None
                    if tail is None:
                        body = _VL3_NOTFOUND_BODY
                        nf3 += 1
                    else:
                        body = head + tail  # status 0, mac, then port and ip
                        ok3 += 1
                    rid = data[pos + 8 : pos + 12]
                    append(_VL3_ACK_HEAD[version])
                    append(rid)
                    crc = crc32(body, crc32(_ZERO4, crc32(rid, _VL3_ACK_HEAD_CRC[version])))
                    append(crc.to_bytes(4, "big"))
                    append(body)
                else:
                    break
                pos = end
        finally:
            if ok2:
                counts[_VL2_OK] += ok2
            if nf2:
                counts[_VL2_NOTFOUND] += nf2
            if ok3:
                counts[_VL3_OK] += ok3
            if nf3:
                counts[_VL3_NOTFOUND] += nf3
        return pos

    # ----------------------------------------------------------------------------------------
    # Other requests

    def _count(self, op: str | None, status: int | None) -> None:
        if op is None:
            return
        self.metrics.svp_requests[(op, "none" if status is None else _STATUS_NAME[status])] += 1

    def _vl2(self, msg: VL2Request) -> bytes:
        found = self.directory.index.vl2(msg.mac, msg.vnet_id)
        if found is None:
            self.metrics.svp_requests[_VL2_NOTFOUND] += 1
            return encode_vl2_ack(msg.id, msg.version, _NOTFOUND, 0, ZERO_IP)
        self.metrics.svp_requests[_VL2_OK] += 1
        return encode_vl2_ack(msg.id, msg.version, _OK, *found)

    def _vl3(self, msg: VL3Request) -> bytes:
        found = self.directory.index.vl3(msg.ip, msg.vnet_id)
        if found is None:
            self.metrics.svp_requests[_VL3_NOTFOUND] += 1
            return encode_vl3_ack(msg.id, msg.version, _NOTFOUND, ZERO_MAC, 0, ZERO_IP)
        self.metrics.svp_requests[_VL3_OK] += 1
        return encode_vl3_ack(msg.id, msg.version, _OK, *found)

    def _ping(self, msg: Ping) -> bytes:
        self._count("ping", _OK)
        return Pong(msg.id, msg.version).encode()

    def _shootdown(self, msg: Shootdown) -> None:
        self._count("shootdown", None)
        log.debug(
            "SVP SHOOTDOWN for %s in vnet %d accepted (no action)", msg.mac.hex(":"), msg.vnet_id
        )
        return None

    def _route(self, msg: RouteRequest) -> bytes:
        answer = self.directory.index.route(msg.vnet_id, msg.vlan, msg.src_ip, msg.dst_ip)
        if answer is None:
            self._count("route", _NOTFOUND)
            return RouteAck(
                msg.id, _NOTFOUND, 0, 0, 0, 0, ZERO_IP, ZERO_MAC, ZERO_MAC, 0, 0, msg.version
            ).encode()
        self._count("route", _OK)
        return RouteAck(
            msg.id,
            _OK,
            answer.dc_id,
            answer.vnet_id,
            answer.vlan,
            answer.port,
            answer.addr,
            answer.src_mac,
            answer.dst_mac,
            answer.src_prefixlen,
            answer.dst_prefixlen,
            msg.version,
        ).encode()

    def _bulk(self, msg: BulkRequest) -> bytes:
        room = self.max_frame - BULK_HEADER_SIZE
        index = self.directory.index
        if msg.bulk_type == BulkType.VL2:
            total, records = index.vl2_records(_records_fit(BULK_VL2_RECORD, room))
            data = _pack_records(BULK_VL2_RECORD, total, records)
        elif msg.bulk_type == BulkType.VL3:
            total, records = index.vl3_records(_records_fit(BULK_VL3_RECORD, room))
            data = _pack_records(BULK_VL3_RECORD, total, records)
        else:
            self._count("bulk", int(Status.BADBULK))
            return BulkAck(msg.id, int(Status.BADBULK), msg.bulk_type, b"", msg.version).encode()
        self._count("bulk", _OK)
        return BulkAck(msg.id, _OK, msg.bulk_type, data, msg.version).encode()

    async def _log_request(self, msg: LogRequest, op: str | None = "log") -> bytes:
        """LOG_REQ -> LOG_ACK; ``op`` is the metric label (None: not counted; a held LOG_WAIT
        builds its answer here on every wake-up and counts its one reply itself)."""
        cns = self.directory.index.cns_for_underlay_ip(msg.ip)
        if len(cns) != 1:
            self._log.warning(
                "log_req_cn",
                "SVP LOG_REQ from underlay IP %s matches %d compute nodes (need exactly 1)",
                _ip_text(msg.ip),
                len(cns),
            )
            self._count(op, _FATAL)
            return LogAck(msg.id, _FATAL, (), msg.version).encode()
        if msg.count < _SMALLEST_LOG_ACK:
            # No entry fits: answered from the index alone, without the store (`portolan log`
            # relies on this to tell an unknown CN from a store failure).
            self._count(op, _OK)
            return LogAck(msg.id, _OK, (), msg.version).encode()
        try:
            # fetch_log's budget is the whole LOG_ACK body, status word included.
            entries = await self.directory.fetch_log(cns[0], msg.count, msg.version)
        except Exception as exc:
            # One line, rate-limited: during a store outage every CN polls several times a second.
            self._log.error(
                "store",
                "SVP LOG_REQ for compute node %s: cannot read the shootdown log from the store "
                "(%s); answering FATAL",
                cns[0],
                _brief(exc),
            )
            self.metrics.svp_internal_errors["log"] += 1
            self._count(op, _FATAL)
            return LogAck(msg.id, _FATAL, (), msg.version).encode()
        kept = _within_budget(entries, msg.count - 4, msg.version)
        if len(kept) != len(entries):
            log.error(
                "Directory.fetch_log returned %d entries for a %d-byte LOG_ACK; sending %d",
                len(entries),
                msg.count,
                len(kept),
            )
        self._count(op, _OK)
        return LogAck(msg.id, _OK, tuple(kept), msg.version).encode()

    async def _log_remove(self, msg: LogRemove) -> bytes:
        try:
            await self._log_batcher.remove(msg.ids)  # with concurrent LOG_RMs, one commit
        except Exception as exc:
            self._log.error(
                "store",
                "SVP LOG_RM of %d ids: cannot remove them from the store's shootdown log (%s); "
                "answering FATAL",
                len(msg.ids),
                _brief(exc),
            )
            self.metrics.svp_internal_errors["log_rm"] += 1
            self._count("log_rm", _FATAL)
            return LogRemoveAck(msg.id, _FATAL, msg.version).encode()
        self._count("log_rm", _OK)
        return LogRemoveAck(msg.id, _OK, msg.version).encode()


class _ConnectionLimitCollector:
    """``portolan_svp_connections_refused_total`` and ``portolan_svp_connections_limit``."""

    def __init__(self, server: SvpServer) -> None:
        self._server = server

    def collect(self) -> Iterable[Any]:
        from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily

        server = self._server
        yield CounterMetricFamily(
            "portolan_svp_connections_refused",
            "SVP connections accepted and closed at once because the limit was reached",
            value=server.connections_refused,
        )
        if server.max_connections is not None:
            yield GaugeMetricFamily(
                "portolan_svp_connections_limit",
                "most SVP connections served at once (--svp-max-connections)",
                value=server.max_connections,
            )


def _brief(exc: BaseException) -> str:
    """An exception as one short line for the log: its type and first line."""
    first = (str(exc).strip().splitlines() or [""])[0]
    text = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _frame_end(data: bytes, pos: int) -> int:
    """End of the frame starting at ``pos``, or the end of ``data`` if it is not all there."""
    if len(data) - pos < 16:
        return len(data)
    end = pos + 16 + int.from_bytes(data[pos + 4 : pos + 8], "big")
    return end if end <= len(data) else len(data)


def _within_budget(entries: Iterable[Any], budget: int, version: int) -> list[Any]:
    """The leading entries whose sizes sum to at most ``budget``; ROUTE entries only for v2."""
    kept = []
    used = 0
    for entry in entries:
        if entry.TYPE == 3 and version < 2:
            continue
        size = LOG_ENTRY_SIZE[entry.TYPE]
        if used + size > budget:
            break
        used += size
        kept.append(entry)
    return kept


def _records_fit(record: struct.Struct, room: int) -> int:
    """How many records fit in ``room`` bytes after the ``total`` word."""
    return max((room - 4) // record.size, 0)


def _pack_records(record: struct.Struct, total: int, records: Iterable[tuple]) -> bytes:
    pack = record.pack
    return struct.pack(">I", total) + b"".join(pack(*r) for r in records)


def _ip_text(ip16: bytes) -> str:
    from protocol.addr import ip_text

    try:
        return ip_text(ip16)
    except ValueError:
        return ip16.hex()


def _peer_name(stream: trio.SocketStream) -> str:
    try:
        host, port = stream.socket.getpeername()[:2]
    except (OSError, AttributeError, ValueError):
        return "?"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
