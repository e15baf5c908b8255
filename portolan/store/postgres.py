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

Fast failure, down or hung. A server that is down, hung (SIGSTOP, overloaded) or cut off
(a firewall dropping packets) costs a request about 2 s, never more, and then 503:

- connecting: ``connect_timeout`` 2 s (libpq's minimum) covers TCP and the startup exchange;
- every statement: the connection class (`BoundedConnection`) gives each round trip with the
  server at most ``statement_wait`` seconds (`STATEMENT_WAIT`, 2 s). A hung server's kernel
  still acknowledges our packets, so no TCP timer can notice it; this client-side bound does.
  When it expires the connection is closed at once, without COMMIT: the server rolls the
  transaction back when it next runs, so a write answered 503 is never committed later. (The
  one window left: a hang after COMMIT was sent and before its answer; the 503 then says the
  outcome is unknown.) Whole-table reads, bulk loads and migrations run inside ``tx.bulk()``
  with `BULK_WAIT` instead;
- on the server side every session gets ``statement_timeout`` (`STATEMENT_TIMEOUT_MS`, lifted
  to `BULK_WAIT` inside ``tx.bulk()``), ``idle_in_transaction_session_timeout`` (a transaction
  whose client vanished stops holding the version row lock) and TCP keepalives plus
  ``tcp_user_timeout``; the client sets keepalives and ``tcp_user_timeout`` too (packets
  dropped on the way fail the connection in about 2 s);
- ``lock_timeout`` (1.5 s) bounds how long a writer waits for another instance's writer
  ("database busy", 503) within the statement bound.

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
#: longest one round trip with the server may take (seconds) before the server counts as hung
STATEMENT_WAIT = 2.0
#: the same inside ``tx.bulk()`` (whole-table reads, bulk loads, migrations)
BULK_WAIT = 300.0
#: server-side bound on one statement (a backstop behind STATEMENT_WAIT)
STATEMENT_TIMEOUT_MS = 5_000
#: server-side: a transaction left idle this long (its client gone) is aborted
IDLE_IN_TRANSACTION_MS = 10_000
#: TCP: unacknowledged data fails the connection after this long (client and server)
TCP_USER_TIMEOUT_MS = 2_000
# A writer waits at most this long for the version row (held by another instance's writer):
# a writer stuck on a half-dead peer's lock gets a 503 instead of hanging the API.
LOCK_TIMEOUT_MS = 1_500
#: executemany with more rows than this runs as bulk
BULK_ROWS = 1_000
_SESSION_OPTIONS = (
    f"-c lock_timeout={LOCK_TIMEOUT_MS} -c statement_timeout={STATEMENT_TIMEOUT_MS} "
    f"-c idle_in_transaction_session_timeout={IDLE_IN_TRANSACTION_MS} "
    "-c tcp_keepalives_idle=5 -c tcp_keepalives_interval=2 -c tcp_keepalives_count=3 "
    f"-c tcp_user_timeout={TCP_USER_TIMEOUT_MS}"
)
_WAIT_TIMEOUT: type[BaseException] = getattr(pgerr, "_WaitTimeout", psycopg.OperationalError)


class ServerHung(psycopg.OperationalError):
    """The server did not answer one round trip within the connection's ``wait_limit``."""


class BoundedConnection(psycopg.Connection[Any]):
    """A psycopg connection whose every wait for the server is bounded by ``wait_limit``
    seconds (None: unbounded). On expiry the connection is closed (its protocol state is
    unknown; the server rolls back whatever transaction was open) and `ServerHung` raised.
    Waits that carry their own shorter timeout (``notifies(timeout=...)``) keep it."""

    wait_limit: float | None = None

    def wait(self, gen: Any, interval: float | None = None, timeout: float | None = None) -> Any:
        limit = self.wait_limit
        kwargs: dict[str, Any] = {} if interval is None else {"interval": interval}
        if limit is None or (timeout is not None and timeout <= limit):
            return super().wait(gen, timeout=timeout, **kwargs)
        try:
            return super().wait(gen, timeout=limit, **kwargs)
        except _WAIT_TIMEOUT:
            try:
                self.pgconn.finish()
            except Exception:
                pass
            raise ServerHung(f"no answer from the server within {limit:g}s") from None


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
        statement_wait: float = STATEMENT_WAIT,
    ) -> None:
        super().__init__(url)
        self._statement_wait = statement_wait
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
            conn = BoundedConnection.connect(
                self.url,
                autocommit=True,
                connect_timeout=self._connect_timeout,
                keepalives=1,
                keepalives_idle=5,
                keepalives_interval=2,
                keepalives_count=3,
                tcp_user_timeout=TCP_USER_TIMEOUT_MS,
                application_name="portolan",
                options=_SESSION_OPTIONS,
            )
        except psycopg.Error as exc:
            raise unreachable(exc, self.url) from exc
        conn.wait_limit = self._statement_wait
        return conn

    @contextmanager
    def _bulk(self, cursor: Any) -> Iterator[None]:
        conn = cursor.connection
        previous = conn.wait_limit
        if previous is not None and previous >= BULK_WAIT:
            yield  # already bulk
            return
        conn.wait_limit = BULK_WAIT
        self._execute(cursor, f"SET LOCAL statement_timeout = {int(BULK_WAIT * 1000)}", ())
        try:
            yield
        finally:
            conn.wait_limit = previous
        self._execute(cursor, "SET LOCAL statement_timeout TO DEFAULT", ())

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
                if (
                    not reused
                    or isinstance(exc, ServerHung)
                    or not isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError)
                ):
                    if isinstance(exc, ServerHung):
                        self._drop_idle()  # they lead to the same hung server
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
            except ServerHung as exc:
                raise StoreUnavailable(
                    f"database unreachable: {exc} to COMMIT; the change may or may not be applied"
                ) from exc
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
        if len(rows) > BULK_ROWS and cursor.connection.wait_limit != BULK_WAIT:
            with self._bulk(cursor):
                self._executemany(cursor, sql, rows)
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
