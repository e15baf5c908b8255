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

Kernel writes triggered from synchronous calls are queued and run in order by one writer
task (``Netlink`` worker thread, in batches); a failure is logged (rate-limited) and counted
in ``kernel_errors``, never raised into the caller. ``await settle()`` waits until every
queued write is done (tests, diagnostics).

Ownership: ``run`` sweeps the stale vxlan/bridge links of the name scheme before it reports
ready and keeps the host veth ends it finds for adoption; ``finish_startup`` (called by the
daemon once restored and config devices exist) deletes host ends no VNIC claimed. When
``run`` ends nothing is deleted: the kernel keeps forwarding with what it knows, and a veth
moved into a tenant namespace keeps working across a varpd restart.

For the kernel firewall (issue 15): `LinuxDevice.bridge`, `LinuxVnic.host_ifname` (the
VNIC's bridge port), `LinuxDriver.bridge_of`/`ports_of`, and `add_vnic_listener(callback)`;
the callback gets ``("added" | "removed", vnic)`` after the kernel change.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any

import trio

from protocol import vxlan
from protocol.addr import ZERO_MAC, format_mac
from varpd.linux import devices, names
from varpd.linux.misses import (
    DEFAULT_MAX_WAITING,
    DEFAULT_NEGATIVE_TTL,
    MissTracker,
)
from varpd.linux.model import (
    LinuxDevice,
    LinuxVnic,
    _check_mac,
    _every_power_of_two,
    _mac_text,
    _point_of,
    _uint,
)
from varpd.linux.netlink import (
    KernelError,
    NeighEvent,
    NeighEvents,
    Netlink,
    PacketSender,
    classify,
)
from varpd.linux.upcalls import UpcallsMixin
from varpd.shim.device import MTU_MAX, MTU_MIN, validate_listen_ip
from varpd.shim.types import (
    AlreadyExists,
    DeviceBusy,
    DeviceStatus,
    InvalidArgument,
    NoSuchDevice,
    NoSuchEntry,
    NoSuchProperty,
    NotAssociated,
    NotSupported,
    Point,
    ReadOnlyProperty,
    TargetMode,
)

log = logging.getLogger("varpd.linux")

ICMPV6_NA = 136
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,31}")
PROPERTY_NAMES = ("mtu", "vnetid", "encap", "varpd/id", "vxlan/listen_ip", "vxlan/listen_port")
VLAN_UNSUPPORTED = (
    "VLAN ids other than 0 need bridge VLAN filtering, which this kernel's linux backend does "
    "not use (see README, 'The kernel data path'); use the udp backend for tagged VNICs"
)

DRIVER_COUNTERS = (
    "lookups",
    "responds",
    "drops",
    "stale_lookups",
    "unknown_requests",
    "injects",
    "resends",
    "kernel_writes",
    "kernel_errors",
    "netlink_overflows",
    "announcements",
)
# plus the tracker's counters (varpd.linux.misses.TRACKER_COUNTERS) and spoofed_dropped
DEVICE_COUNTERS = ("lookups", "injected", "resent", "neigh_installed", "fdb_installed")

VnicListener = Callable[[str, "LinuxVnic"], None]


