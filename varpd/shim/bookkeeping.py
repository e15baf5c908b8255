"""Device bookkeeping shared by both overlay drivers: the shim's `OverlayDriver` (frames in
Python, driver.py) and the kernel backend's `varpd.linux.LinuxDriver` (frames in the kernel).

Both offer varpd the same interface (HACKING.md, "varpd/shim"). This module holds the half of
it that touches no frame, no target and no kernel object, so that the two drivers accept,
refuse, count and report alike; each driver adds its data path through a few hooks.

- Argument checks and property limits: `check_mac`, `check_vnic_address`, `checked_frame`,
  `uint_prop`, `validate_listen_ip`; `MTU_MIN`/`MTU_MAX`/`MTU_DEFAULT`, `VXLAN_PORT_DEFAULT`,
  `PROPERTY_NAMES`, `UPCALL_COUNTERS` (the driver counters both keep).
- `DeviceRecord`, the base of `OverlayDevice` and `varpd.linux.LinuxDevice`: name, vnetid,
  encap, the properties (``get_props``/``set_prop``), the association (varpd id, mode,
  point), the degrade flag and message, the VNICs by MAC and the device counters. A property
  change the data path must see goes through ``_set_mtu``/``_set_vnet_id``; vnetid is
  read-only unless a subclass says otherwise (``READ_ONLY_PROPS``: only the shim keeps the
  illumos setprop).
- `DeviceTable`, the base of both drivers: the devices by name (``device``/``devices``), the
  checks of ``create_device``/``activate``/``delete_device`` (the drivers do the work),
  ``associate``/``disassociate`` (the driver installs and releases the target:
  ``_install_target``/``_release_target``), ``degrade``/``restore``/``status`` (overlay_fm.c:
  a flag and a message of at most 255 characters, link state untouched; ``degraded_count``
  is the driver's total), VNIC lookup, the checks of the ``cache_*`` calls (``_dynamic``:
  DYNAMIC mode only; ``_check_cache_set``), ``respond``/``drop`` (the driver finds the request
  and applies the answer: ``_claim``/``_respond``/``_drop``) and how a miss's head frame
  becomes a `LookupRequest`.

What stays in each driver, because only the shape is alike: the data path behind every hook,
``inject``/``resend`` (each counts and then does its own delivery), ``next_lookup``'s loop,
the ``cache_*`` bodies (a `TargetCache` here, the kernel fdb's mirror there), and the VNIC
calls (synchronous ports here, veth pairs created with ``await`` there).

Invariants: nothing here awaits or does I/O; every check raises its `ShimError` before
anything changes, and a hook runs only once the checks passed.
"""

from __future__ import annotations

import re
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Any, Generic, TypeVar

from protocol import vxlan
from protocol.addr import ZERO_MAC, format_mac, ip_from_wire, ip_to_wire
from protocol.ethernet import ETHERMAX_VLAN, L2Header

from .types import (
    AlreadyExists,
    DeviceBusy,
    DeviceStatus,
    DstType,
    InvalidArgument,
    LookupRequest,
    NoSuchDevice,
    NoSuchEntry,
    NoSuchProperty,
    NotAssociated,
    NotSupported,
    Point,
    ReadOnlyProperty,
    TargetMode,
    UnknownRequest,
)

MTU_DEFAULT = 1400
MTU_MIN = 576
MTU_MAX = 8900
VXLAN_PORT_DEFAULT = vxlan.IANA_PORT
PROPERTY_NAMES = ("mtu", "vnetid", "encap", "varpd/id", "vxlan/listen_ip", "vxlan/listen_port")
DEGRADE_MESSAGE_MAX = 255  # 256 bytes with the NUL, as OVERLAY_STATUS_BUFLEN
DEVICE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,31}")

UPCALL_COUNTERS = (
    "lookups",  # requests handed to varpd
    "responds",
    "drops",
    "stale_lookups",  # misses that no longer needed a lookup when their turn came
    "unknown_requests",  # respond/drop with a req_id that was not outstanding
    "injects",
    "resends",
)


# ---------------------------------------------------------------------- argument checks


def check_mac(mac: bytes) -> None:
    if not isinstance(mac, bytes) or len(mac) != 6:
        raise InvalidArgument(f"a MAC address is 6 raw bytes, got {mac!r}")


def check_vnic_address(mac: bytes, vlan: int) -> None:
    """A VNIC's MAC (non-zero unicast) and VLAN id (0..4094)."""
    check_mac(mac)
    if mac[0] & 1 or mac == ZERO_MAC:
        raise InvalidArgument(f"VNIC MAC {format_mac(mac)} must be a non-zero unicast MAC")
    if isinstance(vlan, bool) or not isinstance(vlan, int) or not 0 <= vlan <= 4094:
        raise InvalidArgument(f"VLAN id must be 0..4094, got {vlan!r}")


