"""The mux: one underlay listen address (ip:port), shared by every device bound to it.

Like overlay_mux.c, a mux is keyed by its listen address and demultiplexes received datagrams
by VNI to the devices in it. Validation is illumos' (minimal, spec §1.5): shorter than the
8-byte header -> ``rx_drop_short``; I bit clear -> ``rx_drop_no_i_bit``; reserved bits ignored;
no device with that VNI -> ``rx_drop_unknown_vni``. The outer source address is passed on to the
device, which (beyond illumos) uses it for the spoof check.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from protocol import vxlan

from .types import AlreadyExists, Point

if TYPE_CHECKING:
    from .device import OverlayDevice

MUX_COUNTERS = ("rx_datagrams", "rx_drop_short", "rx_drop_no_i_bit", "rx_drop_unknown_vni")


class Mux:
    def __init__(self, listen: Point, encap: str) -> None:
        self.listen = listen
        self.encap = encap
        self.devices: dict[int, OverlayDevice] = {}
        self.counters: dict[str, int] = dict.fromkeys(MUX_COUNTERS, 0)

    def add(self, device: OverlayDevice) -> None:
        if device.encap != self.encap:
            raise AlreadyExists(
                f"{self.listen} is already used by encapsulation {self.encap}, not {device.encap}"
            )
        if device.vnet_id in self.devices:
            raise AlreadyExists(f"vnetid {device.vnet_id} is already bound on {self.listen}")
        self.devices[device.vnet_id] = device
        device.joined(self)

    def remove(self, device: OverlayDevice) -> None:
        if self.devices.get(device.vnet_id) is device:
            del self.devices[device.vnet_id]
        device.joined(None)

    def receive(self, payload: bytes, source: Point) -> None:
        """The backend's receiver: one UDP datagram that arrived on ``listen``."""
        self.counters["rx_datagrams"] += 1
        try:
            vni, inner = vxlan.decode(payload)
        except vxlan.VxlanError as exc:
            self.counters["rx_drop_" + exc.reason] += 1
            return
        device = self.devices.get(vni)
        if device is None:
            self.counters["rx_drop_unknown_vni"] += 1
            return
        device.receive(inner, source)
