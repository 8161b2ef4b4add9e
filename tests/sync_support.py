"""Helpers shared by the sync tests."""

from __future__ import annotations

from pathlib import Path

import psycopg
from psycopg import sql

from tasks import central_store, device_store
from tests.conftest import Role


def synced_events(store: Path) -> int:
    """How many of the store's events are marked synced (what a run's counts leave out)."""
    with device_store.open_store(store) as conn:
        return int(conn.execute("SELECT count(*) FROM events WHERE sync_status = 'synced'").fetchone()[0])


def central_of_a_dba(role: Role, database: str) -> str:
    """The URL, as ``role``, of a central in ``database`` a DBA made (its tables theirs), where the
    role may create in the schema and read and write the tables, as a DBA grants a sync role."""
    central_store.ensure_schema(database)
    with psycopg.connect(database, autocommit=True) as conn:
        for grant in (
            "GRANT USAGE, CREATE ON SCHEMA devflow TO {}",
            "GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA devflow TO {}",
            "GRANT USAGE ON ALL SEQUENCES IN SCHEMA devflow TO {}",
        ):
            conn.execute(sql.SQL(grant).format(sql.Identifier(role.name)))
    return role.url(database)


def central_of_a_dba_without_a_tombstone_trigger(role: Role, database: str) -> str:
    """:func:`central_of_a_dba` whose DBA dropped a tombstone trigger, for ``role``, which may not
    restore it (no TRIGGER on the snapshots)."""
    central = central_of_a_dba(role, database)
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("DROP TRIGGER project_status_deleted ON devflow.project_status")
    return central
