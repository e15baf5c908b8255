"""The backend-neutral store: ``Store`` (connection + transactions) and ``Tx`` (the queries).

All SQL lives here, written once in portable SQL with ``?`` placeholders; a backend supplies
the connection, ``BEGIN``/``COMMIT``, placeholder translation (``_prepare``) and the mapping of
its driver's exceptions to ``UniqueViolation`` / ``IntegrityViolation`` / ``StoreUnavailable``
(``_execute``/``_executemany``). Nothing here is async: the Directory runs store work in
``trio.to_thread.run_sync`` under a ``CapacityLimiter``.

Rows are trusted for shape but not for tags: a VNIC's ``tags`` column is JSON text that older
versions stored unchecked (``NaN``, ``Infinity``, lone surrogates such as ``"\ud800"``), which
no JSON answer can carry. `decode_tags` repairs such text on every read (non-finite numbers
become the strings ``"NaN"``/``"Infinity"``/``"-Infinity"``, lone surrogates U+FFFD, text that
is not a JSON object ``{}``) and logs it, so a bad row never turns a read into a 500; the next
write of that VNIC stores the repaired tags.
"""

from __future__ import annotations

import json
import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

from protocol.addr import int_to_mac, mac_to_int

from ..model import ComputeNode, LogRecord, Network, Route, Rule, Vnic
from . import schema

log = logging.getLogger("portolan.store")

# SQLite's default SQLITE_MAX_VARIABLE_NUMBER is large nowadays, PostgreSQL allows 65535;
# stay well below both when building IN (...) lists.
IN_CHUNK = 500


class IntegrityViolation(Exception):
    """A constraint of the database refused a write (foreign key, not null, ...)."""

    def __init__(self, message: str, constraint: str = "") -> None:
        super().__init__(message)
        self.constraint = constraint


class UniqueViolation(IntegrityViolation):
    """A UNIQUE / PRIMARY KEY constraint refused a write (a concurrent writer got there first)."""


class SchemaTooNew(Exception):
    """The database was migrated by a newer portolan than this one."""


@dataclass(slots=True)
class Snapshot:
    """Everything the lookup index needs, read in one transaction.

    ``vnics`` rows are plain tuples ``(mac_int, ip_text, vnet_id, cn_uuid)`` to keep a
    million-row load cheap.
    """

    version: int
    cns: list[ComputeNode] = field(default_factory=list)
    vnics: list[tuple[int, str, int, str]] = field(default_factory=list)
    routes: list[Route] = field(default_factory=list)


_VNIC_COLS = (
    "mac, ip, vnet_id, vlan_id, network_uuid, cn_uuid, belongs_to_uuid, owner_uuid, tags, "
    "firewall_enabled, version"
)
_NET_COLS = (
    "uuid, name, owner_uuid, vnet_id, vlan_id, subnet, gateway, provision_start, "
    "provision_end, version"
)
_LOG_COLS = (
    "seq, id, cn_uuid, type, vnet_id, mac, ip, vlan, version, src_vnet_id, dst_vnet_id, dc_id, "
    "src_ip, dst_ip, src_vlan, dst_vlan, src_prefixlen, dst_prefixlen"
)
_ROUTE_COLS = (
    "vnet_id, vlan_id, subnet, r_dc_id, r_vnet_id, r_vlan_id, r_subnet, r_send_mac, r_ul_ip, "
    "r_ul_port, r_dst_mac, net_uuid, r_net_uuid, version"
)
_RULE_COLS = "uuid, owner_uuid, is_global, enabled, rule, description, log, version, created"


_repairs_logged = 0
_MAX_REPAIR_LOGS = 20


def _clean_text(text: str) -> str:
    if text.isascii() or not any("\ud800" <= c <= "\udfff" for c in text):
        return text
    return "".join("\ufffd" if "\ud800" <= c <= "\udfff" else c for c in text)


def _clean_value(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, str):
        return _clean_text(value)
    if isinstance(value, list):
        return [_clean_value(v) for v in value]
    if isinstance(value, dict):
        return {_clean_text(k): _clean_value(v) for k, v in value.items()}
    return value


