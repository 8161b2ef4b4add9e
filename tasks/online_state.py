"""Persisted state of online migrations in the ``flowyard`` schema: phase, plan, step progress, backfill checkpoints.

The state outlives the flow run: a crashed or cancelled start resumes from the last finished
step and the last backfilled batch, ``flowyard online status`` reads it, and a partial unique
index makes PostgreSQL itself refuse a second unfinished migration on one schema.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import psycopg
from psycopg.types.json import Jsonb

from tasks.db import connection, database_name, one_row
from tasks.errors import UserError
from tasks.online_plan import Phase, Plan

ACTIVE_PHASES = ("starting", "expanded", "completing", "rolling_back")


def lock_name(schema: str) -> str:
    """The advisory lock a phase of a migration on ``schema`` holds on the target while its process
    lives: a process killed mid-phase (SIGKILL, a lost host) leaves the phase recorded as running,
    so ``flowyard online status`` asks the lock whether a process still runs it."""
    return f"flowyard online-migrate {schema}"


def target_key(url: str) -> str:
    """How a target database is named in the state: host:port/database (no user, no password)."""
    parts = urlsplit(url)
    return f"{parts.hostname or 'localhost'}:{parts.port or 5432}/{database_name(url)}"


@dataclass
class MigrationRecord:
    id: int
    target: str
    schema_name: str
    name: str
    phase: str
    plan: Plan
    progress: dict[str, int]
    updated_at: datetime

    def steps_done(self, phase: Phase) -> int:
        return int(self.progress.get(phase, 0))


def _record(row: tuple[Any, ...]) -> MigrationRecord:
    return MigrationRecord(
        row[0], row[1], row[2], row[3], row[4], Plan.model_validate(row[5]), row[6], row[7]
    )


def active_migration(state: str, target: str, schema: str) -> MigrationRecord | None:
    """The unfinished migration on ``schema`` of ``target``, if any."""
    with connection(state) as conn:
        row = conn.execute(
            "SELECT id, target, schema_name, name, phase, plan, progress, updated_at FROM flowyard.online_migrations "
            "WHERE target = %s AND schema_name = %s AND phase = ANY(%s)",
            (target, schema, list(ACTIVE_PHASES)),
        ).fetchone()
    return _record(row) if row else None


def current_version_schema(state: str, target: str, schema: str) -> str | None:
    """The view schema of the last completed migration: the 'previous version' of the next one."""
    with connection(state) as conn:
        row = conn.execute(
            "SELECT version_schema FROM flowyard.online_migrations WHERE target = %s AND schema_name = %s "
            "AND phase = 'completed' ORDER BY updated_at DESC LIMIT 1",
            (target, schema),
        ).fetchone()
    return row[0] if row else None


def another_migration_runs(existing: MigrationRecord, target: str) -> UserError:
    """The one-line refusal of a second migration while ``existing`` is under way on the schema."""
    return UserError(
        f"migration {existing.name!r} is {existing.phase} on {target} schema {existing.schema_name}; "
        "only one migration can run on a schema — complete or roll it back first (flowyard online complete/rollback)"
    )


def begin_migration(state: str, target: str, plan: Plan, flow_run_id: str | None) -> MigrationRecord:
    """Record a new migration in phase 'starting', or return the same unfinished one to resume it."""
    existing = active_migration(state, target, plan.schema_name)
    if existing is not None:
        if existing.name == plan.migration and existing.phase in ("starting", "expanded"):
            return existing
        raise another_migration_runs(existing, target)
    try:
        with connection(state) as conn:
            row = one_row(
                conn,
                "INSERT INTO flowyard.online_migrations (target, schema_name, name, phase, version_schema, "
                "previous_schema, plan, flow_run_id) VALUES (%s, %s, %s, 'starting', %s, %s, %s, %s) "
                "RETURNING id, target, schema_name, name, phase, plan, progress, updated_at",
                (
                    target,
                    plan.schema_name,
                    plan.migration,
                    plan.version_schema,
                    plan.previous_schema,
                    Jsonb(plan.model_dump(mode="json")),
                    flow_run_id,
                ),
            )
    except psycopg.errors.UniqueViolation:
        raise UserError(
            f"another migration was just started on {target} schema {plan.schema_name}; "
            "only one migration can run on a schema — see `flowyard online status`"
        ) from None
    return _record(row)


def set_phase(state: str, migration_id: int, phase: str) -> None:
    with connection(state) as conn:
        conn.execute(
            "UPDATE flowyard.online_migrations SET phase = %s, updated_at = now() WHERE id = %s",
            (phase, migration_id),
        )


def set_steps_done(state: str, migration_id: int, phase: Phase, done: int) -> None:
    with connection(state) as conn:
        conn.execute(
            "UPDATE flowyard.online_migrations SET progress = progress || jsonb_build_object(%s::text, %s::int), "
            "updated_at = now() WHERE id = %s",
            (phase, done, migration_id),
        )


@dataclass
class StoredCheckpoint:
    last_key: list[str] | None
    """The key (one text per key column) of the last backfilled row."""
    upper_key: list[str] | None
    rows_done: int
    done: bool


def _key_list(value: Any) -> list[str] | None:
    """A stored key: a list of texts, or one text as checkpoints before composite keys had it."""
    return None if value is None else [str(v) for v in value] if isinstance(value, list) else [str(value)]


class BackfillCheckpoints:
    """Per-table backfill checkpoints of one migration (the :mod:`tasks.backfill` checkpoint store)."""

    def __init__(self, state: str, migration_id: int) -> None:
        self.state = state
        self.migration_id = migration_id

    def load(self, table: str) -> StoredCheckpoint | None:
        with connection(self.state) as conn:
            row = conn.execute(
                "SELECT last_key, upper_key, rows_done, done FROM flowyard.online_backfill "
                "WHERE migration_id = %s AND table_name = %s",
                (self.migration_id, table),
            ).fetchone()
        if row is None:
            return None
        last, upper, rows_done, done = row
        return StoredCheckpoint(_key_list(last), _key_list(upper), rows_done, done)

    def save(self, table: str, checkpoint: StoredCheckpoint) -> None:
        with connection(self.state) as conn:
            conn.execute(
                """
                INSERT INTO flowyard.online_backfill (migration_id, table_name, last_key, upper_key, rows_done, done)
                VALUES (%s, %s, %s, %s, %s, %s)
                ON CONFLICT (migration_id, table_name) DO UPDATE SET last_key = EXCLUDED.last_key,
                    upper_key = EXCLUDED.upper_key, rows_done = EXCLUDED.rows_done, done = EXCLUDED.done,
                    updated_at = now()
                """,
                (
                    self.migration_id,
                    table,
                    Jsonb(checkpoint.last_key),
                    Jsonb(checkpoint.upper_key),
                    checkpoint.rows_done,
                    checkpoint.done,
                ),
            )


@dataclass
class StatusRow:
    name: str
    target: str
    schema_name: str
    phase: str
    version_schema: str
    updated_at: datetime
    backfill: list[tuple[str, int, bool]]


def list_migrations(state: str, limit: int = 20) -> list[StatusRow]:
    """The latest migrations with their phase and per-table backfill progress, newest first."""
    with connection(state) as conn:
        rows = conn.execute(
            """
            SELECT m.name, m.target, m.schema_name, m.phase, m.version_schema, m.updated_at,
                   coalesce(array_agg(ARRAY[b.table_name, b.rows_done::text, b.done::text] ORDER BY b.table_name)
                            FILTER (WHERE b.table_name IS NOT NULL), '{}')
            FROM flowyard.online_migrations m LEFT JOIN flowyard.online_backfill b ON b.migration_id = m.id
            GROUP BY m.id ORDER BY m.updated_at DESC LIMIT %s
            """,
            (limit,),
        ).fetchall()
    return [
        StatusRow(r[0], r[1], r[2], r[3], r[4], r[5], [(t, int(n), d == "true") for t, n, d in r[6]])
        for r in rows
    ]
