"""LookupIndex: the in-memory VL2 / VL3 / underlay / route index behind every SVP answer.

Theory of operation
-------------------
The store is the source of truth; the index is a projection of it that answers SVP lookups
with a few dict probes and never touches disk. ``load(snapshot)`` builds it from a
``store.Snapshot``; after every committed change the Directory calls ``apply(change)`` with an
``IndexChange`` listing what was written (and the previous state of every VNIC it replaced or
removed), before the call that made the change returns. So an answer is never older than the
last change committed by this process. A full (re)load can be built off the trio thread:
``prepare(snapshot)`` (pure, touches nothing shared) in a worker thread, then
``install(prepared)`` on the owning thread swaps it in with no await in between.

Layout: keyed by the request's own wire bytes, so the SVP server's lookup lane probes with a
slice of the frame (no int or tuple building), and with as few objects per lookup as
possible (at a million VNICs every object touched is a cache and TLB miss):

- every CN gets a small int *slot* for the life of the tables (``_slot``: uuid -> slot; the
  slot int objects are shared, one per CN). Per slot: ``_uuid``, ``_ul`` ((port, ip16) or
  None once the CN is removed), ``_vl2_body`` (the whole VL2_ACK body of an OK answer:
  status u16 0, port u16, ip16; 20 bytes), ``_vl2_zbody`` (the same behind 4 zero bytes: the
  reply's CRC runs over its zeroed CRC field and body) and ``_tail`` (port u16 + ip16, the
  end of a VL3_ACK body).
- ``_vl2``: ``mac[6] 00 00 vnet u32`` (12 bytes: the VL2_REQ body with its pad zeroed) -> slot.
- ``_vl3``: ``ip16 type u32 vnet u32`` (24 bytes: the VL3_REQ body with the canonical type,
  IP for v4-mapped addresses and IPV6 otherwise, as varpd sends) -> ``00 00 00 00 mac[6]
  slot u32`` (one 14-byte object per VNIC; its first 10 bytes start the VL3_ACK body).
- ``_by_ul``: ul ip16 -> [cn_uuid, ...] (unique in practice; a list so duplicates can be seen)
- ``_routes``: (vnet_id, vlan_id) -> [compiled route, ...] most specific first
- ``_flat2`` / ``_flat3``: the same two maps again as ``FlatTable`` s, for the lane: open
  addressing over fixed-size records (``key | state | value``) in one mmap, so a hit reads
  one record where a dict reads its index slot, entry and key object (each a cache and TLB
  miss at a million keys). They mirror the dicts, which stay the authority: a live record
  always agrees with its dict, a key may be missing (a full table), so a probe that ends on
  an empty record asks the dict. Built by ``prepare`` at twice the keys, never resized.

``vl2()`` / ``vl3()`` are one dict probe and one list index. The SVP lane answers a hit
with one flat record and one list index (a precomputed reply body). Answers go through the
CN's slot, so a CN's underlay change is a few list writes whatever the number of its VNICs.

Invariants
----------
- vnet ids are < 2**24 (the VXLAN VNI): a VNIC with a larger one is not indexed and a lookup
  with one misses.
- Every ``_vl3`` value names the ``_vl2`` entry of the same (mac, vnet) with the same slot
  (``apply`` removes before it adds; a VNIC put writes both).
- Every live record of ``_flat2`` / ``_flat3`` is in ``_vl2`` / ``_vl3`` with the same value
  (every dict write or delete is mirrored; a record that cannot be written is left dead).
- A slot, once given to a CN uuid, is that CN's until the next ``load``; removing the CN only
  clears the slot's ``_ul`` / ``_vl2_body`` / ``_vl2_zbody`` / ``_tail`` (its VNICs then
  miss).
- ``version`` is the store version the index reflects (the last applied change's).
- Only the owning trio thread mutates the index; lookups are plain reads (no awaits), so a
  lookup never sees half of a change.
"""

from __future__ import annotations

import ipaddress
import mmap
import socket
import struct
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from typing import Any

from protocol.addr import ip_to_wire

