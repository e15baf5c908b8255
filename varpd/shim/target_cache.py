"""The DYNAMIC-mode target cache and the driver-wide miss queue (overlay_target.c).

``TargetCache`` maps a destination MAC (the only key: broadcast and multicast MACs are just
more keys) to a ``TargetEntry`` with flags PENDING / VALID / DROP, the answer point, and the
frames waiting for an answer. ``MissQueue`` is the driver's one global list of entries waiting
to be handed to varpd plus the table of requests varpd holds (req_id -> entry).

State machine of one entry (spec §2.2, §2.4, §9.3):

- tx, no entry: create it, queue the frame, PENDING, queue the entry for lookup.
- tx, DROP set (DROP wins over VALID): drop the frame.
- tx, VALID: send to the point.
- tx, otherwise: append to the entry's queue unless that passes 128 KiB (tail drop); if it
  was not PENDING, mark it and queue it for lookup again. So at most one lookup per MAC.
- respond: VALID, store the point, clear PENDING, send every queued frame in order.
- drop: if VALID meanwhile, just clear PENDING; else drop the head frame only and, if frames
  remain, queue the entry for another lookup (still PENDING), else clear PENDING.
- cache_set(point): VALID + point, send the queued frames; DROP and PENDING untouched.
- cache_set(drop): set DROP; VALID untouched.
- cache_remove / cache_flush: clear VALID and DROP; the entry, its queued frames and any
  outstanding lookup stay.

There is no TTL and no eviction, as in illumos: an entry lives until the device is deleted or
re-associated. What is bounded is what waits: 128 KiB of frames per entry, and driver-wide a
number of entries waiting for a lookup and a number of queued bytes (``MissQueue`` limits),
so a flood of misses with no varpd to answer cannot grow without limit.
"""

from __future__ import annotations

import itertools
from collections import deque
from typing import TYPE_CHECKING

import trio

from .types import DROP, PENDING, VALID, CacheEntry, NoSuchEntry, Point

if TYPE_CHECKING:
    from .device import OverlayDevice

ENTRY_QUEUE_LIMIT = 128 * 1024  # overlay_ent_size
DEFAULT_MAX_WAITING = 16384
DEFAULT_MAX_QUEUED_BYTES = 64 * 1024 * 1024


class TargetEntry:
    __slots__ = ("mac", "flags", "point", "frames", "queued_bytes", "req_id", "cache")

    def __init__(self, mac: bytes, cache: TargetCache) -> None:
        self.mac = mac
        self.flags = 0
        self.point: Point | None = None
        self.frames: deque[bytes] = deque()
        self.queued_bytes = 0
        self.req_id: int | None = None
        self.cache: TargetCache | None = cache  # None once the entry is discarded

    def snapshot(self) -> CacheEntry:
        return CacheEntry(self.mac, int(self.flags), self.point if self.flags & VALID else None)


class MissQueue:
    """Entries waiting for varpd, in arrival order, and the requests varpd holds."""

    def __init__(
        self,
        max_waiting: int = DEFAULT_MAX_WAITING,
        max_queued_bytes: int = DEFAULT_MAX_QUEUED_BYTES,
    ) -> None:
        self.max_waiting = max_waiting
        self.max_queued_bytes = max_queued_bytes
        self.queue: deque[TargetEntry] = deque()
        self.parked = 0  # entries set aside because their device has no varpd associated
        self.queued_bytes = 0  # frames held in entries, driver-wide
        self.outstanding: dict[int, TargetEntry] = {}
        self._ids = itertools.count(1)
        self._lot = trio.lowlevel.ParkingLot()

    def waiting(self) -> int:
        return len(self.queue) + self.parked

    def can_take(self, nbytes: int, new_lookup: bool) -> bool:
        if self.queued_bytes + nbytes > self.max_queued_bytes:
            return False
        return not (new_lookup and self.waiting() >= self.max_waiting)

    def push(self, entry: TargetEntry) -> None:
        self.queue.append(entry)
        self._lot.unpark()

    async def pop(self) -> TargetEntry:
        while not self.queue:
            await self._lot.park()
        return self.queue.popleft()

    def purge(self) -> None:
        """Forget queued entries whose cache discarded them (after a delete or re-association)."""
        self.queue = deque(entry for entry in self.queue if entry.cache is not None)

    def new_request(self, entry: TargetEntry) -> int:
        req_id = next(self._ids)
        entry.req_id = req_id
        self.outstanding[req_id] = entry
        return req_id

    def take(self, req_id: int) -> TargetEntry | None:
        entry = self.outstanding.pop(req_id, None)
        if entry is not None:
            entry.req_id = None
        return entry


