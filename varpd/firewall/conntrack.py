"""Connection tracking for one VNIC: a bounded LRU table of flows with per-state timeouts.

Keys are normalised to the VNIC's point of view, so both directions of a flow find the same
entry: ``(proto, local address, remote address, local port, remote port)`` where a packet
going OUT has local = source and a packet coming IN has local = destination. ICMP echo flows
use the echo identifier for both ports (requests and replies carry the same one); AH/ESP
flows use 0, 0.

A ``Flow`` remembers who opened it (``origin``, a direction), which directions have been seen,
a TCP state, its expiry time and ``first``, the tuple the rules judged when the flow was created
(``(direction, family, proto, remote address int, match key)``) so that a policy change can
re-judge it and drop flows the new rules no longer allow.

Timeouts (``Timeouts``; every packet of the flow pushes the expiry out again):

=====================  =========  ==================================================
TCP new                30 s       only one side seen yet (SYN sent, or mid-stream pickup)
TCP established        1 h        packets seen both ways, no FIN/RST yet
TCP closing            2 min      after a FIN or RST from either side
UDP                    60 s
ICMP echo              30 s
other (AH/ESP)         60 s       only flows an ALLOW rule created
=====================  =========  ==================================================

A SYN (without ACK) on a closing flow re-opens it as new (port reuse).

Bound: at most ``max_flows`` entries. The table is an ``OrderedDict`` in least-recently-used
order (a hit moves the entry to the end); inserting into a full table first drops expired
entries from the cold end, then evicts the least recently used flow (counted in
``counters["evicted"]``). Expired entries are also removed lazily when looked up, and
``expire()`` sweeps the whole table (varpd may call it from a timer).

Time comes from ``clock`` (``time.monotonic`` by default; tests pass a fake one). Nothing here
awaits or does I/O: the table is used from the shim's synchronous frame path.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Final

from .packet import (
    PROTO_ICMP,
    PROTO_ICMP6,
    PROTO_TCP,
    PROTO_UDP,
    TCP_ACK,
    TCP_FIN,
    TCP_RST,
    TCP_SYN,
)

FlowKey = tuple[int, bytes, bytes, int, int]
FirstPacket = tuple[int, int, int, int, int]  # direction, family, proto, remote int, match key

TCP_NEW: Final = 0
TCP_ESTABLISHED: Final = 1
TCP_CLOSING: Final = 2
STATE_NAMES: Final = {TCP_NEW: "new", TCP_ESTABLISHED: "established", TCP_CLOSING: "closing"}

BOTH_WAYS: Final = 0b110  # bit 1 << Direction.IN | 1 << Direction.OUT

DEFAULT_MAX_FLOWS: Final = 32768


@dataclass(frozen=True, slots=True)
class Timeouts:
    tcp_new: float = 30.0
    tcp_established: float = 3600.0
    tcp_closing: float = 120.0
    udp: float = 60.0
    icmp: float = 30.0
    other: float = 60.0


class Flow:
    """One tracked flow; see the module docstring."""

    __slots__ = ("origin", "seen", "state", "expires", "first")

    def __init__(self, origin: int, first: FirstPacket) -> None:
        self.origin = origin
        self.seen = 1 << origin
        self.state = TCP_NEW
        self.expires = 0.0
        self.first = first

    def __repr__(self) -> str:
        return (
            f"<Flow origin {self.origin} state {STATE_NAMES.get(self.state, self.state)} "
            f"seen {self.seen:#b} expires {self.expires:.1f}>"
        )


class Conntrack:
    """The flow table of one VNIC (bounded, LRU, with timeouts)."""

    def __init__(
        self,
        max_flows: int = DEFAULT_MAX_FLOWS,
        timeouts: Timeouts | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_flows < 1:
            raise ValueError(f"max_flows must be at least 1, got {max_flows}")
        self.max_flows = max_flows
        self.timeouts = timeouts or Timeouts()
        self.clock = clock
        self.table: OrderedDict[FlowKey, Flow] = OrderedDict()
        self.counters: dict[str, int] = {"created": 0, "evicted": 0, "expired": 0, "flushed": 0}

    def __len__(self) -> int:
        return len(self.table)

    def __contains__(self, key: FlowKey) -> bool:
        flow = self.table.get(key)
        return flow is not None and flow.expires > self.clock()

    def items(self) -> Iterator[tuple[FlowKey, Flow]]:
        return iter(list(self.table.items()))

    def lookup(self, key: FlowKey, now: float) -> Flow | None:
        """The live flow for ``key`` (moved to the hot end), or None; drops it if expired."""
        table = self.table
        flow = table.get(key)
        if flow is None:
            return None
        if flow.expires <= now:
            del table[key]
            self.counters["expired"] += 1
            return None
        table.move_to_end(key)
        return flow

    def create(
        self, key: FlowKey, origin: int, first: FirstPacket, tcp_flags: int, now: float
    ) -> Flow:
        """Start tracking ``key`` (replacing any entry) after the packet that opened it."""
        table = self.table
        if key in table:
            del table[key]
        elif len(table) >= self.max_flows:
            self._make_room(now)
        flow = Flow(origin, first)
        table[key] = flow
        self.counters["created"] += 1
        self.update(flow, key[0], origin, tcp_flags, now)
        return flow

    def update(self, flow: Flow, proto: int, direction: int, tcp_flags: int, now: float) -> None:
        """Account a packet of ``flow``: TCP state and the new expiry time."""
        t = self.timeouts
        flow.seen |= 1 << direction
        if proto == PROTO_TCP:
            if tcp_flags & (TCP_FIN | TCP_RST):
                flow.state = TCP_CLOSING
            elif flow.state == TCP_CLOSING:
                if tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN:
                    flow.state = TCP_NEW
                    flow.seen = 1 << direction
            elif flow.seen == BOTH_WAYS:
                flow.state = TCP_ESTABLISHED
            state = flow.state
            if state == TCP_ESTABLISHED:
                flow.expires = now + t.tcp_established
            elif state == TCP_NEW:
                flow.expires = now + t.tcp_new
            else:
                flow.expires = now + t.tcp_closing
        elif proto == PROTO_UDP:
            flow.expires = now + t.udp
        elif proto in (PROTO_ICMP, PROTO_ICMP6):
            flow.expires = now + t.icmp
        else:
            flow.expires = now + t.other

    def _make_room(self, now: float) -> None:
        table = self.table
        # Cold entries that have expired go first (cheap: stop at the first live one).
        while table:
            key, flow = next(iter(table.items()))
            if flow.expires > now:
                break
            del table[key]
            self.counters["expired"] += 1
        while len(table) >= self.max_flows:
            table.popitem(last=False)
            self.counters["evicted"] += 1

    def remove(self, key: FlowKey) -> bool:
        return self.table.pop(key, None) is not None

    def expire(self, now: float | None = None) -> int:
        """Drop every expired flow; returns how many."""
        now = self.clock() if now is None else now
        dead = [k for k, f in self.table.items() if f.expires <= now]
        for k in dead:
            del self.table[k]
        self.counters["expired"] += len(dead)
        return len(dead)

    def retain(self, keep: Callable[[FlowKey, Flow], bool]) -> int:
        """Drop every flow for which ``keep`` is false (policy change); returns how many."""
        dead = [k for k, f in self.table.items() if not keep(k, f)]
        for k in dead:
            del self.table[k]
        self.counters["flushed"] += len(dead)
        return len(dead)

    def clear(self) -> None:
        self.counters["flushed"] += len(self.table)
        self.table.clear()
