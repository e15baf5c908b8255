"""LookupIndex: the in-memory VL2 / VL3 / underlay / route index behind every SVP answer.

Theory of operation
-------------------
The store is the source of truth; the index is a projection of it that answers SVP lookups
with a few dict probes and never touches disk. ``load(snapshot)`` builds it from a
``store.Snapshot``; after every committed change the Directory calls ``apply(change)`` with an
``IndexChange`` listing what was written (and the previous state of every VNIC it replaced or
removed), before the call that made the change returns. So an answer is never older than the
last change committed by this process.

Layout (chosen for the hot path and for a million VNICs in modest memory: no object per VNIC,
just two dict entries keyed by plain ints):

- ``_cns``:   cn_uuid -> (ul port, ul ip16)
- ``_by_ul``: ul ip16 -> [cn_uuid, ...] (unique in practice; a list so duplicates can be seen)
- ``_vl2``:   (mac_int << 24 | vnet_id) -> cn_uuid (interned: one string per CN)
- ``_vl3``:   (ip_int << 24 | vnet_id) -> the VNIC's ``_vl2`` key (the same int object)
- ``_routes``: (vnet_id, vlan_id) -> [compiled route, ...] most specific first

A VL2 answer resolves the VNIC's CN at lookup time, so a CN's underlay change is one dict
write whatever the number of its VNICs. VL3 goes ip -> vl2 key -> CN; the MAC is the key's
upper bits.

Invariants
----------
- vnet ids are < 2**24 (the VXLAN VNI); a lookup with a larger vnet id misses (it would
  otherwise alias another key).
- Every ``_vl3`` value is a key of ``_vl2``; ``apply`` removes before it adds.
- ``version`` is the store version the index reflects (the last applied change's).
- Only the owning trio thread mutates the index; lookups are plain reads (no awaits), so a
  lookup never sees half of a change.
"""

from __future__ import annotations

import ipaddress
import socket
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from protocol.addr import ip_to_wire, mac_to_int

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


