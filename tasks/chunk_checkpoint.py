"""Bulk-copy checkpoints in the target database's ``flowyard`` schema.

- ``bulk_runs``: one row per run key. Re-running the same configuration resumes (or, once
  completed in full mode, re-verifies) the same run key; ``restart`` or a new incremental
  pass starts a new one.
- ``bulk_plans``: the chunk plan of each table, persisted the first time, so a resumed run
  copies exactly the chunks it planned before the crash.
- ``bulk_chunks``: one row per committed chunk, written in the *same transaction* as the
  chunk's rows. A crash at any instant leaves a chunk either fully loaded with its row or
  not loaded at all, never half or twice.
- ``bulk_cursors``: the incremental high-water mark per source table and lineage.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from typing import Any
from uuid import uuid4

import psycopg
from psycopg.types.json import Jsonb

from tasks.chunk_plan import Chunk
from tasks.db import connection
from tasks.errors import ConnectionUnavailable, first_line
from tasks.table_checksum import RECIPE


@dataclass(frozen=True)
class ChunkCheckpoint:
    """What a committed chunk did; also the chunk task's persisted Prefect result."""

    run_key: str
    table: str
    chunk_id: str
    rows_read: int
    rows_written: int
    quarantined: int
    sent_checksum: int | None
    cursor_max: str | None
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class RunHandle:
    run_key: str
    resumed: bool


def fingerprint(config: dict[str, Any]) -> str:
    """A stable hash of a JSON-able configuration."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def open_run(conn: psycopg.Connection, config_hash: str, mode: str, restart: bool) -> RunHandle:
    """The run key to use: the latest one for this configuration unless a new pass is due.

    A new pass gets a random key, never one derived from what this target recorded: chunk
    results cached by Prefect (keyed by run key) outlive the target, and a dropped and
    re-created target would otherwise hand its first pass the key of the old one, whose
    chunks would all come back *Cached* while the new tables stay empty. A resumed run
    reads its key back from ``bulk_runs``."""
    latest = conn.execute(
        "SELECT run_key, status FROM flowyard.bulk_runs WHERE config_hash = %s ORDER BY created_at DESC LIMIT 1",
        (config_hash,),
    ).fetchone()
    new_pass = latest is None or restart or (mode != "full" and latest[1] == "completed")
    if latest is not None and not new_pass:
        conn.execute("UPDATE flowyard.bulk_runs SET status = 'running' WHERE run_key = %s", (latest[0],))
        return RunHandle(latest[0], resumed=True)
    run_key = f"{config_hash}-{uuid4().hex[:12]}"
    conn.execute(
        "INSERT INTO flowyard.bulk_runs (run_key, config_hash, mode, status) VALUES (%s, %s, %s, 'running')",
        (run_key, config_hash, mode),
    )
    return RunHandle(run_key, resumed=False)


def finish_run(conn: psycopg.Connection, run_key: str, report: dict[str, Any], error: str | None = None) -> None:
    """The run ended: ``completed``, or ``failed`` with ``error`` (the first line) in its report.
    A failed run's committed chunks are kept: the same copy resumes it."""
    conn.execute(
        "UPDATE flowyard.bulk_runs SET status = %s, finished_at = now(), report = %s WHERE run_key = %s",
        ("failed" if error else "completed", Jsonb({**report, "error": error} if error else report), run_key),
    )


@contextmanager
def failure_recorded(target_url: str, run_key: str) -> Iterator[None]:
    """A run stopped by an error, a cancellation or Ctrl-C is recorded as ``failed`` with why,
    instead of staying ``running`` for ``flowyard bulk status`` to show forever. When the target
    itself is what failed, the record cannot be written; status then tells the run is gone by
    its free advisory lock (:func:`run_lock_name`), and the run's own error goes on: a refused
    connection (:class:`ConnectionUnavailable`, not a ``psycopg.Error``) took its place."""
    try:
        yield
    except BaseException as exc:
        why = first_line(exc) if isinstance(exc, Exception) else f"interrupted ({type(exc).__name__})"
        try:
            with connection(target_url) as conn:
                finish_run(conn, run_key, {}, error=why)
        except (psycopg.Error, ConnectionUnavailable):
            pass
        raise


def load_plan(conn: psycopg.Connection, run_key: str, table: str) -> list[Chunk] | None:
    row = conn.execute(
        "SELECT plan FROM flowyard.bulk_plans WHERE run_key = %s AND source_table = %s", (run_key, table)
    ).fetchone()
    return None if row is None else [Chunk.from_json(c) for c in row[0]]


def save_plan(conn: psycopg.Connection, run_key: str, table: str, target: str, chunks: list[Chunk]) -> None:
    conn.execute(
        "INSERT INTO flowyard.bulk_plans (run_key, source_table, target_table, plan) VALUES (%s, %s, %s, %s)",
        (run_key, table, target, Jsonb([c.to_json() for c in chunks])),
    )


_CHUNK_COLUMNS = "chunk_id, rows_read, rows_written, quarantined, sent_checksum, cursor_max, seconds, checksum_recipe"


