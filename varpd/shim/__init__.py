"""The shim: a model of the illumos overlay driver (overlay(7), /dev/overlay) in trio.

What it owns
------------
The kernel half of SmartDataCenter's overlay networking. The overlay design answers two
questions: *how do I put a frame on the wire?* (encapsulation: VXLAN, here) and *where do I
send it?* (the target: one fixed point, or a cache filled by varpd). The shim answers the
first and keeps the answers to the second; varpd (``varpd/``) finds them. varpd talks to the
shim only through ``OverlayDriver``'s methods, as illumos varpd talks only to /dev/overlay.

::

     guest      guest                    varpd lookup workers
       |          |                        ^ next_lookup()   | respond/drop, inject,
   VnicPort   VnicPort                     |                 v resend, cache_*
   +--Vnic------Vnic-------- OverlayDevice (name, vnetid, mtu, vxlan/listen_*) -------+
   |  local switch: unicast to a local MAC stays here; broadcast/multicast goes to the |
   |  other VNICs of the VLAN *and* to the overlay tx path                             |
   |  tx: add 802.1Q tag (VNIC vlan) -> MTU check -> target:                           |
   |      POINT: the one point, for every frame     DYNAMIC: TargetCache (dst MAC)     |
   |      -> VXLAN header (precomputed) + frame -> Backend.send(listen, point, flow)   |
   |  rx: Mux (per listen ip:port) -> VNI -> device -> spoof check -> strip tag ->    |
   |      VNICs of that VLAN                                                           |
   +------------------------------------------------------------------------------------+
                  Backend: memory (MemoryUnderlay) | udp (sockets + TAP, separate module)

Identifiers and objects
-----------------------
- ``OverlayDriver`` (driver.py): all devices of a node, the muxes, the miss queue, the upcalls.
- ``OverlayDevice`` / ``Vnic`` (device.py): a device's properties, state, target and VNICs.
- ``DeviceTable`` / ``DeviceRecord`` (bookkeeping.py): the bases of ``OverlayDriver`` and
  ``OverlayDevice``, shared with the kernel backend (``varpd.linux``): the devices by name,
  the argument and property checks, association, degrade/restore/status, the upcall counters.
- ``TargetCache`` / ``MissQueue`` (target_cache.py): DYNAMIC mode's MAC -> point cache with its
  state machine, and the driver-wide queue of misses waiting for varpd.
- ``Mux`` (mux.py): one per listen ip:port in use, shared by its devices, demux by VNI.
- ``Backend`` / ``VnicPort`` (backend.py): what moves datagrams and frames; ``memory.py`` is
  the in-process implementation, ``udp.py`` the one on real UDP sockets with TAP devices as
  VNICs (``tap.py``), imported only when used.
- types.py: ``Point``, ``LookupRequest``, ``CacheEntry``, enums, ``DeviceStatus``, errors.

Lifecycle of a device (spec §1.3)
---------------------------------
``create_device(name, vnetid)`` (name unique; vnetid 0..2^24-1; (vnetid, encap) unique, else
``AlreadyExists``/EEXIST) -> ``set_prop`` (``mtu`` 576..8900 default 1400, ``vxlan/listen_ip``
required, ``vxlan/listen_port`` default 4789; ``vnetid`` settable below 2^24-1, the illumos
off-by-one) -> varpd ``associate(name, varpd_id, mode, point)`` -> ``await activate(name)``
(needs listen_ip (EINVAL) and an association (ENXIO); binds/joins the mux) -> frames flow. After
activation every ``set_prop`` fails with ``NotSupported`` (ENOTSUP). ``await delete_device``
fails with ``DeviceBusy`` (EBUSY) while VNICs exist; otherwise it leaves the mux (the last
device unbinds the address), takes back varpd's requests and drops waiting frames.

Deviation: illumos joins the mux when the first MAC client starts; we join at activation (the
VNIC calls are synchronous and binding a socket is not), so an activated device receives even
with no VNIC yet.

Association: ``associate`` installs a fresh target each time (POINT: the point; DYNAMIC: a
cache with no answers). Misses that were waiting are kept and go to the new varpd, so a frame
that arrives while no varpd is associated waits (parked) instead of being lost; limits below.
``disassociate`` takes back every request varpd holds for the device (its req_ids become
unknown) and parks them. ``degrade``/``restore``/``status`` model overlay_fm.c: a flag and a
message of at most 255 characters, link state untouched; ``degraded_count`` is the driver's
total.

Life of a frame
---------------
Guest -> ``VnicPort`` -> ``Vnic.transmit``: firewall ``filter.check(frame, OUT)``; then
``OverlayDevice.from_guest``: runt (<14), MTU (>mtu+14) and guest-tagged (802.1Q from the
untagged tenant side: it could hop VLANs) drops; unicast to a local MAC of
the same VLAN is delivered there (``filter.check(frame, IN)`` at the receiver) and stops;
broadcast/multicast is delivered to the VLAN's other VNICs and continues. The 802.1Q tag is
added for a VNIC with vlan != 0. ``overlay_tx`` (also the target of ``resend``): not in a mux
-> drop; > mtu+14(+4 tagged) -> drop; POINT -> send; DYNAMIC -> cache: DROP -> drop, VALID ->
send, else queue on the entry (miss). Sending is ``vxlan header + frame`` to
``Backend.send(listen, point, datagram, flow_hash(frame))``: synchronous, never awaits; a
refusal is counted (``tx_drop_backend``). The backend turns the flow hash into the outer
source port: memory uses ``protocol.vxlan.source_port(flow_hash)``, udp picks one socket of
its send pool, so one inner flow always leaves from one port.

Receive: backend -> ``Mux.receive(payload, outer source)``: <8 bytes, no I bit, unknown VNI
are counted drops on the mux; reserved bits are ignored. Device: inner <14 bytes -> drop;
**spoof check** (beyond illumos): if the inner source MAC is VALID in this device's cache at
another underlay IP than the outer source IP, drop (``rx_drop_spoofed``). Then the tag is
stripped and the frame goes to the VNIC with that MAC on that VLAN, or to every VNIC of the
VLAN for broadcast/multicast; ``inject`` enters here too (``bypass_filter=True`` by default,
for varpd's proxy replies).

Misses and the upcall interface (spec §2.2, §2.3)
-------------------------------------------------
A miss creates a PENDING entry holding the frame and queues it on the driver's ``MissQueue``.
``await driver.next_lookup()`` pops the oldest entry of an associated device and returns a
``LookupRequest`` built from its head frame (L2 fields + the bytes); the entry stays PENDING
until ``respond(req_id, point)`` (VALID; all queued frames sent in order) or ``drop(req_id)``
(the head frame dropped; another lookup if frames remain). One lookup per MAC at a time; later
frames wait behind it, at most 128 KiB per entry (tail drop, ``tx_drop_queue_full``). Unknown
req_ids raise ``UnknownRequest``. next_lookup has no 1-second timeout: cancel it instead.

Limits: no TTL and no eviction of cache entries (illumos has neither); what is bounded is
waiting work: ``max_waiting_lookups`` entries waiting for a lookup (default 16384) and
``max_queued_bytes`` of frames in all entries (default 64 MiB). Past either, the frame is
dropped (``tx_drop_lookup_queue_full``).

Concurrency and what may block
------------------------------
Everything runs in one trio thread. Frame paths and cache operations are synchronous and
never await, so no lock is needed and nothing interleaves inside them. Only ``activate``,
``delete_device`` (a lock serialises them: they await the backend's bind/unbind) and
``next_lookup`` await. Run the driver with ``await nursery.start(driver.run)`` or
``async with driver.running():`` -- it hosts the backend's tasks (the memory backend has none).

Metrics: ``driver.counters``, ``device.counters``, ``mux.counters``, ``vnic.counters`` are
plain dicts; ``driver.metrics()`` gathers them for the daemon's exporter.

Where to change what: wire format -> protocol/vxlan.py; frame helpers -> protocol/ethernet.py;
what both drivers accept, refuse and report (checks, properties, association, status) ->
bookkeeping.py; cache semantics -> target_cache.py; switching/tagging/MTU/spoof check ->
device.py; demux -> mux.py; a new way to move bytes -> implement backend.py's protocols.
"""