def decode_tags(text: str | None) -> dict[str, Any]:
    """A stored ``tags`` column as a dict JSON can answer (see the module docstring)."""
    if not text:
        return {}
    suspect = "NaN" in text or "Infinity" in text or "\\u" in text
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if isinstance(value, dict) and not suspect:
        return value
    repaired = _clean_value(value) if isinstance(value, dict) else {}
    if repaired != value or not isinstance(value, dict):
        global _repairs_logged
        if _repairs_logged < _MAX_REPAIR_LOGS:
            _repairs_logged += 1
            log.warning("repaired stored VNIC tags that JSON cannot carry: %.80r", text)
    return repaired


def _vnic(row: Sequence[Any]) -> Vnic:
    return Vnic(
        mac=int_to_mac(row[0]),
        ip=row[1],
        vnet_id=row[2],
        vlan_id=row[3],
        network_uuid=row[4],
        cn_uuid=row[5],
        belongs_to_uuid=row[6],
        owner_uuid=row[7],
        tags=decode_tags(row[8]),
        firewall_enabled=bool(row[9]),
        version=row[10],
    )


def _vnic_params(v: Vnic) -> tuple[Any, ...]:
    return (
        mac_to_int(v.mac),
        v.ip,
        v.vnet_id,
        v.vlan_id,
        v.network_uuid,
        v.cn_uuid,
        v.belongs_to_uuid,
        v.owner_uuid,
        json.dumps(v.tags, sort_keys=True, separators=(",", ":")),
        int(bool(v.firewall_enabled)),
        v.version,
    )


def _network(row: Sequence[Any]) -> Network:
    return Network(*row)


def _log(row: Sequence[Any]) -> LogRecord:
    return LogRecord(
        seq=row[0],
        id=bytes(row[1]),
        cn_uuid=row[2],
        type=row[3],
        vnet_id=row[4],
        mac=int_to_mac(row[5]) if row[5] is not None else None,
        ip=row[6],
        vlan=row[7],
        version=row[8],
        src_vnet_id=row[9] or 0,
        dst_vnet_id=row[10] or 0,
        dc_id=row[11] or 0,
        src_ip=row[12],
        dst_ip=row[13],
        src_vlan=row[14] or 0,
        dst_vlan=row[15] or 0,
        src_prefixlen=row[16] or 0,
        dst_prefixlen=row[17] or 0,
    )


def _log_params(r: LogRecord) -> tuple[Any, ...]:
    return (
        r.id,
        r.cn_uuid,
        r.type,
        r.vnet_id,
        mac_to_int(r.mac) if r.mac is not None else None,
        r.ip,
        r.vlan,
        r.version,
        r.src_vnet_id,
        r.dst_vnet_id,
        r.dc_id,
        r.src_ip,
        r.dst_ip,
        r.src_vlan,
        r.dst_vlan,
        r.src_prefixlen,
        r.dst_prefixlen,
    )


def _route(row: Sequence[Any]) -> Route:
    return Route(
        vnet_id=row[0],
        vlan_id=row[1],
        subnet=row[2],
        r_dc_id=row[3],
        r_vnet_id=row[4],
        r_vlan_id=row[5],
        r_subnet=row[6],
        r_send_mac=int_to_mac(row[7]),
        r_ul_ip=row[8],
        r_ul_port=row[9],
        r_dst_mac=int_to_mac(row[10]) if row[10] is not None else None,
        net_uuid=row[11],
        r_net_uuid=row[12],
        version=row[13],
    )


def _route_params(r: Route) -> tuple[Any, ...]:
    return (
        r.vnet_id,
        r.vlan_id,
        r.subnet,
        r.r_dc_id,
        r.r_vnet_id,
        r.r_vlan_id,
        r.r_subnet,
        mac_to_int(r.r_send_mac),
        r.r_ul_ip,
        r.r_ul_port,
        mac_to_int(r.r_dst_mac) if r.r_dst_mac is not None else None,
        r.net_uuid,
        r.r_net_uuid,
        r.version,
    )


def _rule(row: Sequence[Any]) -> Rule:
    return Rule(
        uuid=row[0],
        owner_uuid=row[1],
        is_global=bool(row[2]),
        enabled=bool(row[3]),
        rule=row[4],
        description=row[5],
        log=bool(row[6]),
        version=row[7],
        created=row[8],
    )


def _chunks(items: Sequence[Any], n: int = IN_CHUNK) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


