"""The linux backend's records: `LinuxDevice` (one overlay device: recorded properties,
association, the names and indexes of its kernel objects, its mirror of the vxlan fdb and
neighbour table) and `LinuxVnic` (one VNIC: its veth pair), plus the small value helpers the
driver shares. Plain data; no I/O. `LinuxDriver` owns every instance.
"""

from __future__ import annotations

from ipaddress import ip_address
from typing import Any

from protocol.addr import format_mac, ip_from_wire
from protocol.ethernet import ETHERMAX_VLAN
from varpd.linux import names
from varpd.shim.device import MTU_DEFAULT, VXLAN_PORT_DEFAULT
from varpd.shim.types import InvalidArgument, Point, TargetMode

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


class LinuxDevice:
    """One overlay device's recorded state and its kernel objects' names and indexes."""

    def __init__(self, name: str, vnet_id: int) -> None:
        self.name = name
        self.vnet_id = vnet_id
        self.encap = "vxlan"
        self.mtu = MTU_DEFAULT
        self.listen_ip: bytes | None = None
        self.listen_port = VXLAN_PORT_DEFAULT
        self.activated = False
        self.associated = False
        self.varpd_id: int | None = None
        self.mode = TargetMode.NONE
        self.point: Point | None = None
        self.degraded = False
        self.message = ""
        self.vnics: dict[bytes, LinuxVnic] = {}
        self.bridge = names.bridge_name(vnet_id)
        self.vxlan = names.vxlan_name(vnet_id)
        self.br_ifindex = 0
        self.vx_ifindex = 0
        self.fdb: dict[bytes, Point | None] = {}  # mirror of the vxlan fdb (None = drop)
        self.neigh: dict[str, bytes] = {}  # mirror of the vxlan's neighbour entries
        self.counters: dict[str, int] = dict.fromkeys(DEVICE_COUNTERS, 0)

    def props(self) -> dict[str, Any]:
        return {
            "mtu": self.mtu,
            "vnetid": self.vnet_id,
            "encap": self.encap,
            "varpd/id": self.varpd_id,
            "vxlan/listen_ip": None
            if self.listen_ip is None
            else str(ip_from_wire(self.listen_ip)),
            "vxlan/listen_port": self.listen_port,
        }

    def local_ip(self) -> str | None:
        if self.listen_ip is None:
            return None
        ip = ip_from_wire(self.listen_ip)
        return None if ip.is_unspecified else str(ip)


def _uint(prop: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise InvalidArgument(f"{prop} must be an unsigned integer, not {value!r}")
    try:
        number = int(value)
    except ValueError:
        raise InvalidArgument(f"{prop} must be an unsigned integer, not {value!r}") from None
    if number < 0:
        raise InvalidArgument(f"{prop} must be an unsigned integer, not {number}")
    return number


def _check_mac(mac: bytes) -> None:
    if not isinstance(mac, bytes) or len(mac) != 6:
        raise InvalidArgument(f"a MAC address is 6 raw bytes, got {mac!r}")


def _checked_frame(frame: bytes, op: str) -> bytes:
    if not isinstance(frame, bytes | bytearray | memoryview):
        raise InvalidArgument(f"{op} needs the frame as bytes, not {type(frame).__name__}")
    if not 14 <= len(frame) <= ETHERMAX_VLAN:
        raise InvalidArgument(f"{op}: a frame must be 14..{ETHERMAX_VLAN} bytes, got {len(frame)}")
    return bytes(frame)
