"""``OverlayDriver``: the model of /dev/overlay plus dladm's kernel side (spec §1-§2)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio

from protocol import vxlan
from protocol.addr import UNSPECIFIED, V4_MAPPED_PREFIX, ZERO_MAC, format_mac
from protocol.ethernet import ETHERMAX_VLAN, FrameError, parse_l2

from .backend import Backend, VnicPort
from .device import OverlayDevice, Vnic
from .mux import Mux
from .target_cache import (
    DEFAULT_MAX_QUEUED_BYTES,
    DEFAULT_MAX_WAITING,
    MissQueue,
    TargetCache,
    TargetEntry,
)
from .types import (
    PENDING,
    VALID,
    AlreadyExists,
    CacheEntry,
    DeviceBusy,
    DeviceStatus,
    DstType,
    InvalidArgument,
    LookupRequest,
    NoSuchDevice,
    NoSuchEncap,
    NoSuchEntry,
    NotAssociated,
    NotSupported,
    Point,
    TargetMode,
    UnknownRequest,
)

ENCAPS = ("vxlan",)
DEGRADE_MESSAGE_MAX = 255  # 256 bytes with the NUL, as OVERLAY_STATUS_BUFLEN
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,31}")

DRIVER_COUNTERS = (
    "lookups",  # requests handed to varpd
    "responds",
    "drops",
    "stale_lookups",  # queued entries that no longer needed a lookup when their turn came
    "unknown_requests",  # respond/drop with a req_id that was not outstanding
    "injects",
    "resends",
)


class OverlayDriver:
    """All overlay devices of one node, their muxes, and the upcall interface to varpd.

    Run it with ``await nursery.start(driver.run)`` or ``async with driver.running():``.
    """

    def __init__(
        self,
        backend: Backend,
        *,
        max_waiting_lookups: int = DEFAULT_MAX_WAITING,
        max_queued_bytes: int = DEFAULT_MAX_QUEUED_BYTES,
    ) -> None:
        self.backend = backend
        self.misses = MissQueue(max_waiting_lookups, max_queued_bytes)
        self.counters: dict[str, int] = dict.fromkeys(DRIVER_COUNTERS, 0)
        self.degraded_count = 0
        self._devices: dict[str, OverlayDevice] = {}
        self._muxes: dict[tuple[bytes, int], Mux] = {}
        self._lifecycle = trio.Lock()
        self._running = False

    # ------------------------------------------------------------------ running

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the backend's tasks until cancelled."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.backend.run)
            self._running = True
            try:
                task_status.started()
                await trio.sleep_forever()
            finally:
                self._running = False

    @asynccontextmanager
    async def running(self) -> AsyncIterator[OverlayDriver]:
        """``async with driver.running():`` -- run() in a private nursery for the block."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.run)
            try:
                yield self
            finally:
                nursery.cancel_scope.cancel()

    @property
    def is_running(self) -> bool:
        return self._running

    # ------------------------------------------------------------------ lookup helpers

    def device(self, name: str) -> OverlayDevice:
        try:
            return self._devices[name]
        except KeyError:
            raise NoSuchDevice(f"no overlay device named {name!r}") from None

    def devices(self) -> list[str]:
        return sorted(self._devices)

    def check_vnet_id_free(
        self, vnet_id: int, encap: str, device: OverlayDevice | None = None
    ) -> None:
        for other in self._devices.values():
            if other is not device and other.vnet_id == vnet_id and other.encap == encap:
                raise AlreadyExists(
                    f"overlay {other.name} already uses vnetid {vnet_id} with {encap}; "
                    "a (vnetid, encap) pair is unique per node"
                )

    # ------------------------------------------------------------------ device lifecycle

    def create_device(self, name: str, vnet_id: int, encap: str = "vxlan") -> OverlayDevice:
        if encap not in ENCAPS:
            raise NoSuchEncap(f"unknown encapsulation {encap!r}; known: {', '.join(ENCAPS)}")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
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
        device = OverlayDevice(self, name, vnet_id, encap)
        self._devices[name] = device
        return device

    def set_prop(self, name: str, prop: str, value: object) -> None:
        self.device(name).set_prop(prop, value)

    def get_props(self, name: str) -> dict[str, object]:
        return self.device(name).get_props()

    async def activate(self, name: str) -> None:
        """OVERLAY_IOC_ACTIVATE: needs the required props and a varpd; joins the mux."""
        async with self._lifecycle:
            device = self.device(name)
            if device.activated:
                raise AlreadyExists(f"overlay {name} is already activated")
            if device.listen_ip is None:
                raise InvalidArgument(
                    f"overlay {name}: unset required property vxlan/listen_ip; set it first"
                )
            if not device.associated:
                raise NotAssociated(f"overlay {name} has no varpd associated; associate it first")
            listen = device.listen_point()
            key = (listen.ip, listen.port)
            mux = self._muxes.get(key)
            if mux is None:
                mux = Mux(listen, device.encap)
                await self.backend.bind(listen, mux.receive)
                self._muxes[key] = mux
            mux.add(device)
            device.activated = True

    async def delete_device(self, name: str) -> None:
        """OVERLAY_IOC_DELETE: refused while VNICs exist; leaves the mux, drops waiting frames."""
        async with self._lifecycle:
            device = self.device(name)
            if device.vnics:
                raise DeviceBusy(
                    f"overlay {name} still has {len(device.vnics)} VNIC(s); remove them first"
                )
            mux = device.mux
            if mux is not None:
                mux.remove(device)
                if not mux.devices:
                    del self._muxes[(mux.listen.ip, mux.listen.port)]
                    await self.backend.unbind(mux.listen)
            self._drop_target(device)
            if device.degraded:
                self.degraded_count -= 1
            del self._devices[name]

    def _revoke(self, device: OverlayDevice) -> list[TargetEntry]:
        """Take back every request varpd holds for ``device``'s cache."""
        cache = device.cache
        if cache is None:
            return []
        revoked = []
        for req_id, entry in list(self.misses.outstanding.items()):
            if entry.cache is cache:
                self.misses.take(req_id)
                revoked.append(entry)
        return revoked

    def _drop_target(self, device: OverlayDevice) -> None:
        self._revoke(device)
        if device.cache is not None:
            device.cache.discard()
            device.cache = None
        self.misses.parked -= len(device.parked)
        device.parked.clear()
        device.point = None

    # ------------------------------------------------------------------ association

    def associate(
        self, name: str, varpd_id: int, mode: TargetMode, point: Point | None = None
    ) -> None:
        """OVERLAY_TARG_ASSOCIATE: install a fresh target (point, or a cache without answers).

        Misses still waiting from an earlier association are kept and handed to the new varpd.
        """
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
            _check_point(point)
            self._drop_target(device)
            device.point = point
        elif mode == TargetMode.DYNAMIC:
            if device.cache is None:
                self._drop_target(device)
                device.cache = TargetCache(device, self.misses)
            else:
                device.cache.forget_answers()
        else:
            raise InvalidArgument(f"overlay {name}: target mode must be POINT or DYNAMIC")
        device.mode = mode
        device.varpd_id = varpd_id
        device.associated = True
        device.unpark()

    def disassociate(self, name: str) -> None:
        """OVERLAY_TARG_DISASSOCIATE: no varpd any more; requests it held wait for the next."""
        device = self.device(name)
        if not device.associated:
            raise NotAssociated(f"overlay {name} is not associated with a varpd")
        device.associated = False
        device.varpd_id = None
        for entry in self._revoke(device):
            if entry.frames:
                device.request_lookup(entry)  # parks it
            else:
                entry.flags &= ~PENDING

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

    # ------------------------------------------------------------------ upcalls

    async def next_lookup(self) -> LookupRequest:
        """Wait for the next miss of any associated device (OVERLAY_TARG_LOOKUP, no timeout)."""
        misses = self.misses
        while True:
            entry = await misses.pop()
            cache = entry.cache
            if cache is None or entry.req_id is not None:
                self.counters["stale_lookups"] += 1
                continue
            device = cache.device
            if not device.associated:
                device.request_lookup(entry)  # park until a varpd associates
                continue
            if not entry.frames:  # answered meanwhile by cache_set
                entry.flags &= ~PENDING
                self.counters["stale_lookups"] += 1
                continue
            head = entry.frames[0]
            try:
                l2 = parse_l2(head)
            except FrameError:
                cache.pop_head(entry)
                device.counters["tx_drop_bad_header"] += 1
                if entry.frames:
                    misses.push(entry)
                else:
                    entry.flags &= ~PENDING
                continue
            req_id = misses.new_request(entry)
            self.counters["lookups"] += 1
            device.counters["lookups"] += 1
            return LookupRequest(
                req_id=req_id,
                device=device.name,
                varpd_id=device.varpd_id or 0,
                vnet_id=device.vnet_id,
                hdr_size=l2.hdr_size,
                pkt_size=len(head) - l2.hdr_size,
                src_mac=l2.src,
                dst_mac=l2.dst,
                dst_type=DstType(l2.dst_type),
                sap=l2.sap,
                vlan=l2.vlan,
                frame=head,
            )

    def _take(self, req_id: int) -> TargetEntry:
        entry = self.misses.take(req_id)
        if entry is None or entry.cache is None:
            self.counters["unknown_requests"] += 1
            raise UnknownRequest(f"lookup request {req_id} is not outstanding")
        return entry

    def respond(self, req_id: int, point: Point) -> None:
        """OVERLAY_TARG_RESPOND: the entry becomes VALID; every queued frame is sent."""
        if not isinstance(point, Point):
            raise InvalidArgument(f"respond needs a Point, not {type(point).__name__}")
        entry = self._take(req_id)
        self.counters["responds"] += 1
        entry.cache.respond(entry, point)  # type: ignore[union-attr]

    def drop(self, req_id: int) -> None:
        """OVERLAY_TARG_DROP: drop the head frame; look up again if more frames wait."""
        entry = self._take(req_id)
        self.counters["drops"] += 1
        entry.cache.drop(entry)  # type: ignore[union-attr]

    def inject(self, name: str, frame: bytes, *, bypass_filter: bool = True) -> None:
        """OVERLAY_TARG_INJECT: deliver ``frame`` up to the VNICs of its VLAN, as if received.

        ``bypass_filter`` (default) skips the VNIC firewall: varpd's proxied ARP/NDP replies.
        Never delivered to the VNIC whose MAC is the frame's source (its own GARP/NA).
        """
        device = self.device(name)
        frame = _checked_frame(frame, "inject")
        self.counters["injects"] += 1
        device.counters["injected"] += 1
        device.deliver_up(frame, not bypass_filter, skip_source=True)

    def resend(self, name: str, frame: bytes) -> None:
        """OVERLAY_TARG_RESEND: push ``frame`` (tagged as on the overlay) into the tx path."""
        device = self.device(name)
        frame = _checked_frame(frame, "resend")
        self.counters["resends"] += 1
        device.counters["resent"] += 1
        device.overlay_tx(frame)

    # ------------------------------------------------------------------ cache administration

    def _dynamic_cache(self, name: str, op: str) -> TargetCache:
        device = self.device(name)
        if device.mode == TargetMode.POINT:
            raise NotSupported(f"overlay {name} is in POINT mode and has no target cache to {op}")
        if device.cache is None:
            raise NotAssociated(f"overlay {name} has never been associated with a varpd")
        return device.cache

    def cache_get(self, name: str, mac: bytes) -> CacheEntry | None:
        device = self.device(name)
        _check_mac(mac)
        if device.mode == TargetMode.POINT and device.point is not None:
            return CacheEntry(mac, int(VALID), device.point)
        return self._dynamic_cache(name, "read").get(mac)

    def cache_set(self, name: str, mac: bytes, point: Point | None, drop: bool = False) -> None:
        cache = self._dynamic_cache(name, "set")
        if not cache.device.associated:
            raise NotAssociated(f"overlay {name} has no varpd associated")
        _check_mac(mac)
        if not drop and not isinstance(point, Point):
            raise InvalidArgument("cache_set needs a Point unless drop=True")
        cache.set(mac, point, drop)

    def cache_remove(self, name: str, mac: bytes) -> None:
        _check_mac(mac)
        self._dynamic_cache(name, "remove from").remove(mac)

    def cache_flush(self, name: str) -> None:
        self._dynamic_cache(name, "flush").flush()

    def cache_list(
        self, name: str, after: bytes | None = None, limit: int | None = None
    ) -> list[CacheEntry]:
        """VALID/DROP entries in MAC order (``after``: a marker MAC; ``limit``: batch size)."""
        device = self.device(name)
        if device.mode == TargetMode.POINT and device.point is not None:
            return [] if after is not None else [CacheEntry(ZERO_MAC, int(VALID), device.point)]
        return self._dynamic_cache(name, "list").list(after, limit)

    # ------------------------------------------------------------------ VNICs

    def add_vnic(self, name: str, mac: bytes, vlan: int = 0, port: VnicPort | None = None) -> Vnic:
        device = self.device(name)
        _check_mac(mac)
        if mac[0] & 1 or mac == ZERO_MAC:
            raise InvalidArgument(f"VNIC MAC {format_mac(mac)} must be a non-zero unicast MAC")
        if isinstance(vlan, bool) or not isinstance(vlan, int) or not 0 <= vlan <= 4094:
            raise InvalidArgument(f"VLAN id must be 0..4094, got {vlan!r}")
        if mac in device.vnics:
            raise AlreadyExists(f"overlay {name} already has a VNIC {format_mac(mac)}")
        if port is None:
            port = self.backend.vnic_port(name, mac, vlan)
        vnic = Vnic(device, mac, vlan, port)
        device.vnics[mac] = vnic
        device.by_vlan.setdefault(vlan, []).append(vnic)
        port.attach(vnic.transmit)
        return vnic

    def remove_vnic(self, name: str, mac: bytes) -> None:
        device = self.device(name)
        vnic = device.vnics.pop(mac, None)
        if vnic is None:
            raise NoSuchEntry(f"overlay {name} has no VNIC {format_mac(mac)}")
        members = device.by_vlan[vnic.vlan]
        members.remove(vnic)
        if not members:
            del device.by_vlan[vnic.vlan]
        vnic.port.detach()

    def vnic(self, name: str, mac: bytes) -> Vnic:
        try:
            return self.device(name).vnics[mac]
        except KeyError:
            raise NoSuchEntry(f"overlay {name} has no VNIC {format_mac(mac)}") from None

    def vnics(self, name: str) -> list[Vnic]:
        return sorted(self.device(name).vnics.values(), key=lambda v: v.mac)

    # ------------------------------------------------------------------ metrics

    def metrics(self) -> dict[str, Any]:
        """Counters for export: driver, per device, per mux (keyed by listen ip:port)."""
        misses = self.misses
        return {
            "driver": {
                **self.counters,
                "lookups_waiting": misses.waiting(),
                "lookups_outstanding": len(misses.outstanding),
                "queued_bytes": misses.queued_bytes,
                "degraded_devices": self.degraded_count,
            },
            "devices": {name: dict(d.counters) for name, d in sorted(self._devices.items())},
            "muxes": {str(m.listen): dict(m.counters) for m in self._muxes.values()},
        }


def _check_mac(mac: bytes) -> None:
    if not isinstance(mac, bytes) or len(mac) != 6:
        raise InvalidArgument(f"a MAC address is 6 raw bytes, got {mac!r}")


def _check_point(point: Point) -> None:
    ip = point.ip
    if ip == UNSPECIFIED or ip == V4_MAPPED_PREFIX + b"\x00" * 4:
        raise InvalidArgument(f"point {point} has an unspecified address")
    if ip[:12] == b"\x00" * 12 and int.from_bytes(ip[12:], "big") > 1:
        raise InvalidArgument(f"point {point} is an IPv4-compatible address; use IPv4")
    if point.port == 0:
        raise InvalidArgument(f"point {point} has port 0")


def _checked_frame(frame: bytes, op: str) -> bytes:
    if not isinstance(frame, bytes | bytearray | memoryview):
        raise InvalidArgument(f"{op} needs the frame as bytes, not {type(frame).__name__}")
    if not 14 <= len(frame) <= ETHERMAX_VLAN:
        raise InvalidArgument(f"{op}: a frame must be 14..{ETHERMAX_VLAN} bytes, got {len(frame)}")
    return bytes(frame)