def _checkpoint(run_key: str, table: str, row: tuple[Any, ...]) -> ChunkCheckpoint:
    """The checkpoint of a ``bulk_chunks`` row; a sent checksum of another recipe than today's
    (NULL: saved before recipes were recorded) is none, so validation recomputes it rather than
    failing a copy whose rows are the same."""
    digest = None if row[4] is None or row[7] != RECIPE else int(row[4])
    return ChunkCheckpoint(run_key, table, row[0], row[1], row[2], row[3], digest, row[5], row[6])


def committed_chunks(
    conn: psycopg.Connection, run_key: str, table: str, chunk_id: str | None = None
) -> dict[str, ChunkCheckpoint]:
    """The committed chunks of a table (or just ``chunk_id``), keyed by chunk id; only checksums
    computed by today's :data:`~tasks.table_checksum.RECIPE` are kept."""
    rows = conn.execute(
        "SELECT " + _CHUNK_COLUMNS + " FROM flowyard.bulk_chunks "  # noqa: S608 - constant column list
        "WHERE run_key = %s AND source_table = %s AND (%s::text IS NULL OR chunk_id = %s)",
        (run_key, table, chunk_id, chunk_id),
    ).fetchall()
    return {row[0]: _checkpoint(run_key, table, row) for row in rows}


def record_chunk(conn: psycopg.Connection, checkpoint: ChunkCheckpoint, flow_run_id: str | None) -> None:
    """Insert the checkpoint; call inside the transaction that loaded the chunk's rows."""
    c = checkpoint
    conn.execute(
        """
        INSERT INTO flowyard.bulk_chunks (run_key, source_table, chunk_id, rows_read, rows_written, quarantined,
                                          sent_checksum, cursor_max, seconds, flow_run_id, checksum_recipe)
        VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
        """,
        (
            c.run_key,
            c.table,
            c.chunk_id,
            c.rows_read,
            c.rows_written,
            c.quarantined,
            c.sent_checksum,
            c.cursor_max,
            c.seconds,
            flow_run_id,
            RECIPE,
        ),
    )


def record_quarantined(conn: psycopg.Connection, checkpoint: ChunkCheckpoint, rows: int) -> ChunkCheckpoint:
    """The checkpoint, updated in the open transaction, of a chunk ``rows`` more of whose rows were
    quarantined after it loaded (a seed's deferred keys rejected them): they are no longer written,
    and its sent checksum no longer stands for the rows it wrote."""
    moved = replace(
        checkpoint,
        rows_written=checkpoint.rows_written - rows,
        quarantined=checkpoint.quarantined + rows,
        sent_checksum=None,
    )
    conn.execute(
        "UPDATE flowyard.bulk_chunks SET rows_written = %s, quarantined = %s, sent_checksum = NULL "
        "WHERE run_key = %s AND source_table = %s AND chunk_id = %s",
        (moved.rows_written, moved.quarantined, moved.run_key, moved.table, moved.chunk_id),
    )
    return moved


def mark_table_completed(conn: psycopg.Connection, run_key: str, table: str) -> None:
    conn.execute(
        "UPDATE flowyard.bulk_plans SET completed = true WHERE run_key = %s AND source_table = %s",
        (run_key, table),
    )


def last_cursor(conn: psycopg.Connection, lineage: str, table: str) -> str | None:
    row = conn.execute(
        "SELECT cursor_value FROM flowyard.bulk_cursors WHERE lineage = %s AND source_table = %s",
        (lineage, table),
    ).fetchone()
    return row[0] if row else None


def save_cursor(conn: psycopg.Connection, lineage: str, table: str, value: str, run_key: str) -> None:
    conn.execute(
        """
        INSERT INTO flowyard.bulk_cursors (lineage, source_table, cursor_value, run_key) VALUES (%s, %s, %s, %s)
        ON CONFLICT (lineage, source_table)
        DO UPDATE SET cursor_value = EXCLUDED.cursor_value, run_key = EXCLUDED.run_key, updated_at = now()
        """,
        (lineage, table, value, run_key),
    )


def run_lock_name(config_hash: str) -> str:
    """The advisory lock a bulk run of one configuration holds while it works."""
    return f"bulk-migrate:{config_hash}"


@dataclass(frozen=True)
class RunProgress:
    run_key: str
    chunks_planned: int
    chunks_done: int
    rows_done: int
    status: str  # running | completed | failed
    error: str | None
    config_hash: str


def latest_run_progress(conn: psycopg.Connection) -> RunProgress | None:
    """Progress of the most recently started bulk run on this target (for terminal progress bars)."""
    row = conn.execute(
        """
        SELECT r.run_key,
               (SELECT coalesce(sum(jsonb_array_length(p.plan)), 0) FROM flowyard.bulk_plans p WHERE p.run_key = r.run_key),
               (SELECT count(*) FROM flowyard.bulk_chunks c WHERE c.run_key = r.run_key),
               (SELECT coalesce(sum(rows_written), 0) FROM flowyard.bulk_chunks c WHERE c.run_key = r.run_key),
               r.status, r.report->>'error', r.config_hash
        FROM flowyard.bulk_runs r ORDER BY r.created_at DESC LIMIT 1
        """
    ).fetchone()
    return None if row is None else RunProgress(row[0], int(row[1]), int(row[2]), int(row[3]), *row[4:])
