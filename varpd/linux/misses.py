"""Kernel misses turned into lookups: one outstanding lookup per key, a short negative
memory, a bounded wait queue; and the frames that carry a miss to the plugins.

A miss is ``(device, kind, key)``: kind "l2" with a MAC (the vxlan device has no fdb entry
for it), or "l3" with an IP text (a tenant's ARP request or Neighbor Solicitation reached
the vxlan ``proxy`` and no permanent neighbour entry answers it). `MissTracker.miss`
decides what happens to each notification:

- **pending**: a lookup for that key is already waiting or outstanding -> counted
  (``suppressed_pending``), nothing else. At most one lookup per key at any time.
- **negative**: a lookup for that key ended without an answer less than ``negative_ttl``
  (1 s) ago -> counted (``suppressed_negative``). A tenant that keeps asking for an unknown
  address costs at most one lookup per key per ``negative_ttl``.
- **full**: ``max_waiting`` misses already wait for a lookup worker -> counted
  (``dropped_full``) and forgotten; the kernel repeats the miss on the next frame.
- otherwise **queued**; `pop` hands it to ``next_lookup`` (FIFO), `new_request` numbers it.

``finish(miss, negative)`` ends the key's lookup (respond/drop/answered by inject);
``forget(device)`` drops everything of a device (deleted, disassociated); ``forgive(device,
key)`` clears a negative memory (an operator's cache set, a shootdown).

The plugins see a miss as the frame the shim would have queued (`varpd.shim.types.
LookupRequest`): an L2 miss as a unicast IPv4 frame to the MAC, an L3 miss as an ARP
request (IPv4) or a Neighbor Solicitation with a source link-layer option (IPv6) for the
IP, sent by `REQUESTER_MAC`. So the svp/files plugins run their existing VL2 and proxy
ARP/NDP paths unchanged; the driver recognises the replies they inject.

Everything here is synchronous except `pop`; it runs in the trio thread.
"""

from __future__ import annotations

import collections
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address, ip_address

import trio

from protocol.ethernet import (
    ARP_REQUEST,
    BROADCAST_MAC,
    ETH_P_IPV6,
    NDP_OPT_SLLA,
    build_arp,
    build_l2_header,
    icmpv6_checksum,
)

#: the (locally administered) source MAC of synthesised requests; never a real VNIC's
REQUESTER_MAC = b"\x02\x70\x76\x00\x00\x01"
REQUESTER_IP6 = IPv6Address("fe80::70:76ff:fe00:1").packed
ETH_P_IPV4 = 0x0800
ICMPV6_NS = 135
IPPROTO_ICMPV6 = 58
DEFAULT_MAX_WAITING = 256
DEFAULT_NEGATIVE_TTL = 1.0
_NEGATIVE_MAX = 65536

TRACKER_COUNTERS = (
    "misses_l2",
    "misses_l3",
    "suppressed_pending",
    "suppressed_negative",
    "dropped_full",
)


@dataclass(eq=False)
class Miss:
    device: str
    kind: str  # "l2" | "l3"
    key: bytes | str  # MAC bytes for l2, IP text for l3
    req_id: int | None = None
    answered: bool = False
    queued_at: float = field(default_factory=time.monotonic)

    @property
    def ident(self) -> tuple[str, str, bytes | str]:
        return (self.device, self.kind, self.key)


