"""The upcall half of `LinuxDriver`: what the daemon and the plugins call while looking
things up (``next_lookup``, ``respond``, ``drop``, ``inject``, ``resend``) and the target
cache (``cache_*``), all on the kernel's vxlan fdb and neighbour table. See
`varpd.linux.driver` for the whole picture. Everything here is synchronous and runs in the
trio thread except ``next_lookup``, which waits for the next kernel miss.

The class's base is `varpd.shim.bookkeeping.DeviceTable`, which the shim's driver shares: it
holds ``counters``, ``device()``/``_devices``, the checks and counters of ``respond``/``drop``
(this class supplies ``_claim``, ``_respond`` and ``_drop``), the DYNAMIC-mode check of the
``cache_*`` calls (``_dynamic``, ``_check_cache_set``) and the `LookupRequest` made of a
miss's frame. Of the driver it needs ``tracker``, ``spoof``, ``_sender`` and ``_enqueue``
(the ordered queue of kernel writes).
"""

from __future__ import annotations

from collections.abc import Callable
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Any

from protocol.addr import ZERO_MAC, format_mac
from protocol.ethernet import (
    ARP_REPLY,
    BROADCAST_MAC,
    ETH_P_ARP,
    ETH_P_IPV6,
    FrameError,
    build_arp,
    build_unsolicited_na,
    parse_arp,
    parse_l2,
    strip_vlan_tag,
)
from varpd.linux import devices
from varpd.linux.misses import (
    REQUESTER_MAC,
    Miss,
    MissTracker,
    l2_miss_frame,
    l3_miss_frame,
)
from varpd.linux.model import LinuxDevice, _mac_text
from varpd.linux.netlink import PacketSender
from varpd.shim.bookkeeping import DeviceTable, check_mac, checked_frame
from varpd.shim.types import (
    DROP,
    VALID,
    CacheEntry,
    InvalidArgument,
    LookupRequest,
    NoSuchEntry,
    Point,
    TargetMode,
)

ICMPV6_NA = 136


