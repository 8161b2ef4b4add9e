"""Preparing an online migration: every user SQL expression is checked against the live catalog
before start runs anything, so a typo in ``up``/``down`` cannot reach the sync trigger, where it
would fail every application write to the table until rollback."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from psycopg import sql

from tasks.backfill import BackfillOptions
from tasks.db import connect, database_name
from tasks.embedded_pg import EmbeddedPostgres, free_port
from tasks.errors import ServerReadOnly, UserError
from tasks.online_migration import lint_plan, prepare_plan, run_online_phase
from tasks.online_phases import RunOptions, run_options
from tasks.online_state import active_migration, target_key
from tests.conftest import older_server_bin_dir, scratch_database
from tests.online_support import make_schema, run, schema_dump


def _prepare(url: str, state: str, tmp_path: Path, operations: list[dict[str, Any]]) -> Any:
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump({"name": "checked", "operations": operations}))
    return prepare_plan(url, state, str(path), "public")


RENAME_NOTE = {"rename_column": {"table": "orders", "from": "note", "to": "comment"}}


def _widen(up: str = "amount::bigint", down: str = "amount::int") -> dict[str, Any]:
    return {"alter_column": {"table": "orders", "column": "amount", "type": "bigint", "up": up, "down": down}}


@pytest.mark.parametrize(
    ("operations", "expected"),
    [
        (
            [
                {
                    "add_column": {
                        "table": "orders",
                        "column": {"name": "x", "type": "int"},
                        "up": "amount +* 2",
                    }
                }
            ],
            "operation 0 (add_column): field 'up': operator does not exist: integer +* integer",
        ),
        (
            [_widen(up="amout::bigint")],
            "operation 0 (alter_column): field 'up': column \"amout\" does not exist",
        ),
        (  # down runs in the new version, where note is already called comment
            [RENAME_NOTE, _widen(down="CASE WHEN note IS NULL THEN 0 ELSE amount::int END")],
            "operation 1 (alter_column): field 'down': column \"note\" does not exist",
        ),
        (
            [{"drop_column": {"table": "orders", "column": "legacy", "down": "no_such_fn(id)"}}],
            "operation 0 (drop_column): field 'down': function no_such_fn(bigint) does not exist",
        ),
        (
            [{"add_column": {"table": "orders", "column": {"name": "x", "type": "integr"}}}],
            "operation 0 (add_column): field 'column.type': type \"integr\" does not exist",
        ),
        (
            [{"add_column": {"table": "orders", "column": {"name": "x", "type": "int", "default": "'abc'"}}}],
            "operation 0 (add_column): field 'column.default': invalid input syntax for type integer",
        ),
        (
            [
                {
                    "create_table": {
                        "name": "t2",
                        "columns": [{"name": "a", "type": "int"}, {"name": "b", "type": "txt"}],
                    }
                }
            ],
            "operation 0 (create_table): field 'columns.1.type': type \"txt\" does not exist",
        ),
    ],
)
def test_a_bad_expression_fails_before_anything_runs(
    fresh_db: str, state_db: str, tmp_path: Path, operations: list[dict[str, Any]], expected: str
) -> None:
    make_schema(fresh_db, rows=10)
    before = schema_dump(fresh_db)
    with pytest.raises(UserError) as error:
        _prepare(fresh_db, state_db, tmp_path, operations)
    assert str(error.value).startswith(expected)
    assert schema_dump(fresh_db) == before
    with connect(fresh_db, autocommit=True) as conn:  # the application still writes
        conn.execute("INSERT INTO orders (id, amount) VALUES (100001, 5)")


def test_down_may_use_the_new_versions_names_and_every_user_expression_is_checked(
    fresh_db: str, state_db: str, tmp_path: Path
) -> None:
    make_schema(fresh_db, rows=10)
    plan = _prepare(
        fresh_db,
        state_db,
        tmp_path,
        [
            RENAME_NOTE,
            _widen(down="CASE WHEN comment IS NULL THEN 0 ELSE amount::int END"),
            {
                "add_column": {
                    "table": "orders",
                    "column": {"name": "flag", "type": "boolean"},
                    "up": "amount > 5",
                }
            },
        ],
    )
    assert {c.where for c in plan.checks} >= {
        "operation 1 (alter_column): field 'type'",
        "operation 1 (alter_column): field 'up'",
        "operation 1 (alter_column): field 'down'",
        "operation 2 (add_column): field 'column.type'",
        "operation 2 (add_column): field 'up'",
    }


def test_checks_read_and_call_nothing(fresh_db: str, state_db: str, tmp_path: Path) -> None:
    """A volatile default is parsed, never evaluated: the sequence does not move."""
    make_schema(fresh_db, rows=10)
    with connect(fresh_db, autocommit=True) as conn:
        before = conn.execute("SELECT last_value, is_called FROM tickets_id_seq").fetchone()
    column = {"name": "n", "type": "bigint", "default": "nextval('tickets_id_seq')"}
    plan = _prepare(fresh_db, state_db, tmp_path, [{"add_column": {"table": "tickets", "column": column}}])
    assert any(c.where == "operation 0 (add_column): field 'column.default'" for c in plan.checks)
    with connect(fresh_db, autocommit=True) as conn:
        assert conn.execute("SELECT last_value, is_called FROM tickets_id_seq").fetchone() == before


def test_a_backfill_that_hits_bad_data_is_one_line_and_resumes_after_the_fix(
    fresh_db: str, state_db: str, tmp_path: Path
) -> None:
    make_schema(fresh_db, rows=300)
    with connect(fresh_db, autocommit=True) as conn:
        conn.execute("UPDATE orders SET amount = 40000 WHERE id = 250")
    narrow = {"alter_column": {"table": "orders", "column": "amount", "type": "smallint",
                               "up": "amount::smallint", "down": "amount::int"}}  # fmt: skip
    plan = _prepare(fresh_db, state_db, tmp_path, [narrow])
    batches_of_100 = RunOptions(backfill=BackfillOptions(batch_size=100))
    with pytest.raises(UserError) as error:
        run(fresh_db, state_db, plan, "start", batches_of_100)
    message = str(error.value)
    assert "backfill orders in keyset batches) failed: smallint out of range" in message
    assert "run start again to resume" in message and "\n" not in message
    assert isinstance(error.value.__cause__, psycopg.errors.NumericValueOutOfRange)

    with connect(fresh_db, autocommit=True) as conn:
        conn.execute("UPDATE orders SET amount = 400 WHERE id = 250")
    report = run(fresh_db, state_db, plan, "start", batches_of_100)  # resumes after the last batch
    assert report.backfills[0].resumed_from == ["200"] and report.backfills[0].rows == 100
    with connect(fresh_db, autocommit=True) as conn:
        assert conn.execute(
            "SELECT count(*) FROM orders WHERE _fy_new_amount IS DISTINCT FROM amount"
        ).fetchone() == (0,)


SLOW_COPY = {"add_column": {"table": "orders", "column": {"name": "copy", "type": "int"}, "up": "slow_copy(amount)"}}
"""An ``up`` that takes as long per row as :func:`_slow_copy` makes the function ``slow_copy`` sleep."""


def _slow_copy(url: str, seconds_a_row: float) -> None:
    with connect(url, autocommit=True) as conn:
        conn.execute(
            sql.SQL(
                "CREATE OR REPLACE FUNCTION slow_copy(v int) RETURNS int LANGUAGE plpgsql VOLATILE "
                "AS $$BEGIN PERFORM pg_sleep({}); RETURN v; END$$"
            ).format(sql.Literal(seconds_a_row))
        )


def _copied(url: str) -> bool:
    with connect(url, autocommit=True) as conn:
        return conn.execute("SELECT count(*) FROM orders WHERE copy IS DISTINCT FROM amount").fetchone() == (0,)


def _run_options(batch_size: int = 5000, batch_timeout_seconds: float = 60.0) -> RunOptions:
    """The run options of the flow's parameters, as ``flowyard online start`` passes them."""
    return run_options(
        batch_size=batch_size,
        batch_delay_seconds=0.0,
        max_rows_per_second=None,
        lock_timeout_ms=200,
        statement_timeout_ms=10_000,
        retry_deadline_seconds=300.0,
        batch_timeout_seconds=batch_timeout_seconds,
    )