class Tx:
    """One open transaction. Only valid inside ``with store.transaction() as tx:``."""

    def __init__(self, store: Store, cursor: Any, write: bool) -> None:
        self._store = store
        self._cur = cursor
        self.write = write

    # -- plumbing -------------------------------------------------------------------------
    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        return self._store._execute(self._cur, sql, params)

    def executemany(self, sql: str, seq: Iterable[Sequence[Any]]) -> None:
        self._store._executemany(self._cur, sql, seq)

    def bulk(self) -> AbstractContextManager[None]:
        """Statements inside take as long as they need (whole-table reads, bulk loads,
        migrations); elsewhere a backend may bound each statement (PostgreSQL: see
        ``portolan.store.postgres``)."""
        return self._store._bulk(self._cur)

    def _one(self, sql: str, params: Sequence[Any] = ()) -> Any:
        return self.execute(sql, params).fetchone()

    def _all(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        return list(self.execute(sql, params).fetchall())

    # -- meta / version counter -------------------------------------------------------------
    def meta_get(self, key: str) -> int | None:
        row = self._one("SELECT value FROM meta WHERE key = ?", (key,))
        return None if row is None else int(row[0])

    def meta_set(self, key: str, value: int) -> None:
        if self.meta_get(key) is None:
            self.execute("INSERT INTO meta (key, value) VALUES (?, ?)", (key, value))
        else:
            self.execute("UPDATE meta SET value = ? WHERE key = ?", (value, key))

    def next_version(self) -> int:
        """Take the next value of the global change counter.

        Call it first in a write transaction: on PostgreSQL the row lock it takes serialises
        all writers (check-then-insert logic after it is race free); on SQLite
        ``BEGIN IMMEDIATE`` already does.
        """
        row = self._one("UPDATE meta SET value = value + 1 WHERE key = 'version' RETURNING value")
        return int(row[0])

    def current_version(self) -> int:
        return self.meta_get("version") or 0

    # -- compute nodes ----------------------------------------------------------------------
    def get_cn(self, uuid: str) -> ComputeNode | None:
        row = self._one("SELECT uuid, ip, port, version FROM cns WHERE uuid = ?", (uuid,))
        return ComputeNode(*row) if row else None

    def cn_by_ip(self, ip: str) -> ComputeNode | None:
        row = self._one("SELECT uuid, ip, port, version FROM cns WHERE ip = ?", (ip,))
        return ComputeNode(*row) if row else None

    def list_cns(self) -> list[ComputeNode]:
        rows = self._all("SELECT uuid, ip, port, version FROM cns ORDER BY uuid")
        return [ComputeNode(*r) for r in rows]

    def insert_cn(self, cn: ComputeNode) -> None:
        self.execute(
            "INSERT INTO cns (uuid, ip, port, version) VALUES (?, ?, ?, ?)",
            (cn.uuid, cn.ip, cn.port, cn.version),
        )

    def update_cn(self, cn: ComputeNode) -> None:
        self.execute(
            "UPDATE cns SET ip = ?, port = ?, version = ? WHERE uuid = ?",
            (cn.ip, cn.port, cn.version, cn.uuid),
        )

    def delete_cn(self, uuid: str) -> bool:
        return self.execute("DELETE FROM cns WHERE uuid = ?", (uuid,)).rowcount > 0

    # -- networks ---------------------------------------------------------------------------
    def get_network(self, uuid: str) -> Network | None:
        row = self._one(f"SELECT {_NET_COLS} FROM networks WHERE uuid = ?", (uuid,))
        return _network(row) if row else None

    def list_networks(self, vnet_id: int | None = None) -> list[Network]:
        if vnet_id is None:
            rows = self._all(f"SELECT {_NET_COLS} FROM networks ORDER BY uuid")
        else:
            rows = self._all(
                f"SELECT {_NET_COLS} FROM networks WHERE vnet_id = ? ORDER BY uuid", (vnet_id,)
            )
        return [_network(r) for r in rows]

    def insert_network(self, n: Network) -> None:
        self.execute(
            f"INSERT INTO networks ({_NET_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                n.uuid,
                n.name,
                n.owner_uuid,
                n.vnet_id,
                n.vlan_id,
                n.subnet,
                n.gateway,
                n.provision_start,
                n.provision_end,
                n.version,
            ),
        )

    def delete_network(self, uuid: str) -> bool:
        return self.execute("DELETE FROM networks WHERE uuid = ?", (uuid,)).rowcount > 0

    # -- vnics ------------------------------------------------------------------------------
    def get_vnic(self, mac: bytes) -> Vnic | None:
        row = self._one(f"SELECT {_VNIC_COLS} FROM vnics WHERE mac = ?", (mac_to_int(mac),))
        return _vnic(row) if row else None

    def get_vnics(self, macs: Sequence[bytes]) -> dict[bytes, Vnic]:
        out: dict[bytes, Vnic] = {}
        ints = [mac_to_int(m) for m in macs]
        for chunk in _chunks(ints):
            marks = ", ".join("?" * len(chunk))
            for row in self._all(
                f"SELECT {_VNIC_COLS} FROM vnics WHERE mac IN ({marks})", tuple(chunk)
            ):
                v = _vnic(row)
                out[v.mac] = v
        return out

    def vnic_by_ip(self, vnet_id: int, ip: str) -> Vnic | None:
        row = self._one(
            f"SELECT {_VNIC_COLS} FROM vnics WHERE vnet_id = ? AND ip = ?", (vnet_id, ip)
        )
        return _vnic(row) if row else None

    def list_vnics(
        self,
        *,
        vnet_id: int | None = None,
        cn_uuid: str | None = None,
        network_uuid: str | None = None,
        owner_uuid: str | None = None,
    ) -> list[Vnic]:
        where: list[str] = []
        params: list[Any] = []
        for col, val in (
            ("vnet_id", vnet_id),
            ("cn_uuid", cn_uuid),
            ("network_uuid", network_uuid),
            ("owner_uuid", owner_uuid),
        ):
            if val is not None:
                where.append(f"{col} = ?")
                params.append(val)
        sql = f"SELECT {_VNIC_COLS} FROM vnics"
        if where:
            sql += " WHERE " + " AND ".join(where)
        with self.bulk() if not where else nullcontext():  # every VNIC: may take a while
            return [_vnic(r) for r in self._all(sql + " ORDER BY mac", params)]

    def vnet_ips(self, vnet_id: int) -> list[str]:
        """Every IP used by a VNIC of the vnet (canonical text)."""
        return [r[0] for r in self._all("SELECT ip FROM vnics WHERE vnet_id = ?", (vnet_id,))]

    def vnet_ip_owners(self, vnet_ids: Sequence[int]) -> dict[tuple[int, str], bytes]:
        """(vnet_id, ip) -> mac for every VNIC in the given vnets."""
        out: dict[tuple[int, str], bytes] = {}
        for chunk in _chunks(sorted(set(vnet_ids))):
            marks = ", ".join("?" * len(chunk))
            for mac, ip, vnet in self._all(
                f"SELECT mac, ip, vnet_id FROM vnics WHERE vnet_id IN ({marks})", tuple(chunk)
            ):
                out[(vnet, ip)] = int_to_mac(mac)
        return out

    def mac_exists(self, mac: bytes) -> bool:
        return self._one("SELECT 1 FROM vnics WHERE mac = ?", (mac_to_int(mac),)) is not None

    def count_vnics(self, *, cn_uuid: str | None = None, network_uuid: str | None = None) -> int:
        if cn_uuid is not None:
            row = self._one("SELECT COUNT(*) FROM vnics WHERE cn_uuid = ?", (cn_uuid,))
        elif network_uuid is not None:
            row = self._one("SELECT COUNT(*) FROM vnics WHERE network_uuid = ?", (network_uuid,))
        else:
            row = self._one("SELECT COUNT(*) FROM vnics")
        return int(row[0])

    def cns_in_vnet(self, vnet_id: int) -> set[str]:
        """The CNs holding at least one VNIC of the vnet (shootdown recipients)."""
        rows = self._all("SELECT DISTINCT cn_uuid FROM vnics WHERE vnet_id = ?", (vnet_id,))
        return {r[0] for r in rows}

    def insert_vnic(self, v: Vnic) -> None:
        self.execute(
            f"INSERT INTO vnics ({_VNIC_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            _vnic_params(v),
        )

    def insert_vnics(self, vnics: Iterable[Vnic]) -> None:
        with self.bulk():
            self.executemany(
                f"INSERT INTO vnics ({_VNIC_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (_vnic_params(v) for v in vnics),
            )

    def update_vnic(self, v: Vnic) -> None:
        p = _vnic_params(v)
        self.execute(
            "UPDATE vnics SET ip = ?, vnet_id = ?, vlan_id = ?, network_uuid = ?, cn_uuid = ?, "
            "belongs_to_uuid = ?, owner_uuid = ?, tags = ?, firewall_enabled = ?, version = ? "
            "WHERE mac = ?",
            (*p[1:], p[0]),
        )

    def delete_vnic(self, mac: bytes) -> bool:
        return self.execute("DELETE FROM vnics WHERE mac = ?", (mac_to_int(mac),)).rowcount > 0

    def delete_vnics(self, macs: Sequence[bytes]) -> None:
        ints = [mac_to_int(m) for m in macs]
        for chunk in _chunks(ints):
            marks = ", ".join("?" * len(chunk))
            self.execute(f"DELETE FROM vnics WHERE mac IN ({marks})", tuple(chunk))

    # -- shootdown log ----------------------------------------------------------------------
    def append_log(self, records: Iterable[LogRecord]) -> None:
        self.executemany(
            "INSERT INTO shootdown_log (id, cn_uuid, type, vnet_id, mac, ip, vlan, version, "
            "src_vnet_id, dst_vnet_id, dc_id, src_ip, dst_ip, src_vlan, dst_vlan, "
            "src_prefixlen, dst_prefixlen) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (_log_params(r) for r in records),
        )

    def fetch_log(
        self, cn_uuid: str, limit: int | None = None, types: Sequence[int] | None = None
    ) -> list[LogRecord]:
        """A CN's log rows oldest first (by seq), optionally only of some types."""
        sql = f"SELECT {_LOG_COLS} FROM shootdown_log WHERE cn_uuid = ?"
        params: list[Any] = [cn_uuid]
        if types is not None:
            sql += " AND type IN (" + ", ".join("?" * len(types)) + ")"
            params.extend(types)
        sql += " ORDER BY seq"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        return [_log(r) for r in self._all(sql, params)]

    def remove_log(self, ids: Sequence[bytes]) -> int:
        removed = 0
        for chunk in _chunks(list(dict.fromkeys(bytes(i) for i in ids))):
            marks = ", ".join("?" * len(chunk))
            cur = self.execute(f"DELETE FROM shootdown_log WHERE id IN ({marks})", tuple(chunk))
            removed += max(cur.rowcount, 0)
        return removed

    def delete_log_for_cn(self, cn_uuid: str) -> int:
        cur = self.execute("DELETE FROM shootdown_log WHERE cn_uuid = ?", (cn_uuid,))
        return max(cur.rowcount, 0)

    def count_log(self, cn_uuid: str | None = None) -> int:
        if cn_uuid is None:
            return int(self._one("SELECT COUNT(*) FROM shootdown_log")[0])
        return int(self._one("SELECT COUNT(*) FROM shootdown_log WHERE cn_uuid = ?", (cn_uuid,))[0])

    # -- routes -----------------------------------------------------------------------------
    def list_routes(self) -> list[Route]:
        rows = self._all(
            f"SELECT {_ROUTE_COLS} FROM routes ORDER BY vnet_id, vlan_id, subnet, r_subnet"
        )
        return [_route(r) for r in rows]

    def get_route(self, key: tuple[int, int, str, str]) -> Route | None:
        row = self._one(
            f"SELECT {_ROUTE_COLS} FROM routes WHERE vnet_id = ? AND vlan_id = ? AND subnet = ? "
            "AND r_subnet = ?",
            key,
        )
        return _route(row) if row else None

    def put_route(self, r: Route) -> None:
        self.delete_route(r.key)
        self.execute(
            f"INSERT INTO routes ({_ROUTE_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            _route_params(r),
        )

    def delete_route(self, key: tuple[int, int, str, str]) -> bool:
        cur = self.execute(
            "DELETE FROM routes WHERE vnet_id = ? AND vlan_id = ? AND subnet = ? AND r_subnet = ?",
            key,
        )
        return cur.rowcount > 0

    # -- rules (table only; the rules engine owns the semantics) ------------------------------
    def list_rules(self) -> list[Rule]:
        return [_rule(r) for r in self._all(f"SELECT {_RULE_COLS} FROM rules ORDER BY uuid")]

    def get_rule(self, uuid: str) -> Rule | None:
        row = self._one(f"SELECT {_RULE_COLS} FROM rules WHERE uuid = ?", (uuid,))
        return _rule(row) if row else None

    def put_rule(self, r: Rule) -> None:
        self.execute("DELETE FROM rules WHERE uuid = ?", (r.uuid,))
        self.execute(
            f"INSERT INTO rules ({_RULE_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                r.uuid,
                r.owner_uuid,
                int(r.is_global),
                int(r.enabled),
                r.rule,
                r.description,
                int(r.log),
                r.version,
                r.created,
            ),
        )

    def delete_rule(self, uuid: str) -> bool:
        return self.execute("DELETE FROM rules WHERE uuid = ?", (uuid,)).rowcount > 0

    # -- the whole index --------------------------------------------------------------------
    def snapshot(self) -> Snapshot:
        with self.bulk():
            return Snapshot(
                version=self.current_version(),
                cns=self.list_cns(),
                vnics=[
                    (r[0], r[1], r[2], r[3])
                    for r in self._all("SELECT mac, ip, vnet_id, cn_uuid FROM vnics")
                ],
                routes=self.list_routes(),
            )


