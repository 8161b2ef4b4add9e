"""Migration files are validated before anything runs; errors are one line naming operation, field and problem."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tasks.db import connect
from tasks.errors import UserError
from tasks.online_migration import lint_plan
from tasks.online_spec import AddColumn, AlterColumn, load_spec, parse_spec
from tests.online_support import make_schema, plan_for, widen


def _error(data: object) -> str:
    with pytest.raises(UserError) as info:
        parse_spec(data, "m.yaml")
    message = str(info.value)
    assert "\n" not in message
    return message


def test_valid_yaml_and_json_files_load(tmp_path: Path) -> None:
    yaml_file = tmp_path / "m.yaml"
    yaml_file.write_text(
        "name: m1\noperations:\n  - add_column: {table: t, column: {name: c, type: int, default: '0'}}\n"
        "  - alter_column: {table: t, column: a, type: bigint, up: a::bigint, down: a::int}\n"
    )
    json_file = tmp_path / "m.json"
    json_file.write_text(
        json.dumps({"name": "m1", "operations": [{"rename_table": {"from": "a", "to": "b"}}]})
    )
    spec = load_spec(yaml_file)
    assert [type(op) for op in spec.operations] == [AddColumn, AlterColumn]
    assert load_spec(json_file).operations[0].to == "b"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("operation", "field"),
    [
        ({"raw_sql": {"up": "SELECT 1 -- \u0000"}}, "up"),
        ({"add_column": {"table": "t", "column": {"name": "c", "type": "text", "default": "'a\u0000'"}}}, "column.default"),
        ({"alter_column": {"table": "t", "column": "c", "check": {"constraint": "c <> '\u0000'"}}}, "check.constraint"),
    ],
)
def test_sql_text_with_a_nul_character_is_refused_at_load_naming_file_and_field(
    tmp_path: Path, operation: dict, field: str
) -> None:
    """PostgreSQL takes no NUL in any text: such a file used to load, plan and start, then fail
    inside PostgreSQL at the step that ran the SQL."""
    path = tmp_path / "nul.json"
    path.write_text(json.dumps({"name": "nul", "operations": [{"raw_sql": {"up": "SELECT 1"}}, operation]}))
    kind = next(iter(operation))
    with pytest.raises(UserError) as info:
        load_spec(path)
    assert str(info.value) == (
        f"nul.json: operation 1 ({kind}): field '{field}': contains a NUL character (\\u0000), "
        "which PostgreSQL cannot take; remove it"
    )


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (
            {"name": "m", "operations": [{"add_column": {"table": "t"}}]},
            "operation 0 (add_column): field 'column': Field required",
        ),
        (
            {"name": "m", "operations": [{"rename_column": {"table": "t", "from": "a"}}, {"drop_table": {}}]},
            "operation 0 (rename_column): field 'to'",
        ),
        ({"name": "m", "operations": [{"frobnicate": {}}]}, "operation 0: unknown type 'frobnicate'"),
        (
            {"name": "m", "operations": [{"alter_column": {"table": "t", "column": "a", "type": "bigint"}}]},
            "operation 0 (alter_column): up/down: a type change needs both",
        ),
        (
            {
                "name": "m",
                "operations": [
                    {"add_column": {"table": "t", "column": {"name": "c", "type": "int", "nullable": False}}}
                ],
            },
            "up: a NOT NULL column needs a default or an up expression",
        ),
        (
            {
                "name": "m",
                "operations": [
                    {"create_index": {"name": "i", "table": "t", "columns": ["a"], "method": "nope"}}
                ],
            },
            "operation 0 (create_index): field 'method'",
        ),
        ({"name": "Bad-Name", "operations": []}, "field 'name' must be 1-40 lowercase"),
        ({"name": "m", "operations": []}, "field 'operations' must be a non-empty list"),
        (
            {"name": "m", "operations": [{"drop_table": {"name": "x; drop"}}]},
            "operation 0 (drop_table): field 'name'",
        ),
    ],
)
def test_bad_files_get_one_precise_line(data: object, expected: str) -> None:
    assert expected in _error(data)


def test_operations_on_missing_or_indexed_columns_are_refused(fresh_db: str, state_db: str) -> None:
    make_schema(fresh_db, rows=10)
    with pytest.raises(UserError, match=r"operation 1 \(rename_column\): column orders.nope does not exist"):
        plan_for(
            fresh_db,
            state_db,
            {
                "name": "bad",
                "operations": [
                    {"drop_index": {"name": "orders_note_idx"}},
                    {"rename_column": {"table": "orders", "from": "nope", "to": "x"}},
                ],
            },
        )
    with connect(fresh_db, autocommit=True) as conn:
        conn.execute("ALTER TABLE tickets ADD COLUMN parent int REFERENCES tickets (id)")
    with pytest.raises(
        UserError,
        match=r"operation 0 \(alter_column\): tickets.id: self-referencing foreign key tickets_parent_fkey is not supported",
    ):
        plan_for(fresh_db, state_db, {"name": "bad", "operations": [widen("tickets", "id")]})
    with connect(fresh_db, autocommit=True) as conn:
        conn.execute("CREATE TABLE parts (id int PRIMARY KEY, k int) PARTITION BY RANGE (id)")
        conn.execute("CREATE INDEX parts_k ON parts (k)")
    with pytest.raises(UserError, match=r"parts.k is indexed \(parts_k\) on a partitioned table"):
        plan_for(fresh_db, state_db, {"name": "bad", "operations": [widen("parts", "k")]})


@pytest.mark.parametrize("server", ["fresh_db", "older_db"])
def test_a_foreign_key_on_a_partitioned_table_is_refused_before_postgresql_18(
    server: str, state_db: str, request: pytest.FixtureRequest
) -> None:
    """PostgreSQL 14-17 refuse a foreign key NOT VALID on a partitioned table: the plan says so
    in one line, before start changes anything (18 takes the key as on any table)."""
    url = request.getfixturevalue(server)
    with connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE owners (id int PRIMARY KEY)")
        conn.execute("CREATE TABLE parts (id int PRIMARY KEY, k int) PARTITION BY RANGE (id)")
        conn.execute("CREATE TABLE parts_low PARTITION OF parts FOR VALUES FROM (0) TO (100)")
        older = conn.info.server_version < 180000
    column = {"name": "owner", "type": "int", "references": {"table": "owners", "column": "id"}}
    spec = {"name": "pfk", "operations": [{"add_column": {"table": "parts", "column": column}}]}
    if not older:
        titles = [step.title for step in plan_for(url, state_db, spec).start]
        assert "add constraint parts_owner_fkey NOT VALID on parts" in titles
        return
    with pytest.raises(UserError) as err:
        plan_for(url, state_db, spec)
    assert re.fullmatch(
        r"operation 0 \(add_column\): foreign key parts_owner_fkey on partitioned table public\.parts "
        r"cannot be added NOT VALID before PostgreSQL 18 \(this server runs PostgreSQL 1[4-7]\); add it to each "
        r"partition .*",
        str(err.value),
    )


def test_a_backfill_without_a_key_is_refused_in_one_line(fresh_db: str, state_db: str) -> None:
    make_schema(fresh_db, rows=10)
    with connect(fresh_db, autocommit=True) as conn:
        conn.execute("CREATE TABLE heap (a int, b text)")
        conn.execute("CREATE UNIQUE INDEX heap_a ON heap (a)")  # unique but nullable: no keyset order
    add = {"add_column": {"table": "heap", "column": {"name": "c", "type": "int"}, "up": "a + 1"}}
    with pytest.raises(
        UserError, match=r"public.heap has no primary key or unique NOT NULL key .*; add one first"
    ):
        plan_for(fresh_db, state_db, {"name": "nokey", "operations": [add]})
    with connect(fresh_db, autocommit=True) as conn:
        conn.execute("ALTER TABLE heap ALTER COLUMN a SET NOT NULL")
    (backfill,) = [
        s.backfill
        for s in plan_for(fresh_db, state_db, {"name": "nokey", "operations": [add]}).start
        if s.backfill
    ]
    assert backfill.key_columns == ["a"]


def test_raw_sql_breaking_a_rule_is_refused_unless_unsafe(fresh_db: str, state_db: str) -> None:
    make_schema(fresh_db, rows=10)
    raw = {
        "raw_sql": {
            "up": "CREATE INDEX orders_amount ON orders (amount)",
            "down": "DROP INDEX CONCURRENTLY orders_amount",
        }
    }
    plan = plan_for(fresh_db, state_db, {"name": "raw", "operations": [raw]})
    with pytest.raises(
        UserError, match=r"operation 0 \(raw_sql\): field 'up': index-not-concurrent.*unsafe: true"
    ):
        lint_plan(plan, 200)
    raw["raw_sql"]["unsafe"] = True  # type: ignore[index]
    warnings = lint_plan(plan_for(fresh_db, state_db, {"name": "raw", "operations": [raw]}), 200).warnings
    assert len(warnings) == 1 and "index-not-concurrent" in warnings[0]


def test_zero_lock_timeout_fails_the_lint(fresh_db: str, state_db: str) -> None:
    make_schema(fresh_db, rows=10)
    plan = plan_for(
        fresh_db,
        state_db,
        {"name": "lt", "operations": [{"drop_column": {"table": "orders", "column": "legacy"}}]},
    )
    with pytest.raises(UserError, match="missing-lock-timeout"):
        lint_plan(plan, 0)


def test_a_migration_file_that_is_not_yaml_says_what_is_wrong_and_where(tmp_path: Path) -> None:
    """The parser error's first line is only its context (``while parsing a flow sequence``)."""
    broken = tmp_path / "broken.yaml"
    broken.write_text("steps:\n  - [add_column, a\n")
    with pytest.raises(UserError) as info:
        load_spec(broken)
    assert str(info.value) == "broken.yaml: not valid YAML: expected ',' or ']', but got '<stream end>' at line 3, column 1"