def test_a_backfill_batch_past_its_statement_timeout_names_the_batch_size_option(
    fresh_db: str, state_db: str, tmp_path: Path
) -> None:
    """``--statement-timeout-ms`` is the short DDL's, not the batches': the line said to fix "the
    timeout", which that option does not, and not the batch size, which works."""
    make_schema(fresh_db, rows=50)
    _slow_copy(fresh_db, 0.01)  # a 50-row batch runs 500 ms
    plan = _prepare(fresh_db, state_db, tmp_path, [SLOW_COPY])
    with pytest.raises(UserError) as error:
        run(fresh_db, state_db, plan, "start", _run_options(batch_timeout_seconds=0.1))
    message = str(error.value)
    assert "(backfill orders in keyset batches) failed: canceling statement due to statement timeout" in message
    assert "a backfill batch may run 0.1 s; run start again with a smaller --batch-size (batch_size)" in message
    assert "the timeout" not in message and "\n" not in message

    run(fresh_db, state_db, plan, "start", _run_options(batch_size=1, batch_timeout_seconds=0.1))
    assert _copied(fresh_db)


def test_a_row_slower_than_the_batch_limit_passes_with_a_longer_batch_timeout(
    fresh_db: str, state_db: str, tmp_path: Path
) -> None:
    """A single row whose ``up`` outlasts the batches' statement_timeout (an expensive function, a
    huge jsonb transform) was cancelled even in one-row batches: the limit was a fixed 60 s that no
    option changed, and the line named only ``--batch-size``, which cannot help."""
    make_schema(fresh_db, rows=3)
    _slow_copy(fresh_db, 0.3)
    plan = _prepare(fresh_db, state_db, tmp_path, [SLOW_COPY])
    with pytest.raises(UserError) as error:
        run(fresh_db, state_db, plan, "start", _run_options(batch_size=1, batch_timeout_seconds=0.1))
    message = str(error.value)
    assert "failed: canceling statement due to statement timeout; a backfill batch may run 0.1 s;" in message
    assert "or with a longer --batch-timeout-seconds (batch_timeout_seconds) if a single row takes that long" in message

    run(fresh_db, state_db, plan, "start", _run_options(batch_size=1, batch_timeout_seconds=30.0))
    assert _copied(fresh_db)