class MissTracker:
    """Dedupe, negative memory and the bounded queue of kernel misses (module docstring)."""

    def __init__(
        self,
        max_waiting: int = DEFAULT_MAX_WAITING,
        negative_ttl: float = DEFAULT_NEGATIVE_TTL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_waiting = max_waiting
        self.negative_ttl = negative_ttl
        self.clock = clock
        self.counters: dict[str, int] = dict.fromkeys(TRACKER_COUNTERS, 0)
        self._waiting: collections.deque[Miss] = collections.deque()
        self._pending: dict[tuple[str, str, bytes | str], Miss] = {}
        self._outstanding: dict[int, Miss] = {}
        self._negative: dict[tuple[str, str, bytes | str], float] = {}
        self._next_id = 1
        self._wakeup = trio.Event()

    # ------------------------------------------------------------------ intake

    def miss(self, device: str, kind: str, key: bytes | str) -> str:
        """Account one kernel miss; returns queued | pending | negative | full."""
        self.counters["misses_" + kind] += 1
        ident = (device, kind, key)
        if ident in self._pending:
            self.counters["suppressed_pending"] += 1
            return "pending"
        until = self._negative.get(ident)
        if until is not None:
            if self.clock() < until:
                self.counters["suppressed_negative"] += 1
                return "negative"
            del self._negative[ident]
        if len(self._waiting) >= self.max_waiting:
            self.counters["dropped_full"] += 1
            return "full"
        miss = Miss(device, kind, key)
        self._pending[ident] = miss
        self._waiting.append(miss)
        self._wakeup.set()
        return "queued"

    async def pop(self) -> Miss:
        while not self._waiting:
            self._wakeup = trio.Event()
            await self._wakeup.wait()
        return self._waiting.popleft()

    def new_request(self, miss: Miss) -> int:
        req_id = self._next_id
        self._next_id = self._next_id + 1 if self._next_id < 2**63 else 1
        miss.req_id = req_id
        self._outstanding[req_id] = miss
        return req_id

    # ------------------------------------------------------------------ outcomes

    def take(self, req_id: int) -> Miss | None:
        return self._outstanding.pop(req_id, None)

    def outstanding_l3(self, device: str, ip: str) -> Miss | None:
        miss = self._pending.get((device, "l3", ip))
        return miss if miss is not None and miss.req_id is not None else None

    def finish(self, miss: Miss, negative: bool) -> None:
        if self._pending.get(miss.ident) is miss:
            del self._pending[miss.ident]
        if miss.req_id is not None:
            self._outstanding.pop(miss.req_id, None)
        if negative:
            if len(self._negative) >= _NEGATIVE_MAX:
                now = self.clock()
                self._negative = {k: v for k, v in self._negative.items() if v > now}
                if len(self._negative) >= _NEGATIVE_MAX:
                    self._negative.clear()
            self._negative[miss.ident] = self.clock() + self.negative_ttl

    def forgive(self, device: str, kind: str, key: bytes | str) -> None:
        self._negative.pop((device, kind, key), None)

    def forget(self, device: str) -> None:
        self._waiting = collections.deque(m for m in self._waiting if m.device != device)
        for ident in [i for i in self._pending if i[0] == device]:
            del self._pending[ident]
        for req_id in [r for r, m in self._outstanding.items() if m.device == device]:
            del self._outstanding[req_id]
        for ident in [i for i in self._negative if i[0] == device]:
            del self._negative[ident]

    # ------------------------------------------------------------------ gauges

    def waiting(self) -> int:
        return len(self._waiting)

    def outstanding(self) -> int:
        return len(self._outstanding)


# ---------------------------------------------------------------------- synthesised frames


def l2_miss_frame(mac: bytes) -> bytes:
    """A minimal unicast IPv4 frame to ``mac`` (what the shim would have queued)."""
    return build_l2_header(mac, REQUESTER_MAC, ETH_P_IPV4) + bytes(46)


def _solicited_node(target: bytes) -> bytes:
    return bytes.fromhex("ff0200000000000000000001ff") + target[13:]


def ns_frame(target: IPv6Address) -> bytes:
    """A Neighbor Solicitation for ``target`` from `REQUESTER_MAC` (with an SLLA option)."""
    t16 = target.packed
    dst_ip = _solicited_node(t16)
    icmp = bytearray(
        struct.pack(">BBHI16sBB6s", ICMPV6_NS, 0, 0, 0, t16, NDP_OPT_SLLA, 1, REQUESTER_MAC)
    )
    struct.pack_into(">H", icmp, 2, icmpv6_checksum(REQUESTER_IP6, dst_ip, icmp))
    ip6 = struct.pack(">IHBB16s16s", 6 << 28, len(icmp), IPPROTO_ICMPV6, 255, REQUESTER_IP6, dst_ip)
    dst_mac = b"\x33\x33" + dst_ip[12:]
    return build_l2_header(dst_mac, REQUESTER_MAC, ETH_P_IPV6) + ip6 + bytes(icmp)


def l3_miss_frame(ip: str) -> bytes:
    """An ARP request (IPv4) or NS (IPv6) for ``ip`` from `REQUESTER_MAC`."""
    addr = ip_address(ip)
    if isinstance(addr, IPv4Address):
        return build_arp(
            ARP_REQUEST, REQUESTER_MAC, IPv4Address(0), bytes(6), addr, dst=BROADCAST_MAC
        )
    return ns_frame(addr)
