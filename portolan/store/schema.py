"""Table definitions and migrations, written once for every SQL backend.

The DDL is portable SQL with a few type placeholders that each dialect fills in
(``{BIGINT}``, ``{BLOB}``, ``{SEQ_PK}``, ``{BOOL}``); see ``DIALECT_TYPES``. The schema version
lives in ``meta`` under the key ``schema_version``; the global change counter under ``version``.
A migration is a list of statements that takes the schema from ``version - 1`` to ``version``;
``Store.migrate()`` applies the missing ones in order, in one write transaction, and refuses a
database whose schema is newer than this code knows.

Tables (version 1):
- ``meta(key, value)``: ``schema_version``, ``version`` (global counter, every change takes
  the next value).
- ``cns``: compute nodes (uuid PK, ip canonical text UNIQUE, port, version).
- ``networks``: (uuid PK, name, owner_uuid, vnet_id, vlan_id, subnet, gateway, provision_start,
  provision_end, version).
- ``vnics``: (mac integer PK, ip, vnet_id, vlan_id, network_uuid -> networks, cn_uuid -> cns,
  belongs_to_uuid, owner_uuid, tags JSON text, firewall_enabled 0/1, version);
  UNIQUE(vnet_id, ip).
- ``shootdown_log``: one SVP log entry for one CN (seq PK ordering oldest first, id 16 bytes
  UNIQUE, cn_uuid, type, vnet_id, mac, ip, vlan, version, route fields).
- ``routes``: fabric routes (spec/svp.md §8 ``portolan_vnet_routes`` plus the remote underlay
  answer), PK (vnet_id, vlan_id, subnet, r_subnet).
- ``rules``: firewall rules, reserved for the rules engine (uuid PK, owner_uuid, is_global,
  enabled, rule, description, log, version, created). ``global`` is spelled ``is_global`` to
  stay clear of SQL keywords.
Booleans are stored as integers 0/1 in every dialect (one conversion rule in Python).

Version 2 adds ``changes(version PK, payload)``: the changes feed. A backend whose
``Store.record_change`` is not a no-op (PostgreSQL) writes one row per committed change, in
the change's own transaction, naming the keys it touched (``portolan.store.notify``); other
instances read ``version > cursor`` to catch up. ``meta.changes_floor`` is the highest
version pruned from it: an instance whose cursor is below it reloads its index in full.
SQLite leaves the table empty.
"""

from __future__ import annotations

from dataclasses import dataclass

DIALECT_TYPES: dict[str, dict[str, str]] = {
    "sqlite": {
        "BIGINT": "INTEGER",
        "BLOB": "BLOB",
        "SEQ_PK": "INTEGER PRIMARY KEY AUTOINCREMENT",
        "BOOL": "INTEGER",
    },
    "postgresql": {
        "BIGINT": "BIGINT",
        "BLOB": "BYTEA",
        "SEQ_PK": "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY",
        "BOOL": "INTEGER",
    },
}

