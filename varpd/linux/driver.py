"""`LinuxDriver`: the upcall interface of `varpd.shim.OverlayDriver`, on the kernel's tables.

The daemon and the plugins talk to this object exactly as to the shim (``next_lookup``,
``respond``, ``drop``, ``inject``, ``resend``, ``cache_*``, ``associate``, ``status``, ...);
frames never pass through Python. What each call does here:

- ``create_device``/``set_prop`` only record (the vxlan needs listen ip/port and the target
  mode); the bridge appears with the first VNIC or at ``activate``, which also creates the
  vxlan netdev (`varpd.linux.devices`). ``delete_device`` removes both.
- ``add_vnic_async``/``remove_vnic_async`` create/adopt and delete the VNIC's veth pair (the
  daemon awaits them; the sync ``add_vnic``/``remove_vnic`` of the shim are not offered).
- Misses arrive as netlink notifications (`NeighEvents`), go through `MissTracker` and come
  out of ``next_lookup`` as `LookupRequest`s whose frame is what the shim would have queued.
  ``respond`` on an L2 miss writes ``MAC dst IP port PORT`` (permanent) into the vxlan fdb;
  ``drop`` remembers the key as unanswered for ``negative_ttl``.
- ``inject`` of a proxied ARP reply / NA (to `REQUESTER_MAC`) becomes a permanent neighbour
  entry on the vxlan device (the kernel's ``proxy`` answers the tenant from then on), marks
  the L3 miss answered, queues an internal VL2 lookup when the MAC has no fdb entry yet, and
  announces the answer to the local VNICs (an ARP reply to broadcast / an unsolicited NA), so
  the tenant's pending resolution completes without waiting for its 1 s retry. ``inject`` of
  anything else (a shootdown's gratuitous ARP or NA) updates the neighbour entry too and is
  delivered to the VNICs through the host ends of their veths (AF_PACKET).
- ``cache_set``/``cache_remove``/``cache_flush`` write the kernel fdb; ``cache_get`` and
  ``cache_list`` read the driver's mirror of it, which the notification socket keeps equal
  to the kernel's table (entries added by anyone, e.g. ``bridge fdb add``, appear there; a
  receive overflow triggers a dump). A drop entry is an fdb entry without a remote: the
  vxlan device discards frames to it.
- POINT devices (direct) get no miss flags and one default fdb entry (all-zero MAC).

Kernel writes triggered from synchronous calls run in call order. fdb and neighbour writes
and frames to the VNICs are done at once on the trio thread (`NeighWriter`, AF_PACKET) when
nothing is queued before them; anything else, or anything behind a queued write, goes to the
queue that one writer task runs in batches in the ``Netlink`` worker thread. So an ARP answer
reaches the tenant only after the fdb entry its packets need is in the kernel. A failure is
logged (rate-limited) and counted in ``kernel_errors``, never raised into the caller.
``await settle()`` waits until every queued write is done (tests, diagnostics).

Ownership: ``run`` sweeps the stale vxlan/bridge links of the name scheme before it reports
ready and keeps the host veth ends it finds for adoption; ``finish_startup`` (called by the
daemon once restored and config devices exist) deletes host ends no VNIC claimed. When
``run`` ends nothing is deleted: the kernel keeps forwarding with what it knows, and a veth
moved into a tenant namespace keeps working across a varpd restart.

Device bookkeeping (the device table, the checks of create/activate/delete/associate/
set_prop, degrade/restore/status, VNIC lookup, the counters of respond/drop) is
`varpd.shim.bookkeeping`'s, shared with the shim's `OverlayDriver` so both drivers accept
and report alike; ``associate``/``disassociate`` call back ``_install_target`` (POINT: the
default fdb entry) and ``_release_target`` (the tracker forgets the device's misses).

For the kernel firewall (issue 15): `LinuxDevice.bridge`, `LinuxVnic.host_ifname` (the
VNIC's bridge port), `LinuxDriver.bridge_of`/`ports_of`, and `add_vnic_listener(callback)`;
the callback gets ``("added" | "removed", vnic)`` after the kernel change.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import trio

from protocol.addr import ZERO_MAC, format_mac
from varpd.linux import devices, names
from varpd.linux.misses import (
    DEFAULT_MAX_WAITING,
    DEFAULT_NEGATIVE_TTL,
    MissTracker,
)
from varpd.linux.model import DEVICE_COUNTERS as DEVICE_COUNTERS
from varpd.linux.model import (
    LinuxDevice,
    LinuxVnic,
    _every_power_of_two,
    _mac_text,
    _point_of,
)
from varpd.linux.neighwrite import NeighWriter
from varpd.linux.netlink import (
    KernelError,
    NeighEvent,
    NeighEvents,
    Netlink,
    PacketSender,
    classify,
)
from varpd.linux.upcalls import ICMPV6_NA as ICMPV6_NA
from varpd.linux.upcalls import UpcallsMixin, send_each
from varpd.shim.bookkeeping import PROPERTY_NAMES as PROPERTY_NAMES
from varpd.shim.bookkeeping import UPCALL_COUNTERS, check_vnic_address
from varpd.shim.types import (
    AlreadyExists,
    InvalidArgument,
    NoSuchEntry,
    NotSupported,
    Point,
    TargetMode,
)

log = logging.getLogger("varpd.linux")

VLAN_UNSUPPORTED = (
    "VLAN ids other than 0 need bridge VLAN filtering, which this kernel's linux backend does "
    "not use (see README, 'The kernel data path'); use the udp backend for tagged VNICs"
)

DRIVER_COUNTERS = UPCALL_COUNTERS + (
    "kernel_writes",
    "kernel_errors",
    "netlink_overflows",
    "announcements",
)
# plus the tracker's counters (varpd.linux.misses.TRACKER_COUNTERS) and spoofed_dropped

VnicListener = Callable[[str, "LinuxVnic"], None]


#: queued kernel writes that `NeighWriter` does at once instead (same arguments after ``what``)
_RAW_WRITES: dict[Callable[..., Any], str] = {
    devices.fdb_replace: "fdb_replace",
    devices.fdb_delete: "fdb_delete",
    devices.neigh_replace: "neigh_replace",
    devices.neigh_delete: "neigh_delete",
}


class LinuxDriver(UpcallsMixin):
    """All linux-backend overlay devices of this network namespace (module docstring)."""

    backend_name = "linux"

    def __init__(
        self,
        *,
        max_waiting_lookups: int = DEFAULT_MAX_WAITING,
        negative_ttl: float = DEFAULT_NEGATIVE_TTL,
    ) -> None:
        super().__init__(DRIVER_COUNTERS)
        self.tracker = MissTracker(max_waiting_lookups, negative_ttl)
        self.nl = Netlink()
        self._by_vx: dict[int, LinuxDevice] = {}
        self._events: NeighEvents | None = None
        self._raw: NeighWriter | None = None
        self._sender: PacketSender | None = None
        self._running = False
        self._ops: list[tuple[str, Callable[..., Any], tuple[Any, ...]]] = []
        self._ops_wakeup = trio.Event()
        self._ops_submitted = 0
        self._ops_done = 0
        self._ops_idle = trio.Event()
        self._stale_hosts: set[str] = set()
        self._listeners: list[VnicListener] = []
        self.spoof: Any = None  # varpd.linux.spoof.SpoofGuard when nftables is usable

    # ------------------------------------------------------------------ running

    @property
    def is_running(self) -> bool:
        return self._running

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Open netlink, sweep stale links, listen and write until cancelled."""
        await self.nl.open()
        try:
            self._events = NeighEvents()
            self._sender = PacketSender()
            self._raw = NeighWriter(self._write_failed)
            hosts = await self.nl.call(devices.sweep)
            self._stale_hosts = set(hosts)
            try:
                from varpd.linux.spoof import SpoofGuard

                self.spoof = await SpoofGuard.open()
            except Exception as exc:  # no nftables: the defence stays off, said in the log
                log.warning("linux backend: spoof defence unavailable: %s", exc)
                self.spoof = None
            async with trio.open_nursery() as nursery:
                if self.spoof is not None:
                    nursery.start_soon(self.spoof.run)
                nursery.start_soon(self._listen)
                nursery.start_soon(self._writer)
                nursery.start_soon(self._raw.run)
                self._running = True
                log.info("linux backend ready (%d host veth end(s) kept for adoption)", len(hosts))
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._running = False
            if self._events is not None:
                self._events.close()
                self._events = None
            if self._sender is not None:
                self._sender.close()
                self._sender = None
            if self._raw is not None:
                self._raw.close()
                self._raw = None
            with trio.CancelScope(shield=True):
                await self.nl.close()

    async def finish_startup(self) -> list[str]:
        """Delete the host veth ends found at start that no VNIC adopted; their names."""
        stale, self._stale_hosts = sorted(self._stale_hosts), set()
        for name in stale:
            try:
                await self.nl.call(devices.delete_link, name)
            except KernelError as exc:
                log.warning("cannot delete stale VNIC link %s: %s", name, exc)
        if stale:
            log.info("deleted %d stale VNIC link(s): %s", len(stale), ", ".join(stale))
        return stale

    # ------------------------------------------------------------------ kernel writes

    def _enqueue(self, what: str, fn: Callable[..., Any], *args: Any) -> None:
        """Do one kernel write in order with the others: at once on the trio thread when
        nothing is queued before it and it is a write `NeighWriter` makes (fdb / neighbour
        entries) or an announcement; else through the writer task's queue."""
        raw = self._raw
        if raw is not None and not self._ops and self._ops_idle.is_set():
            method = _RAW_WRITES.get(fn)
            if method is not None:
                getattr(raw, method)(what, *args)
                self.counters["kernel_writes"] += 1
                return
            if fn is send_each:
                fn(None, *args)
                return
        self._ops.append((what, fn, args))
        self._ops_submitted += 1
        self._ops_wakeup.set()

    @staticmethod
    def _run_batch(
        ipr: Any, batch: list[tuple[str, Callable[..., Any], tuple[Any, ...]]]
    ) -> list[tuple[str, str]]:
        errors = []
        for what, fn, args in batch:
            try:
                fn(ipr, *args)
            except Exception as exc:
                errors.append((what, str(getattr(exc, "extra_message", None) or exc)))
        return errors

    async def _writer(self) -> None:
        while True:
            if not self._ops:
                self._ops_idle.set()
                self._ops_wakeup = trio.Event()
                await self._ops_wakeup.wait()
                continue
            self._ops_idle = trio.Event()
            batch, self._ops = self._ops, []
            try:
                errors = await self.nl.call(self._run_batch, batch)
            except KernelError as exc:
                errors = [("batch", str(exc))]
            self.counters["kernel_writes"] += len(batch)
            self._ops_done += len(batch)
            for what, text in errors:
                self._write_failed(what, text)

    def _write_failed(self, what: str, text: str) -> None:
        self.counters["kernel_errors"] += 1
        if _every_power_of_two(self.counters["kernel_errors"]):
            log.warning("kernel write failed: %s: %s", what, text)

    async def settle(self) -> None:
        """Wait until every queued kernel write has been done."""
        while self._ops or self._ops_done < self._ops_submitted:
            await self._ops_idle.wait()
            await trio.sleep(0)

    # ------------------------------------------------------------------ notifications

    async def _listen(self) -> None:
        assert self._events is not None
        events = self._events
        while True:
            try:
                msgs = await events.receive()
            except (trio.ClosedResourceError, OSError):
                return
            if msgs is None:
                self.counters["netlink_overflows"] += 1
                log.warning("netlink notifications overflowed; re-reading the kernel tables")
                await self._resync()
                continue
            for msg in msgs:
                event = classify(msg)
                if event is None:
                    continue
                try:
                    self._on_event(event)
                except Exception:  # never let one odd message stop the listener
                    log.exception("handling %s", event)

    def _on_event(self, ev: NeighEvent) -> None:
        dev = self._by_vx.get(ev.ifindex)
        if dev is None:
            return
        if ev.kind == "l2miss":
            assert ev.mac is not None
            if dev.mode != TargetMode.DYNAMIC or ev.mac in dev.vnics:
                return
            self.tracker.miss(dev.name, "l2", ev.mac)
        elif ev.kind == "l3miss":
            assert ev.ip is not None
            if dev.mode != TargetMode.DYNAMIC:
                return
            self.tracker.miss(dev.name, "l3", ev.ip)
        elif ev.kind == "fdb":
            assert ev.mac is not None
            if ev.deleted:
                dev.fdb.pop(ev.mac, None)
            else:
                dev.fdb[ev.mac] = _point_of(ev.dst, ev.port, dev.listen_port)
            if self.spoof is not None and ev.mac != ZERO_MAC:
                self.spoof.note(dev.vnet_id, ev.mac, dev.fdb.get(ev.mac))
        elif ev.kind == "neigh" and ev.ip is not None:
            if ev.deleted or ev.mac is None:
                dev.neigh.pop(ev.ip, None)
            else:
                dev.neigh[ev.ip] = ev.mac

    async def _resync(self) -> None:
        for dev in list(self._devices.values()):
            if not dev.vx_ifindex:
                continue
            try:
                msgs = await self.nl.call(devices.fdb_dump, dev.vx_ifindex)
            except KernelError as exc:
                log.warning("fdb dump of %s failed: %s", dev.vxlan, exc)
                continue
            fdb: dict[bytes, Point | None] = {}
            for msg in msgs:
                ev = classify(msg)
                if ev is not None and ev.kind == "fdb" and ev.mac is not None:
                    fdb[ev.mac] = _point_of(ev.dst, ev.port, dev.listen_port)
            dev.fdb = fdb

    # ------------------------------------------------------------------ devices

    def create_device(self, name: str, vnet_id: int, encap: str = "vxlan") -> LinuxDevice:
        if encap != "vxlan":
            raise InvalidArgument(f"unknown encapsulation {encap!r}; known: vxlan")
        self._check_new_device(name, vnet_id, encap)
        dev = LinuxDevice(name, vnet_id)
        self._devices[name] = dev
        return dev

    def set_prop(self, name: str, prop: str, value: object) -> None:
        """Recorded (checks: `DeviceRecord.set_prop`); a new mtu also goes to the host ends."""
        dev = self.device(name)
        dev.set_prop(prop, value)
        if prop == "mtu":
            for vnic in dev.vnics.values():
                self._enqueue(f"mtu of {vnic.host_ifname}", _set_mtu, vnic.host_ifname, dev.mtu)

    async def _ensure_bridge(self, dev: LinuxDevice) -> None:
        if not dev.br_ifindex:
            dev.br_ifindex = await self.nl.call(devices.ensure_bridge, dev.bridge)

    async def activate(self, name: str) -> None:
        dev = self.device(name)
        self._check_activatable(dev)
        await self._ensure_bridge(dev)
        dev.vx_ifindex = await self.nl.call(
            devices.create_vxlan,
            dev.vxlan,
            dev.vnet_id,
            dev.local_ip(),
            dev.listen_port,
            dev.mtu,
            dev.mode == TargetMode.DYNAMIC,
            dev.br_ifindex,
        )
        self._by_vx[dev.vx_ifindex] = dev
        dev.activated = True
        if dev.mode == TargetMode.POINT and dev.point is not None:
            self._install_default(dev)
        else:
            for mac, point in list(dev.fdb.items()):
                self._write_fdb(dev, mac, point)
        if self.spoof is not None:
            self.spoof.add_port(dev.listen_port)
        log.info("%s: vxlan %s (vni %d) in bridge %s", name, dev.vxlan, dev.vnet_id, dev.bridge)

    async def delete_device(self, name: str) -> None:
        dev = self.device(name)
        self._check_no_vnics(dev)
        self.tracker.forget(name)
        if self.spoof is not None and dev.activated:
            self.spoof.remove_port(dev.listen_port)
            self.spoof.forget_vni(dev.vnet_id)
        self._by_vx.pop(dev.vx_ifindex, None)
        for link in (dev.vxlan, dev.bridge):
            try:
                await self.nl.call(devices.delete_link, link)
            except KernelError as exc:
                log.error("deleting %s of %s: %s", link, name, exc)
        self._forget_device(dev)

    # ------------------------------------------------------------------ association

    def _install_target(self, dev: LinuxDevice, mode: TargetMode, point: Point | None) -> None:
        if mode == TargetMode.POINT:
            dev.point = point
            if dev.activated:
                self._install_default(dev)

    def _release_target(self, dev: LinuxDevice) -> None:
        self.tracker.forget(dev.name)

    # ------------------------------------------------------------------ VNICs

    def add_vnic(self, name: str, mac: bytes, vlan: int = 0, port: Any = None) -> LinuxVnic:
        raise NotSupported("the linux backend adds VNICs with `await add_vnic_async(...)`")

    def remove_vnic(self, name: str, mac: bytes) -> None:
        raise NotSupported("the linux backend removes VNICs with `await remove_vnic_async(...)`")

    async def add_vnic_async(
        self, name: str, mac: bytes, vlan: int = 0, ifname: str | None = None
    ) -> LinuxVnic:
        """Create (or adopt after a restart) the VNIC's veth pair in the device's bridge."""
        dev = self.device(name)
        check_vnic_address(mac, vlan)
        if vlan != 0:
            raise NotSupported(f"VNIC {format_mac(mac)} on VLAN {vlan}: {VLAN_UNSUPPORTED}")
        if mac in dev.vnics:
            raise AlreadyExists(f"overlay {name} already has a VNIC {format_mac(mac)}")
        tenant = ifname or names.tenant_name(dev.vnet_id, mac)
        why = names.check_ifname(tenant)
        if why is not None:
            raise InvalidArgument(why)
        if any(v.tenant_ifname == tenant for d in self._devices.values() for v in d.vnics.values()):
            raise AlreadyExists(f"interface name {tenant} is already used by another VNIC")
        host = names.host_name(dev.vnet_id, mac)
        await self._ensure_bridge(dev)
        vnic = LinuxVnic(dev, mac, vlan, host, tenant)
        dev.vnics[mac] = vnic  # reserve the MAC while we await the kernel
        try:
            vnic.host_ifindex, vnic.adopted = await self.nl.call(
                devices.create_vnic, host, tenant, _mac_text(mac), dev.mtu, dev.br_ifindex
            )
        except BaseException:
            dev.vnics.pop(mac, None)
            raise
        self._stale_hosts.discard(host)
        if mac in dev.fdb:  # it was remote until now
            self._fdb_delete(dev, mac)
        self._notify("added", vnic)
        log.info(
            "%s: VNIC %s %s (host end %s)",
            name,
            format_mac(mac),
            "adopted" if vnic.adopted else f"created as {tenant}",
            host,
        )
        return vnic

    async def remove_vnic_async(self, name: str, mac: bytes) -> None:
        dev = self.device(name)
        vnic = dev.vnics.get(mac)
        if vnic is None:
            raise NoSuchEntry(f"overlay {name} has no VNIC {format_mac(mac)}")
        await self.nl.call(devices.delete_link, vnic.host_ifname)
        del dev.vnics[mac]
        self._notify("removed", vnic)

    # ------------------------------------------------------------------ for the firewall

    def bridge_of(self, name: str) -> str:
        """The Linux bridge of overlay device ``name``."""
        return self.device(name).bridge

    def ports_of(self, name: str) -> dict[bytes, str]:
        """MAC -> host-side bridge port ifname of every VNIC of ``name``."""
        return {mac: v.host_ifname for mac, v in self.device(name).vnics.items()}

    def add_vnic_listener(self, callback: VnicListener) -> None:
        """``callback("added" | "removed", vnic)`` after each VNIC change (must not raise)."""
        self._listeners.append(callback)

    def _notify(self, what: str, vnic: LinuxVnic) -> None:
        for callback in list(self._listeners):
            try:
                callback(what, vnic)
            except Exception:
                log.exception("VNIC listener %r failed on %s", callback, what)

    # ------------------------------------------------------------------ metrics

    def metrics(self) -> dict[str, Any]:
        tracker = self.tracker
        driver = {**self.counters, **tracker.counters}
        driver["lookups_waiting"] = tracker.waiting()
        driver["lookups_outstanding"] = tracker.outstanding()
        driver["degraded_devices"] = self.degraded_count
        # one nftables counter for all devices (per-device rules would multiply the rules)
        driver["spoofed_dropped"] = self.spoof.dropped_total if self.spoof is not None else 0
        devs = {name: dict(dev.counters) for name, dev in sorted(self._devices.items())}
        return {"driver": driver, "devices": devs, "muxes": {}}


def _set_mtu(ipr: Any, ifname: str, mtu: int) -> None:
    found = ipr.link_lookup(ifname=ifname)
    if found:
        ipr.link("set", index=found[0], mtu=mtu)
