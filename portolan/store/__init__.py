"""Portolan's store: the source of truth for compute nodes, networks, VNICs, the shootdown log,
fabric routes and (later) firewall rules.

Theory of operation
-------------------
``open_store(url)`` returns a ``Store`` (``sqlite:PATH``, ``sqlite::memory:``,
``postgresql://...``: ``postgres.PostgresStore``, shared by several portolan instances). Its API
is synchronous: the Directory runs it in ``trio.to_thread.run_sync`` under a
``trio.CapacityLimiter`` (``store.workers``: 1 for SQLite, the pool size for PostgreSQL). Work happens in
``with store.transaction() as tx:`` blocks; ``tx`` (``base.Tx``) carries every query, written
once in portable SQL. A backend supplies only the connection, BEGIN/COMMIT, placeholder style
and the mapping of driver exceptions:

- ``UniqueViolation`` — a UNIQUE/PK constraint refused a write (MAC, (vnet_id, ip), CN ip);
  the Directory retries the whole operation, which then sees the winner's row.
- ``IntegrityViolation`` — any other constraint (e.g. a foreign key after a concurrent delete).
- ``portolan.errors.StoreUnavailable`` — the database cannot be reached or used right now.

Invariants
----------
- Every write transaction takes the next value of the global counter first
  (``tx.next_version()``); every row it writes carries that value. Counter values grow
  strictly with commit order (the counter row is locked until commit).
- A mapping change and its shootdown log rows are written in the same transaction.
- The schema version is recorded in ``meta.schema_version``; ``Store.migrate()`` applies the
  missing steps of ``schema.MIGRATIONS`` in one transaction and refuses a newer database.

Lifecycle
---------
``open_store(url)`` connects and (by default) migrates; ``store.close()`` closes.
"""

from __future__ import annotations

from .base import IntegrityViolation, SchemaTooNew, Snapshot, Store, Tx, UniqueViolation
from .schema import SCHEMA_VERSION


def open_store(url: str, *, migrate: bool = True) -> Store:
    """Open the store named by ``url`` and bring its schema up to date.

    ``sqlite:PATH`` (also ``sqlite:///abs/path`` and ``sqlite::memory:``);
    ``postgresql://...`` / ``postgres://...`` (libpq connection URLs).
    """
    if url.startswith("sqlite:"):
        from .sqlite import SqliteStore

        path = url[len("sqlite:") :]
        if path.startswith("//"):
            path = path[2:]
        if not path:
            raise ValueError(f"store URL {url!r} names no file (use sqlite:PATH)")
        store: Store = SqliteStore(path, url=url)
    elif url.startswith(("postgresql://", "postgres://", "postgresql:")):
        try:
            from .postgres import PostgresStore  # type: ignore[import-not-found]
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.postgres":
                raise
            raise NotImplementedError(
                "the PostgreSQL store backend is not implemented yet; use sqlite:PATH"
            ) from None
        store = PostgresStore(url)
    else:
        raise ValueError(f"unknown store URL {url!r}: expected sqlite:PATH or postgresql://...")
    if migrate:
        try:
            store.migrate()
        except BaseException:
            store.close()
            raise
    return store


__all__ = [
    "SCHEMA_VERSION",
    "IntegrityViolation",
    "SchemaTooNew",
    "Snapshot",
    "Store",
    "Tx",
    "UniqueViolation",
    "open_store",
]
