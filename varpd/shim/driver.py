"""``OverlayDriver``: the model of /dev/overlay plus dladm's kernel side (spec §1-§2)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio

from protocol.addr import UNSPECIFIED, V4_MAPPED_PREFIX, ZERO_MAC, format_mac
from protocol.ethernet import FrameError, parse_l2

from .backend import Backend, VnicPort
from .bookkeeping import DEGRADE_MESSAGE_MAX as DEGRADE_MESSAGE_MAX
from .bookkeeping import (
    UPCALL_COUNTERS,
    DeviceTable,
    check_mac,
    check_vnic_address,
    checked_frame,
)
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
    InvalidArgument,
    LookupRequest,
    NoSuchEncap,
    NoSuchEntry,
    Point,
    TargetMode,
)

ENCAPS = ("vxlan",)
DRIVER_COUNTERS = UPCALL_COUNTERS


class OverlayDriver(DeviceTable[OverlayDevice]):
    """All overlay devices of one node, their muxes, and the upcall interface to varpd.

    Run it with ``await nursery.start(driver.run)`` or ``async with driver.running():``.
    The device table, the checks and the association/degrade bookkeeping are the shared
    `DeviceTable`'s (bookkeeping.py); this adds the muxes, the miss queue and the frames.
    """

    def __init__(
        self,
        backend: Backend,
        *,
        max_waiting_lookups: int = DEFAULT_MAX_WAITING,
        max_queued_bytes: int = DEFAULT_MAX_QUEUED_BYTES,
    ) -> None:
        super().__init__(DRIVER_COUNTERS)
        self.backend = backend
        self.misses = MissQueue(max_waiting_lookups, max_queued_bytes)
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

    # ------------------------------------------------------------------ device lifecycle

    def create_device(self, name: str, vnet_id: int, encap: str = "vxlan") -> OverlayDevice:
        if encap not in ENCAPS:
            raise NoSuchEncap(f"unknown encapsulation {encap!r}; known: {', '.join(ENCAPS)}")
        self._check_new_device(name, vnet_id, encap)
        device = OverlayDevice(self, name, vnet_id, encap)
        self._devices[name] = device
        return device

    async def activate(self, name: str) -> None:
        """OVERLAY_IOC_ACTIVATE: needs the required props and a varpd; joins the mux."""
        async with self._lifecycle:
            device = self.device(name)
            self._check_activatable(device)
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
            self._check_no_vnics(device)
            mux = device.mux
            if mux is not None:
                mux.remove(device)
                if not mux.devices:
                    del self._muxes[(mux.listen.ip, mux.listen.port)]
                    await self.backend.unbind(mux.listen)
            self._drop_target(device)
            self._forget_device(device)

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

    def _install_target(self, device: OverlayDevice, mode: TargetMode, point: Point | None) -> None:
        """OVERLAY_TARG_ASSOCIATE: install a fresh target (point, or a cache without answers).

        Misses still waiting from an earlier association are kept and handed to the new varpd.
        """
        if mode == TargetMode.POINT:
            assert point is not None
            _check_point(point)
            self._drop_target(device)
            device.point = point
        elif device.cache is None:
            self._drop_target(device)
            device.cache = TargetCache(device, self.misses)
        else:
            device.cache.forget_answers()
        device.unpark()

    def _release_target(self, device: OverlayDevice) -> None:
        """OVERLAY_TARG_DISASSOCIATE: requests varpd held wait for the next varpd."""
        for entry in self._revoke(device):
            if entry.frames:
                device.request_lookup(entry)  # parks it
            else:
                entry.flags &= ~PENDING

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
            return self._lookup_request(req_id, device, head, l2)

    def _claim(self, req_id: int) -> TargetEntry | None:
        entry = self.misses.take(req_id)
        if entry is None or entry.cache is None:
            return None
        return entry

    def _respond(self, request: TargetEntry, point: Point) -> None:
        """OVERLAY_TARG_RESPOND: the entry becomes VALID; every queued frame is sent."""
        request.cache.respond(request, point)  # type: ignore[union-attr]

    def _drop(self, request: TargetEntry) -> None:
        """OVERLAY_TARG_DROP: drop the head frame; look up again if more frames wait."""
        request.cache.drop(request)  # type: ignore[union-attr]

    def inject(self, name: str, frame: bytes, *, bypass_filter: bool = True) -> None:
        """OVERLAY_TARG_INJECT: deliver ``frame`` up to the VNICs of its VLAN, as if received.

        ``bypass_filter`` (default) skips the VNIC firewall: varpd's proxied ARP/NDP replies.
        Never delivered to the VNIC whose MAC is the frame's source (its own GARP/NA).
        """
        device = self.device(name)
        frame = checked_frame(frame, "inject")
        self.counters["injects"] += 1
        device.counters["injected"] += 1
        device.deliver_up(frame, not bypass_filter, skip_source=True)

    def resend(self, name: str, frame: bytes) -> None:
        """OVERLAY_TARG_RESEND: push ``frame`` (tagged as on the overlay) into the tx path."""
        device = self.device(name)
        frame = checked_frame(frame, "resend")
        self.counters["resends"] += 1
        device.counters["resent"] += 1
        device.overlay_tx(frame)

    # ------------------------------------------------------------------ cache administration

    def _dynamic_cache(self, name: str, op: str) -> TargetCache:
        cache = self._dynamic(name, op).cache
        assert cache is not None  # associate() gives every DYNAMIC device a cache
        return cache

    def cache_get(self, name: str, mac: bytes) -> CacheEntry | None:
        device = self.device(name)
        check_mac(mac)
        if device.mode == TargetMode.POINT and device.point is not None:
            return CacheEntry(mac, int(VALID), device.point)
        return self._dynamic_cache(name, "read").get(mac)

    def cache_set(self, name: str, mac: bytes, point: Point | None, drop: bool = False) -> None:
        device = self._check_cache_set(name, mac, point, drop)
        assert device.cache is not None  # DYNAMIC: associate() installed it
        device.cache.set(mac, point, drop)

    def cache_remove(self, name: str, mac: bytes) -> None:
        check_mac(mac)
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
        check_vnic_address(mac, vlan)
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


def _check_point(point: Point) -> None:
    ip = point.ip
    if ip == UNSPECIFIED or ip == V4_MAPPED_PREFIX + b"\x00" * 4:
        raise InvalidArgument(f"point {point} has an unspecified address")
    if ip[:12] == b"\x00" * 12 and int.from_bytes(ip[12:], "big") > 1:
        raise InvalidArgument(f"point {point} is an IPv4-compatible address; use IPv4")
    if point.port == 0:
        raise InvalidArgument(f"point {point} has port 0")
