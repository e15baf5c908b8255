"""PolicyService: the compiled policy of every compute node, kept current, with long-poll waits.

State: a :class:`~.selection.FirewallModel` (every VNIC and rule), the compiled entries of each
firewall-enabled VNIC, and per CN the current document (its VNIC map) and **generation**.

Generations are store versions: a CN's generation is the value of the store's change counter
at the commit that last changed its document (after a full reload, the counter's value at the
snapshot). So generations only grow, survive a restart, and two portolan instances sharing a
database that report the same generation for a CN report the same document (both computed from
the store state at that version). A CN never seen has generation 0 and an empty document.

Incremental path (the common one): the Directory calls :meth:`on_change` after every commit,
still under its write lock, so changes arrive in commit order.

- rule put/removed: recompile the firewall-enabled VNICs the old or new rule selects;
- VNIC put/removed (create, move, IP, tags, owner, belongs_to, firewall flag, delete): recompile
  that VNIC, and the VNICs selected by the *other* side of every enabled rule naming the old or
  new state as a peer; the old and new CN are rebuilt.

Candidates come from the model's indexes, partitioned by owner (rules by vm uuid, bare tag,
tag=value, all vms; VNICs by belongs_to, tag, tag=value, CN), never from a scan of every rule. Peers resolved for a rule
side are shared by all VNICs compiled in the same pass. Only CNs whose document actually
differs get a new generation, and only their waiters are woken.

Full path: :meth:`reload` re-reads every rule and VNIC in one read transaction (holding the
Directory's write lock, so no commit slips between the snapshot and the incremental stream),
recompiles everything in a worker thread (new objects only; swapped in on the trio thread) and
compares document by document. It runs lazily: the service starts stale; :meth:`invalidate`
(called when the Directory reloads its index because another process wrote the store) marks it
stale and wakes every waiter, and the next read (:meth:`ensure_fresh`) reloads. If an
incremental update ever fails, the service logs it and falls back to the same path.

Other instances (PostgreSQL): :meth:`apply_remote` is the ``Coherence`` hook. It re-reads the
VNICs a remote change names and diffs the rules table by (uuid, version), then takes the
incremental path; None (the feed was lost or pruned) means :meth:`invalidate`.

Cost (bench-like run, 10k rules over 100 owners, 5k firewall-enabled VNICs on 50 CNs, ~200k
entries): full reload ~2.5 s; a VNIC tag change or a rule change ~15-20 ms.

Long-poll: :meth:`wait_changed` returns once a CN's generation differs from the one the client
holds (trio Events per CN, set and replaced on each change); callers bound it with a timeout.
"""

from __future__ import annotations

import json
import logging
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import trio

from portolan.model import Rule as StoredRule
from portolan.model import Vnic
from protocol.fwpolicy import Policy, VnicPolicy

from .compiler import PeerCache, compile_vnic
from .selection import FirewallModel, FwRule, VnicView

log = logging.getLogger("portolan.firewall")


@dataclass(frozen=True, slots=True)
class _Change:
    """A change assembled from the store (remote changes): same fields as a RuleChange."""

    version: int
    vnics_put: tuple[Vnic, ...] = ()
    vnics_removed: tuple[Vnic, ...] = ()
    rules_put: tuple[StoredRule, ...] = ()
    rules_removed: tuple[str, ...] = ()


@dataclass(slots=True)
class CnDocument:
    """One CN's current document (VNIC map keyed by MAC text) and generation."""

    cn_uuid: str
    generation: int = 0
    vnics: dict[str, VnicPolicy] = field(default_factory=dict)
    _json: bytes | None = None

    def policy(self) -> Policy:
        return Policy(cn_uuid=self.cn_uuid, generation=self.generation, vnics=self.vnics)

    def json_bytes(self) -> bytes:
        if self._json is None:
            self._json = json.dumps(self.policy().to_json(), separators=(",", ":")).encode()
        return self._json

    def replace(self, vnics: dict[str, VnicPolicy], version: int) -> None:
        """Take a new VNIC map; the generation moves past both ``version`` and the last one."""
        self.vnics = vnics
        self.generation = max(version, self.generation + 1)
        self._json = None


