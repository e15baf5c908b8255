"""The boundary between the driver model and whatever moves its bytes.

A backend does two jobs and nothing else:

1. **Underlay datagrams.** ``bind(listen, receiver)`` starts receiving UDP datagrams addressed
   to ``listen`` and calls ``receiver(payload, source)`` for each one, ``source`` being the outer
   sender's ip:port (the mux's spoof check needs the IP). ``send(src, dst, payload, flow_hash)``
   sends ``payload`` from the listen address ``src`` to ``dst``; it never blocks and never
   awaits: it returns False when the datagram could not be taken (socket buffer full, no
   route), and the driver counts the drop. ``flow_hash`` is the inner flow's hash
   (``protocol.vxlan.flow_hash``); the backend turns it into the outer source port
   (``protocol.vxlan.source_port``) or uses it to pick one socket of a pool.
2. **VNIC ports.** ``vnic_port(device, mac, vlan)`` makes the tenant side of a VNIC when the
   caller of ``add_vnic`` did not bring one (memory: an in-process queue pair; udp: a TAP).

``run()`` hosts the backend's tasks (socket receive loops, TAP readers) for as long as the
driver runs; ``bind`` may require it to be running. The driver calls ``receiver`` and a port's
``transmit`` callback synchronously from those tasks: they do not block and do not await.

A ``VnicPort`` is attached by the driver with ``attach(transmit)``: the port calls
``transmit(frame)`` for every frame the guest sends (untagged Ethernet). The driver hands
frames to the guest with ``deliver(frame) -> bool`` (non-blocking; False = the guest side is
full and the frame is dropped and counted). ``detach()`` when the VNIC is removed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import trio

from .types import Point

DatagramReceiver = Callable[[bytes, Point], None]
FrameSink = Callable[[bytes], None]


class VnicPort(Protocol):
    def attach(self, transmit: FrameSink) -> None:
        """Start handing the guest's frames to ``transmit``."""
        ...

    def detach(self) -> None:
        """Stop: later guest frames are discarded; pending deliveries may be discarded."""
        ...

    def deliver(self, frame: bytes) -> bool:
        """Give ``frame`` to the guest; False if it could not be taken (dropped)."""
        ...


class Backend(Protocol):
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Host the backend's tasks until cancelled; ``task_status.started()`` once ready."""
        ...

    async def bind(self, listen: Point, receiver: DatagramReceiver) -> None:
        """Receive datagrams sent to ``listen``; raise ``AddressInUse`` if it is taken."""
        ...

    async def unbind(self, listen: Point) -> None:
        """Stop receiving on ``listen`` (idempotent)."""
        ...

    def send(self, src: Point, dst: Point, payload: bytes, flow_hash: int) -> bool:
        """Send a datagram from the bound ``src`` to ``dst``; never blocks; False = dropped."""
        ...

    def vnic_port(self, device: str, mac: bytes, vlan: int) -> VnicPort:
        """The default tenant-side port for a new VNIC."""
        ...
