"""The PostgreSQL backend: psycopg 3 (sync API), a small pool of connections, the changes feed.

Theory of operation
-------------------
``PostgresStore(url)`` keeps up to ``pool_size`` idle connections (autocommit mode, so
transactions are exactly the ``BEGIN``/``COMMIT`` this module sends). ``transaction()`` takes
an idle connection or opens one, so several worker threads (the Directory's
``CapacityLimiter(store.workers)``) each work on their own connection:

- writers: ``BEGIN`` (READ COMMITTED). Their first statement, ``tx.next_version()``, locks
  the ``meta`` version row until commit; every later statement of the transaction sees every
  change committed before it. So writers of *every* instance sharing the database are
  serialised, check-then-insert allocation (lowest free IP, random MAC) is race free, and
  versions commit in increasing order (readers always see a prefix of the version sequence);
- readers: ``BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY``: one consistent snapshot for
  the whole transaction (an index load reads several tables).

SQL is the portable SQL of ``base.Tx`` with ``?`` placeholders, rewritten to psycopg's ``%s``
once per statement text. Driver errors are mapped: unique violations to ``UniqueViolation``
(the Directory retries), other integrity errors and serialization failures/deadlocks to
``IntegrityViolation`` (retried too), anything that says the server cannot be used (connection
refused or lost, admin shutdown, server starting up, statement timeout) to ``StoreUnavailable``
with a message starting "database unreachable" (HTTP 503). A connection that failed is closed,
never returned to the pool; when a pooled connection turns out dead at ``BEGIN`` (the server
restarted since it was used) every idle connection is dropped and one fresh connection is
tried before giving up, so the first request after an outage succeeds.

Fast failure: ``connect_timeout`` is 2 s (libpq's minimum) and TCP keepalives are on, so an
unreachable server costs a request at most a couple of seconds; ``lock_timeout`` (10 s) bounds
how long a writer waits for another instance's writer ("database busy", 503).

Coherence: ``record_change`` (called by the Directory inside every versioned write) appends the
change's keys to ``changes`` and sends ``NOTIFY portolan_changes, '<version>'``; see
``portolan.store.notify`` and ``portolan.coherence``. Every ``PRUNE_EVERY`` versions the feed
loses rows older than ``KEEP_CHANGES`` versions and ``meta.changes_floor`` records the cut.

Migrations run under ``pg_advisory_xact_lock`` so instances starting together do not race.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg import errors as pgerr
from psycopg.pq import TransactionStatus

from ..errors import StoreUnavailable
from . import redact_url
from .base import IntegrityViolation, Store, Tx, UniqueViolation
from .notify import CHANNEL, encode_change

MIGRATION_LOCK_KEY = 0x706F72746F6C616E  # "portolan"
DEFAULT_POOL_SIZE = 4
CONNECT_TIMEOUT = 2
# A writer waits at most this long for the version row (held by another instance's writer):
# a writer stuck on a half-dead peer's lock gets a 503 instead of hanging the API.
LOCK_TIMEOUT_MS = 10_000
KEEP_CHANGES = 20_000
PRUNE_EVERY = 1_000


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def unreachable(exc: BaseException, url: str = "") -> StoreUnavailable:
    """StoreUnavailable for a failed connection; libpq may quote the connection string in its
    message (``missing "=" after "..."``), so ``url`` is shown with its password masked."""
    text = _first_line(exc)
    if url:
        text = text.replace(url, redact_url(url))
    return StoreUnavailable(f"database unreachable: {text}")


def _translate(exc: psycopg.Error) -> Exception:
    constraint = ""
    diag = getattr(exc, "diag", None)
    if diag is not None:
        constraint = diag.constraint_name or ""
    if isinstance(exc, pgerr.UniqueViolation):
        return UniqueViolation(_first_line(exc), constraint=constraint)
    if isinstance(exc, psycopg.IntegrityError):
        return IntegrityViolation(_first_line(exc), constraint=constraint)
    if isinstance(exc, pgerr.SerializationFailure | pgerr.DeadlockDetected):
        return IntegrityViolation(_first_line(exc), constraint="serialization")
    if isinstance(exc, pgerr.LockNotAvailable):
        return StoreUnavailable(f"database busy: {_first_line(exc)}")
    if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError):
        return unreachable(exc)
    sqlstate = getattr(exc, "sqlstate", None) or ""
    if sqlstate[:2] in ("08", "53", "57"):  # connection, resources, operator intervention
        return unreachable(exc)
    return exc


class PostgresStore(Store):
    dialect = "postgresql"

    def __init__(
        self,
        url: str,
        *,
        pool_size: int = DEFAULT_POOL_SIZE,
        connect_timeout: int = CONNECT_TIMEOUT,
    ) -> None:
        super().__init__(url)
        self.workers = pool_size
        self._pool_size = pool_size
        self._connect_timeout = max(2, int(connect_timeout))
        self._idle: list[psycopg.Connection[Any]] = []
        self._lock = threading.Lock()
        self._closed = False
        self._sql: dict[str, str] = {}
        #: names this store object in the changes feed (an instance skips hooks for its own)
        self.origin = uuid.uuid4().hex[:12]
        # Connect once now: a wrong URL or a server that is down fails at open.
        self._release(self._connect())

    # -- connections --------------------------------------------------------------------------
    def _connect(self) -> psycopg.Connection[Any]:
        try:
            return psycopg.connect(
                self.url,
                autocommit=True,
                connect_timeout=self._connect_timeout,
                keepalives=1,
                keepalives_idle=5,
                keepalives_interval=2,
                keepalives_count=3,
                application_name="portolan",
                options=f"-c lock_timeout={LOCK_TIMEOUT_MS}",
            )
        except psycopg.Error as exc:
            raise unreachable(exc, self.url) from exc

    def _acquire(self) -> tuple[psycopg.Connection[Any], bool]:
        """An idle pooled connection (reused=True) or a new one."""
        with self._lock:
            if self._closed:
                raise StoreUnavailable("store is closed")
            if self._idle:
                return self._idle.pop(), True
        return self._connect(), False

    def _release(self, conn: psycopg.Connection[Any]) -> None:
        healthy = (
            not conn.closed
            and not conn.broken
            and conn.info.transaction_status == TransactionStatus.IDLE
        )
        with self._lock:
            if healthy and not self._closed and len(self._idle) < self._pool_size:
                self._idle.append(conn)
                return
        try:
            conn.close()
        except Exception:
            pass

    def _drop_idle(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for c in idle:
            try:
                c.close()
            except Exception:
                pass

    def _begin(self, write: bool) -> tuple[psycopg.Connection[Any], psycopg.Cursor[Any]]:
        stmt = "BEGIN" if write else "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"
        conn, reused = self._acquire()
        while True:
            try:
                cur = conn.cursor()
                cur.execute(stmt)
                return conn, cur
            except psycopg.Error as exc:
                try:
                    conn.close()
                except Exception:
                    pass
                if not reused or not isinstance(
                    exc, psycopg.OperationalError | psycopg.InterfaceError
                ):
                    raise _translate(exc) from exc
                # The pooled connection died while idle (server restart): so did its peers.
                self._drop_idle()
                conn, reused = self._connect(), False

    @contextmanager
    def transaction(self, write: bool = True) -> Iterator[Tx]:
        conn, cur = self._begin(write)
        done = False
        try:
            yield Tx(self, cur, write)
            try:
                cur.execute("COMMIT")
            except psycopg.Error as exc:
                raise _translate(exc) from exc
            done = True
        finally:
            if not done and not conn.closed:
                try:
                    cur.execute("ROLLBACK")
                except psycopg.Error:
                    pass
            try:
                cur.close()
            except Exception:
                pass
            self._release(conn)

    # -- statements ---------------------------------------------------------------------------
    def _prepare(self, sql: str) -> str:
        out = self._sql.get(sql)
        if out is None:
            out = sql.replace("%", "%%").replace("?", "%s")
            self._sql[sql] = out
        return out

    def _execute(self, cursor: Any, sql: str, params: Sequence[Any]) -> Any:
        try:
            cursor.execute(self._prepare(sql), tuple(params))
        except psycopg.Error as exc:
            raise _translate(exc) from exc
        return cursor

    def _executemany(self, cursor: Any, sql: str, seq: Iterable[Sequence[Any]]) -> None:
        rows = [tuple(p) for p in seq]
        if not rows:
            return
        try:
            cursor.executemany(self._prepare(sql), rows)
        except psycopg.Error as exc:
            raise _translate(exc) from exc

    def _has_table(self, tx: Tx, name: str) -> bool:
        row = tx.execute("SELECT to_regclass(?) IS NOT NULL", (name,)).fetchone()
        return bool(row[0])

    def _lock_for_migration(self, tx: Tx) -> None:
        tx.execute("SET LOCAL lock_timeout = 0")  # another instance may be migrating: wait
        tx.execute("SELECT pg_advisory_xact_lock(?)", (MIGRATION_LOCK_KEY,))

    # -- the changes feed ---------------------------------------------------------------------
    def record_change(self, tx: Tx, change: Any) -> None:
        version = getattr(change, "version", 0)
        if not isinstance(version, int) or version <= 0:
            return  # an unversioned write (LOG_RM): nothing for other instances to follow
        tx.execute(
            "INSERT INTO changes (version, payload) VALUES (?, ?)",
            (version, encode_change(change, self.origin)),
        )
        tx.execute("SELECT pg_notify(?, ?)", (CHANNEL, str(version)))
        if version % PRUNE_EVERY == 0 and version > KEEP_CHANGES:
            floor = version - KEEP_CHANGES
            tx.execute("DELETE FROM changes WHERE version <= ?", (floor,))
            tx.meta_set("changes_floor", floor)

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self._drop_idle()


__all__ = ["PostgresStore"]
