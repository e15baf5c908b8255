"""The SQLite backend: one connection, WAL mode, ``BEGIN IMMEDIATE`` for writers.

The connection is shared by whichever worker thread holds the Directory's
``CapacityLimiter(1)``; a ``threading.Lock`` makes concurrent use from several threads safe
anyway (transactions are then serialised). ``synchronous=FULL``: a committed shootdown log
row survives a crash of the process or of the machine.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from ..errors import StoreUnavailable
from .base import IntegrityViolation, Store, Tx, UniqueViolation

# OperationalError messages that mean "the database is not usable right now" (as opposed to a
# bug in our SQL, which must surface as the programming error it is).
_UNAVAILABLE = (
    "database is locked",
    "database table is locked",
    "unable to open",
    "disk i/o error",
    "readonly database",
    "database or disk is full",
    "no such file",
    "file is not a database",
    "database disk image is malformed",
    "cannot commit",
)


def _translate(exc: sqlite3.Error) -> Exception:
    msg = str(exc)
    low = msg.lower()
    if isinstance(exc, sqlite3.IntegrityError):
        if "unique constraint failed" in low:
            return UniqueViolation(msg, constraint=msg.split(":", 1)[-1].strip())
        return IntegrityViolation(msg)
    if isinstance(exc, sqlite3.OperationalError | sqlite3.DatabaseError) and any(
        k in low for k in _UNAVAILABLE
    ):
        return StoreUnavailable(f"store unavailable: {msg}")
    return exc


class SqliteStore(Store):
    dialect = "sqlite"

    def __init__(self, path: str, *, url: str | None = None, busy_timeout: float = 5.0) -> None:
        super().__init__(url or f"sqlite:{path}")
        self.path = path
        self._lock = threading.Lock()
        try:
            self._conn = sqlite3.connect(
                path, isolation_level=None, check_same_thread=False, timeout=busy_timeout
            )
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"cannot open sqlite store {path!r}: {exc}") from exc
        try:
            self._conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
            if path != ":memory:":
                self._conn.execute("PRAGMA journal_mode = WAL")
            self._conn.execute("PRAGMA synchronous = FULL")
            self._conn.execute("PRAGMA foreign_keys = ON")
        except sqlite3.Error as exc:
            self._conn.close()  # e.g. not a database file: do not leave the handle open
            raise StoreUnavailable(f"cannot open sqlite store {path!r}: {exc}") from exc
        self._closed = False

    @contextmanager
    def transaction(self, write: bool = True) -> Iterator[Tx]:
        with self._lock:
            if self._closed:
                raise StoreUnavailable("store is closed")
            cur = self._conn.cursor()
            try:
                cur.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            except sqlite3.Error as exc:
                cur.close()
                raise _translate(exc) from exc
            try:
                yield Tx(self, cur, write)
            except BaseException:
                try:
                    cur.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
                cur.close()
                raise
            try:
                cur.execute("COMMIT")
            except sqlite3.Error as exc:
                try:
                    cur.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
                raise _translate(exc) from exc
            finally:
                cur.close()

    def _execute(self, cursor: Any, sql: str, params: Sequence[Any]) -> Any:
        try:
            return cursor.execute(sql, tuple(params))
        except sqlite3.Error as exc:
            raise _translate(exc) from exc

    def _executemany(self, cursor: Any, sql: str, seq: Iterable[Sequence[Any]]) -> None:
        try:
            cursor.executemany(sql, seq)
        except sqlite3.Error as exc:
            raise _translate(exc) from exc

    def _has_table(self, tx: Tx, name: str) -> bool:
        row = tx.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)
        ).fetchone()
        return row is not None

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._conn.close()
