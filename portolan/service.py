"""The Directory: portolan's business logic and the only writer of the store.

Theory of operation
-------------------
Every public operation validates its inputs (collecting *every* bad field into one
``InvalidParameters``), then runs one store transaction in a worker thread
(``trio.to_thread.run_sync`` under the Directory's ``CapacityLimiter``, 1 for SQLite). A write
transaction

1. takes the next value of the global change counter (``tx.next_version()``; on PostgreSQL
   this row lock also serialises writers of every instance sharing the database),
2. re-reads what it depends on, checks conflicts, allocates MACs/IPs (lowest free first),
3. writes the mapping rows (all stamped with that version) and, in the same transaction, one
   shootdown log row per recipient CN and entry,
4. records the change for other instances (``store.record_change``: the changes-feed row and
   NOTIFY on PostgreSQL, see ``portolan.coherence``; nothing on SQLite),
5. commits, and returns an ``IndexChange``.

Back in the trio task, still holding the write lock, the Directory applies the change to its
``LookupIndex`` and tells its subscribers (``subscribe``: the firewall policy service), then
returns: a lookup made after the call returns sees the new state. Changes other instances
commit arrive through ``apply_remote`` under the same lock.

A ``UniqueViolation`` (another instance took the same MAC/IP between our check and our
insert) rolls back and retries the whole operation, which then sees the winner's row and
either picks another address or reports a ``Conflict``.

Shootdowns (SVP log rows)
-------------------------
Recipients are every CN holding a VNIC of the vnet after the change, plus the previous CN on a
move; on delete, the CNs holding a VNIC of the vnet before the delete.

| change | entries for each recipient |
|---|---|
| create VNIC | VL3(ip) |
| IP change | VL3(new ip), VL3(old ip) |
| move (cn_uuid change) | VL2(mac), VL3(ip) (+ VL3(old ip) if the IP changed too) |
| delete VNIC | VL2(mac) |
| CN underlay address/port change | VL2(mac) for every VNIC on the CN, to the CNs of its vnet |
| tags / firewall / owner / belongs_to only | none (the version still grows) |
| ``load`` | none |

Invariants
----------
- The index reflects every change committed by this Directory before the call returns.
- Versions strictly increase with each committed change; every row a change writes carries it.
- A CN's underlay IP is unique; a VNIC's MAC is unique; an IP is unique within a vnet; subnets
  of one vnet do not overlap (409 ``Conflict`` with a field error ``subnet``/``Overlap``).
- A CN is deleted only with no VNICs (its pending log rows go with it); a network only with
  no VNICs.

Lifecycle
---------
``d = await Directory.open(url)`` (opens and migrates the store, loads the index) ...
``await d.aclose()``.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import secrets
import uuid as uuidlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from ipaddress import IPv4Address, IPv6Address
from typing import Any, TypeVar

import trio

from protocol.addr import format_mac, parse_ip, parse_mac
from protocol.svp import LogEntry

from . import allocation
from .errors import (
    DUPLICATE,
    INVALID,
    MISSING,
    OVERLAP,
    Conflict,
    FieldError,
    InUse,
    InvalidParameters,
    NotFound,
    PortolanError,
    SubnetFull,
)
from .index import IndexChange, LookupIndex
from .model import (
    DEFAULT_UL_PORT,
    LOG_ENTRY_SIZES,
    LOG_STATUS_SIZE,
    LOG_VL2,
    LOG_VL3,
    ComputeNode,
    LogRecord,
    Network,
    Route,
    Vnic,
)
from .store import IntegrityViolation, Store, Tx, open_store

T = TypeVar("T")

VNET_MAX = (1 << 24) - 1
VLAN_MAX = 4094
U32_MAX = (1 << 32) - 1
MAX_WRITE_ATTEMPTS = 8
MAC_ALLOC_TRIES = 50
VNIC_UPDATABLE = frozenset(
    {"cn_uuid", "ip", "tags", "firewall_enabled", "belongs_to_uuid", "owner_uuid"}
)
_MISSING: Any = object()
#: bounds on a VNIC's tags: how many, name length, string value length (characters)
MAX_TAGS = 100
MAX_TAG_KEY = 128
MAX_TAG_VALUE = 1024


class _NoChange(Exception):
    """Raised inside a write to roll back and return ``result`` (nothing to change)."""

    def __init__(self, result: Any) -> None:
        super().__init__("no change")
        self.result = result


#: public name for writers outside this module (`Directory.write` callers, e.g. the rules)
NoChange = _NoChange


# -- validation helpers (append to ``errs``; return the normalised value or None) -------------


def _v_uuid(errs: list[FieldError], field: str, value: Any, required: bool = True) -> str | None:
    if value is None:
        if required:
            errs.append(FieldError(field, MISSING, f"{field} is required"))
        return None
    if not isinstance(value, str):
        errs.append(FieldError(field, INVALID, f"{field} must be a UUID string"))
        return None
    try:
        return str(uuidlib.UUID(value))
    except ValueError:
        errs.append(FieldError(field, INVALID, f"{field} must be a UUID"))
        return None


def _v_ip(errs: list[FieldError], field: str, value: Any, required: bool = True) -> str | None:
    if value is None:
        if required:
            errs.append(FieldError(field, MISSING, f"{field} is required"))
        return None
    if not isinstance(value, str | IPv4Address | IPv6Address):
        errs.append(FieldError(field, INVALID, "invalid IP address"))
        return None
    try:
        return str(parse_ip(value.strip() if isinstance(value, str) else value))
    except ValueError:
        errs.append(FieldError(field, INVALID, "invalid IP address"))
        return None


def _v_int(
    errs: list[FieldError], field: str, value: Any, lo: int, hi: int, required: bool = True
) -> int | None:
    if value is None:
        if required:
            errs.append(FieldError(field, MISSING, f"{field} is required"))
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        errs.append(FieldError(field, INVALID, f"{field} must be an integer"))
        return None
    if not lo <= value <= hi:
        errs.append(FieldError(field, INVALID, f"{field} must be between {lo} and {hi}"))
        return None
    return value


def _v_mac(errs: list[FieldError], field: str, value: Any, required: bool = True) -> bytes | None:
    if value is None:
        if required:
            errs.append(FieldError(field, MISSING, f"{field} is required"))
        return None
    mac: bytes | None = None
    try:
        if isinstance(value, bytes | bytearray):
            mac = bytes(value) if len(value) == 6 else None
        elif isinstance(value, str):
            mac = parse_mac(value)
        elif isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 48:
            mac = value.to_bytes(6, "big")
    except ValueError:
        mac = None
    if mac is None:
        errs.append(FieldError(field, INVALID, "invalid MAC address"))
        return None
    if not allocation.is_unicast_mac(mac):
        errs.append(FieldError(field, INVALID, "MAC address must be a non-zero unicast address"))
        return None
    return mac


def _v_subnet(
    errs: list[FieldError], field: str, value: Any
) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    if value is None:
        errs.append(FieldError(field, MISSING, f"{field} is required"))
        return None
    if not isinstance(value, str) or "/" not in value:
        errs.append(FieldError(field, INVALID, "Subnet must be in CIDR form"))
        return None
    try:
        net = ipaddress.ip_network(value.strip(), strict=False)
    except ValueError:
        errs.append(FieldError(field, INVALID, "Subnet must be in CIDR form"))
        return None
    if int(net.network_address) != int(ipaddress.ip_address(value.split("/")[0].strip())):
        errs.append(FieldError(field, INVALID, "Subnet must not have host bits set"))
        return None
    if isinstance(net, ipaddress.IPv6Network) and net.network_address.ipv4_mapped is not None:
        errs.append(FieldError(field, INVALID, "use IPv4 notation for IPv4 subnets"))
        return None
    return net


def _v_str(errs: list[FieldError], field: str, value: Any, required: bool = True) -> str | None:
    if value is None:
        if required:
            errs.append(FieldError(field, MISSING, f"{field} is required"))
        return None
    if not isinstance(value, str) or not value.strip():
        errs.append(FieldError(field, INVALID, f"{field} must be a non-empty string"))
        return None
    if _has_surrogate(value):
        errs.append(FieldError(field, INVALID, f"{field} holds a lone UTF-16 surrogate"))
        return None
    return value


def _v_bool(errs: list[FieldError], field: str, value: Any) -> bool | None:
    if not isinstance(value, bool):
        errs.append(FieldError(field, INVALID, f"{field} must be a boolean"))
        return None
    return value


def _has_surrogate(text: str) -> bool:
    return not text.isascii() and any("\ud800" <= c <= "\udfff" for c in text)


def _tag_value_problem(value: Any) -> str | None:
    """Why a tag value cannot be stored and answered as JSON, or None (nested values are
    looked at iteratively)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            return "NaN and Infinity are not JSON numbers"
        if isinstance(item, str) and _has_surrogate(item):
            return "a string holds a lone UTF-16 surrogate"
        if isinstance(item, dict):
            if not all(isinstance(k, str) and not _has_surrogate(k) for k in item):
                return "object keys must be strings without lone surrogates"
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
        elif not isinstance(item, str | int | float | bool) and item is not None:
            return f"{type(item).__name__} is not a JSON value"
    return None


