"""pytest fixtures for tests that need a real PostgreSQL server.

- ``pg_cluster`` (session): one private cluster (``PgCluster``: initdb as ``postgres`` in a
  folder that user owns, a free loopback port), started once for the session and destroyed at
  the end. Skips (with the reason) when the server binaries are not installed.
- ``pg_url``: a fresh, empty database on that cluster for one test (``CREATE DATABASE``),
  dropped afterwards (``WITH (FORCE)`` closes what the test left connected).
- ``own_pg_cluster``: a cluster of the test's own, for tests that stop and start the server
  (outages) without disturbing the others.

Bind the fixtures you use in the test module (an assignment, so linters do not take the
test parameters of the same name for shadowed imports)::

    from tests.support import pg_fixtures

    pg_cluster = pg_fixtures.pg_cluster
    pg_url = pg_fixtures.pg_url
"""

from __future__ import annotations

import itertools
import os
import pwd
from collections.abc import Iterator

import pytest

from tests.support.pgcluster import PgCluster, find_pg_bin

SKIP_REASON = (
    "PostgreSQL server binaries (initdb, pg_ctl) not found: install postgresql-15 "
    "(or set PORTOLAN_PG_BIN to their folder)"
)

_counter = itertools.count(1)


def require_pg_binaries() -> None:
    if find_pg_bin() is None:
        pytest.skip(SKIP_REASON)
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run initdb as")


def database_url(cluster: PgCluster, dbname: str) -> str:
    return f"postgresql://{cluster.user}@127.0.0.1:{cluster.port}/{dbname}"


def create_database(cluster: PgCluster, dbname: str) -> str:
    import psycopg

    with psycopg.connect(database_url(cluster, "postgres"), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{dbname}"')
    return database_url(cluster, dbname)


def drop_database(cluster: PgCluster, dbname: str) -> None:
    import psycopg

    try:
        with psycopg.connect(
            database_url(cluster, "postgres"), autocommit=True, connect_timeout=5
        ) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
    except psycopg.Error:
        pass  # the cluster is down or gone; it is destroyed with the session anyway


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    require_pg_binaries()
    cluster = PgCluster().setup()
    try:
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture
def pg_url(pg_cluster: PgCluster) -> Iterator[str]:
    dbname = f"t_{os.getpid()}_{next(_counter)}"
    url = create_database(pg_cluster, dbname)
    try:
        yield url
    finally:
        drop_database(pg_cluster, dbname)


@pytest.fixture
def own_pg_cluster() -> Iterator[PgCluster]:
    require_pg_binaries()
    cluster = PgCluster().setup()
    try:
        yield cluster
    finally:
        cluster.destroy()


__all__ = [
    "SKIP_REASON",
    "create_database",
    "database_url",
    "drop_database",
    "own_pg_cluster",
    "pg_cluster",
    "pg_url",
    "require_pg_binaries",
]
