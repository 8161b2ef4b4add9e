"""Preparing an online migration: every user SQL expression is checked against the live catalog
before start runs anything, so a typo in ``up``/``down`` cannot reach the sync trigger, where it
would fail every application write to the table until rollback."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from tasks.backfill import BackfillOptions
from tasks.db import connect
from tasks.errors import UserError
from tasks.online_migration import lint_plan, prepare_plan
from tasks.online_phases import RunOptions
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
