"""The memory backend: an in-process underlay shared by any number of drivers.

``MemoryUnderlay`` is one simulated L3 network. Every driver that uses it binds its listen
addresses (``vxlan/listen_ip``:``listen_port`` of its devices) on it; an address can be bound
by one driver only (``AddressInUse``), so each driver has its own underlay IP(s).

Delivery is **synchronous and in order**: ``send`` calls the receiving mux's callback before it
returns, so a frame sent by a guest on node A has been decapsulated on node B and queued on the
B guest's port by the time A's ``await port.send(frame)`` returns. Nothing is reordered, no task
is involved, and tests need no waiting. The call chain is bounded: the receive path only ever
delivers to guest ports, it never transmits. A datagram to an address nobody bound is counted
(``no_listener``) and vanishes, as UDP would.

The outer UDP source port is ``protocol.vxlan.source_port(flow_hash)``; receivers see
``Point(src listen ip, that port)`` as the sender. ``tap(callback)`` lets tests see every
datagram (as a ``Datagram``); ``refuse`` (a predicate) makes ``send`` return False for chosen
datagrams, modelling a full socket buffer; ``deliver`` injects a hand-made datagram.

Give a driver either the underlay itself (``OverlayDriver(underlay)``) or a per-driver view
(``OverlayDriver(underlay.backend())``, which releases its addresses when the driver stops).

``MemoryVnicPort`` is a VNIC's tenant side: ``await port.send(frame)`` is the guest
transmitting, ``await port.receive()`` waits for the next frame delivered to the guest, and
``port.received()`` drains what has been delivered so far without waiting. It holds at most
``capacity`` undelivered frames; beyond that deliveries are refused (and counted by the VNIC).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import trio

from protocol.vxlan import source_port

from .backend import DatagramReceiver, FrameSink
from .types import AddressInUse, Point

PORT_CAPACITY = 4096


@dataclass(frozen=True, slots=True)
class Datagram:
    src: Point  # listen ip, hashed source port
    dst: Point
    payload: bytes


class MemoryUnderlay:
    """An in-process underlay network; implements the ``Backend`` protocol."""

    def __init__(self) -> None:
        self._bound: dict[tuple[bytes, int], DatagramReceiver] = {}
        self._taps: list[Callable[[Datagram], None]] = []
        self.refuse: Callable[[Datagram], bool] | None = None
        self.counters: dict[str, int] = {"sent": 0, "delivered": 0, "no_listener": 0, "refused": 0}
        self._sources: dict[tuple[bytes, int], Point] = {}  # interned outer source points

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Nothing to run (delivery is synchronous); may be run by any number of drivers."""
        task_status.started()
        await trio.sleep_forever()

    async def bind(self, listen: Point, receiver: DatagramReceiver) -> None:
        key = (listen.ip, listen.port)
        if key in self._bound:
            raise AddressInUse(f"underlay address {listen} is already bound")
        self._bound[key] = receiver

    async def unbind(self, listen: Point) -> None:
        self._bound.pop((listen.ip, listen.port), None)

    def bound(self) -> list[Point]:
        return [Point(ip, port) for ip, port in self._bound]

    def send(self, src: Point, dst: Point, payload: bytes, flow_hash: int) -> bool:
        key = (src.ip, source_port(flow_hash))
        outer_src = self._sources.get(key)
        if outer_src is None:
            outer_src = self._sources[key] = Point(*key)
        if self._taps or self.refuse is not None:
            datagram = Datagram(outer_src, dst, payload)
            if self.refuse is not None and self.refuse(datagram):
                self.counters["refused"] += 1
                return False
            for tap in self._taps:
                tap(datagram)
        self.counters["sent"] += 1
        self._to(dst, payload, outer_src)
        return True

    def deliver(self, src: Point, dst: Point, payload: bytes) -> None:
        """Inject a datagram as if ``src`` had sent it (tests: malformed or spoofed frames)."""
        self._to(dst, payload, src)

    def _to(self, dst: Point, payload: bytes, src: Point) -> None:
        receiver = self._bound.get((dst.ip, dst.port))
        if receiver is None:
            self.counters["no_listener"] += 1
            return
        self.counters["delivered"] += 1
        receiver(payload, src)

    def tap(self, callback: Callable[[Datagram], None]) -> Callable[[], None]:
        """Call ``callback`` for every datagram sent; returns a function that removes it."""
        self._taps.append(callback)
        return lambda: self._taps.remove(callback)

    def capture(self) -> list[Datagram]:
        """A list that collects every datagram sent from now on (for tests)."""
        captured: list[Datagram] = []
        self._taps.append(captured.append)
        return captured

    def vnic_port(self, device: str, mac: bytes, vlan: int) -> MemoryVnicPort:
        return MemoryVnicPort()

    def backend(self) -> MemoryBackend:
        """A per-driver view of this underlay (its bindings are released when it stops)."""
        return MemoryBackend(self)


