"""Every operation, start → complete and start → rollback, on a real PostgreSQL.

Rollback must give back exactly the prior schema (pg_dump --schema-only) and data (checksums);
complete must give the new schema with the same data, and both versions must answer during expand.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from psycopg import sql

from tasks.db import connect
from tasks.errors import UserError
from tasks.online_migration import lint_plan
from tests.online_support import (
    TABLES,
    WIDEN_AMOUNT,
    checksum,
    make_schema,
    plan_for,
    run,
    schema_dump,
    widen,
)


@dataclass(frozen=True)
class Case:
    op: list[dict[str, Any]]
    before: str
    """A query over the old version ..."""
    after: str
    """... and the same data, read from the new version after complete."""
    final: str
    """A query that is true only for the final (contracted) schema."""
    table: str = "orders"


def _col(table: str, column: str) -> str:
    return (
        "SELECT format_type(atttypid, atttypmod) || ':' || attnotnull FROM pg_attribute "
        f"WHERE attrelid = 'public.{table}'::regclass AND attname = '{column}' AND NOT attisdropped"
    )


CASES: dict[str, Case] = {
    "add_column_not_null_default": Case(
        [
            {
                "add_column": {
                    "table": "orders",
                    "column": {"name": "priority", "type": "int", "nullable": False, "default": "3"},
                }
            }
        ],
        "SELECT id, 3 FROM orders",
        "SELECT id, priority FROM orders",
        f"SELECT ({_col('orders', 'priority')}) = 'integer:true'",
    ),
    "add_column_up_check_unique": Case(
        [
            {
                "add_column": {
                    "table": "orders",
                    "column": {
                        "name": "ref",
                        "type": "bigint",
                        "nullable": False,
                        "check": {"constraint": "ref > 0"},
                        "unique": {},
                    },
                    "up": "id * 10",
                }
            }
        ],
        "SELECT id, id * 10 FROM orders",
        "SELECT id, ref FROM orders",
        f"SELECT ({_col('orders', 'ref')}) = 'bigint:true' AND EXISTS (SELECT 1 FROM pg_constraint WHERE conname = 'orders_ref_key' AND contype = 'u')"
        " AND EXISTS (SELECT 1 FROM pg_constraint WHERE conname = 'orders_ref_check' AND convalidated)",
    ),
    "add_column_volatile_default": Case(
        [
            {
                "add_column": {
                    "table": "orders",
                    "column": {
                        "name": "token",
                        "type": "uuid",
                        "nullable": False,
                        "default": "gen_random_uuid()",
                    },
                }
            }
        ],
        "SELECT id, true FROM orders",
        "SELECT id, token IS NOT NULL FROM orders",
        f"SELECT ({_col('orders', 'token')}) = 'uuid:true' AND (SELECT count(DISTINCT token) FROM orders) = (SELECT count(*) FROM orders)",
    ),
    "drop_column": Case(
        [{"drop_column": {"table": "orders", "column": "legacy"}}],
        "SELECT id, amount FROM orders",
        "SELECT id, amount FROM orders",
        f"SELECT ({_col('orders', 'legacy')}) IS NULL",
    ),
    "rename_column": Case(
        [{"rename_column": {"table": "orders", "from": "note", "to": "comment"}}],
        "SELECT id, note FROM orders",
        "SELECT id, comment FROM orders",
        f"SELECT ({_col('orders', 'comment')}) = 'text:false' AND to_regclass('public.orders_note_idx') IS NOT NULL",
    ),
    "alter_type_int_bigint": Case(
        [WIDEN_AMOUNT],
        "SELECT id, amount::bigint FROM orders",
        "SELECT id, amount FROM orders",
        f"SELECT ({_col('orders', 'amount')}) = 'bigint:true' AND "
        "(SELECT pg_get_expr(adbin, adrelid) FROM pg_attrdef WHERE adrelid = 'public.orders'::regclass "
        "AND adnum = (SELECT attnum FROM pg_attribute WHERE attrelid = 'public.orders'::regclass AND attname = 'amount')) IS NULL",
    ),
    "alter_type_text_enum": Case(
        [
            {
                "raw_sql": {
                    "up": "CREATE TYPE order_status AS ENUM ('new', 'paid')",
                    "down": "DROP TYPE IF EXISTS order_status",
                }
            },
            {
                "alter_column": {
                    "table": "orders",
                    "column": "status",
                    "type": "order_status",
                    "default": "'new'",
                    "up": "status::order_status",
                    "down": "status::text",
                }
            },
        ],
        "SELECT id, status FROM orders",
        "SELECT id, status::text FROM orders",
        f"SELECT ({_col('orders', 'status')}) = 'order_status:true'",
    ),
    "alter_set_not_null": Case(
        [
            {
                "alter_column": {
                    "table": "orders",
                    "column": "legacy",
                    "nullable": False,
                    "up": "coalesce(legacy, '')",
                    "down": "legacy",
                }
            }
        ],
        "SELECT id, coalesce(legacy, '') FROM orders",
        "SELECT id, legacy FROM orders",
        f"SELECT ({_col('orders', 'legacy')}) = 'text:true'",
    ),
    "alter_check": Case(
        [
            {
                "alter_column": {
                    "table": "orders",
                    "column": "amount",
                    # upper case and a literal naming the column: both must be read as SQL reads them
                    "check": {"name": "amount_small", "constraint": "AMOUNT < 500 AND note <> 'amount'"},
                    "up": "least(amount, 499)",
                    "down": "amount",
                }
            }
        ],
        "SELECT id, least(amount, 499) FROM orders",
        "SELECT id, amount FROM orders",
        "SELECT EXISTS (SELECT 1 FROM pg_constraint WHERE conname = 'amount_small' AND convalidated AND contype = 'c'"
        " AND pg_get_constraintdef(oid) = 'CHECK (((amount < 500) AND (note <> ''amount''::text)))')",
    ),
    "alter_unique": Case(
        [
            {
                "alter_column": {
                    "table": "orders",
                    "column": "legacy",
                    "unique": {"name": "orders_legacy_key"},
                    "up": "legacy || id",
                    "down": "legacy",
                }
            }
        ],
        "SELECT id, legacy || id FROM orders",
        "SELECT id, legacy FROM orders",
        "SELECT EXISTS (SELECT 1 FROM pg_constraint WHERE conname = 'orders_legacy_key' AND contype = 'u')",
    ),
    "alter_foreign_key": Case(
        [
            {
                "alter_column": {
                    "table": "orders",
                    "column": "customer_id",
                    "references": {"table": "customers", "column": "id"},
                }
            }
        ],
        "SELECT id, customer_id FROM orders",
        "SELECT id, customer_id FROM orders",
        "SELECT EXISTS (SELECT 1 FROM pg_constraint WHERE conname = 'orders_customer_id_fkey' AND contype = 'f' AND convalidated)",
    ),
    "alter_default_drop_not_null": Case(
        [{"alter_column": {"table": "orders", "column": "status", "default": "'paid'", "nullable": True}}],
        "SELECT id, status FROM orders",
        "SELECT id, status FROM orders",
        f"SELECT ({_col('orders', 'status')}) = 'text:false'",
    ),
    "create_index": Case(
        [{"create_index": {"name": "orders_amount_idx", "table": "orders", "columns": ["amount", "id"]}}],
        "SELECT id, amount FROM orders",
        "SELECT id, amount FROM orders",
        "SELECT indisvalid FROM pg_index WHERE indexrelid = 'public.orders_amount_idx'::regclass",
    ),
    "drop_index": Case(
        [{"drop_index": {"name": "orders_note_idx"}}],
        "SELECT id, note FROM orders",
        "SELECT id, note FROM orders",
        "SELECT to_regclass('public.orders_note_idx') IS NULL",
    ),
    "create_table": Case(
        [
            {
                "create_table": {
                    "name": "refunds",
                    "columns": [
                        {"name": "id", "type": "bigint", "primary_key": True, "nullable": False},
                        {
                            "name": "order_id",
                            "type": "bigint",
                            "nullable": False,
                            "references": {"table": "orders", "column": "id"},
                        },
                    ],
                }
            }
        ],
        "SELECT id FROM orders",
        "SELECT id FROM orders",
        "SELECT to_regclass('public.refunds') IS NOT NULL",
    ),
    "drop_table": Case(
        [{"drop_table": {"name": "archive"}}],
        "SELECT id FROM orders",
        "SELECT id FROM orders",
        "SELECT to_regclass('public.archive') IS NULL",
    ),
    "rename_table": Case(
        [{"rename_table": {"from": "archive", "to": "history"}}],
        "SELECT id, payload FROM archive",
        "SELECT id, payload FROM history",
        "SELECT to_regclass('public.archive') IS NULL AND to_regclass('public.history') IS NOT NULL",
        table="archive",
    ),
    "alter_type_serial_primary_key_referenced_by_fk": Case(
        [widen("tickets", "id")],
        "SELECT t.id, e.id FROM tickets t JOIN ticket_events e ON e.ticket_id = t.id",
        "SELECT t.id, e.id FROM tickets t JOIN ticket_events e ON e.ticket_id = t.id",
        f"SELECT ({_col('tickets', 'id')}) = 'bigint:true'"
        " AND (SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conname = 'tickets_pkey') = 'PRIMARY KEY (id)'"
        " AND (SELECT convalidated AND pg_get_constraintdef(oid) = 'FOREIGN KEY (ticket_id) REFERENCES tickets(id) ON DELETE CASCADE'"
        "      FROM pg_constraint WHERE conname = 'ticket_events_ticket_id_fkey')"
        " AND pg_get_serial_sequence('public.tickets', 'id') = 'public.tickets_id_seq'"
        " AND (SELECT data_type::text FROM pg_sequences WHERE sequencename = 'tickets_id_seq') = 'bigint'"
        " AND (SELECT pg_get_expr(adbin, adrelid) FROM pg_attrdef WHERE adrelid = 'public.tickets'::regclass"
        "      AND adnum = (SELECT attnum FROM pg_attribute WHERE attrelid = 'public.tickets'::regclass AND attname = 'id'))"
        "     = 'nextval(''tickets_id_seq''::regclass)'",
        table="tickets",
    ),
    "alter_type_unique_column": Case(
        [widen("tickets", "code")],
        "SELECT id, code FROM tickets",
        "SELECT id, code FROM tickets",
        f"SELECT ({_col('tickets', 'code')}) = 'bigint:true'"
        " AND (SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conname = 'tickets_code_key') = 'UNIQUE (code)'",
        table="tickets",
    ),
    "alter_type_column_in_check": Case(
        [widen("tickets", "score")],
        "SELECT id, score FROM tickets",
        "SELECT id, score FROM tickets",
        f"SELECT ({_col('tickets', 'score')}) = 'bigint:false'"
        " AND (SELECT convalidated AND pg_get_constraintdef(oid) = 'CHECK (((score >= 0) AND (score < 1000000)))'"
        "      FROM pg_constraint WHERE conname = 'tickets_score_check')",
        table="tickets",
    ),
    "alter_type_indexed_column": Case(
        [widen("tickets", "queue")],
        "SELECT id, queue FROM tickets",
        "SELECT id, queue FROM tickets",
        f"SELECT ({_col('tickets', 'queue')}) = 'bigint:false'"
        " AND pg_get_indexdef('public.tickets_queue_idx'::regclass)"
        "     = 'CREATE INDEX tickets_queue_idx ON public.tickets USING btree (queue) WHERE (queue IS NOT NULL)'",
        table="tickets",
    ),
    "alter_type_composite_key_column": Case(
        [widen("shipments", "line")],
        "SELECT order_id, line, qty FROM shipments",
        "SELECT order_id, line, qty FROM shipments",
        f"SELECT ({_col('shipments', 'line')}) = 'bigint:true'"
        " AND (SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conname = 'shipments_pkey')"
        "     = 'PRIMARY KEY (order_id, line)'",
        table="shipments",
    ),
    "alter_type_identity_column": Case(
        [widen("shipments", "serial_no")],
        "SELECT order_id, line, serial_no FROM shipments",
        "SELECT order_id, line, serial_no FROM shipments",
        f"SELECT ({_col('shipments', 'serial_no')}) = 'bigint:true'"
        " AND (SELECT attidentity FROM pg_attribute WHERE attrelid = 'public.shipments'::regclass AND attname = 'serial_no') = 'd'"
        " AND pg_get_serial_sequence('public.shipments', 'serial_no') = 'public.shipments_serial_no_seq'"
        " AND (SELECT last_value FROM shipments_serial_no_seq) >= (SELECT max(serial_no) FROM shipments)"
        # the identity's options carry over; the int-sized default maximum widens with the type
        " AND (SELECT (seqstart, seqincrement, seqmin, seqmax, seqcache, seqcycle) FROM pg_sequence"
        "      WHERE seqrelid = 'public.shipments_serial_no_seq'::regclass)"
        "     = (7::bigint, 3::bigint, 7::bigint, 9223372036854775807::bigint, 5::bigint, true)",
        table="shipments",
    ),
    "raw_sql": Case(
        [
            {
                "raw_sql": {
                    "up": "CREATE TABLE audit (id bigint PRIMARY KEY)",
                    "down": "DROP TABLE IF EXISTS audit",
                }
            }
        ],
        "SELECT id FROM orders",
        "SELECT id FROM orders",
        "SELECT to_regclass('public.audit') IS NOT NULL",
    ),
}


SERVERS = ["fresh_db", "older_db"]
"""Each round trip runs on the embedded PostgreSQL 18 and on the machine's PostgreSQL 14-17
package (flowyard's state staying on the embedded one): the generated SQL must not need 18."""


def _scalar(url: str, query: str, search_path: str = "public") -> Any:
    with connect(url, autocommit=True) as conn:
        conn.execute(f"SET search_path = {search_path}")
        return conn.execute(query).fetchone()[0]


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("server", SERVERS)
def test_start_then_rollback_restores_schema_and_data(
    server: str, state_db: str, name: str, request: pytest.FixtureRequest
) -> None:
    fresh_db = request.getfixturevalue(server)
    case = CASES[name]
    make_schema(fresh_db)
    dump_before = schema_dump(fresh_db)
    data_before = {t: checksum(fresh_db, f"SELECT * FROM {t}") for t in TABLES}
    plan = plan_for(fresh_db, state_db, {"name": f"rb_{name}"[:40], "operations": case.op})

    run(fresh_db, state_db, plan, "start")
    assert schema_dump(fresh_db) != dump_before, "start changed nothing"
    run(fresh_db, state_db, plan, "rollback")

    assert schema_dump(fresh_db) == dump_before
    assert {t: checksum(fresh_db, f"SELECT * FROM {t}") for t in TABLES} == data_before


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("server", SERVERS)
def test_start_then_complete_keeps_data_and_reaches_final_schema(
    server: str, state_db: str, name: str, request: pytest.FixtureRequest
) -> None:
    fresh_db = request.getfixturevalue(server)
    case = CASES[name]
    make_schema(fresh_db)
    expected = checksum(fresh_db, case.before)
    plan = plan_for(fresh_db, state_db, {"name": f"co_{name}"[:40], "operations": case.op})
    assert lint_plan(plan, lock_timeout_ms=200).warnings == []  # every generated statement passes the lint

    run(fresh_db, state_db, plan, "start")
    # During expand both versions answer, each through its own search_path.
    assert checksum(fresh_db, case.before, "public") == expected
    assert checksum(fresh_db, case.after, plan.version_schema) == expected
    run(fresh_db, state_db, plan, "complete")

    assert checksum(fresh_db, case.after) == expected
    assert checksum(fresh_db, case.after, plan.version_schema) == expected
    assert _scalar(fresh_db, case.final) is True
    assert (
        _scalar(
            fresh_db,
            "SELECT count(*) FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid "
            "WHERE c.relkind IN ('r', 'v') AND attname LIKE '\\_fy\\_%' AND NOT attisdropped",
        )
        == 0
    )
    assert _scalar(fresh_db, "SELECT count(*) FROM pg_trigger WHERE tgname LIKE '\\_fy\\_%'") == 0
    assert _scalar(fresh_db, "SELECT count(*) FROM pg_class WHERE relname LIKE '\\_fy\\_%'") == 0
    assert _scalar(fresh_db, "SELECT count(*) FROM pg_constraint WHERE conname LIKE '\\_fy\\_%'") == 0


def test_complete_leaves_statistics_for_the_swapped_in_column(fresh_db: str, state_db: str) -> None:
    """The bigint column that replaces orders.amount has statistics as soon as complete returns, with
    autovacuum off: without them the planner guesses for every query on the column."""
    rows = 3000  # amount = g % 700 + 1 takes 700 distinct values
    make_schema(fresh_db, rows=rows)
    with connect(fresh_db, autocommit=True) as conn:
        conn.execute("ALTER TABLE orders SET (autovacuum_enabled = false)")
        conn.execute("ANALYZE orders")  # the old column has statistics; its shadow will not
    plan = plan_for(fresh_db, state_db, {"name": "stats_after_swap", "operations": [WIDEN_AMOUNT]})
    run(fresh_db, state_db, plan, "start")
    run(fresh_db, state_db, plan, "complete")

    with connect(fresh_db, autocommit=True) as conn:
        amount_type, distinct = conn.execute(
            """
            SELECT format_type(a.atttypid, a.atttypmod),
                   -- NULL without statistics; a negative n_distinct is a fraction of the rows
                   (SELECT round(CASE WHEN s.n_distinct < 0 THEN -s.n_distinct * %s ELSE s.n_distinct END)
                    FROM pg_stats s WHERE s.tablename = 'orders' AND s.attname = a.attname)
            FROM pg_attribute a WHERE a.attrelid = 'orders'::regclass AND a.attname = 'amount'
            """,
            (rows,),
        ).fetchone()
    assert (amount_type, distinct) == ("bigint", 700)


def test_sync_expressions_resolve_types_whatever_the_writers_search_path(
    fresh_db: str, state_db: str
) -> None:
    """up/down may use the schema's own types (an enum) even when the writer's search_path lacks the schema."""
    make_schema(fresh_db, rows=10)
    plan = plan_for(fresh_db, state_db, {"name": "enum_path", "operations": CASES["alter_type_text_enum"].op})
    run(fresh_db, state_db, plan, "start")
    with connect(fresh_db, autocommit=True) as conn:
        conn.execute("SET search_path = pg_catalog")  # an old-version writer that qualifies its tables
        conn.execute("INSERT INTO public.orders (id, status) VALUES (101, 'paid')")
        conn.execute(f"SET search_path = {plan.version_schema}")  # a new-version writer, views only
        conn.execute("INSERT INTO orders (id, status) VALUES (102, 'paid')")
        conn.execute("SET search_path = public")
        rows = conn.execute(
            "SELECT id, status, _fy_new_status::text FROM orders WHERE id > 100 ORDER BY id"
        ).fetchall()
    assert rows == [(101, "paid", "paid"), (102, "paid", "paid")]


def test_set_not_null_runs_before_its_proving_check_is_dropped(fresh_db: str, state_db: str) -> None:
    """In one ALTER TABLE the DROP CONSTRAINT would run first and SET NOT NULL would scan the table under lock."""
    make_schema(fresh_db, rows=10)
    plan = plan_for(fresh_db, state_db, {"name": "nn_order", "operations": CASES["alter_set_not_null"].op})
    statements = [s for step in plan.complete for s in step.statements]
    set_nn = next(i for i, s in enumerate(statements) if "SET NOT NULL" in s)
    drop = next(i for i, s in enumerate(statements) if "DROP CONSTRAINT" in s)
    assert set_nn < drop and "DROP CONSTRAINT" not in statements[set_nn]


def test_both_versions_write_through_a_primary_key_type_change(fresh_db: str, state_db: str) -> None:
    """During expand of tickets.id int -> bigint both versions insert (numbered by the one sequence) and
    reference the new rows from ticket_events; after complete the key, the FK and the numbering hold."""
    make_schema(fresh_db, rows=10)
    plan = plan_for(fresh_db, state_db, {"name": "pk_writes", "operations": [widen("tickets", "id")]})
    run(fresh_db, state_db, plan, "start")
    with connect(fresh_db, autocommit=True) as conn:
        old_id = conn.execute("INSERT INTO tickets (code) VALUES (-1) RETURNING id").fetchone()[0]
        conn.execute(f"SET search_path = {plan.version_schema}")
        new_id = conn.execute("INSERT INTO tickets (code) VALUES (-2) RETURNING id").fetchone()[0]
        conn.execute(
            "INSERT INTO ticket_events VALUES (1001, %s, 'new'), (1002, %s, 'old')", (new_id, old_id)
        )
        conn.execute("SET search_path = public")
        assert conn.execute(
            "SELECT count(*) FROM tickets WHERE id IS DISTINCT FROM _fy_new_id OR id IS NULL"
        ).fetchone() == (0,)
        with pytest.raises(psycopg.errors.ForeignKeyViolation):  # the old FK and its twin both still check
            conn.execute("INSERT INTO ticket_events VALUES (1003, 999999, 'dangling')")
    run(fresh_db, state_db, plan, "complete")
    with connect(fresh_db, autocommit=True) as conn:
        assert conn.execute(
            "SELECT array_agg(e.id ORDER BY e.id) FROM ticket_events e JOIN tickets t ON t.id = e.ticket_id "
            "WHERE t.code < 0"
        ).fetchone() == ([1001, 1002],)
        next_id = conn.execute("INSERT INTO tickets (code) VALUES (-3) RETURNING id").fetchone()[0]
        assert next_id > max(old_id, new_id)
        with pytest.raises(psycopg.errors.ForeignKeyViolation):
            conn.execute("INSERT INTO ticket_events VALUES (1004, 999999, 'dangling')")


@contextmanager
def _widened(
    url: str, state: str, target: tuple[str, str], *setup: str | sql.Composable
) -> Iterator[psycopg.Connection]:
    """Run the ``setup`` statements, widen ``target`` (table, column) to bigint through start and
    complete, and yield a connection for checking the result."""
    with connect(url, autocommit=True) as conn:
        for statement in setup:
            conn.execute(statement)  # type: ignore[arg-type]
        table, column = target
        plan = plan_for(url, state, {"name": f"widen_{table}", "operations": [widen(table, column)]})
        run(url, state, plan, "start")
        run(url, state, plan, "complete")
        yield conn


def test_descending_identity_keeps_its_chosen_bound_and_widens_the_default_one(
    fresh_db: str, state_db: str
) -> None:
    """A countdown identity int -> bigint: its user-set MAXVALUE stays, its int-sized default MINVALUE
    becomes bigint's, and new rows continue the countdown below the old ones."""
    with _widened(
        fresh_db,
        state_db,
        ("countdown", "n"),
        "CREATE TABLE countdown (n int GENERATED ALWAYS AS IDENTITY "
        "(START WITH 100 INCREMENT BY -2 MAXVALUE 100) PRIMARY KEY, note text)",
        "INSERT INTO countdown (note) SELECT 'x' FROM generate_series(1, 10)",
    ) as conn:
        options = conn.execute(
            "SELECT seqtypid::regtype::text, seqstart, seqincrement, seqmin, seqmax, seqcycle FROM pg_sequence "
            "WHERE seqrelid = pg_get_serial_sequence('public.countdown', 'n')::regclass"
        ).fetchone()
        assert options == ("bigint", 100, -2, -(2**63), 100, False)
        assert conn.execute("INSERT INTO countdown (note) VALUES ('y') RETURNING n").fetchone() == (80,)
        assert conn.execute(
            "SELECT attidentity FROM pg_attribute WHERE attrelid = 'public.countdown'::regclass AND attname = 'n'"
        ).fetchone() == ("a",)


def test_long_constraint_names_get_distinct_expand_names(fresh_db: str, state_db: str) -> None:
    """Two 62-character CHECK names that differ only in their last character, both on the widened
    column: ``_fy_`` + name is over PostgreSQL's 63-byte limit, so cut-off expand-phase names would
    collide; both constraints must be rebuilt and take their own names back at complete."""
    first, second = "c" * 61 + "1", "c" * 61 + "2"
    with _widened(
        fresh_db,
        state_db,
        ("bounded", "v"),
        sql.SQL(
            "CREATE TABLE bounded (id int PRIMARY KEY, v int CONSTRAINT {} CHECK (v > 0) CONSTRAINT {} CHECK (v < 100))"
        ).format(sql.Identifier(first), sql.Identifier(second)),
        "INSERT INTO bounded SELECT g, g FROM generate_series(1, 20) g",
    ) as conn:
        checks = conn.execute(
            "SELECT conname, pg_get_constraintdef(oid), convalidated FROM pg_constraint "
            "WHERE conrelid = 'public.bounded'::regclass AND contype = 'c' ORDER BY conname"
        ).fetchall()
        assert checks == [(first, "CHECK ((v > 0))", True), (second, "CHECK ((v < 100))", True)]
        assert conn.execute(
            "SELECT format_type(atttypid, atttypmod) FROM pg_attribute "
            "WHERE attrelid = 'public.bounded'::regclass AND attname = 'v'"
        ).fetchone() == ("bigint",)


def test_user_views_on_a_swapped_or_dropped_column_are_refused_before_start(fresh_db: str, state_db: str) -> None:
    """Complete's DROP COLUMN/TABLE would fail halfway through the contract on a user's view (any
    schema, materialized too) or another schema's foreign key; the plan names it instead. A view on
    other columns is no obstacle."""
    make_schema(fresh_db, rows=10)
    with connect(fresh_db, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA reports")
        conn.execute("CREATE VIEW reports.scores AS SELECT id, score FROM tickets")
        conn.execute("CREATE MATERIALIZED VIEW reports.archive_copy AS SELECT * FROM archive")
        conn.execute("CREATE TABLE reports.escalations (ticket_id int REFERENCES public.tickets (id))")
    cases = [
        ("alter_column", [widen("tickets", "score")], "tickets.score is used by view reports.scores"),
        (
            "drop_column",
            [{"drop_column": {"table": "tickets", "column": "score"}}],
            "tickets.score is used by view reports.scores",
        ),
        ("drop_table", [{"drop_table": {"name": "archive"}}], "archive is used by view reports.archive_copy"),
        (
            "alter_column",
            [widen("tickets", "id")],
            "tickets.id is used by foreign key reports.escalations_ticket_id_fkey, view reports.scores",
        ),
    ]
    for n, (kind, operations, expected) in enumerate(cases):
        pattern = rf"operation 0 \({kind}\): {expected}, which complete would have to drop: drop (it|them) first"
        with pytest.raises(UserError, match=pattern):
            plan_for(fresh_db, state_db, {"name": f"outside_{n}", "operations": operations})
    plan = plan_for(fresh_db, state_db, {"name": "views_other", "operations": [widen("tickets", "queue")]})
    run(fresh_db, state_db, plan, "start")
    run(fresh_db, state_db, plan, "complete")
    with connect(fresh_db, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM reports.scores").fetchone() == (300,)


def test_a_second_migration_may_alter_columns_the_previous_version_views_read(
    fresh_db: str, state_db: str
) -> None:
    """The previous migration's version schema has views on every column; they are flowyard's own
    (dropped at the next complete), so they do not block the next migration."""
    make_schema(fresh_db, rows=10)
    first = plan_for(fresh_db, state_db, {"name": "first", "operations": [widen("tickets", "queue")]})
    run(fresh_db, state_db, first, "start")
    run(fresh_db, state_db, first, "complete")
    second = plan_for(fresh_db, state_db, {"name": "second", "operations": [widen("tickets", "score")]})
    assert second.previous_schema == first.version_schema
    run(fresh_db, state_db, second, "start")
    run(fresh_db, state_db, second, "complete")
    with connect(fresh_db, autocommit=True) as conn:
        assert conn.execute(_col("tickets", "score")).fetchone() == ("bigint:false",)