class PolicyService:
    """See the module docstring. One per Directory (:func:`policy_service_for`)."""

    def __init__(self, directory: Any, *, subscribe: bool = True) -> None:
        self.directory = directory
        self.model = FirewallModel()
        self._entries: dict[bytes, tuple[str, VnicPolicy]] = {}  # mac -> (cn, policy)
        self._docs: dict[str, CnDocument] = {}
        self._events: dict[str, trio.Event] = {}
        self._stale = True
        self._reload_lock = trio.Lock()
        self._compile_limiter = trio.CapacityLimiter(1)
        self.version = 0  # store version the state reflects
        self.counters = {"reloads": 0, "changes": 0, "recompiled_vnics": 0, "generations": 0}
        self._unsubscribe = None
        if subscribe and hasattr(directory, "subscribe"):
            self._unsubscribe = directory.subscribe(self.on_change)

    def close(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None

    # -- reading ------------------------------------------------------------------------------
    @property
    def stale(self) -> bool:
        return self._stale

    async def ensure_fresh(self) -> None:
        """Reload from the store if the state is stale (first use, invalidate, failure)."""
        if self._stale:
            await self.reload(only_if_stale=True)

    def generation(self, cn_uuid: str) -> int:
        doc = self._docs.get(cn_uuid)
        return 0 if doc is None else doc.generation

    def document(self, cn_uuid: str) -> CnDocument:
        return self._docs.get(cn_uuid) or CnDocument(cn_uuid)

    def policy(self, cn_uuid: str) -> Policy:
        return self.document(cn_uuid).policy()

    async def wait_changed(self, cn_uuid: str, generation: int) -> int:
        """Block until ``cn_uuid``'s generation is not ``generation``; return the new one."""
        while True:
            await self.ensure_fresh()
            current = self.generation(cn_uuid)
            if current != generation:
                return current
            event = self._events.get(cn_uuid)
            if event is None:
                event = self._events[cn_uuid] = trio.Event()
            try:
                await event.wait()
            finally:
                # the last waiter giving up (timeout, disconnect) takes its Event along, so
                # polls for many CNs (or made-up uuids) leave nothing behind
                if (
                    not event.is_set()
                    and event.statistics().tasks_waiting == 0
                    and self._events.get(cn_uuid) is event
                ):
                    del self._events[cn_uuid]

    def _wake(self, cn_uuid: str) -> None:
        event = self._events.pop(cn_uuid, None)
        if event is not None:
            event.set()

    def _wake_all(self) -> None:
        events, self._events = self._events, {}
        for event in events.values():
            event.set()

    # -- full reload --------------------------------------------------------------------------
    def invalidate(self) -> None:
        """Everything may have changed elsewhere: reload on next use; wake every waiter (they
        re-check after the reload and sleep again if their CN did not change)."""
        self._stale = True
        self._wake_all()

    async def reload(self, *, only_if_stale: bool = False) -> None:
        """Rebuild the whole state from the store and publish the CNs whose document changed."""
        async with self._reload_lock:
            if only_if_stale and not self._stale:
                return
            async with self.directory.exclusive():
                await self._reload_locked()

    async def _reload_locked(self) -> None:
        def read(tx: Any) -> tuple[int, list[Vnic], list[StoredRule]]:
            return tx.current_version(), tx.list_vnics(), tx.list_rules()

        version, vnics, rules = await self.directory.read(read)
        # Compiling everything is CPU work (seconds at 10k rules): keep it off the event loop.
        # It only builds new objects; the swap below happens back on the trio thread.
        built = await trio.to_thread.run_sync(_build, vnics, rules, limiter=self._compile_limiter)
        self._install(version, *built)

    def load(self, version: int, vnics: Iterable[Vnic], rules: Iterable[StoredRule]) -> set[str]:
        """Replace the state with these VNICs and rules (as of store ``version``); returns the
        CNs whose document changed."""
        return self._install(version, *_build(vnics, rules))

    def _install(
        self, version: int, model: FirewallModel, entries: dict[bytes, tuple[str, VnicPolicy]]
    ) -> set[str]:
        self.model = model
        self._entries = entries
        cns = set(self._docs) | self.model.cns()
        changed = self._publish(cns, version)
        self.version = max(self.version, version)
        self._stale = False
        self.counters["reloads"] += 1
        return changed

    # -- changes made by other instances --------------------------------------------------------
    async def apply_remote(self, change: Any) -> None:
        """Hook for cross-instance coherence (``Coherence.add_hook``): another instance committed
        ``change`` (keys only are needed: the VNICs it names) or, with None, anything.

        Re-reads the named VNICs and the rules table's (uuid, version) pairs -- a rule write
        carries no mapping keys, so rules are always diffed by version, then only changed rules
        are fetched -- and feeds the differences to the incremental path. Takes the Directory's
        write lock, so it never interleaves with this instance's own commits; do not call it
        with that lock held (use :meth:`invalidate` there)."""
        if change is None or self._stale:
            self.invalidate()
            return
        macs = sorted(
            {v.mac for v in getattr(change, "vnics_put", ())}
            | {v.mac for v in getattr(change, "vnics_removed", ())}
        )
        known = {uuid: r.stored.version for uuid, r in self.model.rules.items()}

        def read(tx: Any) -> tuple[int, dict[bytes, Vnic], list[StoredRule], list[str]]:
            version = tx.current_version()
            current = tx.get_vnics(macs) if macs else {}
            pairs = {row[0]: row[1] for row in tx.execute("SELECT uuid, version FROM rules")}
            changed = [tx.get_rule(u) for u, v in pairs.items() if known.get(u) != v]
            gone = [u for u in known if u not in pairs]
            return version, current, [r for r in changed if r is not None], gone

        async with self._reload_lock, self.directory.exclusive():
            if self._stale:
                return
            version, current, rules_put, rules_gone = await self.directory.read(read)
            old = tuple(self.model.vnics[m].vnic for m in macs if m in self.model.vnics)
            synthetic = _Change(
                version=version,
                vnics_removed=old,
                vnics_put=tuple(current.values()),
                rules_put=tuple(rules_put),
                rules_removed=tuple(rules_gone),
            )
            self.on_change(synthetic)

    # -- incremental --------------------------------------------------------------------------
    def on_change(self, change: Any) -> None:
        """Directory subscriber: ``change`` is the committed ``IndexChange`` (a ``RuleChange``
        for rules), or None when the Directory reloaded its index from the store."""
        if change is None:
            self.invalidate()
            return
        if self._stale:
            return  # the coming reload reads this change from the store
        try:
            self._apply(change)
        except Exception:
            log.exception("incremental firewall policy update failed; reloading in full")
            self.invalidate()

    def _apply(self, change: Any) -> None:
        rules_put: tuple[StoredRule, ...] = getattr(change, "rules_put", ())
        rules_removed: tuple[str, ...] = getattr(change, "rules_removed", ())
        old_vnics = {v.mac: v for v in getattr(change, "vnics_removed", ())}
        new_vnics = {v.mac: v for v in getattr(change, "vnics_put", ())}
        if not (rules_put or rules_removed or old_vnics or new_vnics):
            self.version = max(self.version, change.version)
            return
        self.counters["changes"] += 1
        model = self.model
        dirty: set[bytes] = set()
        dirty_cns: set[str] = set()
        peer_of: list[tuple[FwRule, bool, bool]] = []

        # Rules: the VNICs the old and the new rule select need recompiling.
        for uuid in (*rules_removed, *(r.uuid for r in rules_put)):
            old = model.remove_rule(uuid)
            if old is not None:
                dirty.update(v.mac for v in model.vnics_selected(old))
        for stored in rules_put:
            new = model.put_rule(stored)
            dirty.update(v.mac for v in model.vnics_selected(new))

        # VNICs: the VNIC itself, and the VNICs whose peers it was or becomes.
        for mac in old_vnics.keys() | new_vnics.keys():
            before = model.remove_vnic(mac)
            if before is not None:
                peer_of.extend(model.rules_with_peer(before))
                dirty_cns.add(before.vnic.cn_uuid)
            dirty.add(mac)
        for vnic in new_vnics.values():
            view = model.put_vnic(vnic)
            peer_of.extend(model.rules_with_peer(view))
            dirty_cns.add(vnic.cn_uuid)
        seen: set[tuple[str, str]] = set()
        for rule, on_from, on_to in peer_of:
            for flag, side, name in (
                (on_from, rule.rule.to_side, "to"),
                (on_to, rule.rule.from_side, "from"),
            ):
                if flag and (rule.uuid, name) not in seen:
                    seen.add((rule.uuid, name))
                    dirty.update(v.mac for v in model.vnics_on_side(side, rule.owner, peer=False))

        cache: PeerCache = {}
        for mac in dirty:
            previous = self._entries.pop(mac, None)
            if previous is not None:
                dirty_cns.add(previous[0])
            view = model.vnics.get(mac)
            if view is not None and self._compile_into(view, cache):
                dirty_cns.add(view.vnic.cn_uuid)
        self.counters["recompiled_vnics"] += len(dirty)
        self._publish(dirty_cns, change.version)
        self.version = max(self.version, change.version)

    # -- helpers ------------------------------------------------------------------------------
    def _compile_into(self, view: VnicView, cache: PeerCache) -> bool:
        vp = compile_vnic(self.model, view, cache)
        if vp is None:
            return False
        self._entries[view.mac] = (view.vnic.cn_uuid, vp)
        return True

    def _publish(self, cns: Iterable[str], version: int) -> set[str]:
        changed: set[str] = set()
        for cn in cns:
            vnics: dict[str, VnicPolicy] = {}
            for view in self.model.vnics_on_cn(cn):
                entry = self._entries.get(view.mac)
                if entry is not None:
                    vnics[entry[1].mac] = entry[1]
            doc = self._docs.get(cn)
            if doc is None:
                if not vnics:
                    continue
                doc = self._docs[cn] = CnDocument(cn)
            elif doc.vnics == vnics:
                continue
            doc.replace(vnics, version)
            changed.add(cn)
            self.counters["generations"] += 1
            self._wake(cn)
        return changed


def _build(
    vnics: Iterable[Vnic], rules: Iterable[StoredRule]
) -> tuple[FirewallModel, dict[bytes, tuple[str, VnicPolicy]]]:
    """A new model and the compiled entries of all its firewall-enabled VNICs (pure)."""
    model = FirewallModel(vnics, rules)
    cache: PeerCache = {}
    entries: dict[bytes, tuple[str, VnicPolicy]] = {}
    for view in model.vnics.values():
        vp = compile_vnic(model, view, cache)
        if vp is not None:
            entries[view.mac] = (view.vnic.cn_uuid, vp)
    return model, entries


_SERVICES: weakref.WeakKeyDictionary[Any, PolicyService] = weakref.WeakKeyDictionary()


def policy_service_for(directory: Any) -> PolicyService:
    """The PolicyService of ``directory``, created (subscribed, stale) on first use."""
    service = _SERVICES.get(directory)
    if service is None:
        service = _SERVICES[directory] = PolicyService(directory)
    return service


__all__ = ["CnDocument", "PolicyService", "policy_service_for"]