class MemoryBackend:
    """One driver's attachment to a ``MemoryUnderlay``; implements ``Backend``.

    Same behaviour as using the underlay directly, except that the addresses bound through it
    are unbound when its ``run()`` ends, so a stopped (or "restarted") node frees its addresses.
    """

    def __init__(self, underlay: MemoryUnderlay) -> None:
        self.underlay = underlay
        self._mine: set[Point] = set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            task_status.started()
            await trio.sleep_forever()
        finally:
            for listen in self._mine:
                self.underlay._bound.pop((listen.ip, listen.port), None)
            self._mine.clear()

    async def bind(self, listen: Point, receiver: DatagramReceiver) -> None:
        await self.underlay.bind(listen, receiver)
        self._mine.add(listen)

    async def unbind(self, listen: Point) -> None:
        self._mine.discard(listen)
        await self.underlay.unbind(listen)

    def send(self, src: Point, dst: Point, payload: bytes, flow_hash: int) -> bool:
        return self.underlay.send(src, dst, payload, flow_hash)

    def vnic_port(self, device: str, mac: bytes, vlan: int) -> MemoryVnicPort:
        return MemoryVnicPort()


class MemoryVnicPort:
    """The tenant side of a VNIC in memory: a guest that tests drive by hand."""

    def __init__(self, capacity: int = PORT_CAPACITY) -> None:
        self.capacity = capacity
        self._transmit: FrameSink | None = None
        self._inbox: deque[bytes] = deque()
        self._lot = trio.lowlevel.ParkingLot()

    # driver side
    def attach(self, transmit: FrameSink) -> None:
        self._transmit = transmit

    def detach(self) -> None:
        self._transmit = None

    def deliver(self, frame: bytes) -> bool:
        if len(self._inbox) >= self.capacity:
            return False
        self._inbox.append(frame)
        self._lot.unpark_all()
        return True

    # guest side
    @property
    def attached(self) -> bool:
        return self._transmit is not None

    def send_nowait(self, frame: bytes) -> None:
        """The guest transmits ``frame`` (an untagged Ethernet frame); synchronous."""
        if self._transmit is None:
            raise RuntimeError("this VNIC port is not attached to a VNIC (removed?)")
        self._transmit(bytes(frame))

    async def send(self, frame: bytes) -> None:
        self.send_nowait(frame)
        await trio.lowlevel.checkpoint()

    async def receive(self) -> bytes:
        while not self._inbox:
            await self._lot.park()
        frame = self._inbox.popleft()
        await trio.lowlevel.cancel_shielded_checkpoint()
        return frame

    def received(self) -> list[bytes]:
        """Every frame delivered and not yet received, oldest first (drains the inbox)."""
        frames = list(self._inbox)
        self._inbox.clear()
        return frames

    def pending(self) -> int:
        return len(self._inbox)