def _cancel_update_of(url: str, table: str, stop: threading.Event) -> None:
    """As a DBA would: ``pg_cancel_backend`` the first UPDATE of ``table`` seen running, from another
    session; until ``stop`` is set."""
    with connect(url, autocommit=True) as conn:
        while not stop.is_set():
            if conn.execute(
                "SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE datname = current_database() "
                "AND pid <> pg_backend_pid() AND state = 'active' AND query LIKE %s",
                (f"UPDATE %{table}% SET %",),
            ).fetchall():
                return
            stop.wait(0.01)


def _start_cancelled_by_another_session(url: str, state_db: str, tmp_path: Path) -> tuple[Any, str]:
    """The plan of a slow backfill of 5 rows and the line its start fails with when another session
    cancels its batch (:func:`_cancel_update_of`)."""
    make_schema(url, rows=5)
    _slow_copy(url, 2.0)  # a 5-row batch runs 10 s unless cancelled
    plan = _prepare(url, state_db, tmp_path, [SLOW_COPY])
    stop = threading.Event()
    canceller = threading.Thread(target=_cancel_update_of, args=(url, "orders", stop))
    canceller.start()
    try:
        with pytest.raises(UserError) as error:
            run(url, state_db, plan, "start", _run_options())
    finally:
        stop.set()
        canceller.join()
    return plan, str(error.value)


