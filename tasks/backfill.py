"""Keyset-batched backfill of a live table: short transactions, a rate limit, a checkpoint per batch.

Each batch is one short transaction: it reads the keys of its next ``batch_size`` rows, then
updates the rows between the first and the last of them with set-based assignments
(``UPDATE ... SET new = up(old)``). The session marks itself with ``flowyard.backfill = on`` so
the per-row sync trigger stands aside (its ``WHEN`` condition, with no PL/pgSQL call per row),
and runs with the table's schema as search_path so the expressions resolve as they do in the
trigger. Row locks are held for one batch only, the lock-timeout retry of :mod:`tasks.ddl_retry`
protects application writers, and after each batch the last key is saved, so a crash or a
cancel resumes from the last finished batch. Re-running a batch is harmless: the trigger
computes the same values again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Protocol

import psycopg
from psycopg import sql

from tasks.db import one_row
from tasks.ddl_retry import LockPolicy, with_lock_retry
from tasks.online_plan import BackfillTarget
from tasks.online_state import StoredCheckpoint


@dataclass(frozen=True)
class BackfillOptions:
    batch_size: int = 5000
    delay_seconds: float = 0.0
    """Pause between batches, to leave I/O to the application."""
    max_rows_per_second: float | None = None
    policy: LockPolicy = LockPolicy(statement_timeout_ms=60_000)


@dataclass
class BackfillResult:
    table: str
    rows: int
    batches: int
    seconds: float
    resumed_from: list[str] | None
    """The checkpointed key (as text) the run continued after; None for a fresh start."""

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0


class CheckpointStore(Protocol):
    def load(self, table: str) -> StoredCheckpoint | None: ...

    def save(self, table: str, checkpoint: StoredCheckpoint) -> None: ...


def _row(target: BackfillTarget, param: str | None = None) -> sql.Composable:
    """The key as a row value: ``(k1, k2)``, or ``(CAST(%(param0)s AS t1), ...)`` for a bound one."""
    if param is None:
        items: list[sql.Composable] = [sql.Identifier(k) for k in target.key_columns]
    else:
        items = [
            sql.SQL("CAST({} AS {})").format(sql.Placeholder(f"{param}{n}"), sql.SQL(t))
            for n, t in enumerate(target.key_types)
        ]
    return sql.SQL("({})").format(sql.SQL(", ").join(items))


def _key_text(target: BackfillTarget) -> sql.Composable:
    """The key as ``ARRAY[k1::text, ...]``: how checkpoints store it, whatever its types."""
    return sql.SQL("ARRAY[{}]").format(
        sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier(k)) for k in target.key_columns)
    )


def _order(target: BackfillTarget, descending: bool = False) -> sql.Composable:
    return sql.SQL(", ").join(
        sql.SQL("{} DESC" if descending else "{}").format(sql.Identifier(k)) for k in target.key_columns
    )


@dataclass(frozen=True)
class _BatchQueries:
    """The two statements of one batch, composed once per backfill and per kind (first or next).

    ``keys`` finds the batch's first and last key with an index-only read that locks nothing;
    ``update`` then gets both as bound values, so the planner sees a bounded key range and reads
    it through the index even where the key column has no statistics yet (as right after a
    migration that swapped in a new primary-key column). Given the upper bound as a subquery,
    or no lower bound on the first batch, it estimated a third of the table and scanned all of
    it, holding the batch's row locks for the whole scan: 0.3-1 s at 5M rows, and application
    writes to those rows waited for it.
    """

    keys: sql.Composed
    update: sql.Composed


def _batch_queries(target: BackfillTarget, first: bool) -> _BatchQueries:
    """One keyset batch: the next ``size`` keys after ``last`` (row-value comparison, so composite keys work)."""
    key = _row(target)
    lower = sql.SQL("") if first else sql.SQL("{} > {} AND ").format(key, _row(target, "last"))
    tbl = sql.Identifier(target.schema_name, target.table)
    keys = sql.SQL(
        "WITH batch AS (SELECT {keys} FROM {tbl} WHERE {lower}{key} <= {upper} ORDER BY {order} LIMIT %(size)s) "
        "SELECT (SELECT {key_text} FROM batch ORDER BY {order} LIMIT 1), "
        "(SELECT {key_text} FROM batch ORDER BY {desc} LIMIT 1)"
    ).format(
        keys=sql.SQL(", ").join(sql.Identifier(k) for k in target.key_columns),
        tbl=tbl,
        lower=lower,
        key=key,
        upper=_row(target, "upper"),
        order=_order(target),
        key_text=_key_text(target),
        desc=_order(target, descending=True),
    )
    update = sql.SQL("UPDATE {tbl} SET {assignments} WHERE {key} >= {start} AND {key} <= {end}").format(
        tbl=tbl,
        # the user's ``up`` as text; sent with bound keys, psycopg reads each ``%`` (modulo, a
        # LIKE pattern) as a placeholder's, so it is doubled to reach the server as one
        assignments=sql.SQL(", ").join(sql.SQL(a.replace("%", "%%")) for a in target.assignments),
        key=key,
        start=_row(target, "start"),
        end=_row(target, "end"),
    )
    return _BatchQueries(keys, update)


def _key_params(name: str, key: list[str] | None) -> dict[str, object]:
    return {f"{name}{n}": value for n, value in enumerate(key or [])}


def _run_batch(
    conn: psycopg.Connection, target: BackfillTarget, queries: _BatchQueries, params: dict[str, object]
) -> tuple[list[str] | None, int]:
    """Update the batch after ``last`` in this transaction; its last key (None past the end) and row count."""
    conn.execute(
        "SELECT set_config('search_path', %s, true), set_config('flowyard.backfill', 'on', true)",
        (target.schema_name,),
    )
    start, end = one_row(conn, queries.keys, params)
    if end is None:
        return None, 0
    bounds = _key_params("start", start) | _key_params("end", end)
    return end, conn.execute(queries.update, bounds).rowcount


def backfill(
    conn: psycopg.Connection,
    target: BackfillTarget,
    store: CheckpointStore,
    options: BackfillOptions,
    on_batch: Callable[[StoredCheckpoint], None] | None = None,
) -> BackfillResult:
    """Backfill ``target`` from its checkpoint to the key that was highest when the backfill began.

    Rows inserted after that are filled by the trigger as they are written. ``conn`` must be
    in autocommit mode.
    """
    checkpoint = store.load(target.table)
    if checkpoint is None:
        row = conn.execute(
            sql.SQL("SELECT {} FROM {} ORDER BY {} LIMIT 1").format(
                _key_text(target),
                sql.Identifier(target.schema_name, target.table),
                _order(target, descending=True),
            )
        ).fetchone()
        upper = row[0] if row else None
        checkpoint = StoredCheckpoint(None, upper, 0, upper is None)
        store.save(target.table, checkpoint)
    resumed_from = checkpoint.last_key
    first_queries, next_queries = _batch_queries(target, first=True), _batch_queries(target, first=False)
    started, rows, batches = time.monotonic(), 0, 0
    while not checkpoint.done:
        batch_started = time.monotonic()
        queries = next_queries if checkpoint.last_key else first_queries
        params: dict[str, object] = {
            "size": options.batch_size,
            **_key_params("last", checkpoint.last_key),
            **_key_params("upper", checkpoint.upper_key),
        }
        (last, touched), _ = with_lock_retry(
            conn,
            partial(_run_batch, target=target, queries=queries, params=params),
            options.policy,
            what=f"backfill {target.table}",
        )
        batches += 1
        rows += touched
        checkpoint = StoredCheckpoint(
            last or checkpoint.last_key, checkpoint.upper_key, checkpoint.rows_done + touched, last is None
        )
        store.save(target.table, checkpoint)
        if on_batch is not None:
            on_batch(checkpoint)
        _throttle(options, touched, time.monotonic() - batch_started)
    return BackfillResult(target.table, rows, batches, time.monotonic() - started, resumed_from)


def _throttle(options: BackfillOptions, rows: int, elapsed: float) -> None:
    """Sleep for the configured delay, and long enough to stay under the row-rate limit."""
    pause = options.delay_seconds
    if options.max_rows_per_second:
        pause = max(pause, rows / options.max_rows_per_second - elapsed)
    if pause > 0:
        time.sleep(pause)