class Store(ABC):
    """A connection to the database. Synchronous; run it in a worker thread.

    ``with store.transaction() as tx:`` is one transaction: committed when the block ends,
    rolled back if it raises. ``write=True`` (the default) starts a writer transaction
    (SQLite ``BEGIN IMMEDIATE``), ``write=False`` a reader.
    """

    dialect: str = ""
    #: how many worker threads may use the store at once (the Directory's CapacityLimiter)
    workers: int = 1

    def __init__(self, url: str) -> None:
        self.url = url

    # -- what a backend provides ------------------------------------------------------------
    @abstractmethod
    def transaction(self, write: bool = True) -> AbstractContextManager[Tx]: ...

    @abstractmethod
    def close(self) -> None: ...

    @abstractmethod
    def _execute(self, cursor: Any, sql: str, params: Sequence[Any]) -> Any:
        """Run one statement (portable SQL, ``?`` placeholders); map driver errors."""

    @abstractmethod
    def _executemany(self, cursor: Any, sql: str, seq: Iterable[Sequence[Any]]) -> None: ...

    def _bulk(self, cursor: Any) -> AbstractContextManager[None]:
        """Hook behind ``Tx.bulk``: lift per-statement bounds for the block (none here)."""
        return nullcontext()

    def _lock_for_migration(self, tx: Tx) -> None:  # noqa: B027 (optional hook)
        """Hook: serialise concurrent migrations (PostgreSQL: an advisory lock)."""

    def record_change(self, tx: Tx, change: Any) -> None:  # noqa: B027 (optional hook)
        """Hook: called inside every committed write transaction with its ``IndexChange``.

        PostgreSQL appends it to the changes feed and NOTIFYs the other instances (delivered
        on commit); SQLite does nothing.
        """

    # -- schema ------------------------------------------------------------------------------
    def schema_version(self) -> int:
        with self.transaction(write=False) as tx:
            return self._read_schema_version(tx)

    def _read_schema_version(self, tx: Tx) -> int:
        if not self._has_table(tx, "meta"):
            return 0
        return tx.meta_get("schema_version") or 0

    @abstractmethod
    def _has_table(self, tx: Tx, name: str) -> bool: ...

    def migrate(self) -> int:
        """Bring the schema up to ``schema.SCHEMA_VERSION``; return the version now recorded."""
        with self.transaction(write=True) as tx:
            with tx.bulk():  # waits for other instances' migrations, may rewrite big tables
                self._lock_for_migration(tx)
                tx.execute(schema.META_DDL.format(**schema.DIALECT_TYPES[self.dialect]))
                current = tx.meta_get("schema_version") or 0
                if current > schema.SCHEMA_VERSION:
                    raise SchemaTooNew(
                        f"database schema version {current} is newer than this portolan's "
                        f"({schema.SCHEMA_VERSION})"
                    )
                for m in schema.pending_migrations(current):
                    for stmt in m.render(self.dialect):
                        tx.execute(stmt)
                    tx.meta_set("schema_version", m.version)
            return tx.meta_get("schema_version") or 0

    # -- conveniences (each its own transaction) ---------------------------------------------
    def snapshot(self) -> Snapshot:
        with self.transaction(write=False) as tx:
            return tx.snapshot()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
