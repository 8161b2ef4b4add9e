"""The backfill survives a SIGKILL of the process running it, and resumes from its last checkpointed batch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from psycopg import sql

from tasks.backfill import BackfillOptions
from tasks.db import connect
from tasks.online_phases import RunOptions
from tasks.online_state import active_migration, target_key
from tasks.process_group import spawn_group
from tests.conftest import ROOT
from tests.online_support import add_column, checksum, make_schema, plan_for, run, schema_dump
from tests.process_support import GUARD_SECONDS

SPEC = {
    "name": "kill_backfill",
    "operations": [
        {
            "alter_column": {
                "table": "orders",
                "column": "amount",
                "type": "bigint",
                "up": "amount::bigint * 3",
                "down": "(amount / 3)::int",
            }
        },
        {
            "add_column": {
                "table": "orders",
                "column": {"name": "score", "type": "int", "nullable": False},
                "up": "amount + 1",
            }
        },
    ],
}

COMPOSITE = {
    "name": "kill_composite",
    "operations": [
        {
            "alter_column": {
                "table": "shipments",
                "column": "qty",
                "type": "bigint",
                "up": "qty::bigint * 3",
                "down": "(qty / 3)::int",
            }
        }
    ],
}
"""A backfill of shipments, keyed by (order_id, line): batches compare row values."""

CHILD = textwrap.dedent(
    """
    import json
    import sys
    from tasks.backfill import BackfillOptions
    from tasks.online_phases import RunOptions
    from tests.online_support import plan_for, run
    url, state, spec = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    plan = plan_for(url, state, spec)
    run(url, state, plan, "start", RunOptions(backfill=BackfillOptions(batch_size=200, delay_seconds=0.05)))
    """
)


def _rows_done(state: str, url: str, name: str) -> int:
    with connect(state) as conn:
        row = conn.execute(
            "SELECT b.rows_done FROM flowyard.online_backfill b JOIN flowyard.online_migrations m ON m.id = b.migration_id "
            "WHERE m.target = %s AND m.name = %s",
            (target_key(url), name),
        ).fetchone()
    return int(row[0]) if row else 0


def _kill_mid_backfill(url: str, state: str, spec: dict = SPEC) -> None:
    """Run start in a real process and SIGKILL its process group once 2000 rows are backfilled."""
    child = spawn_group(
        [sys.executable, "-c", CHILD, url, state, json.dumps(spec)], cwd=ROOT, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 120
    while _rows_done(state, url, spec["name"]) < 2000:
        assert child.poll() is None, child.stderr.read().decode() if child.stderr else "child exited"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(child.pid, signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL


def test_sigkill_during_backfill_then_resume_finishes_correctly(fresh_db: str, state_db: str) -> None:
    make_schema(fresh_db, rows=20_000)
    _kill_mid_backfill(fresh_db, state_db)

    done_at_kill = _rows_done(state_db, fresh_db, SPEC["name"])
    record = active_migration(state_db, target_key(fresh_db), "public")
    assert record is not None and record.phase == "starting"
    assert 2000 <= done_at_kill < 20_000

    report = run(
        fresh_db, state_db, record.plan, "start", RunOptions(backfill=BackfillOptions(batch_size=5000))
    )
    (result,) = report.backfills
    assert result.resumed_from is not None and int(result.resumed_from[0]) >= done_at_kill - 200
    assert result.rows == 20_000 - int(result.resumed_from[0])  # only the rest, not from the beginning
    assert report.steps_skipped == 0 and report.steps_run < len(record.plan.start)

    with connect(fresh_db) as conn:
        wrong = conn.execute(
            "SELECT count(*) FROM orders WHERE _fy_new_amount IS DISTINCT FROM amount::bigint * 3 "
            "OR score IS DISTINCT FROM amount + 1"
        ).fetchone()[0]
    assert wrong == 0
    run(fresh_db, state_db, record.plan, "complete")
    with connect(fresh_db) as conn:
        assert conn.execute("SELECT count(*), sum(amount) = sum(score - 1) * 3 FROM orders").fetchone() == (
            20_000,
            True,
        )


def test_sigkill_during_backfill_then_rollback_restores_everything(fresh_db: str, state_db: str) -> None:
    make_schema(fresh_db, rows=20_000)
    dump, data = schema_dump(fresh_db), checksum(fresh_db, "SELECT * FROM orders")
    _kill_mid_backfill(fresh_db, state_db)
    record = active_migration(state_db, target_key(fresh_db), "public")
    assert record is not None and record.phase == "starting"
    run(fresh_db, state_db, record.plan, "rollback")
    assert schema_dump(fresh_db) == dump
    assert checksum(fresh_db, "SELECT * FROM orders") == data


def test_composite_key_backfill_resumes_after_sigkill_from_its_row_value_checkpoint(
    fresh_db: str, state_db: str
) -> None:
    make_schema(fresh_db, rows=20_000)
    before = checksum(fresh_db, "SELECT order_id, line, qty::bigint * 3 FROM shipments")
    _kill_mid_backfill(fresh_db, state_db, COMPOSITE)
    done_at_kill = _rows_done(state_db, fresh_db, COMPOSITE["name"])
    record = active_migration(state_db, target_key(fresh_db), "public")
    assert record is not None and record.phase == "starting" and 2000 <= done_at_kill < 20_000

    report = run(fresh_db, state_db, record.plan, "start")
    (result,) = report.backfills
    assert result.resumed_from is not None and len(result.resumed_from) == 2
    with connect(fresh_db) as conn:
        rest = conn.execute(
            "SELECT count(*) FROM shipments WHERE (order_id, line) > (%s::bigint, %s::int)",
            result.resumed_from,
        ).fetchone()[0]
        wrong = conn.execute(
            "SELECT count(*) FROM shipments WHERE _fy_new_qty IS DISTINCT FROM qty::bigint * 3"
        ).fetchone()[0]
    assert result.rows == rest == 20_000 - done_at_kill  # only the rest, not from the beginning
    assert wrong == 0
    run(fresh_db, state_db, record.plan, "complete")
    assert checksum(fresh_db, "SELECT order_id, line, qty FROM shipments") == before


def _flushed_stats(url: str, updates: int, counter: str) -> int:
    """The statistic ``counter`` (a scalar SELECT), read once ``orders`` shows ``updates`` updated rows.

    A backend reports its table and function counters together when it ends, a little after
    its client has closed the connection: the update count says the report has landed, so a
    zero count is a real zero and not a report still on its way.
    """
    deadline = time.monotonic() + GUARD_SECONDS
    while time.monotonic() < deadline:
        with connect(url) as conn:
            done, value = conn.execute(
                sql.SQL(
                    "SELECT (SELECT n_tup_upd FROM pg_stat_user_tables WHERE relname = 'orders'), ({})"
                ).format(
                    sql.SQL(counter)  # type: ignore[arg-type]
                )
            ).fetchone()
        if done >= updates:
            return int(value)
        time.sleep(0.1)
    raise AssertionError(f"orders never showed {updates} updates in pg_stat_user_tables")


TRIGGER_CALLS = (
    "SELECT coalesce(sum(calls), 0) FROM pg_stat_user_functions WHERE funcname LIKE '\\_fy\\_sync\\_%'"
)
SEQ_SCANS = "SELECT seq_scan FROM pg_stat_user_tables WHERE relname = 'orders'"


def test_the_backfill_never_calls_the_sync_trigger_but_application_writes_do(
    fresh_db: str, state_db: str
) -> None:
    """The trigger's WHEN condition keeps the backfill free of one PL/pgSQL call per row."""
    make_schema(fresh_db, rows=5000)
    with connect(fresh_db, autocommit=True) as conn:
        conn.execute(
            sql.SQL("ALTER DATABASE {} SET track_functions = 'pl'").format(sql.Identifier(conn.info.dbname))
        )
    report = run(fresh_db, state_db, plan_for(fresh_db, state_db, SPEC), "start")
    assert report.backfills[0].rows == 5000
    assert _flushed_stats(fresh_db, 5000, TRIGGER_CALLS) == 0
    with connect(fresh_db) as app:
        app.execute("UPDATE orders SET amount = amount + 1 WHERE id <= 3")
    assert _flushed_stats(fresh_db, 5003, TRIGGER_CALLS) == 3