class UpcallsMixin(DeviceTable[LinuxDevice]):
    """Lookups, injections and the target cache of `LinuxDriver` (module docstring)."""

    tracker: MissTracker
    spoof: Any
    _sender: PacketSender | None
    _enqueue: Callable[..., None]

    # ------------------------------------------------------------------ upcalls

    async def next_lookup(self) -> LookupRequest:
        tracker = self.tracker
        while True:
            miss = await tracker.pop()
            dev = self._devices.get(miss.device)
            if dev is None or not dev.associated or dev.mode != TargetMode.DYNAMIC:
                tracker.finish(miss, negative=False)
                self.counters["stale_lookups"] += 1
                continue
            if miss.kind == "l2":
                assert isinstance(miss.key, bytes)
                if dev.fdb.get(miss.key) is not None or miss.key in dev.vnics:
                    tracker.finish(miss, negative=False)  # answered meanwhile
                    self._release_held(dev, miss.key)
                    self.counters["stale_lookups"] += 1
                    continue
                frame = l2_miss_frame(miss.key)
            else:
                assert isinstance(miss.key, str)
                frame = l3_miss_frame(miss.key)
            l2 = parse_l2(frame)  # untagged: the request's vlan is 0
            req_id = tracker.new_request(miss)
            return self._lookup_request(req_id, dev, frame, l2)

    def _claim(self, req_id: int) -> Miss | None:
        return self.tracker.take(req_id)

    def _respond(self, request: Miss, point: Point) -> None:
        """An L2 answer becomes an fdb entry."""
        dev = self._devices.get(request.device)
        if dev is not None and request.kind == "l2":
            self._fdb_set(dev, request.key, point)
        self.tracker.finish(request, negative=False)

    def _drop(self, request: Miss) -> None:
        """Remembered as unanswered for ``negative_ttl``, unless answered meanwhile."""
        self.tracker.finish(request, negative=not request.answered)
        dev = self._devices.get(request.device)
        if dev is not None and request.kind == "l2":
            dev.held.pop(request.key, None)  # no remote: the tenant's packets would be dropped

    def inject(self, name: str, frame: bytes, *, bypass_filter: bool = True) -> None:
        """A reply/announcement from varpd: neighbour entry + delivery (module docstring)."""
        dev = self.device(name)
        frame = checked_frame(frame, "inject")
        self.counters["injects"] += 1
        dev.counters["injected"] += 1
        try:
            l2 = parse_l2(frame)
        except FrameError as exc:
            raise InvalidArgument(f"inject: {exc}") from None
        answer = l2.dst == REQUESTER_MAC
        learned = self._learn_from(dev, frame, l2, announce=answer)
        if learned is not None and answer:
            return
        self._deliver(dev, frame, l2.dst)

    def _learn_from(
        self, dev: LinuxDevice, frame: bytes, l2: Any, *, announce: bool = False
    ) -> tuple[str, bytes] | None:
        """(ip, mac) of an ARP reply / gratuitous ARP / NA, after installing it; else None."""
        ip: str | None = None
        mac: bytes | None = None
        if l2.sap == ETH_P_ARP:
            try:
                arp = parse_arp(frame)
            except FrameError:
                return None
            if arp.op == ARP_REPLY or arp.gratuitous:
                ip, mac = str(arp.sender_ip), arp.sender_mac
        elif l2.sap == ETH_P_IPV6:
            off = l2.hdr_size
            if (
                len(frame) >= off + 40 + 24
                and frame[off + 6] == 58
                and frame[off + 40] == ICMPV6_NA
            ):
                icmp = off + 40
                target = IPv6Address(frame[icmp + 8 : icmp + 24])
                pos = icmp + 24
                while pos + 8 <= len(frame):
                    opt_type, opt_len = frame[pos], frame[pos + 1]
                    if opt_len == 0:
                        break
                    if opt_type == 2:
                        ip, mac = str(target), bytes(frame[pos + 2 : pos + 8])
                        break
                    pos += opt_len * 8
        if ip is None or mac is None or mac[0] & 1 or mac == ZERO_MAC:
            return None
        self._neigh_set(dev, ip, mac, announce=announce)
        return ip, mac

    def _neigh_set(self, dev: LinuxDevice, ip: str, mac: bytes, *, announce: bool = False) -> None:
        """Install ip -> mac on the vxlan device; with ``announce``, tell the local VNICs first
        (the tenant waiting on it needs the fdb entry, queued before, not this neighbour entry:
        the kernel's proxy needs it only for the tenant's next ARP / NS)."""
        dev.neigh[ip] = mac
        if announce:
            self._announce(dev, ip, mac)
        if dev.vx_ifindex:
            self._enqueue(
                f"neighbour {ip} on {dev.vxlan}",
                devices.neigh_replace,
                dev.vx_ifindex,
                ip,
                _mac_text(mac),
            )
            dev.counters["neigh_installed"] += 1
        miss = self.tracker.outstanding_l3(dev.name, ip)
        if miss is not None:
            miss.answered = True
        self.tracker.forgive(dev.name, "l3", ip)
        if dev.mode == TargetMode.DYNAMIC and mac not in dev.vnics and dev.fdb.get(mac) is None:
            self.tracker.miss(dev.name, "l2", mac)  # the internal VL2 lookup

    def _announce(self, dev: LinuxDevice, ip: str, mac: bytes) -> None:
        """Tell the local VNICs ``ip`` is at ``mac`` (completes a pending resolution).

        The tenant sends its queued packets the moment it hears this, so it must not hear it
        before the kernel can forward them: the frame goes out through the kernel-write queue,
        after the fdb write queued before it (``cache_set`` of the plugin's answer), and when
        the MAC has no fdb entry
        at all it is held until the internal VL2 lookup installs one (`_release_held`)."""
        addr = ip_address(ip)
        if isinstance(addr, IPv4Address):
            frame = build_arp(ARP_REPLY, mac, addr, BROADCAST_MAC, addr, src=mac)
        else:
            frame = build_unsolicited_na(mac, addr.packed)
        self.counters["announcements"] += 1
        if dev.mode == TargetMode.DYNAMIC and mac not in dev.vnics and mac not in dev.fdb:
            held = dev.held.setdefault(mac, [])
            if len(held) < 8:
                held.append(frame)
            return
        self._deliver(dev, frame, BROADCAST_MAC)

    def _release_held(self, dev: LinuxDevice, mac: bytes) -> None:
        for frame in dev.held.pop(mac, ()):
            self._deliver(dev, frame, BROADCAST_MAC)

    def _deliver(self, dev: LinuxDevice, frame: bytes, dst: bytes) -> None:
        """Hand ``frame`` to the VNICs it is for through their host ends, in order with the
        kernel writes queued before it (at once when none are)."""
        sender = self._sender
        if sender is None:
            return
        try:
            untagged = strip_vlan_tag(frame)
        except FrameError:
            untagged = frame
        targets = [v.host_ifname for v in dev.vnics.values() if dst[0] & 1 or dst == v.mac]
        if targets:
            self._enqueue(f"frame to {len(targets)} VNIC(s) on {dev.name}", send_each, sender,
                          targets, untagged)  # fmt: skip

    def resend(self, name: str, frame: bytes) -> None:
        """Push ``frame`` into the vxlan device's transmit path (DHCP redirects)."""
        dev = self.device(name)
        frame = checked_frame(frame, "resend")
        self.counters["resends"] += 1
        dev.counters["resent"] += 1
        if self._sender is not None and dev.activated:
            self._sender.send(dev.vxlan, frame)

    # ------------------------------------------------------------------ the fdb

    def _install_default(self, dev: LinuxDevice) -> None:
        point = dev.point
        assert point is not None
        dev.fdb = {ZERO_MAC: point}
        if dev.vx_ifindex:
            self._enqueue(
                f"default fdb entry on {dev.vxlan}",
                devices.fdb_default,
                dev.vx_ifindex,
                str(point.address),
                point.port,
            )

    def _write_fdb(self, dev: LinuxDevice, mac: bytes, point: Point | None) -> None:
        if not dev.vx_ifindex:
            return
        if point is None:  # drop: the unspecified remote of the underlay's family
            local = dev.local_ip() or ""
            dst: str | None = "::" if ":" in local else "0.0.0.0"
            port = None
        else:
            dst, port = str(point.address), point.port
        self._enqueue(
            f"fdb {format_mac(mac)} on {dev.vxlan}",
            devices.fdb_replace,
            dev.vx_ifindex,
            _mac_text(mac),
            dst,
            port,
        )
        dev.counters["fdb_installed"] += 1

    def _fdb_set(self, dev: LinuxDevice, mac: Any, point: Point | None) -> None:
        assert isinstance(mac, bytes)
        self.tracker.forgive(dev.name, "l2", mac)
        if mac in dev.vnics:  # a local VNIC is the bridge's business, never a tunnel's
            if mac in dev.fdb:
                self._fdb_delete(dev, mac)
            return
        dev.fdb[mac] = point
        self._write_fdb(dev, mac, point)
        if self.spoof is not None:
            self.spoof.note(dev.vnet_id, mac, point)
        if dev.held:
            self._release_held(dev, mac)

    def _fdb_delete(self, dev: LinuxDevice, mac: bytes) -> None:
        dev.fdb.pop(mac, None)
        if self.spoof is not None:
            self.spoof.note(dev.vnet_id, mac, None)
        self.tracker.forgive(dev.name, "l2", mac)
        if dev.vx_ifindex:
            self._enqueue(
                f"fdb delete {format_mac(mac)} on {dev.vxlan}",
                devices.fdb_delete,
                dev.vx_ifindex,
                _mac_text(mac),
            )

    def cache_get(self, name: str, mac: bytes) -> CacheEntry | None:
        dev = self.device(name)
        check_mac(mac)
        if dev.mode == TargetMode.POINT and dev.point is not None:
            return CacheEntry(mac, VALID, dev.point)
        if mac not in self._dynamic(name, "read").fdb:
            return None
        point = dev.fdb[mac]
        return CacheEntry(mac, DROP if point is None else VALID, point)

    def cache_set(self, name: str, mac: bytes, point: Point | None, drop: bool = False) -> None:
        dev = self._check_cache_set(name, mac, point, drop)
        self._fdb_set(dev, mac, None if drop else point)

    def cache_remove(self, name: str, mac: bytes) -> None:
        check_mac(mac)
        dev = self._dynamic(name, "remove from")
        if mac not in dev.fdb:
            raise NoSuchEntry(f"no target cache entry for that MAC on {name}")
        self._fdb_delete(dev, mac)

    def cache_flush(self, name: str) -> None:
        dev = self._dynamic(name, "flush")
        for mac in list(dev.fdb):
            self._fdb_delete(dev, mac)

    def cache_list(
        self, name: str, after: bytes | None = None, limit: int | None = None
    ) -> list[CacheEntry]:
        dev = self.device(name)
        if dev.mode == TargetMode.POINT and dev.point is not None:
            return [] if after is not None else [CacheEntry(ZERO_MAC, VALID, dev.point)]
        dev = self._dynamic(name, "list")
        out = []
        for mac in sorted(dev.fdb):
            if after is not None and mac <= after:
                continue
            point = dev.fdb[mac]
            out.append(CacheEntry(mac, DROP if point is None else VALID, point))
            if limit is not None and len(out) >= limit:
                break
        return out


def send_each(_ipr: Any, sender: PacketSender, ifnames: list[str], frame: bytes) -> None:
    """A kernel-write-queue step that sends ``frame`` out of each host end (no netlink)."""
    for ifname in ifnames:
        sender.send(ifname, frame)