def _v_tags(errs: list[FieldError], field: str, value: Any) -> dict[str, Any] | None:
    """Tags: an object of at most MAX_TAGS entries, keys 1..MAX_TAG_KEY characters, string
    values at most MAX_TAG_VALUE characters, every value storable and answerable as JSON."""
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        errs.append(FieldError(field, INVALID, "tags must be an object with string keys"))
        return None
    problems: list[str] = []
    if len(value) > MAX_TAGS:
        problems.append(f"at most {MAX_TAGS} tags")
    for k, v in value.items():
        if not k or len(k) > MAX_TAG_KEY:
            problems.append(f"tag names are 1 to {MAX_TAG_KEY} characters")
        elif _has_surrogate(k):
            problems.append("a tag name holds a lone UTF-16 surrogate")
        if isinstance(v, str) and len(v) > MAX_TAG_VALUE:
            problems.append(f"tag {k[:40]!r}: values are at most {MAX_TAG_VALUE} characters")
        problem = _tag_value_problem(v)
        if problem is not None:
            problems.append(f"tag {k[:40]!r}: {problem}")
        if problems:
            break
    if problems:
        errs.append(FieldError(field, INVALID, problems[0]))
        return None
    return dict(value)


def _raise(errs: list[FieldError]) -> None:
    if errs:
        raise InvalidParameters(errs)


def _mac_key(mac: bytes | str) -> bytes:
    """Normalise a MAC given to a lookup method; invalid -> InvalidParameters(mac)."""
    errs: list[FieldError] = []
    if isinstance(mac, bytes | bytearray) and len(mac) == 6:
        return bytes(mac)
    try:
        if isinstance(mac, str):
            return parse_mac(mac)
    except ValueError:
        pass
    errs.append(FieldError("mac", INVALID, "invalid MAC address"))
    raise InvalidParameters(errs)


def _new_log_id() -> bytes:
    return uuidlib.uuid4().bytes


def _vl2_rec(cn: str, v: Vnic, version: int) -> LogRecord:
    return LogRecord(
        id=_new_log_id(),
        cn_uuid=cn,
        type=LOG_VL2,
        vnet_id=v.vnet_id,
        mac=v.mac,
        vlan=v.vlan_id,
        version=version,
    )


def _vl3_rec(cn: str, v: Vnic, ip: str, version: int) -> LogRecord:
    return LogRecord(
        id=_new_log_id(),
        cn_uuid=cn,
        type=LOG_VL3,
        vnet_id=v.vnet_id,
        mac=v.mac,
        ip=ip,
        vlan=v.vlan_id,
        version=version,
    )


def _ip_errors(net: Network, ip: str) -> list[FieldError]:
    """An explicit VNIC IP must be a host of the network's subnet and not its gateway."""
    addr = ipaddress.ip_address(ip)
    subnet = ipaddress.ip_network(net.subnet)
    if not allocation.is_assignable(subnet, addr):
        return [FieldError("ip", INVALID, f"ip {ip} is not a host of {subnet}")]
    if net.gateway is not None and addr == ipaddress.ip_address(net.gateway):
        return [FieldError("ip", INVALID, f"ip {ip} is the gateway of network {net.uuid}")]
    return []


def _vnic_create_syntax(**fields: Any) -> tuple[list[FieldError], dict[str, Any]]:
    """The checks of a new VNIC's fields that need no stored state: (errors, normalised
    values; None where a field is absent or bad)."""
    errs: list[FieldError] = []
    get = fields.get
    values = {
        "network_uuid": _v_uuid(errs, "network_uuid", get("network_uuid")),
        "cn_uuid": _v_uuid(errs, "cn_uuid", get("cn_uuid")),
        "mac": _v_mac(errs, "mac", get("mac"), required=False),
        "ip": _v_ip(errs, "ip", get("ip"), required=False),
        "belongs_to_uuid": _v_uuid(errs, "belongs_to_uuid", get("belongs_to_uuid"), False),
        "owner_uuid": _v_uuid(errs, "owner_uuid", get("owner_uuid"), required=False),
        "tags": _v_tags(errs, "tags", get("tags")),
        "firewall_enabled": _v_bool(errs, "firewall_enabled", get("firewall_enabled", False)),
    }
    return errs, values


def _vnic_create_state(tx: Tx, values: dict[str, Any]) -> tuple[list[FieldError], Network | None]:
    """The checks of a new VNIC's (valid) fields against the store: (errors, its network)."""
    errs: list[FieldError] = []
    net_uuid, cn_uuid, ip = values["network_uuid"], values["cn_uuid"], values["ip"]
    net = tx.get_network(net_uuid) if net_uuid is not None else None
    if net_uuid is not None and net is None:
        errs.append(FieldError("network_uuid", INVALID, f"network {net_uuid} does not exist"))
    if cn_uuid is not None and tx.get_cn(cn_uuid) is None:
        errs.append(FieldError("cn_uuid", INVALID, f"CN {cn_uuid} does not exist"))
    if ip is not None and net is not None:
        errs.extend(_ip_errors(net, ip))
    return errs, net


def _vnic_update_syntax(changes: dict[str, Any]) -> tuple[list[FieldError], dict[str, Any]]:
    """The checks of a VNIC update that need no stored state: (errors, normalised changes;
    a bad field maps to None)."""
    errs: list[FieldError] = []
    for k in sorted(set(changes) - VNIC_UPDATABLE):
        errs.append(FieldError(k, INVALID, f"{k} cannot be changed"))
    new: dict[str, Any] = {}
    if "cn_uuid" in changes:
        new["cn_uuid"] = _v_uuid(errs, "cn_uuid", changes["cn_uuid"])
    if "ip" in changes:
        new["ip"] = _v_ip(errs, "ip", changes["ip"])
    if "tags" in changes:
        new["tags"] = _v_tags(errs, "tags", changes["tags"])
    if "firewall_enabled" in changes:
        new["firewall_enabled"] = _v_bool(errs, "firewall_enabled", changes["firewall_enabled"])
    for k in ("belongs_to_uuid", "owner_uuid"):
        if k in changes:
            new[k] = _v_uuid(errs, k, changes[k], required=False)
    return errs, new


