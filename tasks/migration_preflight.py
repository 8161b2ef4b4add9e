"""Checks before a migration touches a database: reachable, enough disk for a backup, quiet enough,
constraints, what is applied and pending, and that applied revision files were not edited since.

Hard problems (unreachable, too little disk, an edited applied revision, no matching
``pg_dump``) refuse the run with a UserError; soft ones (many sessions, constraints left
``NOT VALID``) become warnings in the run's report. The integrity snapshot taken here is
the "before" side of the post-deploy comparison.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

from tasks.alembic_deploy import MigrationStatus, migration_status
from tasks.db import connection, one_row, refuse_read_only
from tasks.errors import UserError, check_user_dir, nearest_existing
from tasks.integrity import IntegrityReport, check_integrity
from tasks.pg_backup import pg_binaries, server_major
from tasks.revision_checksums import edited_revisions

FREE_SPACE_FACTOR = 2


@dataclass(frozen=True)
class Preflight:
    server_version: str
    server_major: int
    database_bytes: int
    free_bytes: int | None
    """Free space at the backup location; None when no backup is taken."""
    active_connections: int
    unvalidated_constraints: list[str]
    status: MigrationStatus
    integrity: IntegrityReport
    warnings: list[str] = field(default_factory=list)


def free_space(path: Path) -> int:
    """Free bytes on the filesystem that holds ``path`` (or its nearest existing parent)."""
    return shutil.disk_usage(nearest_existing(path.resolve())).free


def require_free_space(path: Path, database_bytes: int) -> int:
    """Refuse unless ``path`` has at least twice the database size free; returns the free bytes."""
    free = free_space(path)
    if free < FREE_SPACE_FACTOR * database_bytes:
        raise UserError(
            f"only {free / 2**20:,.0f} MiB free at {path} for a backup of a {database_bytes / 2**20:,.0f} MiB "
            f"database (need {FREE_SPACE_FACTOR}x); free space there or pass another backup directory"
        )
    return free


def unvalidated_constraints(conn: psycopg.Connection) -> list[str]:
    """Constraints added ``NOT VALID`` and never validated (rows may violate them)."""
    rows = conn.execute(
        """
        SELECT c.conrelid::regclass::text || '.' || c.conname FROM pg_constraint c
        JOIN pg_namespace n ON n.oid = c.connamespace
        WHERE NOT c.convalidated AND n.nspname NOT IN ('pg_catalog', 'information_schema')
        ORDER BY 1
        """
    ).fetchall()
    return [r[0] for r in rows]


def active_connections(conn: psycopg.Connection) -> int:
    """Other client sessions on this database."""
    return one_row(
        conn,
        """
        SELECT count(*) FROM pg_stat_activity
        WHERE datname = current_database() AND pid <> pg_backend_pid() AND backend_type = 'client backend'
        """,
    )[0]


def run_preflight(
    url: str,
    migrations_dir: str,
    target: str,
    backup_dir: Path | None,
    max_active_connections: int,
    *,
    writes: bool = True,
) -> Preflight:
    """All checks; raises UserError on a hard problem. ``backup_dir`` None skips the backup checks.
    ``writes``: the run changes the database (not a dry run), so a server that takes no writes is
    refused first, before a backup is taken for nothing (:func:`refuse_read_only`); a dry run may
    read a standby."""
    with connection(url) as conn:
        if writes:
            refuse_read_only(conn, url, "nothing was changed (no backup taken, no revision run)")
        version = one_row(conn, "SHOW server_version")[0]
        major = server_major(conn)
        size = one_row(conn, "SELECT pg_database_size(current_database())")[0]
        sessions = active_connections(conn)
        unvalidated = unvalidated_constraints(conn)
        integrity = check_integrity(conn)
        status = migration_status(url, migrations_dir, target)
        edited = edited_revisions(conn, status.applied_files)
        holds_state = one_row(conn, "SELECT to_regclass('flowyard.alembic_version')")[0] is not None
    if edited:
        raise UserError(
            "applied revisions were edited after they were applied: "
            + "; ".join(e.describe() for e in edited)
            + ". Restore the original files and put changes in a new revision"
        )
    free = None
    if backup_dir is not None:
        pg_binaries(major)
        free = require_free_space(check_user_dir(backup_dir, "backup directory"), size)
    warnings = []
    if sessions > max_active_connections:
        warnings.append(f"{sessions} other sessions are connected (threshold {max_active_connections})")
    if unvalidated:
        warnings.append(f"constraints not validated: {', '.join(unvalidated)}")
    if holds_state:
        warnings.append(
            "this is flowyard's own state database: a restore would roll back other pipelines' state"
        )
    warnings += [
        f"before the run: {p.check} in {p.table}: {p.detail} ({p.count})" for p in integrity.problems
    ]
    return Preflight(version, major, size, free, sessions, unvalidated, status, integrity, warnings)