from .backend import Backend, DatagramReceiver, FrameSink, VnicPort
from .device import OverlayDevice, Vnic
from .driver import OverlayDriver
from .memory import Datagram, MemoryBackend, MemoryUnderlay, MemoryVnicPort
from .types import (
    DROP,
    PENDING,
    VALID,
    AddressInUse,
    AlreadyExists,
    CacheEntry,
    CacheFlag,
    DeviceBusy,
    DeviceStatus,
    Direction,
    DstType,
    FrameFilter,
    InvalidArgument,
    LookupRequest,
    NoSuchDevice,
    NoSuchEncap,
    NoSuchEntry,
    NoSuchProperty,
    NotAssociated,
    NotSupported,
    Point,
    ReadOnlyProperty,
    ShimError,
    TargetMode,
    UnknownRequest,
)

__all__ = [
    "DROP",
    "PENDING",
    "VALID",
    "AddressInUse",
    "AlreadyExists",
    "Backend",
    "CacheEntry",
    "CacheFlag",
    "DatagramReceiver",
    "Datagram",
    "DeviceBusy",
    "DeviceStatus",
    "Direction",
    "DstType",
    "FrameFilter",
    "FrameSink",
    "InvalidArgument",
    "LookupRequest",
    "MemoryBackend",
    "MemoryUnderlay",
    "MemoryVnicPort",
    "NoSuchDevice",
    "NoSuchEncap",
    "NoSuchEntry",
    "NoSuchProperty",
    "NotAssociated",
    "NotSupported",
    "OverlayDevice",
    "OverlayDriver",
    "Point",
    "ReadOnlyProperty",
    "ShimError",
    "TargetMode",
    "UnknownRequest",
    "Vnic",
    "VnicPort",
]
