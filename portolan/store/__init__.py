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
``check_url(url)`` checks a URL's form without connecting (the CLI refuses a bad ``--store``
up front); ``redact_url(url)`` is the form to print or log: a URL may carry a password.
"""

from __future__ import annotations

import re

from .base import IntegrityViolation, SchemaTooNew, Snapshot, Store, Tx, UniqueViolation
from .schema import SCHEMA_VERSION

_URL_PASSWORD = re.compile(
    r"(?P<keep>^(?:[A-Za-z][A-Za-z0-9+.-]*://|postgres(?:ql)?:)[^/?#@:]*:)[^/?#@]*@"
)
_QUERY_PASSWORD = re.compile(r"(?P<keep>[?&]password=)[^&#]*", re.IGNORECASE)


def redact_url(url: str) -> str:
    """``url`` fit to print or log: a password (``user:PASSWORD@`` or ``?password=``) becomes
    ``***``; anything else is left as it was."""
    url = _URL_PASSWORD.sub(r"\g<keep>***@", url)
    return _QUERY_PASSWORD.sub(r"\g<keep>***", url)


def check_url(url: str) -> str:
    """The kind of store ``url`` names (``"sqlite"`` or ``"postgresql"``), without opening it;
    ValueError (password masked) when it names none."""
    if url.startswith("sqlite:"):
        if not _sqlite_path(url):
            raise ValueError(f"store URL {redact_url(url)!r} names no file (use sqlite:PATH)")
        return "sqlite"
    if url.startswith(("postgresql://", "postgres://", "postgresql:")):
        return "postgresql"
    raise ValueError(
        f"unknown store URL {redact_url(url)!r}: expected sqlite:PATH or postgresql://..."
    )


def _sqlite_path(url: str) -> str:
    path = url[len("sqlite:") :]
    return path[2:] if path.startswith("//") else path


def open_store(url: str, *, migrate: bool = True) -> Store:
    """Open the store named by ``url`` and bring its schema up to date.

    ``sqlite:PATH`` (also ``sqlite:///abs/path`` and ``sqlite::memory:``);
    ``postgresql://...`` / ``postgres://...`` (libpq connection URLs).
    """
    if check_url(url) == "sqlite":
        from .sqlite import SqliteStore

        store: Store = SqliteStore(_sqlite_path(url), url=url)
    else:
        from .postgres import PostgresStore

        store = PostgresStore(url)
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
    "check_url",
    "open_store",
    "redact_url",
]