def _vnic_update_state(
    tx: Tx, key: bytes, new: dict[str, Any]
) -> tuple[list[FieldError], Vnic | None]:
    """The checks of a VNIC update's (valid) fields against the store: (errors, the VNIC as
    stored, None when there is none)."""
    errs: list[FieldError] = []
    old = tx.get_vnic(key)
    if old is None:
        return errs, None
    cn = new.get("cn_uuid")
    if cn is not None and cn != old.cn_uuid and tx.get_cn(cn) is None:
        errs.append(FieldError("cn_uuid", INVALID, f"CN {cn} does not exist"))
    ip = new.get("ip")
    if ip is not None and ip != old.ip and old.network_uuid:
        net = tx.get_network(old.network_uuid)
        if net is not None:
            errs.extend(_ip_errors(net, ip))
    return errs, old


def _split_new_changed(
    items: Sequence[T],
    stored: Callable[[T], Any],
    as_doc: Callable[[Any], Any],
    key: Callable[[T], Any] = lambda item: item,
) -> tuple[list[T], list[tuple[int, Any, T]]]:
    """A load document's entries split into new ones and changed ones ``(index, stored,
    wanted)``; an entry equal to what is stored (compared as ``as_doc(stored) == key(item)``)
    is in neither."""
    new: list[T] = []
    changed: list[tuple[int, Any, T]] = []
    for i, item in enumerate(items):
        have = stored(item)
        if have is None:
            new.append(item)
        elif as_doc(have) != key(item):
            changed.append((i, have, item))
    return new, changed