from .model import ComputeNode, Route, RouteAnswer, Vnic

VNET_LIMIT = 1 << 24
_V4_MAPPED_HI = 0xFFFF << 32
_ZERO_MAC = b"\x00" * 6


def ip_int(text: str) -> int:
    """The 128-bit wire value of a canonical IP text (IPv4 as v4-mapped)."""
    if ":" in text:
        return int.from_bytes(socket.inet_pton(socket.AF_INET6, text), "big")
    return _V4_MAPPED_HI | int.from_bytes(socket.inet_pton(socket.AF_INET, text), "big")


@dataclass(frozen=True, slots=True)
class IndexChange:
    """What one committed transaction changed, for ``LookupIndex.apply``.

    ``vnics_removed`` holds the *previous* state of every VNIC the change removed or replaced
    (a moved VNIC, an IP change); ``vnics_put`` the new states. ``cns_removed`` and
    ``routes_removed`` hold uuids / route keys.
    """

    version: int
    cns_put: tuple[ComputeNode, ...] = ()
    cns_removed: tuple[str, ...] = ()
    vnics_put: tuple[Vnic, ...] = ()
    vnics_removed: tuple[Vnic, ...] = ()
    routes_put: tuple[Route, ...] = ()
    routes_removed: tuple[tuple[int, int, str, str], ...] = ()

    @property
    def touches_mappings(self) -> bool:
        return bool(
            self.cns_put
            or self.cns_removed
            or self.vnics_put
            or self.vnics_removed
            or self.routes_put
            or self.routes_removed
        )


@dataclass(frozen=True, slots=True)
class _CompiledRoute:
    route: Route
    src_net: ipaddress.IPv4Network | ipaddress.IPv6Network
    dst_net: ipaddress.IPv4Network | ipaddress.IPv6Network
    ul: tuple[int, bytes] | None  # static remote (port, ip16)


def _compile(r: Route) -> _CompiledRoute:
    ul = (r.r_ul_port, ip_to_wire(r.r_ul_ip)) if r.r_ul_ip else None
    return _CompiledRoute(r, ipaddress.ip_network(r.subnet), ipaddress.ip_network(r.r_subnet), ul)


def _route_order(c: _CompiledRoute) -> tuple[int, int, str, str]:
    return (-c.dst_net.prefixlen, -c.src_net.prefixlen, c.route.subnet, c.route.r_subnet)


