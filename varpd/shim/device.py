"""One overlay device: properties, lifecycle state, its VNICs and its frame paths.

The ``OverlayDriver`` owns devices and checks the rules that involve several of them
(uniqueness, muxes, the miss queue); a device owns what is its own: property values, the
target (a point or a ``TargetCache``), the VNICs and local switching, VLAN tagging, the MTU,
and encapsulation. Nothing here awaits: every frame path is a plain synchronous call chain.

The properties, association and degrade state are `bookkeeping.DeviceRecord`'s, which the
linux backend's device shares; `OverlayDevice` adds the frame paths and lets ``vnetid`` change
before activation (illumos does). The property limits and ``validate_listen_ip`` live in
bookkeeping.py and are re-exported here, where callers have always found them.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from protocol import vxlan
from protocol.addr import format_mac

from .backend import VnicPort
from .bookkeeping import MTU_DEFAULT as MTU_DEFAULT
from .bookkeeping import MTU_MAX as MTU_MAX
from .bookkeeping import MTU_MIN as MTU_MIN
from .bookkeeping import PROPERTY_NAMES as PROPERTY_NAMES
from .bookkeeping import VXLAN_PORT_DEFAULT as VXLAN_PORT_DEFAULT
from .bookkeeping import DeviceRecord
from .bookkeeping import validate_listen_ip as validate_listen_ip
from .target_cache import TargetCache, TargetEntry
from .types import (
    DROP,
    VALID,
    Direction,
    FrameFilter,
    InvalidArgument,
    Point,
)

if TYPE_CHECKING:
    from .driver import OverlayDriver
    from .mux import Mux

_TPID = b"\x81\x00"

DEVICE_COUNTERS = (
    "tx_frames",  # encapsulated and handed to the backend
    "tx_bytes",  # inner bytes of those
    "tx_queued",  # frames that waited in the target cache for an answer
    "tx_drop_inactive",  # device not activated / not in a mux
    "tx_drop_runt",  # shorter than an Ethernet header
    "tx_drop_mtu",  # inner frame larger than mtu + 14 (+4 tagged)
    "tx_drop_tagged",  # the guest sent an 802.1Q-tagged frame (tenant side is untagged)
    "tx_drop_cache",  # destination cached as DROP
    "tx_drop_queue_full",  # 128 KiB per-entry miss queue full (tail drop)
    "tx_drop_lookup_queue_full",  # driver-wide miss limits reached
    "tx_drop_lookup",  # varpd answered DROP (head frame)
    "tx_drop_bad_header",  # head frame with an unparsable L2 header
    "tx_drop_backend",  # the backend refused the datagram
    "tx_drop_flushed",  # queued frames discarded by delete / re-association
    "rx_frames",  # decapsulated frames accepted for this device
    "rx_bytes",
    "rx_drop_runt",
    "rx_drop_spoofed",  # inner source MAC cached at another underlay IP
    "rx_unclaimed",  # unicast to no local VNIC on that VLAN
    "local_frames",  # frames switched between local VNICs (per receiving VNIC)
    "filter_drop_out",
    "filter_drop_in",
    "injected",
    "resent",
    "lookups",  # requests handed to varpd
)

VNIC_COUNTERS = ("tx_frames", "rx_frames", "rx_drop_full", "filter_drop_out", "filter_drop_in")


class Vnic:
    """A VNIC on an overlay device: its MAC, VLAN, tenant-side port and firewall hook."""

    def __init__(self, device: OverlayDevice, mac: bytes, vlan: int, port: VnicPort) -> None:
        self.device = device
        self.mac = mac
        self.vlan = vlan
        self.port = port
        self.filter: FrameFilter | None = None
        self.counters: dict[str, int] = dict.fromkeys(VNIC_COUNTERS, 0)
        self.tag = _TPID + struct.pack(">H", vlan) if vlan else b""

    def __repr__(self) -> str:
        return f"<Vnic {format_mac(self.mac)} vlan {self.vlan} on {self.device.name}>"

    def transmit(self, frame: bytes) -> None:
        """A frame from the guest (untagged); installed as the port's transmit callback."""
        if not isinstance(frame, bytes):
            frame = bytes(frame)
        flt = self.filter
        if flt is not None and not flt.check(frame, Direction.OUT):
            self.counters["filter_drop_out"] += 1
            self.device.counters["filter_drop_out"] += 1
            return
        self.counters["tx_frames"] += 1
        self.device.from_guest(self, frame)

    def to_guest(self, frame: bytes, filtered: bool = True) -> None:
        flt = self.filter
        if filtered and flt is not None and not flt.check(frame, Direction.IN):
            self.counters["filter_drop_in"] += 1
            self.device.counters["filter_drop_in"] += 1
            return
        if self.port.deliver(frame):
            self.counters["rx_frames"] += 1
        else:
            self.counters["rx_drop_full"] += 1