@pytest.mark.parametrize("analyzed", [True, False], ids=["with statistics", "without statistics"])
def test_no_backfill_batch_scans_the_whole_table(fresh_db: str, state_db: str, analyzed: bool) -> None:
    """Each batch's UPDATE reads only its key range through the index, with or without statistics.

    A scan of the whole table would hold the batch's row locks for the length of the scan, and
    stall application writes to those rows (writes of 256-377 ms at 5M rows, docs/benchmarks.md).
    A key column without statistics is what a migration that swapped in a new primary-key
    column leaves until the next ANALYZE.
    """
    rows = 20_000
    make_schema(fresh_db, rows=rows)
    with connect(fresh_db, autocommit=True) as conn:
        # a live table: updated rows have moved away from their key order, and dead versions
        # remain (autovacuum held off so the planner's statistics stay as measured)
        conn.execute("ALTER TABLE orders SET (autovacuum_enabled = off)")
        conn.execute("UPDATE orders SET legacy = 'y' WHERE id % 2 = 0")
        conn.execute("UPDATE orders SET legacy = 'z' WHERE id % 3 = 0")
        if analyzed:
            conn.execute("ANALYZE orders")
    updated = rows // 2 + rows // 3
    before = _flushed_stats(fresh_db, updated, SEQ_SCANS)
    spec = add_column("add_score", "orders", "score", "int", "amount + 1")
    report = run(
        fresh_db,
        state_db,
        plan_for(fresh_db, state_db, spec),
        "start",
        RunOptions(backfill=BackfillOptions(batch_size=1000)),
    )
    assert (report.backfills[0].rows, report.backfills[0].batches) == (rows, 21)
    assert _flushed_stats(fresh_db, updated + rows, SEQ_SCANS) == before
    with connect(fresh_db) as conn:
        assert (
            conn.execute("SELECT count(*) FROM orders WHERE score IS DISTINCT FROM amount + 1").fetchone()[0]
            == 0
        )


def test_an_up_expression_with_a_percent_sign_is_backfilled(fresh_db: str, state_db: str) -> None:
    """The backfill's UPDATE is sent with its key bounds as parameters, so psycopg read a ``%`` in
    ``up`` (the modulo operator, a LIKE pattern) as a placeholder: start failed at the backfill
    with "incomplete placeholder", after the expression had passed its checks."""
    make_schema(fresh_db, rows=300)
    up = "(amount % 10)::text || CASE WHEN note LIKE '%5' THEN '%' ELSE '' END"
    spec = add_column("percent", "orders", "bucket", "text", up)
    run(fresh_db, state_db, plan_for(fresh_db, state_db, spec), "start", RunOptions(backfill=BackfillOptions(batch_size=100)))
    with connect(fresh_db, autocommit=True) as conn:
        assert conn.execute(
            "SELECT count(*) FROM orders WHERE bucket IS DISTINCT FROM " + up
        ).fetchone() == (0,)