META_DDL = "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value {BIGINT} NOT NULL)"


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    description: str
    statements: tuple[str, ...]

    def render(self, dialect: str) -> list[str]:
        types = DIALECT_TYPES[dialect]
        return [s.format(**types) for s in self.statements]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "initial schema: cns, networks, vnics, shootdown_log, routes, rules",
        (
            """CREATE TABLE cns (
                uuid TEXT PRIMARY KEY,
                ip TEXT NOT NULL UNIQUE,
                port INTEGER NOT NULL,
                version {BIGINT} NOT NULL
            )""",
            """CREATE TABLE networks (
                uuid TEXT PRIMARY KEY,
                name TEXT NOT NULL,
                owner_uuid TEXT NOT NULL,
                vnet_id {BIGINT} NOT NULL,
                vlan_id INTEGER NOT NULL,
                subnet TEXT NOT NULL,
                gateway TEXT,
                provision_start TEXT NOT NULL,
                provision_end TEXT NOT NULL,
                version {BIGINT} NOT NULL
            )""",
            "CREATE INDEX networks_vnet ON networks (vnet_id)",
            """CREATE TABLE vnics (
                mac {BIGINT} PRIMARY KEY,
                ip TEXT NOT NULL,
                vnet_id {BIGINT} NOT NULL,
                vlan_id INTEGER NOT NULL,
                network_uuid TEXT REFERENCES networks (uuid),
                cn_uuid TEXT NOT NULL REFERENCES cns (uuid),
                belongs_to_uuid TEXT,
                owner_uuid TEXT,
                tags TEXT NOT NULL,
                firewall_enabled {BOOL} NOT NULL,
                version {BIGINT} NOT NULL,
                UNIQUE (vnet_id, ip)
            )""",
            "CREATE INDEX vnics_vnet_cn ON vnics (vnet_id, cn_uuid)",
            "CREATE INDEX vnics_cn ON vnics (cn_uuid)",
            "CREATE INDEX vnics_network ON vnics (network_uuid)",
            """CREATE TABLE shootdown_log (
                seq {SEQ_PK},
                id {BLOB} NOT NULL UNIQUE,
                cn_uuid TEXT NOT NULL,
                type INTEGER NOT NULL,
                vnet_id {BIGINT} NOT NULL,
                mac {BIGINT},
                ip TEXT,
                vlan INTEGER NOT NULL,
                version {BIGINT} NOT NULL,
                src_vnet_id {BIGINT},
                dst_vnet_id {BIGINT},
                dc_id {BIGINT},
                src_ip TEXT,
                dst_ip TEXT,
                src_vlan INTEGER,
                dst_vlan INTEGER,
                src_prefixlen INTEGER,
                dst_prefixlen INTEGER
            )""",
            "CREATE INDEX shootdown_log_cn ON shootdown_log (cn_uuid, seq)",
            """CREATE TABLE routes (
                vnet_id {BIGINT} NOT NULL,
                vlan_id INTEGER NOT NULL,
                subnet TEXT NOT NULL,
                r_dc_id {BIGINT} NOT NULL,
                r_vnet_id {BIGINT} NOT NULL,
                r_vlan_id INTEGER NOT NULL,
                r_subnet TEXT NOT NULL,
                r_send_mac {BIGINT} NOT NULL,
                r_ul_ip TEXT,
                r_ul_port INTEGER NOT NULL,
                r_dst_mac {BIGINT},
                net_uuid TEXT,
                r_net_uuid TEXT,
                version {BIGINT} NOT NULL,
                PRIMARY KEY (vnet_id, vlan_id, subnet, r_subnet)
            )""",
            """CREATE TABLE rules (
                uuid TEXT PRIMARY KEY,
                owner_uuid TEXT,
                is_global {BOOL} NOT NULL,
                enabled {BOOL} NOT NULL,
                rule TEXT NOT NULL,
                description TEXT,
                log {BOOL} NOT NULL,
                version {BIGINT} NOT NULL,
                created TEXT NOT NULL
            )""",
            "CREATE INDEX rules_owner ON rules (owner_uuid)",
            "INSERT INTO meta (key, value) VALUES ('version', 0)",
        ),
    ),
    Migration(
        2,
        "changes feed: one row per committed change, for other instances sharing the database",
        (
            """CREATE TABLE changes (
                version {BIGINT} PRIMARY KEY,
                payload TEXT NOT NULL
            )""",
            "INSERT INTO meta (key, value) VALUES ('changes_floor', 0)",
        ),
    ),
)

SCHEMA_VERSION: int = MIGRATIONS[-1].version


def pending_migrations(current: int) -> list[Migration]:
    """The migrations to run on a database at schema version ``current``, in order."""
    return [m for m in MIGRATIONS if m.version > current]


def _check_sequence() -> None:
    for i, m in enumerate(MIGRATIONS, start=1):
        if m.version != i:
            raise AssertionError(f"migration {m.version} out of sequence (expected {i})")


_check_sequence()