class OverlayDevice(DeviceRecord):
    """State of one overlay link; see the package docstring for the lifecycle.

    Properties, association and degrade state are the shared `DeviceRecord`'s; this adds the
    frame paths, the target cache, the parked misses and the mux.
    """

    READ_ONLY_PROPS = ("encap", "varpd/id")  # vnetid may change before activation (illumos)

    vnics: dict[bytes, Vnic]

    def __init__(self, driver: OverlayDriver, name: str, vnet_id: int, encap: str) -> None:
        super().__init__(name, vnet_id, encap, DEVICE_COUNTERS)
        self.driver = driver
        self.cache: TargetCache | None = None
        self.parked: list[TargetEntry] = []  # misses waiting for a varpd to associate
        self.mux: Mux | None = None
        self.by_vlan: dict[int, list[Vnic]] = {}
        self._listen: Point | None = None
        self._header = vxlan.encode_header(vnet_id)
        self._max_frame = self.mtu + 14

    # ------------------------------------------------------------------ properties

    def _set_mtu(self, mtu: int) -> None:
        self.mtu = mtu
        self._max_frame = mtu + 14

    def _set_vnet_id(self, vnet_id: int) -> None:
        # illumos quirk (§9.2), kept: setprop refuses 2^24-1 although create accepts it.
        if vnet_id >= vxlan.VNI_MAX:
            raise InvalidArgument(f"vnetid must be below {vxlan.VNI_MAX}, got {vnet_id}")
        self.driver.check_vnet_id_free(vnet_id, self.encap, self)
        self.vnet_id = vnet_id
        self._header = vxlan.encode_header(vnet_id)

    def listen_point(self) -> Point:
        assert self.listen_ip is not None
        return Point(self.listen_ip, self.listen_port)

    def joined(self, mux: Mux | None) -> None:
        self.mux = mux
        self._listen = None if mux is None else mux.listen

    # ------------------------------------------------------------------ target

    def request_lookup(self, entry: TargetEntry) -> None:
        """Queue a PENDING entry for varpd (or park it until a varpd associates)."""
        if self.associated:
            self.driver.misses.push(entry)
        else:
            self.parked.append(entry)
            self.driver.misses.parked += 1

    def unpark(self) -> None:
        misses = self.driver.misses
        misses.parked -= len(self.parked)
        for entry in self.parked:
            if entry.cache is not None:
                misses.push(entry)
        self.parked.clear()

    # ------------------------------------------------------------------ tx path

    def from_guest(self, vnic: Vnic, frame: bytes) -> None:
        """Switch a guest frame locally and/or send it to the overlay."""
        if len(frame) < 14:
            self.counters["tx_drop_runt"] += 1
            return
        if len(frame) > self._max_frame:
            self.counters["tx_drop_mtu"] += 1
            return
        if frame[12:14] == _TPID:
            # The tenant side is untagged: a guest-made tag would let it hop VLANs.
            self.counters["tx_drop_tagged"] += 1
            return
        dst = frame[:6]
        if dst[0] & 1:
            for other in self.by_vlan.get(vnic.vlan, ()):
                if other is not vnic:
                    self.counters["local_frames"] += 1
                    other.to_guest(frame)
        else:
            other = self.vnics.get(dst)
            if other is not None and other.vlan == vnic.vlan:
                self.counters["local_frames"] += 1
                other.to_guest(frame)
                return
        if vnic.vlan:
            frame = frame[:12] + vnic.tag + frame[12:]
        self.overlay_tx(frame)

    def overlay_tx(self, frame: bytes) -> None:
        """The overlay transmit path (overlay_m_tx): target lookup, then encap and send."""
        if self.mux is None:
            self.counters["tx_drop_inactive"] += 1
            return
        if len(frame) < 14:
            self.counters["tx_drop_runt"] += 1
            return
        limit = self._max_frame + 4 if frame[12:14] == _TPID else self._max_frame
        if len(frame) > limit:
            self.counters["tx_drop_mtu"] += 1
            return
        cache = self.cache
        if cache is None:
            if self.point is None:
                self.counters["tx_drop_inactive"] += 1
            else:
                self.encap_send(frame, self.point)
            return
        dst = frame[:6]
        entry = cache.entries.get(dst)
        if entry is not None:
            flags = entry.flags
            if flags & DROP:
                self.counters["tx_drop_cache"] += 1
                return
            if flags & VALID:
                self.encap_send(frame, entry.point)  # type: ignore[arg-type]
                return
        cache.miss(dst, frame, entry)

    def encap_send(self, frame: bytes, point: Point) -> None:
        if self._listen is None:
            self.counters["tx_drop_inactive"] += 1
            return
        if self.driver.backend.send(
            self._listen, point, self._header + frame, vxlan.flow_hash(frame)
        ):
            self.counters["tx_frames"] += 1
            self.counters["tx_bytes"] += len(frame)
        else:
            self.counters["tx_drop_backend"] += 1

    # ------------------------------------------------------------------ rx path

    def receive(self, inner: bytes, source: Point) -> None:
        """A decapsulated frame from the mux; ``source`` is the outer sender."""
        if len(inner) < 14:
            self.counters["rx_drop_runt"] += 1
            return
        cache = self.cache
        if cache is not None:
            entry = cache.entries.get(inner[6:12])
            if (
                entry is not None
                and entry.flags & VALID
                and entry.point is not None
                and entry.point.ip != source.ip
            ):
                self.counters["rx_drop_spoofed"] += 1
                return
        self.counters["rx_frames"] += 1
        self.counters["rx_bytes"] += len(inner)
        self.deliver_up(inner, True)

    def deliver_up(self, frame: bytes, filtered: bool, skip_source: bool = False) -> None:
        """Hand a (possibly tagged) frame to the VNICs of its VLAN, untagged. ``skip_source``
        (injected frames): never to the VNIC whose MAC is the frame's source, so a VNIC does
        not hear its own announcement (a guest doing DAD would mark its address dadfailed)."""
        if frame[12:14] == _TPID:
            if len(frame) < 18:
                self.counters["rx_drop_runt"] += 1
                return
            vlan = ((frame[14] << 8) | frame[15]) & 0x0FFF
            frame = frame[:12] + frame[16:]
        else:
            vlan = 0
        dst = frame[:6]
        src = frame[6:12] if skip_source else None
        if dst[0] & 1:
            for vnic in self.by_vlan.get(vlan, ()):
                if vnic.mac != src:
                    vnic.to_guest(frame, filtered)
            return
        vnic = self.vnics.get(dst)
        if vnic is not None and vnic.vlan == vlan and vnic.mac != src:
            vnic.to_guest(frame, filtered)
        else:
            self.counters["rx_unclaimed"] += 1
