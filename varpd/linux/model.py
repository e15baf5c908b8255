"""The linux backend's records: `LinuxDevice` (one overlay device: recorded properties,
association, the names and indexes of its kernel objects, its mirror of the vxlan fdb and
neighbour table) and `LinuxVnic` (one VNIC: its veth pair), plus the small value helpers the
driver shares. Plain data; no I/O. `LinuxDriver` owns every instance.

`LinuxDevice` is a `varpd.shim.bookkeeping.DeviceRecord`, as the shim's device is: the
properties (``get_props``/``set_prop``: vnetid read-only here), association and degrade state
are kept and checked there; this module adds only what the kernel data path needs.
"""

from __future__ import annotations

from ipaddress import ip_address
from typing import Any

from protocol.addr import format_mac, ip_from_wire
from varpd.linux import names
from varpd.shim.bookkeeping import DeviceRecord
from varpd.shim.types import Point

DEVICE_COUNTERS = ("lookups", "injected", "resent", "neigh_installed", "fdb_installed")


def _every_power_of_two(n: int) -> bool:
    return n & (n - 1) == 0


def _mac_text(mac: bytes) -> str:
    return format_mac(mac)


def _point_of(dst: str | None, port: int | None, default_port: int) -> Point | None:
    if dst is None:
        return None
    return Point.of(ip_address(dst), port or default_port)


class LinuxVnic:
    """A VNIC on a linux device: a veth pair, host end in the device's bridge."""

    def __init__(self, device: LinuxDevice, mac: bytes, vlan: int, host: str, tenant: str) -> None:
        self.device = device
        self.mac = mac
        self.vlan = vlan
        self.host_ifname = host
        self.tenant_ifname = tenant
        self.host_ifindex = 0
        self.adopted = False
        self.filter: Any = None  # the userspace firewall hook; unused on this data path
        self.counters: dict[str, int] = {}

    @property
    def bridge(self) -> str:
        return self.device.bridge

    def __repr__(self) -> str:
        return f"LinuxVnic({format_mac(self.mac)} {self.host_ifname}/{self.tenant_ifname})"


class LinuxDevice(DeviceRecord):
    """One overlay device's recorded state and its kernel objects' names and indexes."""

    vnics: dict[bytes, LinuxVnic]

    def __init__(self, name: str, vnet_id: int) -> None:
        super().__init__(name, vnet_id, "vxlan", DEVICE_COUNTERS)
        self.bridge = names.bridge_name(vnet_id)
        self.vxlan = names.vxlan_name(vnet_id)
        self.br_ifindex = 0
        self.vx_ifindex = 0
        self.fdb: dict[bytes, Point | None] = {}  # mirror of the vxlan fdb (None = drop)
        self.neigh: dict[str, bytes] = {}  # mirror of the vxlan's neighbour entries
        # announcements of an L3 answer whose MAC has no fdb entry yet, by MAC: sent when the
        # internal VL2 lookup installs one (a tenant told earlier sends into a drop)
        self.held: dict[bytes, list[bytes]] = {}

    def props(self) -> dict[str, Any]:
        """The properties (the name this class has always had for ``get_props``)."""
        return self.get_props()

    def local_ip(self) -> str | None:
        if self.listen_ip is None:
            return None
        ip = ip_from_wire(self.listen_ip)
        return None if ip.is_unspecified else str(ip)