class Directory:
    """Business logic over a store and a lookup index. See the module docstring."""

    def __init__(
        self,
        store: Store,
        *,
        index: LookupIndex | None = None,
        limiter: trio.CapacityLimiter | None = None,
        randbits: Callable[[int], int] = secrets.randbits,
    ) -> None:
        self.store = store
        self.index = index if index is not None else LookupIndex()
        self._limiter = (
            limiter if limiter is not None else trio.CapacityLimiter(getattr(store, "workers", 1))
        )
        self._write_lock = trio.Lock()
        self._subscribers: list[Callable[[IndexChange | None], None]] = []
        self._randbits = randbits
        self._closed = False
        # LOG_REQ answers "nothing for you" from memory while nothing was written since the
        # CN's log was last read empty: every write (local, remote via apply_remote, or a
        # reload) moves the epoch, so an idle poll costs no store read.
        self._log_epoch = 0
        self._log_empty: dict[tuple[str, bool], int] = {}

    @classmethod
    async def open(cls, url: str) -> Directory:
        """Open (and migrate) the store named by ``url`` and load the index from it."""
        store = await trio.to_thread.run_sync(open_store, url)
        self = cls(store)
        try:
            await self.reload_index()
        except BaseException:
            await trio.to_thread.run_sync(store.close)
            raise
        return self

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        async with self._write_lock:
            await trio.to_thread.run_sync(self.store.close, limiter=self._limiter)

    async def reload_index(self) -> None:
        """Rebuild the whole index from the store (startup; after an out-of-band change)."""
        async with self._write_lock:
            snapshot = await self._read(lambda tx: tx.snapshot())
            # built in a worker thread (seconds at 1M VNICs), swapped in atomically here
            self.index.install(await trio.to_thread.run_sync(self.index.prepare, snapshot))
            self._log_epoch += 1
            self._notify(None)

    def subscribe(self, callback: Callable[[IndexChange | None], None]) -> Callable[[], None]:
        """Call ``callback(change)`` after every committed change, under the write lock (so in
        commit order): ``change`` is the ``IndexChange`` (VNIC states before/after; rule writes
        pass a subclass carrying ``rules_put``/``rules_removed``), or None when the index was
        reloaded from the store (anything may have changed). Returns an unsubscribe function.
        The firewall policy service subscribes here."""
        self._subscribers.append(callback)
        return lambda: self._subscribers.remove(callback) if callback in self._subscribers else None

    def _notify(self, change: IndexChange | None) -> None:
        for callback in list(self._subscribers):
            try:
                callback(change)
            except Exception:
                logging.getLogger("portolan.service").exception("change subscriber failed")

    async def apply_remote(self, read: Callable[[Tx], T], apply: Callable[[T], None]) -> T:
        """Coherence entry point (portolan.coherence): run ``read`` in a store transaction and
        hand its result to ``apply`` (which updates the index), serialised with this
        Directory's own writes so a remote change never overtakes a local one."""
        async with self._write_lock:
            result = await self._read(read)
            self._log_epoch += 1
            apply(result)
            return result

    async def _state_errors(self, check: Callable[[Tx], list[FieldError]]) -> list[FieldError]:
        """Run a read-only field check against the store for a request already known to be
        invalid, so its answer names every bad field; a store that cannot answer adds none."""
        try:
            return await self._read(check)
        except PortolanError:
            return []

    async def vnic_field_errors(
        self, mac: bytes | str | None = None, /, **fields: Any
    ) -> list[FieldError]:
        """Every field error ``create_vnic(**fields)`` (``mac`` None) or
        ``update_vnic(mac, **fields)`` would report, syntax and stored state alike, writing
        nothing. The API adds these to the errors of its own request validation so that one
        422 names every bad field."""
        if mac is None:
            errs, values = _vnic_create_syntax(**fields)
            return errs + await self._state_errors(lambda tx: _vnic_create_state(tx, values)[0])
        try:
            key = _mac_key(mac)
        except InvalidParameters as exc:
            return list(exc.errors)
        errs, new = _vnic_update_syntax(fields)
        return errs + await self._state_errors(lambda tx: _vnic_update_state(tx, key, new)[0])

    # -- for the other parts of portolan (coherence, firewall policy service, rules) ----------
    async def read(self, fn: Callable[[Tx], T]) -> T:
        """Run ``fn(tx)`` in a read-only store transaction (in a worker thread); its result."""
        return await self._read(fn)

    async def write(
        self, fn: Callable[[Tx, int], tuple[T, IndexChange | None]], *, versioned: bool = True
    ) -> T:
        """Run ``fn(tx, version)`` in one write transaction (retried on a unique-constraint
        race); ``fn`` returns ``(result, change)``. A change is recorded in the feed, applied
        to the index and told to the subscribers, in commit order. Returns ``result``."""
        return await self._write(fn, versioned=versioned)

    def exclusive(self) -> trio.Lock:
        """The lock each of this Directory's commits holds: ``async with
        directory.exclusive():`` keeps its own writes and remote applications out of the
        block. Never call `write`, `apply_remote` or `reload_index` inside it."""
        return self._write_lock

    def notify_subscribers(self, change: IndexChange | None) -> None:
        """Tell every subscriber about ``change`` (None: anything may have changed), as a
        commit does. Call it with `exclusive` held (from `apply_remote`'s ``apply``), so
        that subscribers hear changes in commit order."""
        self._notify(change)

    # -- transaction plumbing -----------------------------------------------------------------
    async def _read(self, fn: Callable[[Tx], T]) -> T:
        def run() -> T:
            with self.store.transaction(write=False) as tx:
                return fn(tx)

        return await trio.to_thread.run_sync(run, limiter=self._limiter)

    async def _write(
        self, fn: Callable[[Tx, int], tuple[T, IndexChange | None]], *, versioned: bool = True
    ) -> T:
        def run() -> tuple[T, IndexChange | None]:
            for attempt in range(MAX_WRITE_ATTEMPTS):
                try:
                    with self.store.transaction(write=True) as tx:
                        version = tx.next_version() if versioned else 0
                        result, change = fn(tx, version)
                        if change is not None:
                            self.store.record_change(tx, change)  # feed + NOTIFY (PostgreSQL)
                        return result, change
                except _NoChange as nc:
                    return nc.result, None
                except IntegrityViolation as exc:
                    if attempt == MAX_WRITE_ATTEMPTS - 1:
                        raise Conflict(
                            f"concurrent change conflict, try again ({exc.constraint or exc})"
                        ) from exc
            raise AssertionError("unreachable")

        async with self._write_lock:
            result, change = await trio.to_thread.run_sync(run, limiter=self._limiter)
            self._log_epoch += 1
            if change is not None:
                self.index.apply(change)
                self._notify(change)
            return result

    # -- compute nodes -------------------------------------------------------------------------
    async def put_cn(
        self, uuid: str, ip: str | IPv4Address | IPv6Address, port: int = DEFAULT_UL_PORT
    ) -> tuple[ComputeNode, bool]:
        """Create or update a CN's underlay address; returns (cn, created)."""
        errs: list[FieldError] = []
        cn_uuid = _v_uuid(errs, "uuid", uuid)
        cn_ip = _v_ip(errs, "ip", ip)
        cn_port = _v_int(errs, "port", port, 1, 65535)
        _raise(errs)
        assert cn_uuid is not None and cn_ip is not None and cn_port is not None

        def fn(tx: Tx, version: int) -> tuple[tuple[ComputeNode, bool], IndexChange]:
            existing = tx.get_cn(cn_uuid)
            other = tx.cn_by_ip(cn_ip)
            if other is not None and other.uuid != cn_uuid:
                raise Conflict(
                    f"underlay IP {cn_ip} is already used by CN {other.uuid}",
                    [FieldError("ip", DUPLICATE, f"underlay IP {cn_ip} is used by {other.uuid}")],
                )
            if existing is not None and (existing.ip, existing.port) == (cn_ip, cn_port):
                raise _NoChange((existing, False))
            cn = ComputeNode(cn_uuid, cn_ip, cn_port, version)
            if existing is None:
                tx.insert_cn(cn)
                return (cn, True), IndexChange(version, cns_put=(cn,))
            tx.update_cn(cn)
            # The underlay moved: every CN that may have cached one of its VNICs must drop it.
            records: list[LogRecord] = []
            recipients_by_vnet: dict[int, list[str]] = {}
            for v in tx.list_vnics(cn_uuid=cn_uuid):
                if v.vnet_id not in recipients_by_vnet:
                    recipients_by_vnet[v.vnet_id] = sorted(tx.cns_in_vnet(v.vnet_id))
                records.extend(_vl2_rec(r, v, version) for r in recipients_by_vnet[v.vnet_id])
            tx.append_log(records)
            return (cn, False), IndexChange(version, cns_put=(cn,))

        return await self._write(fn)

    async def get_cn(self, uuid: str) -> ComputeNode:
        key = self._uuid_key(uuid)
        cn = await self._read(lambda tx: tx.get_cn(key)) if key else None
        if cn is None:
            raise NotFound("cn", str(uuid))
        return cn

    async def list_cns(self) -> list[ComputeNode]:
        return await self._read(lambda tx: tx.list_cns())

    async def delete_cn(self, uuid: str) -> None:
        key = self._uuid_key(uuid)
        if key is None:
            raise NotFound("cn", str(uuid))

        def fn(tx: Tx, version: int) -> tuple[None, IndexChange]:
            if tx.get_cn(key) is None:
                raise NotFound("cn", key)
            n = tx.count_vnics(cn_uuid=key)
            if n:
                raise InUse(f"CN {key} still holds {n} VNIC(s)")
            tx.delete_log_for_cn(key)
            tx.delete_cn(key)
            return None, IndexChange(version, cns_removed=(key,))

        await self._write(fn)

    # -- networks ------------------------------------------------------------------------------
    async def create_network(
        self,
        *,
        name: str,
        owner_uuid: str,
        vnet_id: int,
        vlan_id: int,
        subnet: str,
        gateway: str | None = None,
        provision_start: str | None = None,
        provision_end: str | None = None,
    ) -> Network:
        errs: list[FieldError] = []
        v_name = _v_str(errs, "name", name)
        v_owner = _v_uuid(errs, "owner_uuid", owner_uuid)
        v_vnet = _v_int(errs, "vnet_id", vnet_id, 0, VNET_MAX)
        v_vlan = _v_int(errs, "vlan_id", vlan_id, 0, VLAN_MAX)
        net = _v_subnet(errs, "subnet", subnet)
        addrs: dict[str, IPv4Address | IPv6Address | None] = {}
        for field, value in (
            ("gateway", gateway),
            ("provision_start", provision_start),
            ("provision_end", provision_end),
        ):
            text = _v_ip(errs, field, value, required=False)
            addrs[field] = ipaddress.ip_address(text) if text else None
            if text and net is not None and not allocation.is_assignable(net, addrs[field]):  # type: ignore[arg-type]
                errs.append(FieldError(field, INVALID, f"{field} must be a host address in {net}"))
                addrs[field] = None
        start = end = None
        if net is not None:
            d_start, d_end = allocation.default_provision_range(net)
            start = addrs["provision_start"] or d_start
            end = addrs["provision_end"] or d_end
            if int(start) > int(end):
                errs.append(
                    FieldError(
                        "provision_start",
                        INVALID,
                        "provision_start must not be after provision_end",
                    )
                )
        _raise(errs)
        assert net is not None and v_vnet is not None and v_vlan is not None
        gw = addrs["gateway"]

        def fn(tx: Tx, version: int) -> tuple[Network, IndexChange]:
            for other in tx.list_networks(v_vnet):
                if net.overlaps(ipaddress.ip_network(other.subnet)):
                    msg = f"subnet {net} overlaps network {other.uuid} ({other.subnet}) in vnet {v_vnet}"
                    raise Conflict(msg, [FieldError("subnet", OVERLAP, msg)])
            n = Network(
                uuid=str(uuidlib.uuid4()),
                name=v_name or "",
                owner_uuid=v_owner or "",
                vnet_id=v_vnet,
                vlan_id=v_vlan,
                subnet=str(net),
                gateway=str(gw) if gw is not None else None,
                provision_start=str(start),
                provision_end=str(end),
                version=version,
            )
            tx.insert_network(n)
            return n, IndexChange(version)

        return await self._write(fn)

    async def get_network(self, uuid: str) -> Network:
        key = self._uuid_key(uuid)
        n = await self._read(lambda tx: tx.get_network(key)) if key else None
        if n is None:
            raise NotFound("network", str(uuid))
        return n

    async def list_networks(self) -> list[Network]:
        return await self._read(lambda tx: tx.list_networks())

    async def delete_network(self, uuid: str) -> None:
        key = self._uuid_key(uuid)
        if key is None:
            raise NotFound("network", str(uuid))

        def fn(tx: Tx, version: int) -> tuple[None, IndexChange]:
            if tx.get_network(key) is None:
                raise NotFound("network", key)
            n = tx.count_vnics(network_uuid=key)
            if n:
                raise InUse(f"network {key} still has {n} VNIC(s)")
            tx.delete_network(key)
            return None, IndexChange(version)

        await self._write(fn)

    # -- VNICs ---------------------------------------------------------------------------------
    async def create_vnic(
        self,
        *,
        network_uuid: str,
        cn_uuid: str,
        mac: bytes | str | None = None,
        ip: str | IPv4Address | IPv6Address | None = None,
        belongs_to_uuid: str | None = None,
        owner_uuid: str | None = None,
        tags: dict[str, Any] | None = None,
        firewall_enabled: bool = False,
    ) -> Vnic:
        errs, values = _vnic_create_syntax(
            network_uuid=network_uuid,
            cn_uuid=cn_uuid,
            mac=mac,
            ip=ip,
            belongs_to_uuid=belongs_to_uuid,
            owner_uuid=owner_uuid,
            tags=tags,
            firewall_enabled=firewall_enabled,
        )
        if errs:
            # One pass: the fields that parsed are checked against the stored state too.
            _raise(errs + await self._state_errors(lambda tx: _vnic_create_state(tx, values)[0]))
        v_net, v_cn, v_mac, v_ip = (
            values["network_uuid"],
            values["cn_uuid"],
            values["mac"],
            values["ip"],
        )
        v_belongs, v_owner, v_tags = values["belongs_to_uuid"], values["owner_uuid"], values["tags"]
        v_fw = values["firewall_enabled"]
        assert v_net is not None and v_cn is not None

        def fn(tx: Tx, version: int) -> tuple[Vnic, IndexChange]:
            errs, net = _vnic_create_state(tx, values)
            _raise(errs)
            assert net is not None
            # MAC
            if v_mac is not None:
                if tx.mac_exists(v_mac):
                    m = format_mac(v_mac)
                    raise Conflict(
                        f"MAC {m} already exists", [FieldError("mac", DUPLICATE, f"MAC {m} in use")]
                    )
                the_mac = v_mac
            else:
                for _ in range(MAC_ALLOC_TRIES):
                    the_mac = allocation.random_mac(self._randbits)
                    if not tx.mac_exists(the_mac):
                        break
                else:
                    raise Conflict("could not allocate a free MAC address")
            # IP
            if v_ip is not None:
                holder = tx.vnic_by_ip(net.vnet_id, v_ip)
                if holder is not None:
                    raise Conflict(
                        f"IP {v_ip} is already used in vnet {net.vnet_id}",
                        [
                            FieldError(
                                "ip", DUPLICATE, f"IP {v_ip} used by {format_mac(holder.mac)}"
                            )
                        ],
                    )
                the_ip = v_ip
            else:
                got = allocation.lowest_free(
                    ipaddress.ip_address(net.provision_start),
                    ipaddress.ip_address(net.provision_end),
                    tx.vnet_ips(net.vnet_id),
                    ipaddress.ip_address(net.gateway) if net.gateway else None,
                )
                if got is None:
                    raise SubnetFull(net.uuid)
                the_ip = str(got)
            vnic = Vnic(
                mac=the_mac,
                ip=the_ip,
                vnet_id=net.vnet_id,
                vlan_id=net.vlan_id,
                cn_uuid=v_cn,
                network_uuid=net.uuid,
                belongs_to_uuid=v_belongs,
                owner_uuid=v_owner,
                tags=v_tags or {},
                firewall_enabled=bool(v_fw),
                version=version,
            )
            tx.insert_vnic(vnic)
            recipients = sorted(tx.cns_in_vnet(vnic.vnet_id))
            tx.append_log(_vl3_rec(r, vnic, vnic.ip, version) for r in recipients)
            return vnic, IndexChange(version, vnics_put=(vnic,))

        return await self._write(fn)

    async def get_vnic(self, mac: bytes | str) -> Vnic:
        key = _mac_key(mac)
        v = await self._read(lambda tx: tx.get_vnic(key))
        if v is None:
            raise NotFound("vnic", format_mac(key))
        return v

    async def list_vnics(
        self,
        *,
        vnet_id: int | None = None,
        cn_uuid: str | None = None,
        network_uuid: str | None = None,
        owner_uuid: str | None = None,
    ) -> list[Vnic]:
        keys: dict[str, str | None] = {}
        for name, value in (
            ("cn_uuid", cn_uuid),
            ("network_uuid", network_uuid),
            ("owner_uuid", owner_uuid),
        ):
            if value is None:
                keys[name] = None
                continue
            keys[name] = self._uuid_key(value)
            if keys[name] is None:
                return []  # a malformed uuid matches nothing
        cn, net, owner = keys["cn_uuid"], keys["network_uuid"], keys["owner_uuid"]
        return await self._read(
            lambda tx: tx.list_vnics(
                vnet_id=vnet_id, cn_uuid=cn, network_uuid=net, owner_uuid=owner
            )
        )

    async def update_vnic(self, mac: bytes | str, /, **changes: Any) -> Vnic:
        """Change cn_uuid (a move), ip, tags, firewall_enabled, belongs_to_uuid, owner_uuid."""
        key = _mac_key(mac)
        errs, new = _vnic_update_syntax(changes)
        if errs:
            # One pass: the fields that parsed are checked against the stored state too.
            _raise(errs + await self._state_errors(lambda tx: _vnic_update_state(tx, key, new)[0]))

        def fn(tx: Tx, version: int) -> tuple[Vnic, IndexChange]:
            errs, old = _vnic_update_state(tx, key, new)
            if old is None:
                raise NotFound("vnic", format_mac(key))
            _raise(errs)
            if "ip" in new and new["ip"] != old.ip:
                holder = tx.vnic_by_ip(old.vnet_id, new["ip"])
                if holder is not None and holder.mac != old.mac:
                    raise Conflict(
                        f"IP {new['ip']} is already used in vnet {old.vnet_id}",
                        [
                            FieldError(
                                "ip", DUPLICATE, f"IP {new['ip']} used by {format_mac(holder.mac)}"
                            )
                        ],
                    )
            updated = replace(old, **new)
            if updated == old:
                raise _NoChange(old)
            updated = replace(updated, version=version)
            tx.update_vnic(updated)
            moved = updated.cn_uuid != old.cn_uuid
            ip_changed = updated.ip != old.ip
            if moved or ip_changed:
                recipients = tx.cns_in_vnet(updated.vnet_id)
                if moved:
                    recipients.add(old.cn_uuid)
                records: list[LogRecord] = []
                for r in sorted(recipients):
                    if moved:
                        records.append(_vl2_rec(r, updated, version))
                    records.append(_vl3_rec(r, updated, updated.ip, version))
                    if ip_changed:
                        records.append(_vl3_rec(r, updated, old.ip, version))
                tx.append_log(records)
            return updated, IndexChange(version, vnics_removed=(old,), vnics_put=(updated,))

        return await self._write(fn)

    async def delete_vnic(self, mac: bytes | str) -> None:
        key = _mac_key(mac)

        def fn(tx: Tx, version: int) -> tuple[None, IndexChange]:
            old = tx.get_vnic(key)
            if old is None:
                raise NotFound("vnic", format_mac(key))
            recipients = sorted(tx.cns_in_vnet(old.vnet_id))
            tx.delete_vnic(key)
            tx.append_log(_vl2_rec(r, old, version) for r in recipients)
            return None, IndexChange(version, vnics_removed=(old,))

        await self._write(fn)

    # -- bulk import ---------------------------------------------------------------------------
    async def load(
        self,
        document: dict[str, Any],
        *,
        replace_existing: bool = False,
        progress: Callable[[str], None] | None = None,
    ) -> dict[str, Any]:
        """Import a starting state: ``{"cns": [...], "vnics": [...], "routes": [...]}``.

        All or nothing. A key the format does not know (``"vnic"``, a CN's ``"prot"``) is an
        error naming its path. An entry identical to what the store holds (CN by uuid, VNIC by
        MAC, route by key; a VNIC's ``network_uuid``, which the format cannot carry, is not
        compared) is left alone. An entry that would *change* a stored object is refused
        (Conflict naming each entry) unless ``replace_existing``; then the object is replaced
        and the shootdown log rows that the same change through the API would write are
        written (a VNIC moved to another CN or given another IP or vnet, a CN given another
        underlay address). New objects get no log rows: a starting state has no caches to
        correct. A bad document raises InvalidParameters naming every bad field
        (``vnics[3].mac``). ``progress`` (called from the store's worker thread) receives a
        short line at each stage of a large import.

        Returns ``{"cns": n, "vnics": n, "routes": n, "version": v, "created": {...},
        "replaced": {...}, "unchanged": {...}, "shootdowns": n}`` (n counts entries of the
        document; the three dicts split them by kind).
        """
        say = progress or (lambda line: None)
        cns, vnics, routes = _validate_document(document)
        say(f"the document is well-formed ({len(cns) + len(vnics) + len(routes):,} entries)")
        doc_macs = [v.mac for v in vnics]
        doc_mac_set = set(doc_macs)

        def fn(tx: Tx, version: int) -> tuple[dict[str, Any], IndexChange]:
            errs: list[FieldError] = []
            existing = {c.uuid: c for c in tx.list_cns()}
            final_ip: dict[str, str] = {u: c.ip for u, c in existing.items()}
            for c in cns:
                final_ip[c.uuid] = c.ip
            ip_users: dict[str, list[str]] = {}
            for u, ip in final_ip.items():
                ip_users.setdefault(ip, []).append(u)
            for i, c in enumerate(cns):
                others = [u for u in ip_users[c.ip] if u != c.uuid]
                if others:
                    errs.append(
                        FieldError(
                            f"cns[{i}].ip", INVALID, f"underlay IP {c.ip} is used by CN {others[0]}"
                        )
                    )
            known_cns = set(final_ip)
            owners = tx.vnet_ip_owners([v.vnet_id for v in vnics])
            for i, v in enumerate(vnics):
                if v.cn_uuid not in known_cns:
                    errs.append(
                        FieldError(f"vnics[{i}].cn_uuid", INVALID, f"CN {v.cn_uuid} does not exist")
                    )
                holder = owners.get((v.vnet_id, v.ip))
                if holder is not None and holder not in doc_mac_set:
                    errs.append(
                        FieldError(
                            f"vnics[{i}].ip",
                            INVALID,
                            f"IP {v.ip} is used in vnet {v.vnet_id} by {format_mac(holder)}",
                        )
                    )
            _raise(errs)
            say(f"checked {len(vnics):,} VNICs against the store")
            # What exists already: split the document into new, identical and changed entries.
            old = tx.get_vnics(doc_macs)
            stored_routes = {r.key: r for r in tx.list_routes()} if routes else {}
            new_cns, changed_cns = _split_new_changed(
                cns,
                lambda c: existing.get(c.uuid),
                lambda h: (h.ip, h.port),
                lambda c: (c.ip, c.port),
            )
            new_vnics, changed_vnics = _split_new_changed(
                vnics, lambda v: old.get(v.mac), lambda h: replace(h, version=0, network_uuid=None)
            )
            new_routes, changed_routes = _split_new_changed(
                routes, lambda r: stored_routes.get(r.key), lambda h: replace(h, version=0)
            )
            n_changed = len(changed_cns) + len(changed_vnics) + len(changed_routes)
            if n_changed and not replace_existing:
                raise _load_conflict(changed_cns, changed_vnics, changed_routes)
            n_new = len(new_cns) + len(new_vnics) + len(new_routes)
            result: dict[str, Any] = {
                "cns": len(cns),
                "vnics": len(vnics),
                "routes": len(routes),
                "version": version,
                "created": {
                    "cns": len(new_cns),
                    "vnics": len(new_vnics),
                    "routes": len(new_routes),
                },
                "replaced": {
                    "cns": len(changed_cns),
                    "vnics": len(changed_vnics),
                    "routes": len(changed_routes),
                },
                "unchanged": {
                    "cns": len(cns) - len(new_cns) - len(changed_cns),
                    "vnics": len(vnics) - len(new_vnics) - len(changed_vnics),
                    "routes": len(routes) - len(new_routes) - len(changed_routes),
                },
                "shootdowns": 0,
            }
            if n_new + n_changed == 0:
                result["version"] = version - 1  # next_version's step is rolled back
                raise _NoChange(result)
            # Writes.
            put_cns = [replace(c, version=version) for c in new_cns]
            for cn in put_cns:
                tx.insert_cn(cn)
            for _, _, c in changed_cns:
                cn = replace(c, version=version)
                tx.update_cn(cn)
                put_cns.append(cn)
            # Replaced VNICs go first and come back with the new ones, so two VNICs of the
            # document may swap IPs without tripping the store's (vnet, ip) uniqueness.
            tx.delete_vnics([have_v.mac for _, have_v, _ in changed_vnics])
            put_vnics = [replace(v, version=version) for v in new_vnics]
            for done in range(0, len(put_vnics), LOAD_BATCH):
                tx.insert_vnics(put_vnics[done : done + LOAD_BATCH])
                if len(put_vnics) > LOAD_BATCH:
                    say(
                        f"wrote {min(done + LOAD_BATCH, len(put_vnics)):,} of "
                        f"{len(put_vnics):,} new VNICs"
                    )
            networks: dict[str, Network | None] = {}
            replaced_vnics: list[tuple[Vnic, Vnic]] = []
            for _, have_v, v in changed_vnics:
                keep = have_v.network_uuid
                if keep is not None:
                    if keep not in networks:
                        networks[keep] = tx.get_network(keep)
                    net = networks[keep]
                    if net is None or net.vnet_id != v.vnet_id or _ip_errors(net, v.ip):
                        keep = None  # the VNIC left its network
                replaced_vnics.append((have_v, replace(v, network_uuid=keep, version=version)))
            tx.insert_vnics([u for _, u in replaced_vnics])
            put_routes = [replace(r, version=version) for r in new_routes]
            put_routes += [replace(r, version=version) for _, _, r in changed_routes]
            for r in put_routes:
                tx.put_route(r)
            records = _load_shootdowns(tx, version, changed_cns, replaced_vnics)
            if records:
                tx.append_log(records)
            result["shootdowns"] = len(records)
            say(f"wrote everything; committing ({len(records):,} shootdown log entries)")
            change = IndexChange(
                version,
                cns_put=tuple(put_cns),
                vnics_removed=tuple(have_v for have_v, _ in replaced_vnics),
                vnics_put=tuple(put_vnics) + tuple(u for _, u in replaced_vnics),
                routes_put=tuple(put_routes),
            )
            return result, change

        return await self._write(fn)

    # -- the shootdown log ---------------------------------------------------------------------
    async def fetch_log(self, cn_uuid: str, budget: int, version: int = 1) -> list[LogEntry]:
        """A CN's pending log entries, oldest first, fitting a LOG_ACK body of ``budget`` bytes
        (status word included). ROUTE entries are skipped for SVP version 1. A log read empty
        with nothing written since is answered from memory (no store read per idle poll)."""
        key = (cn_uuid, budget, version)
        return (await self.fetch_logs([key]))[key]

    async def fetch_logs(
        self, keys: Iterable[tuple[str, int, int]]
    ) -> dict[tuple[str, int, int], list[LogEntry]]:
        """`fetch_log` for many ``(cn_uuid, budget, version)`` keys in one store read.

        Keys whose log was read empty with nothing written since are answered from memory,
        as `fetch_log` does; the rest share one read transaction."""
        epoch = self._log_epoch
        smallest = min(LOG_ENTRY_SIZES.values())
        out: dict[tuple[str, int, int], list[LogEntry]] = {}
        wanted = []
        for key in dict.fromkeys(keys):
            cn_uuid, budget, version = key
            if (
                budget - LOG_STATUS_SIZE < smallest
                or self._log_empty.get((cn_uuid, version >= 2)) == epoch
            ):
                out[key] = []
            else:
                wanted.append(key)
        if not wanted:
            return out

        def read(tx: Tx) -> dict[tuple[str, int, int], list[Any]]:
            return {
                key: tx.fetch_log(
                    key[0],
                    (key[1] - LOG_STATUS_SIZE) // smallest,
                    (LOG_VL2, LOG_VL3) if key[2] < 2 else None,
                )
                for key in wanted
            }

        rows_by_key = await self._read(read)
        for key, rows in rows_by_key.items():
            if not rows:
                self._log_empty[(key[0], key[2] >= 2)] = epoch
            avail, used, entries = key[1] - LOG_STATUS_SIZE, 0, []
            for r in rows:
                size = LOG_ENTRY_SIZES[r.type]
                if used + size > avail:
                    break
                used += size
                entries.append(r.to_entry())
            out[key] = entries
        return out

    async def remove_log(self, ids: Iterable[bytes]) -> int:
        """Delete the listed log entries (missing ids are ignored); returns how many went."""
        id_list = [bytes(i) for i in ids]
        if not id_list:
            return 0

        def fn(tx: Tx, version: int) -> tuple[int, None]:
            return tx.remove_log(id_list), None

        return await self._write(fn, versioned=False)

    async def pending_log(self, cn_uuid: str) -> list[LogEntry]:
        """Everything queued for a CN (all types), oldest first."""
        return [r.to_entry() for r in await self.log_records(cn_uuid)]

    async def log_records(self, cn_uuid: str) -> list[LogRecord]:
        """The stored log rows queued for a CN, oldest first (admin, tests)."""
        return await self._read(lambda tx: tx.fetch_log(cn_uuid))

    # -- routes (for ROUTE_REQ; no API yet, ``load`` writes them) --------------------------------
    async def list_routes(self) -> list[Route]:
        return await self._read(lambda tx: tx.list_routes())

    async def current_version(self) -> int:
        return await self._read(lambda tx: tx.current_version())

    # -- helpers -------------------------------------------------------------------------------
    @staticmethod
    def _uuid_key(value: Any) -> str | None:
        errs: list[FieldError] = []
        return _v_uuid(errs, "uuid", value)