def test_a_batch_another_session_cancels_is_no_timeout_and_start_resumes(
    fresh_db: str, state_db: str, tmp_path: Path
) -> None:
    """A DBA's ``pg_cancel_backend`` raises QueryCanceled as a statement_timeout does (SQLSTATE
    57014 both): the line said the batch may run 60 s and to take smaller batches, when neither
    the batch size nor a limit had anything to do with it."""
    plan, message = _start_cancelled_by_another_session(fresh_db, state_db, tmp_path)
    assert message.endswith(
        "(backfill orders in keyset batches) failed: canceling statement due to user request; "
        "another session cancelled it (pg_cancel_backend); run start again to resume from this step"
    ), message
    assert "\n" not in message

    _slow_copy(fresh_db, 0.0)
    run(fresh_db, state_db, plan, "start", _run_options())
    assert _copied(fresh_db)


@pytest.fixture(scope="module")
def german_pg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedPostgres]:
    """A server that words its messages in German, as one with ``lc_messages = 'de_DE.UTF-8'``
    does: the machine's PostgreSQL package has the translations, but the machine no ``de_DE``
    locale to set, so the server is started with ``LANGUAGE=de``, which gettext follows under any
    ``lc_messages`` but C (this server's is initdb's C.UTF-8)."""
    bin_dir = older_server_bin_dir()
    if bin_dir is None:
        pytest.skip("no PostgreSQL 14-17 server under /usr/lib/postgresql (apt-get install postgresql)")
    server = EmbeddedPostgres(tmp_path_factory.mktemp("pg-de") / "pg", free_port(), bin_dir)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("LANGUAGE", "de")
        server.start()
    try:
        yield server
    finally:
        server.stop()


def test_a_cancel_and_a_timeout_are_told_apart_in_any_language(
    german_pg: EmbeddedPostgres, state_db: str, tmp_path: Path
) -> None:
    """A cancel and a statement_timeout differ only in their message (SQLSTATE 57014 both), and
    the cancel was known by its English words: a server speaking another language got the
    timeout's advice (smaller batches, a longer limit) for a batch another session cancelled."""
    with scratch_database(german_pg) as url:
        with connect(url, autocommit=True) as conn, pytest.raises(psycopg.errors.DivisionByZero) as german:
            conn.execute("SELECT 1 / 0")
        if "Division durch Null" not in str(german.value):
            pytest.skip(f"{older_server_bin_dir()} has no German messages (built without NLS)")
        plan, cancelled = _start_cancelled_by_another_session(url, state_db, tmp_path)
        assert cancelled.endswith(
            "(backfill orders in keyset batches) failed: storniere Anfrage wegen Benutzeraufforderung; "
            "another session cancelled it (pg_cancel_backend); run start again to resume from this step"
        ), cancelled

        _slow_copy(url, 0.3)  # a 5-row batch runs 1.5 s
        with pytest.raises(UserError) as timed_out:
            run(url, state_db, plan, "start", _run_options(batch_timeout_seconds=0.1))
        assert (
            "failed: storniere Anfrage wegen Zeitüberschreitung der Anfrage; a backfill batch may run 0.1 s; "
            "run start again with a smaller --batch-size (batch_size)"
        ) in str(timed_out.value)

        _slow_copy(url, 0.0)
        run(url, state_db, plan, "start", _run_options())
        assert _copied(url)