def _ack_prefixlen(net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> int:
    return net.prefixlen  # IPv4 terms for IPv4 subnets (ROUTE_ACK, spec/svp.md §5)


_K2 = struct.Struct(">HI2xI")  # mac (hi16, lo32), vnet: the VL2 key from a mac int
_K3_TAIL = struct.Struct(">II")  # type, vnet: the end of a VL3 key
_V3 = struct.Struct(">4x6sI")  # (status 0), mac, slot: a VL3 value
_V3_INT = struct.Struct(">4xHII")  # the same from a mac int
_V3_SLOT = struct.Struct(">I")  # the slot at offset 10 of a VL3 value


def _slot3(value: bytes) -> int:
    """The CN slot of a ``_vl3`` value."""
    return _V3_SLOT.unpack_from(value, 10)[0]


_VL2_BODY = struct.Struct(">HH16s")  # status, port, ip16
_TAIL = struct.Struct(">H16s")  # port, ip16
_V4_PREFIX = b"\x00" * 10 + b"\xff\xff"
_TYPE_IP = 1  # VL3Type.IP
_TYPE_IPV6 = 2  # VL3Type.IPV6


def _ip16(text: str) -> bytes:
    if ":" in text:
        return socket.inet_pton(socket.AF_INET6, text)
    return _V4_PREFIX + socket.inet_aton(text)


def vl2_key(mac: bytes, vnet_id: int) -> bytes:
    """The ``_vl2`` key: the VL2_REQ body (mac, zero pad, vnet u32)."""
    return mac + b"\x00\x00" + vnet_id.to_bytes(4, "big")


def vl3_key(ip16: bytes, vnet_id: int) -> bytes:
    """The ``_vl3`` key: the VL3_REQ body with the canonical ip type."""
    kind = _TYPE_IP if ip16[:12] == _V4_PREFIX else _TYPE_IPV6
    return ip16 + _K3_TAIL.pack(kind, vnet_id)


_EMPTY_REC, _LIVE_REC, _DEAD_REC = 0, 1, 2
_FLAT_MIN = 4096  # records
_FLAT_FILL = 0.7  # at most this share of records used (live or dead)
FLAT_VL2 = struct.Struct(">12sBxH")  # VL2 key, state, slot
FLAT_VL3 = struct.Struct(">24sBx10sH2x")  # VL3 key, state, status 0 + mac, slot
_FLAT_SLOT_LIMIT = 1 << 16  # a slot must fit the records' u16


class FlatTable:
    """A read-mostly hash table for the SVP lookup lane, mirroring one of the index's dicts.

    Open addressing with linear probing over fixed-size records ``key | state u8 | value``
    (``FLAT_VL2`` / ``FLAT_VL3``) in one anonymous mmap, huge pages asked for. A hit reads one
    record, where a dict reads its index slot, its entry and the key object: at a million
    keys each of those is a cache (and TLB) miss, so this is what keeps a lookup's cost
    nearly flat in the number of VNICs. The probe hashes with ``hash(key)`` (salted per
    process; tables never leave it).

    The dict stays the authority: every live record is in the dict with the same value, but
    a key of the dict may be missing here (the table was full, or its slot does not fit a
    u16), so a probe that ends on an empty record must fall back on the dict. Never resized:
    sized when built at twice the keys (at least 4096 records), it stops taking new keys at
    70% of its records used (live or deleted); the next full load builds a fresh one.
    """

    __slots__ = ("rec", "size", "klen", "buf", "mask", "end", "used", "limit")

    def __init__(self, rec: struct.Struct, klen: int, count: int) -> None:
        records = 1 << max(_FLAT_MIN.bit_length() - 1, (2 * count).bit_length())
        self.rec, self.size, self.klen = rec, rec.size, klen
        self.buf = mmap.mmap(-1, records * rec.size)
        if hasattr(mmap, "MADV_HUGEPAGE"):
            try:
                self.buf.madvise(mmap.MADV_HUGEPAGE)
            except OSError:
                pass
        self.mask = records - 1
        self.end = records * rec.size
        self.used = 0
        self.limit = int(records * _FLAT_FILL)

    def fill(self, keys: Iterable[bytes], *values: Iterable[Any]) -> None:
        """Add keys not in the table (a fresh build), with their values (one iterable per
        value field, in step with ``keys``), until the table is full."""
        pack_into, klen = self.rec.pack_into, self.klen
        buf, mask, size, end = self.buf, self.mask, self.size, self.end
        used, limit = self.used, self.limit
        for key, *value in zip(keys, *values, strict=True):
            if used >= limit:
                break
            off = (hash(key) & mask) * size
            while buf[off + klen]:
                off += size
                if off == end:
                    off = 0
            pack_into(buf, off, key, _LIVE_REC, *value)
            used += 1
        self.used = used

    def _locate(self, key: bytes) -> tuple[int, int]:
        """(offset of the live record of ``key`` or -1, offset of the first free record)."""
        unpack_from, buf, size, end = self.rec.unpack_from, self.buf, self.size, self.end
        off = (hash(key) & self.mask) * size
        free = -1
        while True:
            row = unpack_from(buf, off)
            state = row[1]
            if state == _EMPTY_REC:
                return -1, off if free < 0 else free
            if state == _LIVE_REC:
                if row[0] == key:
                    return off, free
            elif free < 0:
                free = off
            off += size
            if off == end:
                off = 0

    def get(self, key: bytes) -> tuple[Any, ...] | None:
        """The value of ``key``'s live record, or None (then ask the dict)."""
        off, _ = self._locate(key)
        return None if off < 0 else self.rec.unpack_from(self.buf, off)[2:]

    def put(self, key: bytes, *value: Any) -> bool:
        """Set ``key``'s value; False (and no record of it left live) if it cannot be held."""
        off, free = self._locate(key)
        if off < 0:
            if self.buf[free + self.klen] == _EMPTY_REC:
                if self.used >= self.limit:
                    return False
                self.used += 1
            off = free
        try:
            self.rec.pack_into(self.buf, off, key, _LIVE_REC, *value)
        except struct.error:
            self.buf[off + self.klen] = _DEAD_REC
            return False
        return True

    def discard(self, key: bytes) -> None:
        off, _ = self._locate(key)
        if off >= 0:
            self.buf[off + self.klen] = _DEAD_REC

    def __len__(self) -> int:
        """Records in use (live or deleted)."""
        return self.used


@dataclass(slots=True)
class PreparedIndex:
    """A whole index built by ``LookupIndex.prepare`` (any thread), for ``install``."""

    version: int
    slot: dict[str, int]
    uuid: list[str]
    ul: list[tuple[int, bytes] | None]
    vl2_body: list[bytes | None]
    vl2_zbody: list[bytes | None]
    tail: list[bytes | None]
    by_ul: dict[bytes, list[str]]
    vl2: dict[bytes, int]
    vl3: dict[bytes, bytes]
    routes: dict[tuple[int, int], list[_CompiledRoute]]
    flat2: FlatTable | None = None
    flat3: FlatTable | None = None


class LookupIndex:
    def __init__(self) -> None:
        self.install(self.prepare(_EMPTY))

    # -- lookups (the SVP hot path) -----------------------------------------------------------
    def vl2(self, mac: bytes, vnet_id: int) -> tuple[int, bytes] | None:
        """(ul port, ul ip16) of the CN holding ``mac`` in ``vnet_id``, or None."""
        if not 0 <= vnet_id < VNET_LIMIT or len(mac) != 6:
            return None
        slot = self._vl2.get(bytes(mac) + b"\x00\x00" + vnet_id.to_bytes(4, "big"))
        if slot is None:
            return None
        return self._ul[slot]

    def vl3(self, ip16: bytes, vnet_id: int) -> tuple[bytes, int, bytes] | None:
        """(mac, ul port, ul ip16) for overlay IP ``ip16`` (16 wire bytes) in ``vnet_id``."""
        if not 0 <= vnet_id < VNET_LIMIT or len(ip16) != 16:
            return None
        v = self._vl3.get(vl3_key(bytes(ip16), vnet_id))
        if v is None:
            return None
        mac, slot = _V3.unpack(v)
        ul = self._ul[slot]
        if ul is None:
            return None
        return (mac, ul[0], ul[1])

    def wire_tables(
        self,
    ) -> tuple[
        dict[bytes, int],
        FlatTable,
        list[bytes | None],
        list[bytes | None],
        dict[bytes, bytes],
        FlatTable,
        list[bytes | None],
    ]:
        """(``_vl2``, ``_flat2``, ``_vl2_body``, ``_vl2_zbody``, ``_vl3``, ``_flat3``,
        ``_tail``) for the SVP server's lookup lane, which probes them with slices of request
        frames (layout in the module docstring): the flat table first, the dict when the
        probe ends on an empty record. Valid until the caller next awaits (``install``
        replaces them); read-only."""
        return (
            self._vl2,
            self._flat2,
            self._vl2_body,
            self._vl2_zbody,
            self._vl3,
            self._flat3,
            self._tail,
        )

    def cns_for_underlay_ip(self, ip16: bytes) -> list[str]:
        """The CN(s) whose underlay address is ``ip16`` (LOG_REQ needs exactly one)."""
        return list(self._by_ul.get(bytes(ip16), ()))

    def cn(self, uuid: str) -> tuple[int, bytes] | None:
        """(ul port, ul ip16) of a CN."""
        slot = self._slot.get(uuid)
        return None if slot is None else self._ul[slot]

    def route(self, vnet_id: int, vlan: int, src16: bytes, dst16: bytes) -> RouteAnswer | None:
        """ROUTE_REQ: the most specific route of (vnet, vlan) whose subnet holds ``src16``
        and whose r_subnet holds ``dst16``; the remote answer from a VL3 lookup of the
        destination in the route's remote vnet, else the route's static remote underlay."""
        routes = self._routes.get((vnet_id, vlan))
        if not routes or len(src16) != 16 or len(dst16) != 16:
            return None
        src = ipaddress.IPv6Address(src16)
        dst = ipaddress.IPv6Address(dst16)
        src_ip = src.ipv4_mapped or src
        dst_ip = dst.ipv4_mapped or dst
        for c in routes:
            if src_ip.version != c.src_net.version or dst_ip.version != c.dst_net.version:
                continue
            if src_ip not in c.src_net or dst_ip not in c.dst_net:
                continue
            r = c.route
            hit = self.vl3(dst16, r.r_vnet_id)
            if hit is not None:
                dst_mac, port, addr = hit
            elif c.ul is not None:
                port, addr = c.ul
                dst_mac = r.r_dst_mac or _ZERO_MAC
            else:
                continue
            return RouteAnswer(
                dc_id=r.r_dc_id,
                vnet_id=r.r_vnet_id,
                vlan=r.r_vlan_id,
                port=port,
                addr=addr,
                src_mac=r.r_send_mac,
                dst_mac=dst_mac,
                src_prefixlen=_ack_prefixlen(c.src_net),
                dst_prefixlen=_ack_prefixlen(c.dst_net),
            )
        return None

    # -- iteration (BULK, admin) ------------------------------------------------------------
    def vl2_items(self) -> Iterator[tuple[bytes, int, int, bytes]]:
        """Every resolvable VL2 mapping as (mac, vnet_id, ul port, ul ip16). Safe across
        changes (iterates a copy); ``vl2_records`` is the cheap form for a bounded count."""
        return self._vl2_iter(list(self._vl2.items()))

    def vl3_items(self) -> Iterator[tuple[bytes, int, bytes, int, bytes]]:
        """Every resolvable VL3 mapping as (ip16, vnet_id, mac, ul port, ul ip16)."""
        return self._vl3_iter(list(self._vl3.items()))

    def vl2_records(self, limit: int) -> tuple[int, list[tuple[bytes, int, int, bytes]]]:
        """(number of VL2 mappings held, the first ``limit`` resolvable ones as ``vl2_items``
        yields them, in the index's iteration order), without copying the table."""
        return len(self._vl2), list(islice(self._vl2_iter(self._vl2.items()), max(limit, 0)))

    def vl3_records(self, limit: int) -> tuple[int, list[tuple[bytes, int, bytes, int, bytes]]]:
        """(number of VL3 mappings held, the first ``limit`` resolvable ones)."""
        return len(self._vl3), list(islice(self._vl3_iter(self._vl3.items()), max(limit, 0)))

    def _vl2_iter(
        self, items: Iterable[tuple[bytes, int]]
    ) -> Iterator[tuple[bytes, int, int, bytes]]:
        ul_of = self._ul
        for key, slot in items:
            ul = ul_of[slot]
            if ul is not None:
                yield key[:6], int.from_bytes(key[8:], "big"), ul[0], ul[1]

    def _vl3_iter(
        self, items: Iterable[tuple[bytes, bytes]]
    ) -> Iterator[tuple[bytes, int, bytes, int, bytes]]:
        ul_of = self._ul
        unpack = _V3.unpack
        for key, v in items:
            mac, slot = unpack(v)
            ul = ul_of[slot]
            if ul is not None:
                yield key[:16], int.from_bytes(key[20:], "big"), mac, ul[0], ul[1]

    # -- sizes, for metrics and tests -------------------------------------------------------
    def __len__(self) -> int:
        return len(self._vl2)

    def stats(self) -> dict[str, int]:
        return {
            "cns": sum(ul is not None for ul in self._ul),
            "vnics": len(self._vl2),
            "vl3": len(self._vl3),
            "routes": sum(len(v) for v in self._routes.values()),
            "version": self.version,
        }

    # -- maintenance --------------------------------------------------------------------------
    def load(self, snapshot: Any) -> None:
        """Replace the whole index with the contents of a ``store.Snapshot``
        (``install(prepare(snapshot))``; build it in a worker thread to keep it off the
        event loop)."""
        self.install(self.prepare(snapshot))

    @staticmethod
    def prepare(snapshot: Any) -> PreparedIndex:
        """Build a whole index from a ``store.Snapshot``. Pure: safe in a worker thread."""
        p = PreparedIndex(snapshot.version, {}, [], [], [], [], [], {}, {}, {}, {})
        for cn in snapshot.cns:
            _set_cn(p, cn)
        slot_of = p.slot
        vl2: dict[bytes, int] = {}
        vl3: dict[bytes, bytes] = {}
        k2_pack, k3_pack, v3_pack = _K2.pack, _K3_TAIL.pack, _V3_INT.pack
        v4_prefix = _V4_PREFIX
        inet_aton = socket.inet_aton
        inet_pton, af6 = socket.inet_pton, socket.AF_INET6
        for mac, ip, vnet, cn_uuid in snapshot.vnics:
            if not 0 <= vnet < VNET_LIMIT:
                continue
            slot = slot_of.get(cn_uuid)
            if slot is None:
                slot = _new_slot(p, sys.intern(cn_uuid))
            hi, lo = mac >> 32, mac & 0xFFFFFFFF
            vl2[k2_pack(hi, lo, vnet)] = slot
            if ":" in ip:
                ip16 = inet_pton(af6, ip)
                kind = _TYPE_IP if ip16[:12] == v4_prefix else _TYPE_IPV6
            else:
                ip16 = v4_prefix + inet_aton(ip)
                kind = _TYPE_IP
            vl3[ip16 + k3_pack(kind, vnet)] = v3_pack(hi, lo, slot)
        p.vl2, p.vl3 = vl2, vl3
        # the flat tables: every key whose slot fits the records' u16 (all, in practice)
        p.flat2 = flat2 = FlatTable(FLAT_VL2, 12, len(vl2))
        p.flat3 = flat3 = FlatTable(FLAT_VL3, 24, len(vl3))
        slots3 = [_slot3(v) for v in vl3.values()]
        if len(slot_of) <= _FLAT_SLOT_LIMIT:
            flat2.fill(vl2.keys(), vl2.values())
            flat3.fill(vl3.keys(), [v[:10] for v in vl3.values()], slots3)
        else:
            fit2 = [k for k, s in vl2.items() if s < _FLAT_SLOT_LIMIT]
            flat2.fill(fit2, [vl2[k] for k in fit2])
            fit3 = [(k, v[:10], s) for (k, v), s in zip(vl3.items(), slots3, strict=True)]
            fit3 = [row for row in fit3 if row[2] < _FLAT_SLOT_LIMIT]
            flat3.fill([r[0] for r in fit3], [r[1] for r in fit3], [r[2] for r in fit3])
        for r in snapshot.routes:
            p.routes.setdefault((r.vnet_id, r.vlan_id), []).append(_compile(r))
        for lst in p.routes.values():
            lst.sort(key=_route_order)
        return p

    def install(self, p: PreparedIndex) -> None:
        """Make ``p`` (from ``prepare``) the whole index. No await inside: atomic for trio."""
        self._slot, self._uuid, self._ul = p.slot, p.uuid, p.ul
        self._vl2_body, self._vl2_zbody, self._tail = p.vl2_body, p.vl2_zbody, p.tail
        self._by_ul = p.by_ul
        self._vl2, self._vl3, self._routes = p.vl2, p.vl3, p.routes
        assert p.flat2 is not None and p.flat3 is not None
        self._flat2, self._flat3 = p.flat2, p.flat3
        self.version = p.version
        self._prepared = p

    def apply(self, change: IndexChange) -> None:
        """Apply one committed change (removals first, then puts)."""
        p = self._prepared
        for uuid in change.cns_removed:
            _drop_cn(p, uuid)
        for cn in change.cns_put:
            _set_cn(p, cn)
        for v in change.vnics_removed:
            self._drop_vnic(v)
        self._put_vnics(change.vnics_put)
        for key in change.routes_removed:
            self._drop_route(key)
        for r in change.routes_put:
            self._drop_route(r.key)
            lst = self._routes.setdefault((r.vnet_id, r.vlan_id), [])
            lst.append(_compile(r))
            lst.sort(key=_route_order)
        if change.version > self.version:
            self.version = change.version

    def _drop_vnic(self, v: Vnic) -> None:
        if not 0 <= v.vnet_id < VNET_LIMIT:
            return
        k2 = vl2_key(v.mac, v.vnet_id)
        self._vl2.pop(k2, None)
        self._flat2.discard(k2)
        k3 = vl3_key(_ip16(v.ip), v.vnet_id)
        held = self._vl3.get(k3)
        if held is not None and held[4:10] == v.mac:
            del self._vl3[k3]
            self._flat3.discard(k3)

    def _put_vnics(self, vnics: Iterable[Vnic]) -> None:
        p = self._prepared
        for v in vnics:
            if not 0 <= v.vnet_id < VNET_LIMIT:
                continue
            slot = p.slot.get(v.cn_uuid)
            if slot is None:
                slot = _new_slot(p, sys.intern(v.cn_uuid))
            k2 = vl2_key(v.mac, v.vnet_id)
            self._vl2[k2] = slot
            self._flat2.put(k2, slot)
            k3 = vl3_key(_ip16(v.ip), v.vnet_id)
            self._vl3[k3] = held = _V3.pack(v.mac, slot)
            self._flat3.put(k3, held[:10], slot)

    def _drop_route(self, key: tuple[int, int, str, str]) -> None:
        lst = self._routes.get((key[0], key[1]))
        if not lst:
            return
        lst[:] = [c for c in lst if c.route.key != key]
        if not lst:
            del self._routes[(key[0], key[1])]


def _new_slot(p: PreparedIndex, uuid: str) -> int:
    """Give ``uuid`` a slot (no address yet: its VNICs miss until the CN is put)."""
    slot = len(p.uuid)
    p.slot[uuid] = slot
    p.uuid.append(uuid)
    p.ul.append(None)
    p.vl2_body.append(None)
    p.vl2_zbody.append(None)
    p.tail.append(None)
    return slot


def _set_cn(p: PreparedIndex, cn: ComputeNode) -> None:
    _drop_cn(p, cn.uuid)
    uuid = sys.intern(cn.uuid)
    slot = p.slot.get(uuid)
    if slot is None:
        slot = _new_slot(p, uuid)
    ul = ip_to_wire(cn.ip)
    p.ul[slot] = (cn.port, ul)
    p.vl2_body[slot] = body = _VL2_BODY.pack(0, cn.port, ul)
    p.vl2_zbody[slot] = bytes(4) + body
    p.tail[slot] = _TAIL.pack(cn.port, ul)
    p.by_ul.setdefault(ul, []).append(uuid)


def _drop_cn(p: PreparedIndex, uuid: str) -> None:
    slot = p.slot.get(uuid)
    if slot is None:
        return
    old = p.ul[slot]
    if old is None:
        return
    p.ul[slot] = p.vl2_body[slot] = p.vl2_zbody[slot] = p.tail[slot] = None
    lst = p.by_ul.get(old[1])
    if lst is not None:
        if uuid in lst:
            lst.remove(uuid)
        if not lst:
            del p.by_ul[old[1]]


@dataclass(frozen=True, slots=True)
class _EmptySnapshot:
    version: int = 0
    cns: tuple[()] = ()
    vnics: tuple[()] = ()
    routes: tuple[()] = ()


_EMPTY = _EmptySnapshot()


__all__ = [
    "IndexChange",
    "LookupIndex",
    "PreparedIndex",
    "RouteAnswer",
    "ip_int",
    "vl2_key",
    "vl3_key",
]