#: VNICs written per statement by ``load`` (a progress line after each batch)
LOAD_BATCH = 50_000
#: the keys a ``load`` document may hold, by place (anything else is refused, path named)
LOAD_KEYS: dict[str, frozenset[str]] = {
    "document": frozenset({"cns", "vnics", "routes"}),
    "cns": frozenset({"uuid", "ip", "port"}),
    "vnics": frozenset(
        {
            "mac",
            "ip",
            "vnet_id",
            "vlan",
            "vlan_id",
            "cn_uuid",
            "belongs_to_uuid",
            "owner_uuid",
            "tags",
            "firewall_enabled",
        }
    ),
    "routes": frozenset(
        {
            "vnet_id",
            "vlan",
            "vlan_id",
            "subnet",
            "r_dc_id",
            "r_vnet_id",
            "r_vlan_id",
            "r_subnet",
            "r_send_mac",
            "r_ul_ip",
            "r_ul_port",
            "r_dst_mac",
            "net_uuid",
            "r_net_uuid",
        }
    ),
}
#: changed entries listed one by one in a refusal (the message gives the total)
LOAD_CONFLICTS_LISTED = 20


def _unknown_keys(errs: list[FieldError], prefix: str, item: dict[str, Any], place: str) -> None:
    import difflib

    known = LOAD_KEYS[place]
    for key in item:
        if key in known:
            continue
        close = difflib.get_close_matches(str(key), sorted(known), n=1)
        hint = f'; did you mean "{close[0]}"?' if close else ""
        errs.append(
            FieldError(
                f"{prefix}{key}",
                INVALID,
                f"unknown key (known: {', '.join(sorted(known))}){hint}",
            )
        )