class LinuxDriver(UpcallsMixin):
    """All linux-backend overlay devices of this network namespace (module docstring)."""

    backend_name = "linux"

    def __init__(
        self,
        *,
        max_waiting_lookups: int = DEFAULT_MAX_WAITING,
        negative_ttl: float = DEFAULT_NEGATIVE_TTL,
    ) -> None:
        self.tracker = MissTracker(max_waiting_lookups, negative_ttl)
        self.counters: dict[str, int] = dict.fromkeys(DRIVER_COUNTERS, 0)
        self.degraded_count = 0
        self.nl = Netlink()
        self._devices: dict[str, LinuxDevice] = {}
        self._by_vx: dict[int, LinuxDevice] = {}
        self._events: NeighEvents | None = None
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

    def device(self, name: str) -> LinuxDevice:
        try:
            return self._devices[name]
        except KeyError:
            raise NoSuchDevice(f"no overlay device named {name!r}") from None

    def devices(self) -> list[str]:
        return sorted(self._devices)

    def create_device(self, name: str, vnet_id: int, encap: str = "vxlan") -> LinuxDevice:
        if encap != "vxlan":
            raise InvalidArgument(f"unknown encapsulation {encap!r}; known: vxlan")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise InvalidArgument(
                f"invalid overlay name {name!r}: use 1-31 letters, digits, '_', '.' or '-'"
            )
        if name in self._devices:
            raise AlreadyExists(f"an overlay device named {name!r} already exists")
        if isinstance(vnet_id, bool) or not isinstance(vnet_id, int):
            raise InvalidArgument(f"vnetid must be an integer, not {vnet_id!r}")
        if not 0 <= vnet_id <= vxlan.VNI_MAX:
            raise InvalidArgument(f"vnetid must be 0..{vxlan.VNI_MAX} for vxlan, got {vnet_id}")
        for other in self._devices.values():
            if other.vnet_id == vnet_id:
                raise AlreadyExists(
                    f"overlay {other.name} already uses vnetid {vnet_id} with vxlan; "
                    "a (vnetid, encap) pair is unique per node"
                )
        dev = LinuxDevice(name, vnet_id)
        self._devices[name] = dev
        return dev

    def set_prop(self, name: str, prop: str, value: object) -> None:
        dev = self.device(name)
        if prop not in PROPERTY_NAMES:
            raise NoSuchProperty(
                f"overlay {name} has no property {prop!r}; known: {', '.join(PROPERTY_NAMES)}"
            )
        if dev.activated:
            raise NotSupported(
                f"overlay {name} is activated; its properties can no longer be changed"
            )
        if prop in ("encap", "varpd/id", "vnetid"):
            raise ReadOnlyProperty(f"property {prop} of overlay {name} is read-only")
        if prop == "mtu":
            mtu = _uint(prop, value)
            if not MTU_MIN <= mtu <= MTU_MAX:
                raise InvalidArgument(f"mtu must be {MTU_MIN}..{MTU_MAX}, got {mtu}")
            dev.mtu = mtu
            for vnic in dev.vnics.values():
                self._enqueue(f"mtu of {vnic.host_ifname}", _set_mtu, vnic.host_ifname, mtu)
        elif prop == "vxlan/listen_ip":
            dev.listen_ip = validate_listen_ip(value)
        elif prop == "vxlan/listen_port":
            port = _uint(prop, value)
            if not 1 <= port <= 65535:
                raise InvalidArgument(f"vxlan/listen_port must be 1..65535, got {port}")
            dev.listen_port = port

    def get_props(self, name: str) -> dict[str, object]:
        return self.device(name).props()

    async def _ensure_bridge(self, dev: LinuxDevice) -> None:
        if not dev.br_ifindex:
            dev.br_ifindex = await self.nl.call(devices.ensure_bridge, dev.bridge)

    async def activate(self, name: str) -> None:
        dev = self.device(name)
        if dev.activated:
            raise AlreadyExists(f"overlay {name} is already activated")
        if dev.listen_ip is None:
            raise InvalidArgument(
                f"overlay {name}: unset required property vxlan/listen_ip; set it first"
            )
        if not dev.associated:
            raise NotAssociated(f"overlay {name} has no varpd associated; associate it first")
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
        if dev.vnics:
            raise DeviceBusy(
                f"overlay {name} still has {len(dev.vnics)} VNIC(s); remove them first"
            )
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
        if dev.degraded:
            self.degraded_count -= 1
        del self._devices[name]

    # ------------------------------------------------------------------ association

    def associate(
        self, name: str, varpd_id: int, mode: TargetMode, point: Point | None = None
    ) -> None:
        dev = self.device(name)
        if dev.associated:
            raise AlreadyExists(
                f"overlay {name} is already associated with varpd id {dev.varpd_id}"
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
            dev.point = point
            if dev.activated:
                self._install_default(dev)
        elif mode != TargetMode.DYNAMIC:
            raise InvalidArgument(f"overlay {name}: target mode must be POINT or DYNAMIC")
        dev.mode = mode
        dev.varpd_id = varpd_id
        dev.associated = True

    def disassociate(self, name: str) -> None:
        dev = self.device(name)
        if not dev.associated:
            raise NotAssociated(f"overlay {name} is not associated with a varpd")
        dev.associated = False
        dev.varpd_id = None
        self.tracker.forget(name)

    def degrade(self, name: str, message: str) -> None:
        dev = self.device(name)
        dev.message = str(message)[:255]
        if not dev.degraded:
            dev.degraded = True
            self.degraded_count += 1

    def restore(self, name: str) -> None:
        dev = self.device(name)
        if dev.degraded:
            dev.degraded = False
            self.degraded_count -= 1
        dev.message = ""

    def status(self, name: str) -> DeviceStatus:
        dev = self.device(name)
        return DeviceStatus(
            name=name,
            state="activated" if dev.activated else "created",
            associated=dev.associated,
            varpd_id=dev.varpd_id,
            mode=dev.mode,
            degraded=dev.degraded,
            message=dev.message,
            counters=dict(dev.counters),
        )

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
        _check_mac(mac)
        if mac[0] & 1 or mac == ZERO_MAC:
            raise InvalidArgument(f"VNIC MAC {format_mac(mac)} must be a non-zero unicast MAC")
        if isinstance(vlan, bool) or not isinstance(vlan, int) or not 0 <= vlan <= 4094:
            raise InvalidArgument(f"VLAN id must be 0..4094, got {vlan!r}")
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

    def vnic(self, name: str, mac: bytes) -> LinuxVnic:
        try:
            return self.device(name).vnics[mac]
        except KeyError:
            raise NoSuchEntry(f"overlay {name} has no VNIC {format_mac(mac)}") from None

    def vnics(self, name: str) -> list[LinuxVnic]:
        return sorted(self.device(name).vnics.values(), key=lambda v: v.mac)

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