def checked_frame(frame: bytes, op: str) -> bytes:
    """``frame`` (for ``op``: inject, resend) as bytes of an Ethernet frame's length."""
    if not isinstance(frame, bytes | bytearray | memoryview):
        raise InvalidArgument(f"{op} needs the frame as bytes, not {type(frame).__name__}")
    if not 14 <= len(frame) <= ETHERMAX_VLAN:
        raise InvalidArgument(f"{op}: a frame must be 14..{ETHERMAX_VLAN} bytes, got {len(frame)}")
    return bytes(frame)


def uint_prop(prop: str, value: object) -> int:
    """A property value as an unsigned integer (an int or its decimal text)."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise InvalidArgument(f"{prop} must be an unsigned integer, not {value!r}")
    try:
        number = int(value)
    except ValueError:
        raise InvalidArgument(f"{prop} must be an unsigned integer, not {value!r}") from None
    if number < 0:
        raise InvalidArgument(f"{prop} must be an unsigned integer, not {number}")
    return number


def validate_listen_ip(value: object) -> bytes:
    """vxlan/listen_ip: 16 wire bytes, refusing what overlay_vxlan.c refuses."""
    if isinstance(value, bytes | bytearray):
        if len(value) != 16:
            raise InvalidArgument(
                f"vxlan/listen_ip must be a 16-byte IPv6 (or v4-mapped) address, got {len(value)} bytes"
            )
        wire = bytes(value)
    elif isinstance(value, str | IPv4Address | IPv6Address):
        try:
            wire = ip_to_wire(value if not isinstance(value, str) else ip_address(value.strip()))
        except ValueError:
            raise InvalidArgument(f"vxlan/listen_ip {value!r} is not an IP address") from None
    else:
        raise InvalidArgument(f"vxlan/listen_ip must be an IP address, not {type(value).__name__}")
    v6 = IPv6Address(wire)
    if wire[:12] == b"\x00" * 12 and int.from_bytes(wire[12:], "big") > 1:
        raise InvalidArgument(f"vxlan/listen_ip {v6} is an IPv4-compatible address; use IPv4")
    if v6.is_multicast:
        raise InvalidArgument(f"vxlan/listen_ip {v6} is a multicast address")
    if v6.sixtofour is not None:
        raise InvalidArgument(f"vxlan/listen_ip {v6} is a 6to4 address")
    if v6.ipv4_mapped is not None and v6.ipv4_mapped.is_multicast:
        raise InvalidArgument(f"vxlan/listen_ip {v6.ipv4_mapped} is a multicast address")
    return wire


# ---------------------------------------------------------------------- one device


class DeviceRecord:
    """What a driver records of one overlay device, whatever carries its frames."""

    READ_ONLY_PROPS: tuple[str, ...] = ("encap", "varpd/id", "vnetid")

    def __init__(self, name: str, vnet_id: int, encap: str, counters: tuple[str, ...]) -> None:
        self.name = name
        self.vnet_id = vnet_id
        self.encap = encap
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
        self.vnics: dict[bytes, Any] = {}
        self.counters: dict[str, int] = dict.fromkeys(counters, 0)

    def get_props(self) -> dict[str, Any]:
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

    def set_prop(self, prop: str, value: object) -> None:
        if prop not in PROPERTY_NAMES:
            raise NoSuchProperty(
                f"overlay {self.name} has no property {prop!r}; known: {', '.join(PROPERTY_NAMES)}"
            )
        if self.activated:
            raise NotSupported(
                f"overlay {self.name} is activated; its properties can no longer be changed"
            )
        if prop in self.READ_ONLY_PROPS:
            raise ReadOnlyProperty(f"property {prop} of overlay {self.name} is read-only")
        if prop == "mtu":
            mtu = uint_prop(prop, value)
            if not MTU_MIN <= mtu <= MTU_MAX:
                raise InvalidArgument(f"mtu must be {MTU_MIN}..{MTU_MAX}, got {mtu}")
            self._set_mtu(mtu)
        elif prop == "vnetid":
            self._set_vnet_id(uint_prop(prop, value))
        elif prop == "vxlan/listen_ip":
            self.listen_ip = validate_listen_ip(value)
        elif prop == "vxlan/listen_port":
            port = uint_prop(prop, value)
            if not 1 <= port <= 65535:
                raise InvalidArgument(f"vxlan/listen_port must be 1..65535, got {port}")
            self.listen_port = port

    def _set_mtu(self, mtu: int) -> None:
        self.mtu = mtu

    def _set_vnet_id(self, vnet_id: int) -> None:
        raise ReadOnlyProperty(f"property vnetid of overlay {self.name} is read-only")


# ---------------------------------------------------------------------- all devices

D = TypeVar("D", bound=DeviceRecord)


class DeviceTable(Generic[D]):
    """A driver's devices by name and the upcall interface's bookkeeping (module docstring).

    Subclasses implement ``_install_target``, ``_release_target``, ``_claim``, ``_respond``
    and ``_drop``.
    """

    def __init__(self, counters: tuple[str, ...]) -> None:
        self.counters: dict[str, int] = dict.fromkeys(counters, 0)
        self.degraded_count = 0
        self._devices: dict[str, D] = {}

    # ------------------------------------------------------------------ devices

    def device(self, name: str) -> D:
        try:
            return self._devices[name]
        except KeyError:
            raise NoSuchDevice(f"no overlay device named {name!r}") from None

    def devices(self) -> list[str]:
        return sorted(self._devices)

    def check_vnet_id_free(self, vnet_id: int, encap: str, device: D | None = None) -> None:
        for other in self._devices.values():
            if other is not device and other.vnet_id == vnet_id and other.encap == encap:
                raise AlreadyExists(
                    f"overlay {other.name} already uses vnetid {vnet_id} with {encap}; "
                    "a (vnetid, encap) pair is unique per node"
                )

    def _check_new_device(self, name: str, vnet_id: int, encap: str) -> None:
        """``create_device``'s checks once the driver accepted the encapsulation."""
        if not isinstance(name, str) or not DEVICE_NAME.fullmatch(name):
            raise InvalidArgument(
                f"invalid overlay name {name!r}: use 1-31 letters, digits, '_', '.' or '-'"
            )
        if name in self._devices:
            raise AlreadyExists(f"an overlay device named {name!r} already exists")
        if isinstance(vnet_id, bool) or not isinstance(vnet_id, int):
            raise InvalidArgument(f"vnetid must be an integer, not {vnet_id!r}")
        if not 0 <= vnet_id <= vxlan.VNI_MAX:
            raise InvalidArgument(f"vnetid must be 0..{vxlan.VNI_MAX} for {encap}, got {vnet_id}")
        self.check_vnet_id_free(vnet_id, encap)

    def set_prop(self, name: str, prop: str, value: object) -> None:
        self.device(name).set_prop(prop, value)

    def get_props(self, name: str) -> dict[str, object]:
        return self.device(name).get_props()

    def _check_activatable(self, device: D) -> None:
        """OVERLAY_IOC_ACTIVATE's preconditions: not yet active, listen_ip set, associated."""
        if device.activated:
            raise AlreadyExists(f"overlay {device.name} is already activated")
        if device.listen_ip is None:
            raise InvalidArgument(
                f"overlay {device.name}: unset required property vxlan/listen_ip; set it first"
            )
        if not device.associated:
            raise NotAssociated(
                f"overlay {device.name} has no varpd associated; associate it first"
            )

    def _check_no_vnics(self, device: D) -> None:
        """OVERLAY_IOC_DELETE's precondition."""
        if device.vnics:
            raise DeviceBusy(
                f"overlay {device.name} still has {len(device.vnics)} VNIC(s); remove them first"
            )

    def _forget_device(self, device: D) -> None:
        """The last step of ``delete_device``."""
        if device.degraded:
            self.degraded_count -= 1
        del self._devices[device.name]

    # ------------------------------------------------------------------ association

    def associate(
        self, name: str, varpd_id: int, mode: TargetMode, point: Point | None = None
    ) -> None:
        """OVERLAY_TARG_ASSOCIATE: check, let the driver install the target, record varpd."""
        device = self.device(name)
        if device.associated:
            raise AlreadyExists(
                f"overlay {name} is already associated with varpd id {device.varpd_id}"
            )
        if isinstance(varpd_id, bool) or not isinstance(varpd_id, int) or varpd_id <= 0:
            raise InvalidArgument(f"varpd id must be a positive integer, got {varpd_id!r}")
        try:
            mode = TargetMode(mode)
        except ValueError:
            raise InvalidArgument(f"unknown target mode {mode!r}") from None
        if mode == TargetMode.POINT:
            if not isinstance(point, Point):
                raise InvalidArgument(f"overlay {name}: POINT mode needs a destination point")
        elif mode != TargetMode.DYNAMIC:
            raise InvalidArgument(f"overlay {name}: target mode must be POINT or DYNAMIC")
        self._install_target(device, mode, point)
        device.mode = mode
        device.varpd_id = varpd_id
        device.associated = True

    def _install_target(self, device: D, mode: TargetMode, point: Point | None) -> None:
        """POINT (``point`` is a Point) or DYNAMIC; may still refuse with InvalidArgument."""
        raise NotImplementedError

    def disassociate(self, name: str) -> None:
        """OVERLAY_TARG_DISASSOCIATE: no varpd any more; the driver takes back its requests."""
        device = self.device(name)
        if not device.associated:
            raise NotAssociated(f"overlay {name} is not associated with a varpd")
        device.associated = False
        device.varpd_id = None
        self._release_target(device)

    def _release_target(self, device: D) -> None:
        raise NotImplementedError

    def degrade(self, name: str, message: str) -> None:
        device = self.device(name)
        device.message = str(message)[:DEGRADE_MESSAGE_MAX]
        if not device.degraded:
            device.degraded = True
            self.degraded_count += 1

    def restore(self, name: str) -> None:
        device = self.device(name)
        if device.degraded:
            device.degraded = False
            self.degraded_count -= 1
        device.message = ""

    def status(self, name: str) -> DeviceStatus:
        device = self.device(name)
        return DeviceStatus(
            name=name,
            state="activated" if device.activated else "created",
            associated=device.associated,
            varpd_id=device.varpd_id,
            mode=device.mode,
            degraded=device.degraded,
            message=device.message,
            counters=dict(device.counters),
        )

    def _dynamic(self, name: str, op: str) -> D:
        """The device, if it is in DYNAMIC mode (it has a target cache to ``op``)."""
        device = self.device(name)
        if device.mode == TargetMode.POINT:
            raise NotSupported(f"overlay {name} is in POINT mode and has no target cache to {op}")
        if device.mode != TargetMode.DYNAMIC:
            raise NotAssociated(f"overlay {name} has never been associated with a varpd")
        return device

    def _check_cache_set(self, name: str, mac: bytes, point: Point | None, drop: bool) -> D:
        """``cache_set``'s checks; the device whose cache gets the entry."""
        device = self._dynamic(name, "set")
        if not device.associated:
            raise NotAssociated(f"overlay {name} has no varpd associated")
        check_mac(mac)
        if not drop and not isinstance(point, Point):
            raise InvalidArgument("cache_set needs a Point unless drop=True")
        return device

    # ------------------------------------------------------------------ upcalls

    def _lookup_request(self, req_id: int, device: D, frame: bytes, l2: L2Header) -> LookupRequest:
        """The request varpd gets for a miss whose head frame is ``frame`` (counted)."""
        self.counters["lookups"] += 1
        device.counters["lookups"] += 1
        return LookupRequest(
            req_id=req_id,
            device=device.name,
            varpd_id=device.varpd_id or 0,
            vnet_id=device.vnet_id,
            hdr_size=l2.hdr_size,
            pkt_size=len(frame) - l2.hdr_size,
            src_mac=l2.src,
            dst_mac=l2.dst,
            dst_type=DstType(l2.dst_type),
            sap=l2.sap,
            vlan=l2.vlan,
            frame=frame,
        )

    def _take(self, req_id: int) -> Any:
        request = self._claim(req_id)
        if request is None:
            self.counters["unknown_requests"] += 1
            raise UnknownRequest(f"lookup request {req_id} is not outstanding")
        return request

    def _claim(self, req_id: int) -> Any:
        """Remove the outstanding request ``req_id`` and return it; None if there is none."""
        raise NotImplementedError

    def respond(self, req_id: int, point: Point) -> None:
        """OVERLAY_TARG_RESPOND: ``point`` is where the missed destination lives."""
        if not isinstance(point, Point):
            raise InvalidArgument(f"respond needs a Point, not {type(point).__name__}")
        request = self._take(req_id)
        self.counters["responds"] += 1
        self._respond(request, point)

    def _respond(self, request: Any, point: Point) -> None:
        raise NotImplementedError

    def drop(self, req_id: int) -> None:
        """OVERLAY_TARG_DROP: varpd has no answer for this request."""
        request = self._take(req_id)
        self.counters["drops"] += 1
        self._drop(request)

    def _drop(self, request: Any) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ VNICs

    def vnic(self, name: str, mac: bytes) -> Any:
        try:
            return self.device(name).vnics[mac]
        except KeyError:
            raise NoSuchEntry(f"overlay {name} has no VNIC {format_mac(mac)}") from None

    def vnics(self, name: str) -> list[Any]:
        return sorted(self.device(name).vnics.values(), key=lambda v: v.mac)
