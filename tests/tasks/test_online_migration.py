"""Preparing an online migration: every user SQL expression is checked against the live catalog
before start runs anything, so a typo in ``up``/``down`` cannot reach the sync trigger, where it
would fail every application write to the table until rollback."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from psycopg import sql

from tasks.backfill import BackfillOptions
from tasks.db import connect, database_name
from tasks.ddl_retry import LockPolicy
from tasks.errors import ServerReadOnly, UserError
from tasks.online_migration import lint_plan, prepare_plan, run_online_phase
from tasks.online_phases import RunOptions
from tasks.online_state import active_migration, target_key
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


def test_a_backfill_batch_past_its_statement_timeout_names_the_batch_size_option(
    fresh_db: str, state_db: str, tmp_path: Path
) -> None:
    """No option sets the batches' statement_timeout (``--statement-timeout-ms`` is the short DDL's):
    the line said to fix "the timeout", which the user cannot, and not the batch size, which works."""
    make_schema(fresh_db, rows=50)
    with connect(fresh_db, autocommit=True) as conn:  # 10 ms a row: a 50-row batch runs 500 ms
        conn.execute(
            "CREATE FUNCTION slow_copy(v int) RETURNS int LANGUAGE plpgsql VOLATILE "
            "AS $$BEGIN PERFORM pg_sleep(0.01); RETURN v; END$$"
        )
    copy = {"add_column": {"table": "orders", "column": {"name": "copy", "type": "int"}, "up": "slow_copy(amount)"}}
    plan = _prepare(fresh_db, state_db, tmp_path, [copy])
    limit = LockPolicy(statement_timeout_ms=100)
    with pytest.raises(UserError) as error:
        run(fresh_db, state_db, plan, "start", RunOptions(backfill=BackfillOptions(policy=limit)))
    message = str(error.value)
    assert "(backfill orders in keyset batches) failed: canceling statement due to statement timeout" in message
    assert "a backfill batch may run 100 ms; run start again with a smaller --batch-size (batch_size)" in message
    assert "the timeout" not in message and "\n" not in message

    run(fresh_db, state_db, plan, "start", RunOptions(backfill=BackfillOptions(batch_size=1, policy=limit)))
    with connect(fresh_db, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM orders WHERE copy IS DISTINCT FROM amount").fetchone() == (0,)


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
