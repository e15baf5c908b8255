"""Observers of an in-process node: its overlay driver and VNICs, reporting to `Events`.

`ObservedDriver` is an `OverlayDriver` that prints its upcalls (lookups taken, answered,
dropped), cache fills and removals, and the frames varpd injects; the VNICs it adds become
`ObservedVnic`s, which print deliveries and firewall decisions. They only add printing: the
driver's behaviour is the parent class's. Who called the driver is looked up on the stack
for readable text only (best effort; nothing depends on it but wording).
"""

from __future__ import annotations

import sys
import time
from typing import Any

from lab.scenario import Events, ms
from protocol.addr import format_mac
from protocol.ethernet import ETH_P_ARP
from varpd.shim.device import Vnic
from varpd.shim.driver import OverlayDriver
from varpd.shim.types import Point

#: who called the driver, for readable event text (best effort; only wording depends on it)
_CALLERS = {
    "arp": "proxy ARP: portolan answered VL3",
    "_apply_vl3": "shootdown VL3: re-resolved with portolan",
    "_apply_vl2": "shootdown VL2",
}


def _caller() -> str:
    frame = sys._getframe(2)
    return _CALLERS.get(frame.f_code.co_name, frame.f_code.co_name)


class ObservedDriver(OverlayDriver):
    """The overlay driver of one node, printing its upcalls and cache changes."""

    def __init__(self, backend: Any, node: str, events: Events) -> None:
        super().__init__(backend)
        self.node = node
        self.events = events
        self._asked: dict[int, tuple[Any, float]] = {}

    async def next_lookup(self) -> Any:
        req = await super().next_lookup()
        self._asked[req.req_id] = (req, time.perf_counter())
        if req.sap == ETH_P_ARP:
            what = f"{self.events.frame(req.frame)}: upcall to varpd (proxy ARP)"
        else:
            what = f"miss for {self.events.mac(req.dst_mac)}: upcall to varpd (req {req.req_id})"
        self.events(self.node, what)
        return req

    def respond(self, req_id: int, point: Point) -> None:
        asked = self._asked.pop(req_id, None)
        if asked is not None:
            req, t = asked
            took = ms(time.perf_counter() - t)
            self.events(
                self.node,
                f"VL2 answer from portolan in {took}: {self.events.mac(req.dst_mac)} is at "
                f"{self.events.point(point)}; cache filled, waiting frame sent",
            )
        super().respond(req_id, point)

    def drop(self, req_id: int) -> None:
        asked = self._asked.pop(req_id, None)
        if asked is not None and asked[0].sap != ETH_P_ARP:
            self.events(self.node, f"lookup of {self.events.mac(asked[0].dst_mac)} dropped")
        super().drop(req_id)

    def cache_set(self, name: str, mac: bytes, point: Point | None, drop: bool = False) -> None:
        super().cache_set(name, mac, point, drop)
        self.events(
            self.node,
            f"{_caller()}; cache set {self.events.mac(mac)} -> {self.events.point(point)}",
        )

    def cache_remove(self, name: str, mac: bytes) -> None:
        super().cache_remove(name, mac)
        self.events(self.node, f"{_caller()}; cache entry of {self.events.mac(mac)} removed")

    def inject(self, name: str, frame: bytes, *, bypass_filter: bool = True) -> None:
        self.events(self.node, f"varpd injects towards the guests: {self.events.frame(frame)}")
        super().inject(name, frame, bypass_filter=bypass_filter)

    def add_vnic(self, name: str, mac: bytes, vlan: int = 0, port: Any = None) -> Any:
        vnic = super().add_vnic(name, mac, vlan, port)
        vnic.__class__ = ObservedVnic  # same object, with observed transmit/to_guest
        vnic.node = self.node
        vnic.events = self.events
        return vnic


class ObservedVnic(Vnic):
    """A shim VNIC that reports deliveries and firewall decisions."""

    node: str
    events: Events

    def transmit(self, frame: bytes) -> None:
        before = self.counters["filter_drop_out"]
        super().transmit(frame)
        if self.filter is not None:
            verdict = "BLOCKED" if self.counters["filter_drop_out"] > before else "allowed"
            self.events(self.node, f"firewall {verdict} outbound {self.events.frame(frame)}")

    def to_guest(self, frame: bytes, filtered: bool = True) -> None:
        before = self.counters["filter_drop_in"]
        delivered = self.counters["rx_frames"]
        super().to_guest(frame, filtered)
        who = self.events.macs.get(self.mac, format_mac(self.mac))
        if filtered and self.filter is not None:
            verdict = "BLOCKED" if self.counters["filter_drop_in"] > before else "allowed"
            self.events(
                self.node, f"firewall {verdict} inbound to {who}: {self.events.frame(frame)}"
            )
        if self.counters["rx_frames"] > delivered:
            self.events(self.node, f"guest {who} received {self.events.frame(frame)}")