class TargetCache:
    """One DYNAMIC device's MAC -> entry table; frames leave through the device."""

    def __init__(self, device: OverlayDevice, misses: MissQueue) -> None:
        self.device = device
        self.misses = misses
        self.entries: dict[bytes, TargetEntry] = {}
        self.counters = device.counters

    # ------------------------------------------------------------------ tx path

    def miss(self, mac: bytes, frame: bytes, entry: TargetEntry | None) -> None:
        """A frame for ``mac`` that cannot be sent now (no entry, or not VALID/DROP)."""
        size = len(frame)
        if entry is None:
            if not self.misses.can_take(size, True):
                self.counters["tx_drop_lookup_queue_full"] += 1
                return
            entry = TargetEntry(mac, self)
            self.entries[mac] = entry
        else:
            if entry.queued_bytes + size > ENTRY_QUEUE_LIMIT:
                self.counters["tx_drop_queue_full"] += 1
                return
            if not self.misses.can_take(size, not entry.flags & PENDING):
                self.counters["tx_drop_lookup_queue_full"] += 1
                return
        entry.frames.append(frame)
        entry.queued_bytes += size
        self.misses.queued_bytes += size
        self.counters["tx_queued"] += 1
        if not entry.flags & PENDING:
            entry.flags |= PENDING
            self.device.request_lookup(entry)

    def pop_head(self, entry: TargetEntry) -> bytes:
        frame = entry.frames.popleft()
        entry.queued_bytes -= len(frame)
        self.misses.queued_bytes -= len(frame)
        return frame

    def release(self, entry: TargetEntry, point: Point) -> None:
        """Send every queued frame of ``entry`` to ``point``, in order."""
        send = self.device.encap_send
        while entry.frames:
            send(self.pop_head(entry), point)

    # ------------------------------------------------------------------ answers

    def respond(self, entry: TargetEntry, point: Point) -> None:
        entry.flags = (entry.flags & ~PENDING) | VALID
        entry.point = point
        self.release(entry, point)

    def drop(self, entry: TargetEntry) -> None:
        if entry.flags & VALID:
            entry.flags &= ~PENDING
            return
        if entry.frames:
            self.pop_head(entry)
            self.counters["tx_drop_lookup"] += 1
        if entry.frames:
            self.device.request_lookup(entry)
        else:
            entry.flags &= ~PENDING

    # ------------------------------------------------------------------ administration

    def get(self, mac: bytes) -> CacheEntry | None:
        entry = self.entries.get(mac)
        if entry is None or not entry.flags & (VALID | DROP):
            return None
        return entry.snapshot()

    def set(self, mac: bytes, point: Point | None, drop: bool) -> None:
        entry = self.entries.get(mac)
        if entry is None:
            entry = TargetEntry(mac, self)
            self.entries[mac] = entry
        if drop:
            entry.flags |= DROP
            return
        assert point is not None
        entry.flags |= VALID
        entry.point = point
        self.release(entry, point)

    def remove(self, mac: bytes) -> None:
        entry = self.entries.get(mac)
        if entry is None:
            raise NoSuchEntry(f"no target cache entry for that MAC on {self.device.name}")
        entry.flags &= ~(VALID | DROP)
        entry.point = None

    def flush(self) -> None:
        for entry in self.entries.values():
            entry.flags &= ~(VALID | DROP)
            entry.point = None

    def list(self, after: bytes | None = None, limit: int | None = None) -> list[CacheEntry]:
        """VALID or DROP entries in MAC order, starting after the ``after`` marker."""
        out = []
        for mac in sorted(self.entries):
            if after is not None and mac <= after:
                continue
            entry = self.entries[mac]
            if entry.flags & (VALID | DROP):
                out.append(entry.snapshot())
                if limit is not None and len(out) >= limit:
                    break
        return out

    # ------------------------------------------------------------------ teardown

    def forget_answers(self) -> None:
        """A new varpd association: keep only the misses still waiting, with no answers."""
        for mac, entry in list(self.entries.items()):
            if entry.frames:
                entry.flags &= ~(VALID | DROP)
                entry.point = None
            else:
                entry.cache = None
                del self.entries[mac]
        self.misses.purge()

    def discard(self) -> int:
        """Drop every entry and queued frame (device deleted or mode changed); frames dropped."""
        dropped = 0
        for entry in self.entries.values():
            while entry.frames:
                self.pop_head(entry)
                dropped += 1
            entry.cache = None
        self.entries.clear()
        self.misses.purge()
        self.counters["tx_drop_flushed"] += dropped
        return dropped