def _differences(have: Any, want: Any, fields: tuple[str, ...]) -> str:
    out = []
    for f in fields:
        a, b = getattr(have, f), getattr(want, f)
        if a != b:
            a_text = format_mac(a) if isinstance(a, bytes) else a
            b_text = format_mac(b) if isinstance(b, bytes) else b
            out.append(f"{f} {a_text!r} -> {b_text!r}")
    return ", ".join(out)


_VNIC_LOAD_FIELDS = (
    "ip",
    "vnet_id",
    "vlan_id",
    "cn_uuid",
    "belongs_to_uuid",
    "owner_uuid",
    "tags",
    "firewall_enabled",
)


def _load_conflict(
    changed_cns: list[tuple[int, ComputeNode, ComputeNode]],
    changed_vnics: list[tuple[int, Vnic, Vnic]],
    changed_routes: list[tuple[int, Route, Route]],
) -> Conflict:
    """The refusal of a load that would change stored objects without ``--replace``."""
    errs: list[FieldError] = []
    for i, have, want in changed_cns:
        errs.append(
            FieldError(
                f"cns[{i}]", "Changed", "CN exists: " + _differences(have, want, ("ip", "port"))
            )
        )
    for i, have_v, want_v in changed_vnics:
        errs.append(
            FieldError(
                f"vnics[{i}]",
                "Changed",
                f"VNIC {format_mac(want_v.mac)} exists: "
                + _differences(have_v, want_v, _VNIC_LOAD_FIELDS),
            )
        )
    for i, have_r, want_r in changed_routes:
        fields = tuple(f for f in want_r.__dataclass_fields__ if f != "version")
        errs.append(
            FieldError(
                f"routes[{i}]", "Changed", "route exists: " + _differences(have_r, want_r, fields)
            )
        )
    total = len(errs)
    shown = errs[:LOAD_CONFLICTS_LISTED]
    more = f" (the first {len(shown)} are listed)" if total > len(shown) else ""
    return Conflict(
        f"{total} entr{'y' if total == 1 else 'ies'} would change objects already in the store"
        f"{more}; give --replace to replace them (shootdowns are written for moves)",
        shown,
    )