@pytest.mark.parametrize("set_command", ["SET", "SET LOCAL"])
def test_a_raw_sql_step_its_own_statement_timeout_cancels_names_that_limit(
    fresh_db: str, state_db: str, tmp_path: Path, set_command: str
) -> None:
    """A raw_sql that sets a statement_timeout shorter than flowyard's is cancelled by it sooner
    than flowyard's limit could fire, which the attempt's clock took for another session's cancel:
    the line said to run start again, where the same limit fires again."""
    make_schema(fresh_db, rows=5)
    up = f"{set_command} statement_timeout = '100ms'; SELECT pg_sleep(2)"
    plan = _prepare(fresh_db, state_db, tmp_path, [{"raw_sql": {"up": up}}])
    with pytest.raises(UserError) as error:
        run(fresh_db, state_db, plan, "start", _run_options())
    assert str(error.value) == (
        "checked: start step 2 (raw_sql operation 0) failed: canceling statement due to statement timeout; "
        "a statement_timeout its own SQL sets cancelled it, not --statement-timeout-ms (statement_timeout_ms); "
        "roll back (`flowyard online rollback`), raise or remove that limit in the migration file and start again"
    )


def _enum_status(up: str) -> list[dict[str, Any]]:
    """Seed 000's type change to an enum: a raw_sql operation creates the type the next one uses."""
    return [
        {"raw_sql": {"up": "CREATE TYPE order_state AS ENUM ('new', 'paid', 'shipped')",
                     "down": "DROP TYPE IF EXISTS order_state"}},
        {"alter_column": {"table": "orders", "column": "status", "type": "order_state",
                          "up": up, "down": "status::text"}},
    ]  # fmt: skip


