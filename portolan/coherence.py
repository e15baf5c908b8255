"""Cross-instance coherence: keep this instance's lookup index in step with changes that other
portolan instances commit to the same PostgreSQL database.

Theory of operation
-------------------
Each instance applies its own writes to its index right after commit (``Directory.write``).
What others write reaches it through the changes feed (``portolan.store.notify``): a
``changes(version, payload)`` row per committed change plus ``NOTIFY portolan_changes``.

``Coherence.run`` keeps a LISTEN connection (``notify.listen``, a worker thread) and a
*cursor*: the highest feed version already folded into the index. On every notification it
*catches up*, in one REPEATABLE READ transaction:

1. ``meta.changes_floor`` > cursor (the feed was pruned past us) -> full reload;
2. ``SELECT version, payload FROM changes WHERE version > cursor ORDER BY version`` (batches);
   a ``reload`` record -> full reload;
3. the *current* rows of every key those records name (CNs, VNICs by MAC, routes).

It then rewrites those keys in the index: every (mac, vnet, ip) the records name is removed
(old VL3 keys included: the records carry previous states) and the current rows are put back.
Because it applies *current state* rather than replaying deltas, the step is idempotent and
commutes with the instance's own writes (including its own records coming back through the
feed): the index never moves backwards. Both run under the Directory's write lock
(``Directory.apply_remote``), so a remote catch-up and a local write never interleave.

Versions commit in increasing order (the meta version row is locked from ``next_version`` to
commit), so the committed feed is always a prefix and "version > cursor" misses nothing.

Losing the LISTEN connection means notifications may have been missed: when it comes back the
index is rebuilt in full (``tx.snapshot()``), the cursor set to the snapshot's version, and
catching up resumes. While the database is away, lookups keep being answered from memory.
A failed catch-up or reload (database flapping) is retried with backoff while connected.

When a catch-up saw records of another instance, or after a full reload, the Directory's
subscribers (``Directory.subscribe``: the firewall policy service) are told ``None``
("anything may have changed": the feed names keys, not the previous VNIC/rule states an
incremental policy update needs), and each extra hook in ``hooks`` is awaited with the
synthesised ``IndexChange`` (``None`` after a full reload). A catch-up of this instance's own
records (its writes come back through the feed too) tells nobody: they already know.

Lifecycle: ``await nursery.start(coherence.run)`` returns once LISTEN is active and the first
catch-up is done; cancel the nursery to stop.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import trio

from protocol.addr import int_to_mac

from .errors import StoreUnavailable
from .index import IndexChange
from .model import ComputeNode, Route, Vnic
from .store import Snapshot, Tx
from .store.notify import CHANNEL, ListenerEvent, decode_change, listen, merge

log = logging.getLogger("portolan.coherence")

RemoteHook = Callable[[IndexChange | None], Awaitable[None]]
BATCH = 1000


@dataclass(slots=True)
class _Delta:
    version: int
    more: bool = False
    cns_put: list[ComputeNode] = field(default_factory=list)
    cns_removed: list[str] = field(default_factory=list)
    vnics_old: list[tuple[int, int, str]] = field(default_factory=list)
    vnics_now: list[Vnic] = field(default_factory=list)
    routes_removed: list[tuple[int, int, str, str]] = field(default_factory=list)
    routes_now: list[Route] = field(default_factory=list)
    records: int = 0
    foreign: bool = False  # some record was written by another instance


class Coherence:
    """Follows the changes feed of a PostgreSQL store for one Directory."""

    def __init__(
        self,
        directory: Any,
        url: str,
        *,
        hooks: Sequence[RemoteHook] = (),
        channel: str = CHANNEL,
        retry_initial: float = 0.1,
        retry_max: float = 5.0,
        poll: float = 0.5,
    ) -> None:
        self.directory = directory
        self.url = url
        self.hooks: list[RemoteHook] = list(hooks)
        self.channel = channel
        self.cursor: int = directory.index.version
        self._origin: str = getattr(directory.store, "origin", "")
        self.listening = False
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self.poll = poll
        # counters (tests, metrics)
        self.catch_ups = 0
        self.full_reloads = 0
        self.records_applied = 0

    def add_hook(self, hook: RemoteHook) -> None:
        self.hooks.append(hook)

    # -- the task ---------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        send, recv = trio.open_memory_channel[ListenerEvent](256)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: listen(self.url, send, channel=self.channel, poll=self.poll))
            started = False
            dirty = False  # a catch-up (or reload) is due
            full = False  # notifications may have been missed: reload in full
            retry = self.retry_initial
            deadline = math.inf
            while True:
                ev: ListenerEvent | None = None
                with trio.move_on_at(deadline):
                    ev = await recv.receive()
                while ev is not None:
                    if ev.kind == "lost":
                        if self.listening:
                            log.warning("lost the change notifications: %s", ev.payload)
                        self.listening = False
                        full = True
                    elif ev.kind == "connected":
                        self.listening = True
                        dirty = True
                    else:
                        dirty = True
                    try:
                        ev = recv.receive_nowait()
                    except trio.WouldBlock:
                        ev = None
                deadline = math.inf
                if not (dirty and self.listening):
                    continue
                try:
                    if full:
                        await self.reload()
                        full = False
                    await self.catch_up()
                except Exception as exc:  # never let a bad moment take portolan down
                    if isinstance(exc, StoreUnavailable | OSError):
                        log.warning("catching up with the store failed (%s); retrying", exc)
                    else:
                        log.exception("catching up with the store failed; retrying")
                    deadline = trio.current_time() + retry
                    retry = min(retry * 2, self.retry_max)
                    continue
                dirty = False
                retry = self.retry_initial
                if not started:
                    started = True
                    task_status.started()

    # -- steps ------------------------------------------------------------------------------
    async def reload(self) -> None:
        """Rebuild the whole index from the store; the cursor becomes the snapshot's version.

        The new index is built in the worker thread that reads the snapshot (``prepare``) and
        swapped in under the Directory's write lock (``install``)."""
        index = self.directory.index
        prepare = getattr(index, "prepare", None)

        def read(tx: Tx) -> tuple[int, Any]:
            snap: Snapshot = tx.snapshot()
            return snap.version, (prepare(snap) if prepare is not None else snap)

        def apply(result: tuple[int, Any]) -> None:
            version, built = result
            if prepare is not None:
                index.install(built)
            else:
                index.load(built)
            self.cursor = version
            self._tell_subscribers()

        await self.directory.apply_remote(read, apply)
        self.full_reloads += 1
        log.info("index reloaded at version %d", self.cursor)
        await self._run_hooks(None)

    async def catch_up(self) -> None:
        """Fold every feed record after the cursor into the index (see the module docstring)."""
        while True:
            cursor = self.cursor
            box: list[IndexChange | None] = []

            def apply(delta: _Delta | None, box: list[IndexChange | None] = box) -> None:
                if delta is None:
                    return
                box.append(self._apply(delta))
                if delta.foreign:
                    self._tell_subscribers()

            delta = await self.directory.apply_remote(partial(self._read, cursor=cursor), apply)
            if delta is None:
                await self.reload()
                return
            self.catch_ups += 1
            change = box[0] if box else None
            if delta.foreign and change is not None:
                await self._run_hooks(change)
            if not delta.more:
                return

    def _read(self, tx: Tx, *, cursor: int) -> _Delta | None:
        floor = tx.meta_get("changes_floor") or 0
        if cursor < floor:
            return None
        rows = tx.execute(
            "SELECT version, payload FROM changes WHERE version > ? ORDER BY version LIMIT ?",
            (cursor, BATCH),
        ).fetchall()
        if not rows:
            return _Delta(cursor)
        keys = merge(decode_change(p) for _, p in rows)
        if keys.reload:
            return None
        delta = _Delta(int(rows[-1][0]), more=len(rows) == BATCH, records=len(rows))
        delta.foreign = bool(keys.origins - {self._origin})
        for uuid in sorted(keys.cns):
            cn = tx.get_cn(uuid)
            if cn is None:
                delta.cns_removed.append(uuid)
            else:
                delta.cns_put.append(cn)
        delta.vnics_old = sorted(keys.vnics)
        macs = sorted({int_to_mac(m) for m, _, _ in keys.vnics})
        delta.vnics_now = list(tx.get_vnics(macs).values())
        for key in sorted(keys.routes):
            route = tx.get_route(key)
            delta.routes_removed.append(key)
            if route is not None:
                delta.routes_now.append(route)
        return delta

    def _apply(self, delta: _Delta) -> IndexChange:
        change = IndexChange(
            delta.version,
            cns_put=tuple(delta.cns_put),
            cns_removed=tuple(delta.cns_removed),
            vnics_put=tuple(delta.vnics_now),
            vnics_removed=tuple(
                Vnic(mac=int_to_mac(m), ip=ip, vnet_id=vnet, vlan_id=0, cn_uuid="")
                for m, vnet, ip in delta.vnics_old
            ),
            routes_put=tuple(delta.routes_now),
            routes_removed=tuple(delta.routes_removed),
        )
        if delta.records:
            self.directory.index.apply(change)
            self.records_applied += delta.records
        self.cursor = max(self.cursor, delta.version)
        return change

    def _tell_subscribers(self) -> None:
        """Another instance changed the store: the Directory's subscribers (the firewall policy
        service) hear ``None``, "anything may have changed" (the feed carries keys, not the
        previous states an incremental update would need). Runs under the write lock."""
        self.directory.notify_subscribers(None)

    async def _run_hooks(self, change: IndexChange | None) -> None:
        for hook in list(self.hooks):
            try:
                await hook(change)
            except Exception:
                log.exception("a remote-change hook failed")


__all__ = ["Coherence", "RemoteHook"]