def _load_shootdowns(
    tx: Tx,
    version: int,
    changed_cns: list[tuple[int, ComputeNode, ComputeNode]],
    replaced_vnics: list[tuple[Vnic, Vnic]],
) -> list[LogRecord]:
    """The log rows for objects ``load --replace`` changed, as the API would write them:
    a VNIC moved (VL2 + VL3 to the vnet's CNs and the old CN), re-addressed (VL3 for the new
    and the old IP), or put in another vnet (the old vnet's CNs forget it, VL2 + VL3; the new
    vnet's learn its IP, VL3); a CN given another underlay address (VL2 for each of its VNICs
    to the CNs of their vnets). Tag, owner and firewall changes write nothing."""
    in_vnet: dict[int, set[str]] = {}

    def cns_of(vnet: int) -> set[str]:
        if vnet not in in_vnet:
            in_vnet[vnet] = tx.cns_in_vnet(vnet)
        return in_vnet[vnet]

    records: list[LogRecord] = []
    for have, new in replaced_vnics:
        moved = have.cn_uuid != new.cn_uuid
        if have.vnet_id != new.vnet_id:
            for r in sorted(cns_of(have.vnet_id) | {have.cn_uuid}):
                records.append(_vl2_rec(r, have, version))
                records.append(_vl3_rec(r, have, have.ip, version))
            records.extend(_vl3_rec(r, new, new.ip, version) for r in sorted(cns_of(new.vnet_id)))
            continue
        ip_changed = have.ip != new.ip
        if not (moved or ip_changed or have.vlan_id != new.vlan_id):
            continue
        recipients = set(cns_of(new.vnet_id))
        if moved:
            recipients.add(have.cn_uuid)
        for r in sorted(recipients):
            if moved:
                records.append(_vl2_rec(r, new, version))
            records.append(_vl3_rec(r, new, new.ip, version))
            if ip_changed:
                records.append(_vl3_rec(r, new, have.ip, version))
    for _, _, cn in changed_cns:
        for v in tx.list_vnics(cn_uuid=cn.uuid):
            records.extend(_vl2_rec(r, v, version) for r in sorted(cns_of(v.vnet_id)))
    return records