def test_a_type_that_an_earlier_raw_sql_creates_is_checked_once_it_exists(
    fresh_db: str, state_db: str, tmp_path: Path
) -> None:
    make_schema(fresh_db, rows=50)
    plan = _prepare(fresh_db, state_db, tmp_path, _enum_status("status::order_state"))
    deferred = {c.where for c in plan.checks if c.after_raw_sql}
    assert deferred >= {"operation 1 (alter_column): field 'type'", "operation 1 (alter_column): field 'up'"}
    titles = [s.title for s in plan.start]
    check_step = titles.index("check the expressions that follow raw_sql operations")
    assert titles.index("raw_sql operation 0") < check_step < min(
        i for i, t in enumerate(titles) if "trigger" in t
    ), titles
    assert lint_plan(plan, 200).warnings == []  # the check step passes the lint like every statement
    run(fresh_db, state_db, plan, "start")
    with connect(fresh_db, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM orders WHERE _fy_new_status IS NULL").fetchone() == (0,)
        conn.execute("INSERT INTO orders (id, amount, status) VALUES (100001, 5, 'paid')")  # old version writes


def test_a_typo_after_a_raw_sql_stops_start_before_any_trigger(
    fresh_db: str, state_db: str, tmp_path: Path
) -> None:
    """Before start the typo cannot be told from a name the raw_sql creates; start's check step,
    right after the raw_sql, stops it before the sync trigger exists: writes keep working."""
    make_schema(fresh_db, rows=50)
    plan = _prepare(fresh_db, state_db, tmp_path, _enum_status("stauts::order_state"))
    with pytest.raises(UserError) as error:
        run(fresh_db, state_db, plan, "start")
    assert "check the expressions that follow raw_sql operations) failed: column \"stauts\" does not exist" in str(
        error.value
    )
    with connect(fresh_db, autocommit=True) as conn:
        triggers = conn.execute("SELECT count(*) FROM pg_trigger WHERE tgrelid = 'orders'::regclass").fetchone()
        assert triggers == (0,)
        conn.execute("INSERT INTO orders (id, amount) VALUES (100001, 5)")


def test_a_typo_in_a_type_is_still_refused_before_start_without_raw_sql(
    fresh_db: str, state_db: str, tmp_path: Path
) -> None:
    make_schema(fresh_db, rows=10)
    with pytest.raises(UserError, match=r"field 'type': type \"order_state\" does not exist"):
        _prepare(fresh_db, state_db, tmp_path, _enum_status("status::order_state")[1:])


def _set_read_only(url: str, target: str, value: str) -> None:
    """``ALTER {target} SET default_transaction_read_only``: a DBA's freeze of new sessions."""
    with connect(url, autocommit=True) as conn:
        conn.execute("SET default_transaction_read_only = off")  # this session may still lift it
        conn.execute(
            sql.SQL("ALTER {} SET default_transaction_read_only = {}").format(
                sql.SQL(target).format(sql.Identifier(database_name(url))), sql.SQL(value)
            )
        )


@pytest.mark.parametrize(
    ("target", "where"),
    [("DATABASE {}", "database"), ("ROLE CURRENT_USER IN DATABASE {}", "role")],
)
def test_a_frozen_database_or_role_is_refused_before_a_phase_records_or_runs_anything(
    fresh_db: str, state_db: str, tmp_path: Path, target: str, where: str
) -> None:
    """A DBA's ``default_transaction_read_only``: start recorded the migration and complete moved
    its phase before the first step met PostgreSQL's refusal (a traceback, and ``online status``
    showed it under way). Both are refused in one line, with nothing recorded or moved."""
    make_schema(fresh_db, rows=300)
    plan = _prepare(fresh_db, state_db, tmp_path, [_widen()])
    before = schema_dump(fresh_db)
    _set_read_only(fresh_db, target, "on")
    with pytest.raises(ServerReadOnly) as refused:
        run_online_phase(fresh_db, state_db, plan, "start", RunOptions())
    message = str(refused.value)
    assert f"default_transaction_read_only is on, set for {where} " in message and "\n" not in message
    assert message.endswith("start of checked was not begun (nothing changed or recorded)")
    assert active_migration(state_db, target_key(fresh_db), "public") is None
    assert schema_dump(fresh_db) == before

    _set_read_only(fresh_db, target, "off")
    run_online_phase(fresh_db, state_db, plan, "start", RunOptions())
    _set_read_only(fresh_db, target, "on")
    with pytest.raises(ServerReadOnly, match="complete of checked was not begun"):
        run_online_phase(fresh_db, state_db, plan, "complete", RunOptions())
    record = active_migration(state_db, target_key(fresh_db), "public")
    assert record is not None and record.phase == "expanded" and record.steps_done("complete") == 0

    _set_read_only(fresh_db, target, "off")
    run_online_phase(fresh_db, state_db, plan, "complete", RunOptions())
    assert active_migration(state_db, target_key(fresh_db), "public") is None


def test_a_validate_or_index_build_runs_as_long_as_its_data(fresh_db: str, state_db: str, tmp_path: Path) -> None:
    """A ``VALIDATE`` or a concurrent index build reads the whole table: it ran under a fixed 1-hour
    statement_timeout that no option changed, so on a table that takes longer it was cancelled,
    its invalid index dropped and rebuilt on every resume, and never finished. Like pg_restore's
    index builds it runs without one (lock_timeout still bounds its waits). The CHECK below holds
    only for a row read with no statement timeout."""
    make_schema(fresh_db, rows=300)
    with connect(fresh_db, autocommit=True) as conn:
        conn.execute(
            "CREATE FUNCTION untimed(int) RETURNS boolean LANGUAGE sql STABLE "
            "AS $$ SELECT $1 IS NULL OR current_setting('statement_timeout') = '0' $$"
        )
    check = {"name": "amount_untimed", "constraint": "untimed(amount)"}
    plan = _prepare(fresh_db, state_db, tmp_path, [{"alter_column": {"table": "orders", "column": "amount", "check": check}}])
    run(fresh_db, state_db, plan, "start")
    with connect(fresh_db, autocommit=True) as conn:
        assert conn.execute(
            "SELECT convalidated FROM pg_constraint WHERE conname = 'amount_untimed'"
        ).fetchone() == (True,)