class LookupIndex:
    def __init__(self) -> None:
        self.version = 0
        self._cns: dict[str, tuple[int, bytes]] = {}
        self._by_ul: dict[bytes, list[str]] = {}
        self._vl2: dict[int, str] = {}
        self._vl3: dict[int, int] = {}
        self._routes: dict[tuple[int, int], list[_CompiledRoute]] = {}

    # -- lookups (the SVP hot path) -----------------------------------------------------------
    def vl2(self, mac: bytes, vnet_id: int) -> tuple[int, bytes] | None:
        """(ul port, ul ip16) of the CN holding ``mac`` in ``vnet_id``, or None."""
        if not 0 <= vnet_id < VNET_LIMIT or len(mac) != 6:
            return None
        cn = self._vl2.get(int.from_bytes(mac, "big") << 24 | vnet_id)
        if cn is None:
            return None
        return self._cns.get(cn)

    def vl3(self, ip16: bytes, vnet_id: int) -> tuple[bytes, int, bytes] | None:
        """(mac, ul port, ul ip16) for overlay IP ``ip16`` (16 wire bytes) in ``vnet_id``."""
        if not 0 <= vnet_id < VNET_LIMIT or len(ip16) != 16:
            return None
        k2 = self._vl3.get(int.from_bytes(ip16, "big") << 24 | vnet_id)
        if k2 is None:
            return None
        cn = self._vl2.get(k2)
        if cn is None:
            return None
        ul = self._cns.get(cn)
        if ul is None:
            return None
        return ((k2 >> 24).to_bytes(6, "big"), ul[0], ul[1])

    def cns_for_underlay_ip(self, ip16: bytes) -> list[str]:
        """The CN(s) whose underlay address is ``ip16`` (LOG_REQ needs exactly one)."""
        return list(self._by_ul.get(bytes(ip16), ()))

    def cn(self, uuid: str) -> tuple[int, bytes] | None:
        """(ul port, ul ip16) of a CN."""
        return self._cns.get(uuid)

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
        """Every resolvable VL2 mapping as (mac, vnet_id, ul port, ul ip16)."""
        cns = self._cns
        for key, cn in list(self._vl2.items()):
            ul = cns.get(cn)
            if ul is not None:
                yield (key >> 24).to_bytes(6, "big"), key & 0xFFFFFF, ul[0], ul[1]

    def vl3_items(self) -> Iterator[tuple[bytes, int, bytes, int, bytes]]:
        """Every resolvable VL3 mapping as (ip16, vnet_id, mac, ul port, ul ip16)."""
        vl2, cns = self._vl2, self._cns
        for key, k2 in list(self._vl3.items()):
            cn = vl2.get(k2)
            ul = cns.get(cn) if cn is not None else None
            if ul is not None:
                mac = (k2 >> 24).to_bytes(6, "big")
                yield (key >> 24).to_bytes(16, "big"), key & 0xFFFFFF, mac, ul[0], ul[1]

    # -- sizes, for metrics and tests -------------------------------------------------------
    def __len__(self) -> int:
        return len(self._vl2)

    def stats(self) -> dict[str, int]:
        return {
            "cns": len(self._cns),
            "vnics": len(self._vl2),
            "vl3": len(self._vl3),
            "routes": sum(len(v) for v in self._routes.values()),
            "version": self.version,
        }

    # -- maintenance --------------------------------------------------------------------------
    def load(self, snapshot: Any) -> None:
        """Replace the whole index with the contents of a ``store.Snapshot``."""
        cns: dict[str, tuple[int, bytes]] = {}
        by_ul: dict[bytes, list[str]] = {}
        for cn in snapshot.cns:
            uuid = sys.intern(cn.uuid)
            ul = ip_to_wire(cn.ip)
            cns[uuid] = (cn.port, ul)
            by_ul.setdefault(ul, []).append(uuid)
        vl2: dict[int, str] = {}
        vl3: dict[int, int] = {}
        intern = sys.intern
        for mac, ip, vnet, cn_uuid in snapshot.vnics:
            k2 = mac << 24 | vnet
            vl2[k2] = intern(cn_uuid)
            vl3[ip_int(ip) << 24 | vnet] = k2
        routes: dict[tuple[int, int], list[_CompiledRoute]] = {}
        for r in snapshot.routes:
            routes.setdefault((r.vnet_id, r.vlan_id), []).append(_compile(r))
        for lst in routes.values():
            lst.sort(key=_route_order)
        self._cns, self._by_ul, self._vl2, self._vl3, self._routes = cns, by_ul, vl2, vl3, routes
        self.version = snapshot.version

    def apply(self, change: IndexChange) -> None:
        """Apply one committed change (removals first, then puts)."""
        for uuid in change.cns_removed:
            self._drop_cn(uuid)
        for cn in change.cns_put:
            self._put_cn(cn)
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

    def _put_cn(self, cn: ComputeNode) -> None:
        self._drop_cn(cn.uuid)
        uuid = sys.intern(cn.uuid)
        ul = ip_to_wire(cn.ip)
        self._cns[uuid] = (cn.port, ul)
        self._by_ul.setdefault(ul, []).append(uuid)

    def _drop_cn(self, uuid: str) -> None:
        old = self._cns.pop(uuid, None)
        if old is None:
            return
        lst = self._by_ul.get(old[1])
        if lst is not None:
            if uuid in lst:
                lst.remove(uuid)
            if not lst:
                del self._by_ul[old[1]]

    def _drop_vnic(self, v: Vnic) -> None:
        k2 = mac_to_int(v.mac) << 24 | v.vnet_id
        self._vl2.pop(k2, None)
        k3 = ip_int(v.ip) << 24 | v.vnet_id
        if self._vl3.get(k3) == k2:
            del self._vl3[k3]

    def _put_vnics(self, vnics: Iterable[Vnic]) -> None:
        for v in vnics:
            k2 = mac_to_int(v.mac) << 24 | v.vnet_id
            self._vl2[k2] = sys.intern(v.cn_uuid)
            self._vl3[ip_int(v.ip) << 24 | v.vnet_id] = k2

    def _drop_route(self, key: tuple[int, int, str, str]) -> None:
        lst = self._routes.get((key[0], key[1]))
        if not lst:
            return
        lst[:] = [c for c in lst if c.route.key != key]
        if not lst:
            del self._routes[(key[0], key[1])]


__all__ = ["IndexChange", "LookupIndex", "RouteAnswer", "ip_int"]