def _validate_document(document: Any) -> tuple[list[ComputeNode], list[Vnic], list[Route]]:
    """Parse a ``load`` document; every bad field becomes one FieldError."""
    errs: list[FieldError] = []
    if not isinstance(document, dict):
        raise InvalidParameters([FieldError("document", INVALID, "must be a JSON object")])
    _unknown_keys(errs, "", document, "document")
    sections: dict[str, list[Any]] = {}
    for name in ("cns", "vnics", "routes"):
        value = document.get(name, [])
        if value is None:
            value = []
        if not isinstance(value, list):
            errs.append(FieldError(name, INVALID, f"{name} must be a list"))
            value = []
        sections[name] = value

    def entry(section: str, i: int, item: Any) -> dict[str, Any] | None:
        if not isinstance(item, dict):
            errs.append(FieldError(f"{section}[{i}]", INVALID, "must be an object"))
            return None
        _unknown_keys(errs, f"{section}[{i}].", item, section)
        return item

    cns: list[ComputeNode] = []
    seen_cn: dict[str, int] = {}
    seen_ul: dict[str, int] = {}
    for i, item in enumerate(sections["cns"]):
        e = entry("cns", i, item)
        if e is None:
            continue
        p = f"cns[{i}]."
        u = _v_uuid(errs, p + "uuid", e.get("uuid"))
        ip = _v_ip(errs, p + "ip", e.get("ip"))
        port = _v_int(errs, p + "port", e.get("port", DEFAULT_UL_PORT), 1, 65535)
        if u is not None and u in seen_cn:
            errs.append(FieldError(p + "uuid", INVALID, f"duplicate of cns[{seen_cn[u]}]"))
            u = None
        if ip is not None and ip in seen_ul:
            errs.append(FieldError(p + "ip", INVALID, f"same underlay IP as cns[{seen_ul[ip]}]"))
            ip = None
        if u is not None:
            seen_cn[u] = i
        if ip is not None:
            seen_ul[ip] = i
        if u is not None and ip is not None and port is not None:
            cns.append(ComputeNode(u, ip, port))

    vnics: list[Vnic] = []
    seen_mac: dict[bytes, int] = {}
    seen_ip: dict[tuple[int, str], int] = {}
    for i, item in enumerate(sections["vnics"]):
        e = entry("vnics", i, item)
        if e is None:
            continue
        p = f"vnics[{i}]."
        mac = _v_mac(errs, p + "mac", e.get("mac"))
        ip = _v_ip(errs, p + "ip", e.get("ip"))
        vnet = _v_int(errs, p + "vnet_id", e.get("vnet_id"), 0, VNET_MAX)
        vlan_field = "vlan_id" if "vlan_id" in e else "vlan"
        vlan = _v_int(errs, p + vlan_field, e.get(vlan_field, 0), 0, VLAN_MAX)
        cn = _v_uuid(errs, p + "cn_uuid", e.get("cn_uuid"))
        belongs = _v_uuid(errs, p + "belongs_to_uuid", e.get("belongs_to_uuid"), required=False)
        owner = _v_uuid(errs, p + "owner_uuid", e.get("owner_uuid"), required=False)
        tags = _v_tags(errs, p + "tags", e.get("tags"))
        fw = _v_bool(errs, p + "firewall_enabled", e.get("firewall_enabled", False))
        if mac is not None and mac in seen_mac:
            errs.append(FieldError(p + "mac", INVALID, f"duplicate of vnics[{seen_mac[mac]}]"))
            mac = None
        if ip is not None and vnet is not None:
            if (vnet, ip) in seen_ip:
                errs.append(
                    FieldError(
                        p + "ip", INVALID, f"same IP and vnet as vnics[{seen_ip[(vnet, ip)]}]"
                    )
                )
                ip = None
            else:
                seen_ip[(vnet, ip)] = i
        if mac is not None:
            seen_mac[mac] = i
        if None not in (mac, ip, vnet, vlan, cn) and tags is not None and fw is not None:
            vnics.append(
                Vnic(
                    mac=mac,  # type: ignore[arg-type]
                    ip=ip,  # type: ignore[arg-type]
                    vnet_id=vnet,  # type: ignore[arg-type]
                    vlan_id=vlan,  # type: ignore[arg-type]
                    cn_uuid=cn,  # type: ignore[arg-type]
                    belongs_to_uuid=belongs,
                    owner_uuid=owner,
                    tags=tags,
                    firewall_enabled=fw,
                )
            )

    routes: list[Route] = []
    seen_route: dict[tuple[int, int, str, str], int] = {}
    for i, item in enumerate(sections["routes"]):
        e = entry("routes", i, item)
        if e is None:
            continue
        p = f"routes[{i}]."
        vnet = _v_int(errs, p + "vnet_id", e.get("vnet_id"), 0, VNET_MAX)
        vlan = _v_int(errs, p + "vlan_id", e.get("vlan_id", e.get("vlan", 0)), 0, VLAN_MAX)
        sub = _v_subnet(errs, p + "subnet", e.get("subnet"))
        dc = _v_int(errs, p + "r_dc_id", e.get("r_dc_id"), 0, U32_MAX)
        rvnet = _v_int(errs, p + "r_vnet_id", e.get("r_vnet_id"), 0, VNET_MAX)
        rvlan = _v_int(errs, p + "r_vlan_id", e.get("r_vlan_id", 0), 0, VLAN_MAX)
        rsub = _v_subnet(errs, p + "r_subnet", e.get("r_subnet"))
        send_mac = _v_mac(errs, p + "r_send_mac", e.get("r_send_mac"))
        ul_ip = _v_ip(errs, p + "r_ul_ip", e.get("r_ul_ip"), required=False)
        ul_port = _v_int(errs, p + "r_ul_port", e.get("r_ul_port", DEFAULT_UL_PORT), 1, 65535)
        dst_mac = _v_mac(errs, p + "r_dst_mac", e.get("r_dst_mac"), required=False)
        net_uuid = _v_uuid(errs, p + "net_uuid", e.get("net_uuid"), required=False)
        r_net_uuid = _v_uuid(errs, p + "r_net_uuid", e.get("r_net_uuid"), required=False)
        if None in (vnet, vlan, sub, dc, rvnet, rvlan, rsub, send_mac, ul_port):
            continue
        r = Route(
            vnet_id=vnet,  # type: ignore[arg-type]
            vlan_id=vlan,  # type: ignore[arg-type]
            subnet=str(sub),
            r_dc_id=dc,  # type: ignore[arg-type]
            r_vnet_id=rvnet,  # type: ignore[arg-type]
            r_vlan_id=rvlan,  # type: ignore[arg-type]
            r_subnet=str(rsub),
            r_send_mac=send_mac,  # type: ignore[arg-type]
            r_ul_ip=ul_ip,
            r_ul_port=ul_port,  # type: ignore[arg-type]
            r_dst_mac=dst_mac,
            net_uuid=net_uuid,
            r_net_uuid=r_net_uuid,
        )
        if r.key in seen_route:
            errs.append(
                FieldError(p + "subnet", INVALID, f"duplicate of routes[{seen_route[r.key]}]")
            )
            continue
        seen_route[r.key] = i
        routes.append(r)
    _raise(errs)
    return cns, vnics, routes


__all__ = ["Directory", "IndexChange", "NoChange"]
