"""The log poller: applies portolan's shootdown log to this node (spec §4.7, CONVENTIONS).

One poller per remote. A cycle:

1. wait until a connection is ACTIVE; send LOG_REQ {count = ``log_count`` (1024), ip =
   ``svp/underlay_ip``};
2. apply every entry, the VL3 ones concurrently (each needs a VL3_REQ):
   - VL2 {mac, vnet}: remove the MAC from the kernel cache of the instance serving that vnet
     (``driver.cache_remove``). Always acknowledged.
   - VL3 {ip, vlan, vnet}: VL3_REQ(ip, vnet). OK: push the new VL2 mapping into the cache
     (``driver.cache_set``; illumos does not, we do so the first frame after the move does not
     miss), then inject towards the local guests a gratuitous ARP (IPv4) or an unsolicited
     Neighbor Advertisement to all-nodes (IPv6; illumos ignores v6), tagged with the entry's
     VLAN. Acknowledged when the status was OK or NOTFOUND; other failures leave the entry for
     redelivery.
   - an entry for a vnet no attached instance serves is acknowledged without action.
3. LOG_RM the acknowledged ids at once (illumos waits 1 s);
4. poll again immediately if anything was acknowledged, else after ``log_interval`` (0.25 s;
   illumos 5-10 s). Together that keeps a VNIC move within the 1 s convergence goal.

Waiting instead of polling (protocol.svp_ext): when the connection's server granted LOG_WAIT
in answer to our HELLO (``Connection.caps``), step 1 is a LOG_WAIT of ``log_wait_time`` (55 s,
bounded by the server's maximum) instead of a LOG_REQ: the server answers as soon as an entry
for this node exists, or empty when the wait passes, and the next cycle starts at once. So an
idle node costs one request per 55 s instead of four a second, and a shootdown arrives as soon
as it is written instead of up to one interval later. Right after a connection comes up the
poller waits (up to ``_PROBE_WAIT``) for the HELLO's answer; a server without the extension
(an empty PONG, or a server that dropped the connection over the HELLO) is polled as above.

Failures (no connection, a reset, a non-OK LOG_ACK) just wait the idle interval and retry.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import trio

from protocol.addr import UNSPECIFIED, ip_from_wire
from protocol.ethernet import build_garp, build_unsolicited_na
from protocol.svp import LogRouteEntry, LogVL2Entry, LogVL3Entry, Status
from varpd.plugins.svp.conn import Connection, SvpError
from varpd.shim.types import Point

if TYPE_CHECKING:
    from protocol.svp import LogEntry
    from varpd.plugins.svp.remote import Remote

log = logging.getLogger("varpd.plugins.svp")

#: How long a fresh connection's HELLO may take before the poller falls back to LOG_REQ.
_PROBE_WAIT = 2.0


def build_announcement(mac: bytes, ip16: bytes, vlan: int = 0) -> bytes:
    """The frame that tells local guests ``ip16`` now lives at ``mac``: GARP or NA."""
    ip = ip_from_wire(ip16)
    if ip.version == 4:
        return build_garp(mac, ip.packed, vlan)
    return build_unsolicited_na(mac, ip16, vlan)


class LogPoller:
    """Polls one remote's log and applies it to the attached instances."""

    def __init__(self, remote: Remote) -> None:
        self.remote = remote
        self.interval = remote.options.log_interval
        self.count = remote.options.log_count
        self.wait_time = remote.options.log_wait_time
        self.polls = 0
        self.waits = 0
        self.applied = 0
        self._failed = False
        self._empty = False

    async def run(self) -> None:
        while True:
            await self.remote.wait_active()
            conn = await self._waiting_connection()
            started = trio.current_time()
            try:
                removed = await self.poll_once(conn)
            except Exception:  # a bug here must not take the daemon down; try again later
                log.exception("svp %s: log poll failed", self.remote.label)
                removed, self._failed = 0, True
            if removed:
                continue
            if (
                conn is not None
                and not self._failed
                and self._empty
                and trio.current_time() - started >= self.interval
            ):
                continue  # a LOG_WAIT that was held and ran out: wait again at once
            await trio.sleep(self.interval)

    async def _waiting_connection(self) -> Connection | None:
        """The connection to send LOG_WAIT on, or None to poll with LOG_REQ."""
        remote = self.remote
        if not remote.options.log_wait:
            return None
        deadline = trio.current_time() + _PROBE_WAIT
        while remote.probing() and trio.current_time() < deadline:
            await remote.wait_changed(deadline)
        return remote.wait_connection()

    async def poll_once(self, conn: Connection | None = None) -> int:
        """One LOG_REQ (or, with ``conn``, LOG_WAIT) / apply / LOG_RM cycle; returns the number
        of ids acknowledged."""
        self._failed, self._empty = True, False
        try:
            if conn is not None:
                self.waits += 1
                ack = await self.remote.log_wait(conn, self.count, self.wait_time)
            else:
                self.polls += 1
                ack = await self.remote.log_request(self.count)
        except SvpError as exc:
            log.debug("svp %s: log request failed: %s", self.remote.label, exc)
            return 0
        if ack.status != Status.OK:
            log.info("svp %s: LOG_ACK status %d", self.remote.label, ack.status)
            return 0
        self._failed = False
        if not ack.entries:
            self._empty = True
            return 0
        handled: list[bool] = [False] * len(ack.entries)
        async with trio.open_nursery() as nursery:
            for index, entry in enumerate(ack.entries):
                nursery.start_soon(self._apply, entry, handled, index)
        ids = tuple(e.entry_id for e, ok in zip(ack.entries, handled, strict=True) if ok)
        if not ids:
            return 0
        try:
            rm = await self.remote.log_remove(ids)
        except SvpError as exc:
            log.info("svp %s: LOG_RM of %d ids failed: %s", self.remote.label, len(ids), exc)
            return 0
        if rm.status != Status.OK:
            log.info("svp %s: LOG_RM_ACK status %d", self.remote.label, rm.status)
        return len(ids)

    async def _apply(self, entry: LogEntry, handled: list[bool], index: int) -> None:
        if isinstance(entry, LogVL2Entry):
            handled[index] = self._apply_vl2(entry)
        elif isinstance(entry, LogVL3Entry):
            handled[index] = await self._apply_vl3(entry)
        elif isinstance(entry, LogRouteEntry):  # v2 only; we speak v1 and have no route cache
            handled[index] = True

    def _apply_vl2(self, entry: LogVL2Entry) -> bool:
        host = self.remote.hosts.get(entry.vnet_id)
        if host is None:
            return True
        try:
            host.driver.cache_remove(host.device, entry.mac)
        except Exception as exc:  # the entry may simply not be cached
            log.debug("svp: cache_remove on %s: %s", host.device, exc)
        self.applied += 1
        self.remote.metrics.shootdown("vl2")
        return True

    async def _apply_vl3(self, entry: LogVL3Entry) -> bool:
        host: Any = self.remote.hosts.get(entry.vnet_id)
        if host is None:
            return True
        try:
            ack = await self.remote.vl3(entry.ip, entry.vnet_id)
        except SvpError as exc:
            log.info("svp: VL3 re-resolve of %s failed: %s", ip_from_wire(entry.ip), exc)
            return False
        if ack.status == Status.NOTFOUND:
            return True
        if ack.status != Status.OK:
            return False
        # The instance may have gone while we waited for the answer.
        host = self.remote.hosts.get(entry.vnet_id)
        if host is None:
            return True
        try:
            if ack.addr != UNSPECIFIED:  # as SvpPlugin.arp: never cache a point at ::
                host.driver.cache_set(host.device, ack.mac, Point(ack.addr, ack.port))
            host.driver.inject(host.device, build_announcement(ack.mac, entry.ip, entry.vlan))
        except Exception as exc:
            log.info("svp: cannot apply VL3 shootdown on %s yet: %s", host.device, exc)
            return False
        self.applied += 1
        self.remote.metrics.shootdown("vl3")
        return True
