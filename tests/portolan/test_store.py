"""The SQLite store's own behaviour: migrations on an empty file, WAL mode, ``:memory:``, store
URLs (schemes, masking a password). What every backend shares (round trips, constraints,
transactions, the version counter, the log across a reopen, a newer schema, a closed store) is
pinned once, for SQLite and PostgreSQL, in test_store_backends.py."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from portolan.errors import StoreUnavailable
from portolan.model import ComputeNode
from portolan.store import SCHEMA_VERSION, check_url, open_store, redact_url
from portolan.store.schema import MIGRATIONS
from tests.portolan.conftest import CN1


def test_schema_version_is_recorded(tmp_path: Path) -> None:
    url = f"sqlite:{tmp_path / 'p.db'}"
    with open_store(url) as store:
        assert store.schema_version() == SCHEMA_VERSION == MIGRATIONS[-1].version
        with store.transaction(write=False) as tx:
            assert tx.meta_get("schema_version") == SCHEMA_VERSION
            assert tx.current_version() == 0
    # reopening migrates nothing and keeps the recorded version
    with open_store(url) as store:
        assert store.migrate() == SCHEMA_VERSION


def test_migrate_runs_the_missing_steps_on_an_empty_database(tmp_path: Path) -> None:
    url = f"sqlite:{tmp_path / 'p.db'}"
    with open_store(url, migrate=False) as store:
        assert store.schema_version() == 0
        assert store.migrate() == SCHEMA_VERSION
    con = sqlite3.connect(tmp_path / "p.db")
    tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    con.close()
    assert {"meta", "cns", "networks", "vnics", "shootdown_log", "routes", "rules"} <= tables


def test_sqlite_uses_wal_mode(tmp_path: Path) -> None:
    with open_store(f"sqlite:{tmp_path / 'p.db'}") as store, store.transaction(False) as tx:
        assert tx.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_memory_store_works() -> None:
    with open_store("sqlite::memory:") as store:
        with store.transaction() as tx:
            tx.insert_cn(ComputeNode(CN1, "192.168.1.1", 4789, tx.next_version()))
        assert store.snapshot().cns == [ComputeNode(CN1, "192.168.1.1", 4789, 1)]


def test_an_unreachable_postgresql_url_is_store_unavailable() -> None:
    # (the PostgreSQL backend's behaviour is pinned in test_store_backends.py)
    with pytest.raises(StoreUnavailable, match="database unreachable"):
        open_store("postgresql://portolan@127.0.0.1:1/portolan")


def test_unknown_url_scheme_is_refused() -> None:
    with pytest.raises(ValueError):
        open_store("mysql://x")


def test_unopenable_file_is_store_unavailable(tmp_path: Path) -> None:
    with pytest.raises(StoreUnavailable):
        open_store(f"sqlite:{tmp_path / 'missing-dir' / 'p.db'}")


def test_store_urls_are_checked_without_opening_them() -> None:
    assert check_url("sqlite:./p.db") == "sqlite"
    assert check_url("postgresql://u:pw@h/db") == "postgresql"
    with pytest.raises(ValueError, match="names no file"):
        check_url("sqlite:")
    with pytest.raises(ValueError) as refused:
        check_url("postgresq://user:hunter2@db/portolan")
    assert "hunter2" not in str(refused.value)


def test_a_password_in_a_store_url_is_masked_for_printing() -> None:
    assert redact_url("postgresql://u:hunter2@h:5432/db") == "postgresql://u:***@h:5432/db"
    assert redact_url("postgresql://h/db?user=u&password=hunter2") == (
        "postgresql://h/db?user=u&password=***"
    )
    assert redact_url("postgresql://u@h/db") == "postgresql://u@h/db"
    assert redact_url("sqlite:./portolan.db") == "sqlite:./portolan.db"


def test_a_malformed_postgresql_url_is_refused_without_its_password() -> None:
    # libpq quotes a connection string it cannot parse in its error message
    with pytest.raises(StoreUnavailable) as refused:
        open_store("postgresql:portolan:hunter2@db/portolan")
    assert "hunter2" not in str(refused.value) and "portolan:***@" in str(refused.value)
