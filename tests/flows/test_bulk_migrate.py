"""bulk-migrate end to end: real embedded PostgreSQL, real SQLite files, real Prefect server,
a real worker process killed with SIGKILL."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import sys
import threading
import time
import uuid
from decimal import Decimal
from typing import Any

import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from psycopg import sql

from flows.bulk_migrate import bulk_migrate
from tasks.chunk_plan import Chunk
from tasks.db import connect, database_name, drop_database, ensure_database
from tasks.errors import ServerReadOnly, UserError
from tasks.process_group import spawn_group
from tasks.state import state_url
from tasks.table_checksum import Checksum, checksum
from tests.conftest import ROOT, flow_run_artifacts, recorded_task_runs, run_cli
from tests.process_support import until_its_sessions_end

pytestmark = pytest.mark.usefixtures("prefect_api")


def _exec(url: str, *statements: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement)


def _fetch(url: str, query: str, params: tuple = ()) -> list[tuple]:
    with connect(url, utc=True) as conn:
        return conn.execute(query, params).fetchall()


def _sum(url: str, table: str, columns: list[str]):
    schema, name = table.split(".")
    with connect(url, utc=True) as conn:
        return checksum(conn, sql.Identifier(schema, name), columns)


def _copy_runs(flow_state, chunks: int) -> list:
    """The copy-chunk task runs of one flow run, read back from the Prefect API once all
    ``chunks`` of them are recorded in a final state."""
    return recorded_task_runs(flow_state, "copy ", chunks)


def _task_states(flow_state, chunks: int) -> list[str]:
    """State names of the copy-chunk task runs of one flow run."""
    return [r.state.name for r in _copy_runs(flow_state, chunks)]


@pytest.fixture()
def target_db(pg):
    name = f"tgt_{uuid.uuid4().hex[:10]}"
    ensure_database(pg.url(), name)
    yield pg.url(name)
    drop_database(pg.url(), name)


ORDER_COLUMNS = ["id", "account_id", "amount", "placed", "tags", "doc", "blob", "note"]


def _shop(url: str, orders: int = 2000) -> None:
    _exec(
        url,
        "CREATE TABLE accounts (id bigserial PRIMARY KEY, name text NOT NULL UNIQUE)",
        "CREATE TABLE orders (id int PRIMARY KEY, account_id bigint REFERENCES accounts, amount numeric(12,2),"
        " placed timestamptz, tags text[], doc jsonb, blob bytea, note text CHECK (note <> 'x'))",
        "CREATE INDEX orders_account ON orders (account_id)",
        "INSERT INTO accounts (name) SELECT 'acct ' || g FROM generate_series(1, 50) g",
        f"INSERT INTO orders SELECT g, 1 + g % 50, g * 1.25, '2024-01-01 00:00+02'::timestamptz + g * interval '1 h',"
        " ARRAY['a', NULL, 'ü ' || g], jsonb_build_object('g', g, 'ключ', 'значение 😀'), decode(md5(g::text), 'hex'),"
        " CASE WHEN g % 7 = 0 THEN NULL WHEN g % 11 = 0 THEN '' ELSE 'naïve \"q\" , ' || chr(10) || 'line' END"
        f" FROM generate_series(1, {orders}) g",
    )


def test_full_copy_equals_source_with_ddl_and_rerun_is_cached(fresh_db, target_db):
    _shop(fresh_db)
    state = bulk_migrate(fresh_db, target_db, chunk_rows=300, parallelism=3, return_state=True)
    report = state.result()

    assert _sum(target_db, "public.orders", ORDER_COLUMNS) == _sum(fresh_db, "public.orders", ORDER_COLUMNS)
    assert _sum(target_db, "public.accounts", ["id", "name"]) == _sum(
        fresh_db, "public.accounts", ["id", "name"]
    )
    assert {t["table"]: t["rows"] for t in report["tables"]} == {"public.accounts": 50, "public.orders": 2000}
    assert all("MISMATCH" not in t["validation"] for t in report["tables"])
    # NULL and empty string stay distinct, unicode/bytea/arrays/jsonb/timestamptz survive byte for byte
    probe = "SELECT id, note IS NULL, note, tags::text, doc::text, encode(blob, 'hex'), placed FROM orders WHERE id IN (7, 11, 12) ORDER BY id"
    assert _fetch(target_db, probe) == _fetch(fresh_db, probe)
    # post-data: PK, unique, index, check, validated FK, sequence past the max
    constraints = "SELECT conname, contype, convalidated, pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = 'orders'::regclass ORDER BY 1"
    assert _fetch(target_db, constraints) == _fetch(fresh_db, constraints)
    assert {"orders_pkey", "orders_note_check", "orders_account_id_fkey"} <= {
        c[0] for c in _fetch(target_db, constraints)
    }
    assert _fetch(target_db, "SELECT count(*) FROM pg_indexes WHERE indexname = 'orders_account'") == [(1,)]
    assert report["integrity"] == {"fk_orphans": [], "invalid_indexes": [], "indexes_present": []}
    states = _task_states(state, 8)
    assert len(states) == 8 and "Cached" not in states
    artifacts = {a.type: a for a in flow_run_artifacts(state)}
    assert artifacts["progress"].data == 100.0 and "rows/s" in artifacts["progress"].description
    table = (
        json.loads(artifacts["table"].data)
        if isinstance(artifacts["table"].data, str)
        else artifacts["table"].data
    )
    assert {row["table"]: row["rows"] for row in table} == {"public.accounts": 50, "public.orders": 2000}
    assert set(table[0]) == {"table", "rows", "chunks", "seconds", "rows/s", "validation"}

    again = bulk_migrate(fresh_db, target_db, chunk_rows=300, parallelism=3, return_state=True)
    assert again.result()["run_key"] == report["run_key"]
    assert set(_task_states(again, 8)) == {"Cached"}

    assert _fetch(target_db, "INSERT INTO accounts (name) VALUES ('new') RETURNING id") == [(51,)]
    _exec(target_db, "UPDATE orders SET amount = 0 WHERE id = 1000")
    with pytest.raises(UserError, match=r"orders chunks: key\["):
        bulk_migrate(fresh_db, target_db, chunk_rows=300, parallelism=3)


def test_tables_named_with_dots_quotes_and_pattern_characters_copy(fresh_db, target_db):
    """Names were split at their last dot and put into pg_dump patterns without doubling their
    quotes: one such table failed a whole-database copy. A pattern's * and ? must not match
    other tables either (axbyc is not copied when only a*b?c is)."""
    tables = ['public."my.table"', 'public."we""ird"', '"my.schema"."a.b"', 'public."a*b?c"', "public.axbyc"]
    _exec(fresh_db, 'CREATE SCHEMA "my.schema"')
    for number, table in enumerate(tables, 1):
        _exec(fresh_db, f"CREATE TABLE {table} (id int PRIMARY KEY)", f"INSERT INTO {table} VALUES ({number})")
    report = bulk_migrate(fresh_db, target_db)
    assert {t["table"]: t["rows"] for t in report["tables"]} == {
        'public."my.table"': 1,
        'public."we""ird"': 1,
        '"my.schema"."a.b"': 1,
        "public.a*b?c": 1,
        "public.axbyc": 1,
    }
    assert all("MISMATCH" not in t["validation"] for t in report["tables"])
    assert [_fetch(target_db, f"SELECT id FROM {table}") for table in tables] == [[(n,)] for n in range(1, 6)]

    _exec(target_db, "DROP TABLE axbyc, \"a*b?c\"")
    only = bulk_migrate(fresh_db, target_db, tables=["a*b?c", "my.table"], restart=True)
    assert [t["table"] for t in only["tables"]] == ["public.a*b?c", 'public."my.table"']
    assert _fetch(target_db, "SELECT to_regclass('public.axbyc') IS NULL") == [(True,)]


def test_chunk_checksums_are_taken_in_the_copy_snapshot_and_checked_against_the_target(fresh_db, target_db):
    """Each direct chunk records the source checksum of exactly the rows it sent (same snapshot
    as its COPY OUT); validation compares those with the target, so a source row changed after
    the load does not fail re-verification, while a changed target row does."""
    _shop(fresh_db, orders=900)
    bulk_migrate(fresh_db, target_db, chunk_rows=300, parallelism=2)
    recorded = _fetch(
        target_db,
        "SELECT chunk_id, rows_written, sent_checksum FROM flowyard.bulk_chunks WHERE source_table = 'public.orders'",
    )
    plan = _fetch(target_db, "SELECT plan FROM flowyard.bulk_plans WHERE source_table = 'public.orders'")[0][
        0
    ]
    chunks = [Chunk.from_json(c) for c in plan]
    assert len(chunks) == 3
    assert {r[0]: Checksum(r[1], int(r[2])) for r in recorded} == {
        c.chunk_id: _chunk_sum(fresh_db, c) for c in chunks
    }

    # The sample check re-reads the live source, so it would (rightly) see the later change
    # whenever it draws row 5: only the snapshot-based checks are under test here.
    snapshot_checks = ["count", "checksum"]
    _exec(fresh_db, "UPDATE orders SET note = 'changed later' WHERE id = 5")
    again = bulk_migrate(fresh_db, target_db, chunk_rows=300, parallelism=2, validate=snapshot_checks)
    assert all("MISMATCH" not in t["validation"] for t in again["tables"])
    _exec(target_db, "DELETE FROM orders WHERE id = 850")
    with pytest.raises(UserError, match=re.escape(f"orders chunks: {chunks[-1].chunk_id}")):
        bulk_migrate(fresh_db, target_db, chunk_rows=300, parallelism=2, validate=snapshot_checks)


def _chunk_sum(url: str, chunk: Chunk) -> Checksum:
    with connect(url, utc=True) as conn:
        return checksum(conn, sql.Identifier("public", "orders"), ORDER_COLUMNS, *chunk.pg_filter(["id"]))


def test_mapping_passes_untouched_columns_through_as_text_byte_for_byte(fresh_db, target_db):
    """A rename-only mapping takes the Arrow path with every column as PostgreSQL text: arrays,
    jsonb, bytea, timestamptz, NULL vs empty string and quotes/newlines arrive unchanged."""
    _shop(fresh_db, orders=400)
    mapping = {"orders": {"target": "orders_v2", "rename": {"note": "remark"}}}
    report = bulk_migrate(fresh_db, target_db, tables=["orders"], mapping=mapping, chunk_rows=150)
    assert "MISMATCH" not in report["tables"][0]["validation"]
    columns = ", ".join(ORDER_COLUMNS[:-1])
    probe = "SELECT {}, {} IS NULL, {} FROM {} ORDER BY id"
    assert _fetch(target_db, probe.format(columns, "remark", "remark", "orders_v2")) == _fetch(
        fresh_db, probe.format(columns, "note", "note", "orders")
    )


def test_table_copied_under_a_new_name_keeps_keys_indexes_checks_and_foreign_keys(fresh_db):
    """A mapping with only a ``target`` used to create a bare table with a primary key at most: no
    unique constraint, index, CHECK or foreign key. Copied within one database, so the copies'
    index names must not clash with the source's, and the foreign key must reach the copied parent."""
    _exec(
        fresh_db,
        "CREATE TABLE accounts (id int PRIMARY KEY, name text NOT NULL)",
        "CREATE TABLE orders (id int PRIMARY KEY, account_id int REFERENCES accounts, sku text NOT NULL,"
        " amount numeric CONSTRAINT positive CHECK (amount > 0), CONSTRAINT orders_sku UNIQUE (sku))",
        "CREATE INDEX orders_account ON orders (account_id)",
        "CREATE INDEX orders_big ON orders (amount) WHERE amount > 1000",
        "INSERT INTO accounts SELECT g, 'acct ' || g FROM generate_series(1, 20) g",
        "INSERT INTO orders SELECT g, 1 + g % 20, 'sku-' || g, g * 1.5 FROM generate_series(1, 900) g",
    )
    mapping = {"accounts": {"target": "accounts_v2"}, "orders": {"target": "sales.orders_v2"}}
    report = bulk_migrate(fresh_db, fresh_db, tables=["accounts", "orders"], mapping=mapping, chunk_rows=200)

    constraints = (
        "SELECT conname, contype, convalidated, pg_get_constraintdef(oid) FROM pg_constraint"
        " WHERE conrelid = 'sales.orders_v2'::regclass AND contype <> 'n' ORDER BY 2"
    )
    assert _fetch(fresh_db, constraints) == [
        ("positive", "c", True, "CHECK ((amount > (0)::numeric))"),
        ("orders_account_id_fkey", "f", True, "FOREIGN KEY (account_id) REFERENCES accounts_v2(id)"),
        ("orders_v2_pkey", "p", True, "PRIMARY KEY (id)"),
        ("orders_v2_sku_key", "u", True, "UNIQUE (sku)"),
    ]
    indexes = "SELECT indexdef FROM pg_indexes WHERE schemaname = 'sales' AND tablename = 'orders_v2' ORDER BY 1"
    assert _fetch(fresh_db, indexes) == [
        ("CREATE INDEX orders_v2_account_id_idx ON sales.orders_v2 USING btree (account_id)",),
        ("CREATE INDEX orders_v2_amount_idx ON sales.orders_v2 USING btree (amount) WHERE (amount > (1000)::numeric)",),
        ("CREATE UNIQUE INDEX orders_v2_pkey ON sales.orders_v2 USING btree (id)",),
        ("CREATE UNIQUE INDEX orders_v2_sku_key ON sales.orders_v2 USING btree (sku)",),
    ]
    columns = ["id", "account_id", "sku", "amount"]
    assert _sum(fresh_db, "sales.orders_v2", columns) == _sum(fresh_db, "public.orders", columns)
    assert _sum(fresh_db, "public.accounts_v2", ["id", "name"]) == _sum(fresh_db, "public.accounts", ["id", "name"])
    assert {t["table"]: t["rows"] for t in report["tables"]} == {"public.accounts_v2": 20, "sales.orders_v2": 900}
    assert all("MISMATCH" not in t["validation"] for t in report["tables"])
    assert report["integrity"] == {"fk_orphans": [], "invalid_indexes": [], "indexes_present": []}


COLUMN_DEFINITIONS = """
SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull, a.attcollation::regcollation::text,
       a.attidentity, a.attgenerated, regexp_replace(pg_get_expr(d.adbin, d.adrelid), '[a-z_0-9.]*_seq', 'SEQ'),
       s.seqstart, s.seqincrement, s.seqmin, s.seqmax, s.seqcache, s.seqcycle,
       pg_get_serial_sequence(a.attrelid::regclass::text, a.attname) IS NOT NULL
FROM pg_attribute a
LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
LEFT JOIN pg_sequence s ON s.seqrelid = pg_get_serial_sequence(a.attrelid::regclass::text, a.attname)::regclass
WHERE a.attrelid = %s::regclass AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum
"""


@pytest.mark.parametrize("same_database", [False, True], ids=["other-database", "same-database"])
def test_table_copied_under_a_new_name_keeps_its_column_definitions(fresh_db, target_db, same_database):
    """A copy under another name used to get bare typed columns: no serial default or sequence, no
    identity, no default, no collation, and a generated column left NULL on every row. Inserting
    into the copy then failed or gave other values than the source."""
    target = fresh_db if same_database else target_db
    _exec(
        fresh_db,
        "CREATE TABLE tickets (id serial PRIMARY KEY,"
        " code bigint GENERATED ALWAYS AS IDENTITY (START WITH 100 INCREMENT BY 5 MINVALUE 100),"
        " label text COLLATE \"C\" NOT NULL DEFAULT 'new', opened date DEFAULT current_date,"
        " label_len int GENERATED ALWAYS AS (length(label) * 2) STORED)",
        "INSERT INTO tickets (label, opened) SELECT 'ticket ' || g, date '2026-01-01' + g FROM generate_series(1, 30) g",
    )
    report = bulk_migrate(fresh_db, target, tables=["tickets"], mapping={"tickets": {"target": "archive.tickets_v2"}})

    source_columns = _fetch(fresh_db, COLUMN_DEFINITIONS, ("public.tickets",))
    assert _fetch(target, COLUMN_DEFINITIONS, ("archive.tickets_v2",)) == source_columns
    assert [c[0] for c in source_columns if c[-1]] == ["id", "code"]  # both own a sequence
    rows = "SELECT id, code, label, opened, label_len FROM {} ORDER BY id"
    assert _fetch(target, rows.format("archive.tickets_v2")) == _fetch(fresh_db, rows.format("public.tickets"))
    assert report["tables"][0]["rows"] == 30 and "MISMATCH" not in report["tables"][0]["validation"]
    # the copy goes on where the source would: sequences past the loaded maximum, defaults, generation
    insert = "INSERT INTO {} (label) VALUES ('fresh') RETURNING id, code, label, opened = current_date, label_len"
    expected = _fetch(fresh_db, insert.format("public.tickets"))
    assert expected == [(31, 250, "fresh", True, 10)]
    assert _fetch(target, insert.format("archive.tickets_v2")) == expected


def test_copy_within_one_database_refuses_tables_copied_onto_themselves(fresh_db):
    """Each table that is its own target used to be truncated, then copied from itself (now
    empty): a copy within one database renaming one table emptied every other one."""
    _exec(
        fresh_db,
        "CREATE TABLE orders (id int PRIMARY KEY, v text)",
        "INSERT INTO orders SELECT g, 'o' FROM generate_series(1, 100) g",
        "CREATE TABLE customers (id int PRIMARY KEY, name text)",
        "INSERT INTO customers SELECT g, 'c' FROM generate_series(1, 100) g",
    )
    same = fresh_db.replace("127.0.0.1", "localhost")  # another spelling of the same database
    with pytest.raises(UserError) as err:
        bulk_migrate(fresh_db, same, mapping={"orders": {"target": "orders_v2"}})
    assert str(err.value) == (
        "source and target are the same database: public.customers would be copied onto itself; "
        "leave it out (tables=['public.orders']) or give it a mapping `target`"
    )
    with pytest.raises(UserError, match=r"^source and target are the same database: public.orders would be"):
        bulk_migrate(fresh_db, fresh_db, tables=["orders"])
    with pytest.raises(UserError) as err:
        bulk_migrate(fresh_db, fresh_db, mapping={"orders": {"target": "customers"}, "customers": {"target": "c2"}})
    assert str(err.value) == (
        "source and target are the same database: public.orders would be copied into public.customers, "
        "which this copy also reads (and would empty first); give public.orders a mapping `target` that no "
        "copied table has, or copy in two runs"
    )
    counts = "SELECT (SELECT count(*) FROM orders), (SELECT count(*) FROM customers), to_regclass('orders_v2')"
    assert _fetch(fresh_db, counts) == [(100, 100, None)]
    report = bulk_migrate(fresh_db, same, tables=["orders"], mapping={"orders": {"target": "orders_v2"}})
    assert report["tables"][0]["rows"] == 100
    assert _fetch(fresh_db, "SELECT count(*) FROM orders_v2") == [(100,)]


def test_copy_under_a_new_name_needing_a_missing_function_is_one_line(fresh_db, target_db):
    _exec(
        fresh_db,
        "CREATE FUNCTION next_code() RETURNS text LANGUAGE sql AS $$ SELECT 'c-' || random() $$",
        "CREATE TABLE codes (id int PRIMARY KEY, code text DEFAULT next_code())",
    )
    with pytest.raises(UserError) as err:
        bulk_migrate(fresh_db, target_db, tables=["codes"], mapping={"codes": {"target": "codes_v2"}})
    assert str(err.value) == (
        "cannot create public.codes_v2 like public.codes: function next_code() does not exist in the target "
        "(a default, generated column or CHECK uses it); create it in the target first"
    )


def test_existing_target_with_other_column_types_gets_values_not_reinterpreted_bytes(fresh_db, target_db):
    """The binary pipe used to hand an existing target of other types the source type's bytes:
    int into real gave 1e-45, date into integer gave day numbers, and a count check said ok."""
    _exec(
        fresh_db,
        "CREATE TABLE h (id int PRIMARY KEY, v int, d date, n numeric(6,2))",
        "INSERT INTO h SELECT g, g * 1000, date '2024-01-01' + g, g + 0.25 FROM generate_series(1, 3) g",
        "CREATE TABLE k (id int PRIMARY KEY, d date)",
        "INSERT INTO k VALUES (1, '2024-01-02')",
    )
    _exec(
        target_db,
        "CREATE TABLE h (id bigint PRIMARY KEY, v real, d timestamp, n numeric(8,3))",
        "CREATE TABLE k (id int PRIMARY KEY, d integer)",
    )
    report = bulk_migrate(fresh_db, target_db, tables=["h"])
    assert _fetch(target_db, "SELECT id, v, d::text, n::text FROM h ORDER BY id") == [
        (1, 1000.0, "2024-01-02 00:00:00", "1.250"),
        (2, 2000.0, "2024-01-03 00:00:00", "2.250"),
        (3, 3000.0, "2024-01-04 00:00:00", "3.250"),
    ]
    assert "MISMATCH" not in report["tables"][0]["validation"]
    with pytest.raises(UserError) as err:
        bulk_migrate(fresh_db, target_db, tables=["k"], validate=["count"])
    assert str(err.value) == (
        "1 of 1 chunks failed (committed chunks resume on rerun): chunk public.k key[,) holds a value the "
        'target column cannot take: invalid input syntax for type integer: "2024-01-02" (row 1 of the chunk, '
        "column d); fix the source value, or cast or filter it in the mapping, or alter the column of public.k"
    )
    assert _fetch(target_db, "SELECT count(*) FROM k") == [(0,)]


def test_target_index_unlike_the_sources_fails_the_run_naming_table_and_index(fresh_db, target_db):
    """An existing target table is kept, and so is its index of the source index's name but on
    another column: the run used to pass with the source's index missing from the target."""
    _exec(
        fresh_db,
        "CREATE TABLE items (id int PRIMARY KEY, sku text, price numeric)",
        "CREATE INDEX items_price ON items (price)",
        "INSERT INTO items SELECT g, 'sku-' || g, g FROM generate_series(1, 50) g",
    )
    _exec(
        target_db,
        "CREATE TABLE items (id int PRIMARY KEY, sku text, price numeric)",
        "CREATE INDEX items_price ON items (sku)",
    )
    with pytest.raises(UserError) as err:
        bulk_migrate(fresh_db, target_db)
    assert "index_missing public.items: no index items_price (USING btree (price)) as in the source" in str(err.value)
    assert "\n" not in str(err.value)


def _committed(url: str) -> dict[str, tuple]:
    rows = _fetch(url, "SELECT chunk_id, flow_run_id, completed_at FROM flowyard.bulk_chunks")
    return {r[0]: (r[1], r[2]) for r in rows}


@pytest.mark.parametrize(
    "mapping", [None, {"events": {"compute": {"size": "utf8_length(payload)"}}}], ids=["identical", "mapped"]
)
def test_sigkill_mid_run_then_rerun_loads_each_chunk_exactly_once(fresh_db, target_db, tmp_path, mapping):
    _exec(
        fresh_db,
        "CREATE TABLE events (id bigint PRIMARY KEY, payload text)",
        "INSERT INTO events SELECT g, repeat(md5(g::text), 16) FROM generate_series(1, 300000) g",
    )
    script = (
        "import json, sys; from flows.bulk_migrate import bulk_migrate; "
        "bulk_migrate(sys.argv[1], sys.argv[2], chunk_rows=10000, parallelism=2, validate=[],"
        " mapping=json.loads(sys.argv[3]))"
    )
    log = (tmp_path / "worker.log").open("wb")
    worker = spawn_group(
        [sys.executable, "-c", script, fresh_db, target_db, json.dumps(mapping)], cwd=ROOT, env=os.environ, stdout=log, stderr=log
    )
    committed: dict[str, tuple] = {}
    while len(committed) < 3:
        assert worker.poll() is None, (tmp_path / "worker.log").read_text()[-2000:]
        try:
            committed = _committed(target_db)
        except psycopg.errors.UndefinedTable:
            pass
        time.sleep(0.02)
    os.killpg(worker.pid, signal.SIGKILL)
    worker.wait()
    until_its_sessions_end(target_db)
    before = _committed(target_db)
    assert 3 <= len(before) < 30, "the kill must land while chunks are still in flight"
    assert _fetch(target_db, "SELECT count(*) FROM events")[0][0] < 300000
    status = run_cli("bulk", "status", "--target", target_db).stdout
    assert f"(stopped before it finished (no process holds its lock); run the same copy again to resume): {len(before)}/30 chunks" in status

    state = bulk_migrate(fresh_db, target_db, chunk_rows=10000, parallelism=2, mapping=mapping, return_state=True)
    state.result()

    assert _fetch(target_db, "SELECT count(*), count(DISTINCT id) FROM events") == [(300000, 300000)]
    if mapping:
        assert _fetch(target_db, "SELECT count(*) FROM events WHERE size IS DISTINCT FROM length(payload)") == [(0,)]
    assert _sum(target_db, "public.events", ["id", "payload"]) == _sum(
        fresh_db, "public.events", ["id", "payload"]
    )
    after = _committed(target_db)
    assert len(after) == 30
    assert {k: after[k] for k in before} == before, "chunks committed before the kill were not copied again"
    states = _task_states(state, 30)
    assert states.count("Cached") >= 1 and len(states) == 30


def test_incremental_copies_only_new_and_changed_rows(fresh_db, target_db):
    _exec(
        fresh_db,
        "CREATE TABLE items (id int PRIMARY KEY, name text, updated_at timestamptz NOT NULL)",
        "INSERT INTO items SELECT g, 'item ' || g, '2024-01-01'::timestamptz + g * interval '1 min' FROM generate_series(1, 1000) g",
    )
    first = bulk_migrate(fresh_db, target_db, mode="incremental", cursor_column="updated_at", chunk_rows=200)
    assert first["tables"][0]["rows"] == 1000
    untouched_xmin = _fetch(target_db, "SELECT xmin::text FROM items WHERE id = 500")
    _exec(
        fresh_db,
        "UPDATE items SET name = 'changed', updated_at = '2025-01-01' WHERE id IN (3, 600)",
        "INSERT INTO items SELECT g, 'new ' || g, '2025-01-02' FROM generate_series(1001, 1005) g",
    )
    second = bulk_migrate(fresh_db, target_db, mode="incremental", cursor_column="updated_at", chunk_rows=200)
    assert second["run_key"] != first["run_key"]
    assert second["tables"][0]["rows"] == 7
    assert _fetch(target_db, "SELECT name FROM items WHERE id IN (3, 600) ORDER BY id") == [
        ("changed",),
        ("changed",),
    ]
    assert _fetch(target_db, "SELECT xmin::text FROM items WHERE id = 500") == untouched_xmin
    cols = ["id", "name", "updated_at"]
    assert _sum(target_db, "public.items", cols) == _sum(fresh_db, "public.items", cols)
    third = bulk_migrate(fresh_db, target_db, mode="incremental", cursor_column="updated_at", chunk_rows=200)
    assert third["tables"][0]["rows"] == 0


def _chunk_rows(url: str, run_key: str) -> tuple[int, int]:
    """Rows read and written by the chunks a run committed."""
    return _fetch(
        url,
        "SELECT coalesce(sum(rows_read), 0)::int, coalesce(sum(rows_written), 0)::int FROM flowyard.bulk_chunks WHERE run_key = %s",
        (run_key,),
    )[0]


def _sqlite_items(path, rows: list[tuple[int, str, str]]) -> None:
    with sqlite3.connect(path) as db:
        db.execute(
            "CREATE TABLE IF NOT EXISTS items (id INTEGER PRIMARY KEY, name TEXT, updated_at DATETIME NOT NULL)"
        )
        db.executemany("INSERT OR REPLACE INTO items VALUES (?, ?, ?)", rows)


def test_incremental_from_sqlite_copies_only_new_and_changed_rows(target_db, tmp_path):
    """SQLite sources used to be refused in incremental mode."""
    path = tmp_path / "app.db"
    _sqlite_items(path, [(i, f"item {i}", f"2024-01-01 {i // 60:02d}:{i % 60:02d}:00") for i in range(1, 1001)])
    source = f"sqlite:///{path}"
    with pytest.raises(UserError, match=r"cursor column 'changed_at' is not a column of items; set cursor_column"):
        bulk_migrate(source, target_db, mode="incremental", cursor_column="changed_at")
    first = bulk_migrate(source, target_db, mode="incremental", cursor_column="updated_at", chunk_rows=200)
    assert first["tables"][0]["rows"] == 1000 and first["tables"][0]["chunks"] == 5
    untouched_xmin = _fetch(target_db, "SELECT xmin::text FROM items WHERE id = 500")
    _sqlite_items(
        path,
        [(3, "changed", "2025-01-01 00:00:00"), (600, "changed", "2025-01-01 00:00:00")]
        + [(i, f"new {i}", "2025-01-02 00:00:00") for i in range(1001, 1006)],
    )
    second = bulk_migrate(source, target_db, mode="incremental", cursor_column="updated_at", chunk_rows=200)
    assert second["tables"][0]["rows"] == 7
    assert _chunk_rows(target_db, second["run_key"]) == (7, 7)
    assert "MISMATCH" not in second["tables"][0]["validation"]
    assert _fetch(target_db, "SELECT xmin::text FROM items WHERE id = 500") == untouched_xmin
    with sqlite3.connect(path) as db:
        expected = db.execute("SELECT id, name, updated_at FROM items ORDER BY id").fetchall()
    copied = "SELECT id, name, to_char(updated_at, 'YYYY-MM-DD HH24:MI:SS') FROM items ORDER BY id"
    assert _fetch(target_db, copied) == expected
    third = bulk_migrate(source, target_db, mode="incremental", cursor_column="updated_at", chunk_rows=200)
    assert third["tables"][0]["rows"] == 0


@pytest.mark.parametrize("kind", ["postgres", "sqlite"])
def test_incremental_cursor_defaults_to_the_key(kind, fresh_db, target_db, tmp_path):
    """Without cursor_column an append-only table moves by its single-column key."""
    if kind == "postgres":
        source = fresh_db
        _exec(fresh_db, "CREATE TABLE items (id int PRIMARY KEY, name text, updated_at timestamp NOT NULL)")

        def add(ids: range) -> None:
            _exec(
                fresh_db,
                "INSERT INTO items SELECT g, 'item ' || g, '2024-01-01' "
                f"FROM generate_series({ids.start}, {ids.stop - 1}) g",
            )
    else:
        source = f"sqlite:///{tmp_path / 'app.db'}"

        def add(ids: range) -> None:
            _sqlite_items(tmp_path / "app.db", [(i, f"item {i}", "2024-01-01 00:00:00") for i in ids])

    add(range(1, 301))
    first = bulk_migrate(source, target_db, mode="incremental", chunk_rows=100)
    assert first["tables"][0]["rows"] == 300
    add(range(301, 311))
    second = bulk_migrate(source, target_db, mode="incremental", chunk_rows=100)
    assert second["tables"][0]["rows"] == 10
    assert _chunk_rows(target_db, second["run_key"]) == (10, 10)
    assert _fetch(target_db, "SELECT count(*), max(id) FROM items") == [(310, 310)]


@pytest.mark.parametrize("kind", ["postgres", "sqlite", "files"])
def test_incremental_first_pass_copies_rows_whose_cursor_is_null(kind, fresh_db, target_db, tmp_path):
    """No cursor comparison selects a NULL: those rows were never copied, and the pass then failed
    its count check, as did every rerun. The first pass takes them; later passes move past the
    saved cursor only."""
    rows = [(i, f"item {i}", None if i % 10 == 0 else f"2024-01-01 00:{i:02d}:00") for i in range(1, 51)]
    mapping = {"items": {"key": ["id"], "cursor": "updated_at"}} if kind != "postgres" else {}

    def write(rows: list[tuple[int, str, str | None]]) -> str:
        if kind == "postgres":
            _exec(fresh_db, "CREATE TABLE IF NOT EXISTS items (id int PRIMARY KEY, name text, updated_at timestamp)")
            with psycopg.connect(fresh_db, autocommit=True) as conn:
                conn.cursor().executemany("INSERT INTO items VALUES (%s, %s, %s)", rows)
            return fresh_db
        if kind == "sqlite":
            with sqlite3.connect(tmp_path / "app.db") as db:
                db.execute("CREATE TABLE IF NOT EXISTS items (id INTEGER PRIMARY KEY, name TEXT, updated_at DATETIME)")
                db.executemany("INSERT INTO items VALUES (?, ?, ?)", rows)
            return f"sqlite:///{tmp_path / 'app.db'}"
        lines = [json.dumps({"id": i, "name": n, "updated_at": at}) for i, n, at in rows]
        with (tmp_path / "items.jsonl").open("a") as out:
            out.write("\n".join(lines) + "\n")
        return str(tmp_path)

    source = write(rows)
    options = {"mode": "incremental", "cursor_column": "updated_at", "mapping": mapping, "chunk_rows": 20}
    first = bulk_migrate(source, target_db, **options)
    assert first["tables"][0]["rows"] == 50 and "MISMATCH" not in first["tables"][0]["validation"]
    assert _fetch(target_db, "SELECT count(*), count(updated_at) FROM items") == [(50, 45)]
    write([(51, "new", "2024-06-01 00:00:00")])
    second = bulk_migrate(source, target_db, **options)
    assert second["tables"][0]["rows"] == 1 and "MISMATCH" not in second["tables"][0]["validation"]
    assert _fetch(target_db, "SELECT count(*), count(updated_at) FROM items") == [(51, 46)]


def _items_source(kind: str, url: str, tmp_path) -> tuple[str, dict[str, Any]]:
    """An items table (id, name, updated_at) in a source of ``kind``, and the options of its incremental copy."""
    if kind == "postgres":
        _exec(url, "CREATE TABLE items (id int PRIMARY KEY, name text, updated_at timestamp NOT NULL)")
        return url, {}
    if kind == "sqlite":
        with sqlite3.connect(tmp_path / "app.db") as db:
            db.execute("CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT, updated_at DATETIME NOT NULL)")
        return f"sqlite:///{tmp_path / 'app.db'}", {"items": {"key": ["id"], "cursor": "updated_at"}}
    (tmp_path / "items.jsonl").write_text("")
    return str(tmp_path), {"items": {"key": ["id"], "cursor": "updated_at"}}


def _write_items(kind: str, source: str, tmp_path, rows: list[tuple[int, str, str]], deleted: set[int]) -> None:
    """Insert ``rows`` into the source and delete the ``deleted`` ids from it."""
    if kind == "postgres":
        with psycopg.connect(source, autocommit=True) as conn:
            conn.cursor().executemany("INSERT INTO items VALUES (%s, %s, %s)", rows)
            conn.execute("DELETE FROM items WHERE id = ANY(%s)", (sorted(deleted),))
    elif kind == "sqlite":
        with sqlite3.connect(tmp_path / "app.db") as db:
            db.executemany("INSERT INTO items VALUES (?, ?, ?)", rows)
            db.executemany("DELETE FROM items WHERE id = ?", [(i,) for i in deleted])
    else:
        path = tmp_path / "items.jsonl"
        kept = [line for line in path.read_text().splitlines() if json.loads(line)["id"] not in deleted]
        added = [json.dumps({"id": i, "name": n, "updated_at": at}) for i, n, at in rows]
        path.write_text("".join(f"{line}\n" for line in [*kept, *added]))


@pytest.mark.parametrize("kind", ["postgres", "sqlite", "files"])
def test_incremental_pass_after_a_source_delete_validates_its_window(kind, fresh_db, target_db, tmp_path):
    """Deletes are not propagated, so the target keeps a row the source no longer has; validation
    used to compare whole tables and failed every later pass. A pass now validates the rows of its
    cursor window only, which hold the new rows and not the deleted one."""
    source, mapping = _items_source(kind, fresh_db, tmp_path)
    options = {"mode": "incremental", "cursor_column": "updated_at", "mapping": mapping, "chunk_rows": 20}
    _write_items(kind, source, tmp_path, [(i, f"item {i}", f"2024-01-01 00:{i:02d}:00") for i in range(1, 51)], set())
    assert bulk_migrate(source, target_db, **options)["tables"][0]["rows"] == 50
    _write_items(kind, source, tmp_path, [(i, f"new {i}", "2024-06-01 00:00:00") for i in range(51, 56)], {7})
    second = bulk_migrate(source, target_db, **options)
    assert second["tables"][0]["rows"] == 5
    assert "count: ok (5)" in second["tables"][0]["validation"]
    assert "checksum: ok" in second["tables"][0]["validation"]
    assert _fetch(target_db, "SELECT count(*), count(*) FILTER (WHERE id = 7) FROM items") == [(55, 1)]
    _write_items(kind, source, tmp_path, [(56, "newer", "2024-07-01 00:00:00")], {8})
    third = bulk_migrate(source, target_db, **options)
    assert third["tables"][0]["rows"] == 1 and "count: ok (1)" in third["tables"][0]["validation"]


def test_incremental_pass_names_the_chunk_of_its_window_that_differs_in_the_target(fresh_db, target_db):
    """Within a pass's window validation still compares every chunk: a target row that differs
    from what the pass copied fails the run, naming the chunk's key bounds and cursor window."""
    _exec(
        fresh_db,
        "CREATE TABLE items (id int PRIMARY KEY, name text, updated_at timestamptz NOT NULL)",
        "INSERT INTO items SELECT g, 'item ' || g, '2024-01-01'::timestamptz + g * interval '1 min' FROM generate_series(1, 100) g",
    )
    options = {"mode": "incremental", "cursor_column": "updated_at", "chunk_rows": 40}
    bulk_migrate(fresh_db, target_db, **options)
    _exec(
        fresh_db,
        "DELETE FROM items WHERE id = 3",
        "INSERT INTO items SELECT g, 'new ' || g, '2025-01-01' FROM generate_series(101, 200) g",
    )
    # Something in the target changes a row as it lands (here a trigger): the copy itself succeeds.
    _exec(
        target_db,
        "CREATE FUNCTION garble() RETURNS trigger LANGUAGE plpgsql AS "
        "$$ BEGIN IF NEW.id = 150 THEN NEW.name := 'garbled'; END IF; RETURN NEW; END $$",
        "CREATE TRIGGER garble BEFORE INSERT OR UPDATE ON items FOR EACH ROW EXECUTE FUNCTION garble()",
    )
    # The window holds ids 101-200 in chunks of 40 rows: [,141), [141,181), [181,); 150 is in the second.
    with pytest.raises(UserError, match=r"checksum differs in public\.items chunks: ") as failed:
        bulk_migrate(fresh_db, target_db, **options, validate=["count", "checksum"])
    message = str(failed.value)
    assert re.search(r'chunks: key\["141","181"\) cursor\([^,]+,[^]]+\]; run the same copy again', message), message
    assert "count" not in message


def _set_database(url: str, **settings: str) -> None:
    """Session defaults of the database behind ``url`` (ALTER DATABASE ... SET), for its next sessions."""
    with psycopg.connect(url, autocommit=True) as conn:
        for name, value in settings.items():
            conn.execute(
                sql.SQL("ALTER DATABASE {} SET {} = {}").format(
                    sql.Identifier(database_name(url)), sql.Identifier(name), sql.Literal(value)
                )
            )


def test_databases_with_other_date_styles_and_time_zones_copy_and_validate(fresh_db, target_db):
    """Chunk bounds and cursors travel as text. A source database set to DateStyle 'SQL, DMY' printed
    a date key as 13/01/2024 and a timestamptz as '... IST' (which PostgreSQL reads as Israel time),
    so planning, copying or validating chunks failed or picked the wrong rows; every connection now
    pins ISO text forms, and a target with other settings still validates."""
    _set_database(fresh_db, DateStyle="SQL, DMY", TimeZone="Asia/Kolkata", IntervalStyle="sql_standard")
    _set_database(fresh_db, extra_float_digits="-3")
    _set_database(target_db, DateStyle="Postgres, MDY", TimeZone="America/New_York", IntervalStyle="iso_8601")
    _exec(
        fresh_db,
        "CREATE TABLE days (day date PRIMARY KEY, at timestamptz, span interval, ratio float8, doc json)",
        "INSERT INTO days SELECT d::date, d + interval '90 min', g * interval '1 day 2 hours', g / 7.0, "
        "json_build_object('g', g) FROM generate_series(1, 120) g, LATERAL (SELECT '2024-01-01'::timestamptz + g * interval '1 day' AS d) s",
        "CREATE TABLE moments (at timestamptz PRIMARY KEY, note text)",
        "INSERT INTO moments SELECT '2024-01-01 00:00+05:30'::timestamptz + g * interval '7 hours', 'm' || g FROM generate_series(1, 120) g",
    )
    report = bulk_migrate(fresh_db, target_db, chunk_rows=25)
    assert {t["table"]: t["rows"] for t in report["tables"]} == {"public.days": 120, "public.moments": 120}
    assert all("MISMATCH" not in t["validation"] for t in report["tables"])
    for table, columns in (("public.days", ["day", "at", "span", "ratio", "doc"]), ("public.moments", ["at", "note"])):
        assert _sum(target_db, table, columns) == _sum(fresh_db, table, columns)
    options = {"tables": ["moments"], "mode": "incremental", "chunk_rows": 25}
    assert bulk_migrate(fresh_db, target_db, **options)["tables"][0]["rows"] == 120
    _exec(fresh_db, "INSERT INTO moments SELECT '2025-03-01 23:30+05:30'::timestamptz + g * interval '1 hour', 'n' || g FROM generate_series(1, 60) g")
    later = bulk_migrate(fresh_db, target_db, **options)
    assert later["tables"][0]["rows"] == 60 and "count: ok" in later["tables"][0]["validation"]
    assert _sum(target_db, "public.moments", ["at", "note"]) == _sum(fresh_db, "public.moments", ["at", "note"])


def test_incremental_from_files_filters_past_the_declared_cursor(target_db, tmp_path):
    """A file table moves by a declared cursor column (compared column-wise); without one it is
    refused in one line, as neither row order nor a key tells which rows changed."""
    data = tmp_path / "files"
    data.mkdir()

    def write(rows: list[tuple[int, str, str]]) -> None:
        lines = [json.dumps({"id": i, "name": n, "updated_at": at}) for i, n, at in rows]
        (data / "items.jsonl").write_text("\n".join(lines) + "\n")

    rows = [(i, f"item {i}", f"2024-01-01T00:{i:02d}:00") for i in range(1, 41)]
    write(rows)
    with pytest.raises(UserError, match=r"file table items needs a cursor column") as refused:
        bulk_migrate(str(data), target_db, mode="incremental", mapping={"items": {"key": ["id"]}})
    assert "\n" not in str(refused.value)
    mapping = {"items": {"key": ["id"], "cursor": "updated_at"}}
    first = bulk_migrate(str(data), target_db, mode="incremental", mapping=mapping, chunk_rows=15)
    assert first["tables"][0]["rows"] == 40
    rows[4] = (5, "changed", "2024-06-01T00:00:00")
    write([*rows, (41, "new", "2024-06-02T00:00:00")])
    second = bulk_migrate(str(data), target_db, mode="incremental", mapping=mapping, chunk_rows=15)
    assert second["tables"][0]["rows"] == 2
    assert _chunk_rows(target_db, second["run_key"]) == (2, 2)
    assert "MISMATCH" not in second["tables"][0]["validation"]
    assert _fetch(target_db, "SELECT id, name FROM items WHERE id IN (4, 5, 41) ORDER BY id") == [
        (4, "item 4"),
        (5, "changed"),
        (41, "new"),
    ]
    assert _fetch(target_db, "SELECT count(*) FROM items") == [(41,)]
    third = bulk_migrate(str(data), target_db, mode="incremental", mapping=mapping, chunk_rows=15)
    assert third["tables"][0]["rows"] == 0


def test_mapping_renames_casts_computes_filters_and_drops(fresh_db, target_db):
    _exec(
        fresh_db,
        "CREATE TABLE events (id bigint PRIMARY KEY, user_id int, kind text, payload jsonb, amount numeric(12,2))",
        "INSERT INTO events SELECT g, g % 10, CASE WHEN g % 4 = 0 THEN 'debug' ELSE 'click' END,"
        " jsonb_build_object('g', g), g * 0.25 FROM generate_series(1, 3000) g",
    )
    mapping = {
        "events": {
            "target": "clicks",
            "rename": {"user_id": "account_id"},
            "cast": {"amount": "double precision"},
            "compute": {"amount_cents": "amount * 100", "kind_upper": "utf8_upper(kind)"},
            "types": {"amount_cents": "bigint"},
            "filter": "kind != 'debug' and account_id >= 2",
            "drop": ["payload"],
        }
    }
    report = bulk_migrate(fresh_db, target_db, mapping=mapping, chunk_rows=500)
    assert "MISMATCH" not in report["tables"][0]["validation"]
    columns = _fetch(
        target_db,
        "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = 'clicks' ORDER BY ordinal_position",
    )
    assert columns == [
        ("id", "bigint"),
        ("account_id", "integer"),
        ("kind", "text"),
        ("amount", "double precision"),
        ("amount_cents", "bigint"),
        ("kind_upper", "text"),
    ]
    expected = _fetch(
        fresh_db,
        "SELECT id, user_id, kind, amount::float8, (amount * 100)::bigint, upper(kind) FROM events"
        " WHERE kind <> 'debug' AND user_id >= 2 ORDER BY id",
    )
    assert _fetch(target_db, "SELECT * FROM clicks ORDER BY id") == expected
    assert _fetch(
        target_db, "SELECT count(*) FROM pg_index WHERE indrelid = 'clicks'::regclass AND indisprimary"
    ) == [(1,)]


GENERATED_COLUMNS = """
SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.attgenerated, pg_get_expr(d.adbin, d.adrelid)
FROM pg_attribute a LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
WHERE a.attrelid = %s::regclass AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum
"""
ITEMS = (
    "CREATE TABLE items (id int PRIMARY KEY, price numeric(10,2), qty int, label text,"
    " total numeric GENERATED ALWAYS AS (price * qty) STORED,"
    " label_len int GENERATED ALWAYS AS (length(label)) STORED,"
    " half numeric GENERATED ALWAYS AS (price / 2) STORED)",
    "INSERT INTO items (id, price, qty, label) SELECT g, g * 1.25, g % 7, 'item ' || g FROM generate_series(1, 500) g",
)


def test_mapping_keeps_generated_columns_generated(fresh_db, target_db):
    """A mapped copy used to leave the source's generated columns out of the target. One whose
    expression reads only columns the mapping keeps as they are stays generated, with the same
    expression, under its own or a new name."""
    _exec(fresh_db, *ITEMS)
    mapping = {"items": {"target": "items_v2", "rename": {"id": "item_id", "half": "half_price"}}}
    report = bulk_migrate(fresh_db, target_db, mapping=mapping, chunk_rows=200)
    assert "MISMATCH" not in report["tables"][0]["validation"]
    source = _fetch(fresh_db, GENERATED_COLUMNS, ("items",))
    renamed = {"id": "item_id", "half": "half_price"}
    assert _fetch(target_db, GENERATED_COLUMNS, ("items_v2",)) == [(renamed.get(c[0], c[0]), *c[1:]) for c in source]
    rows = "SELECT {}, price, qty, label, total, label_len, {} FROM {} ORDER BY 1"
    assert _fetch(target_db, rows.format("item_id", "half_price", "items_v2")) == _fetch(
        fresh_db, rows.format("id", "half", "items")
    )
    insert = "INSERT INTO items_v2 (item_id, price, qty, label) VALUES (501, 2.50, 3, 'new') RETURNING total, label_len, half_price"
    assert _fetch(target_db, insert) == [(Decimal("7.50"), 3, Decimal("1.25"))]


def test_mapping_keeps_values_of_generated_columns_it_cannot_keep_generated(fresh_db, target_db):
    """A generated column whose expression reads a column the mapping renames or casts cannot be
    generated by the same expression in the target: it keeps the source's values as a plain
    column. ``drop`` still drops a generated column."""
    _exec(fresh_db, *ITEMS)
    mapping = {"items": {"rename": {"qty": "quantity"}, "cast": {"label": "varchar(20)"}, "drop": ["half"]}}
    report = bulk_migrate(fresh_db, target_db, mapping=mapping, chunk_rows=200, mode="incremental")
    assert "MISMATCH" not in report["tables"][0]["validation"]
    assert _fetch(target_db, GENERATED_COLUMNS, ("items",)) == [
        ("id", "integer", "", None),
        ("price", "numeric(10,2)", "", None),
        ("quantity", "integer", "", None),
        ("label", "character varying(20)", "", None),
        ("total", "numeric", "", None),
        ("label_len", "integer", "", None),
    ]
    rows = "SELECT id, price, {}, label, total, label_len FROM items ORDER BY id"
    assert _fetch(target_db, rows.format("quantity")) == _fetch(fresh_db, rows.format("qty"))
    _exec(fresh_db, "INSERT INTO items (id, price, qty, label) VALUES (501, 2.50, 3, 'new')")
    bulk_migrate(fresh_db, target_db, mapping=mapping, chunk_rows=200, mode="incremental")
    assert _fetch(target_db, "SELECT count(*), sum(total) FROM items") == _fetch(fresh_db, "SELECT count(*), sum(total) FROM items")
    assert _fetch(target_db, "SELECT total, label_len FROM items WHERE id = 501") == [(Decimal("7.50"), 3)]


def test_mapping_into_an_existing_table_follows_its_columns_for_generated_ones(fresh_db, target_db):
    """An existing target decides: a column it generates itself is not written (here by an
    expression naming the renamed column), a plain one takes the source's values, and a missing one
    is refused in one line instead of the copy leaving it out."""
    _exec(fresh_db, *ITEMS)
    _exec(
        target_db,
        "CREATE TABLE items_a (id int PRIMARY KEY, price numeric(10,2), quantity int, label text,"
        " total numeric GENERATED ALWAYS AS (price * quantity) STORED, label_len int,"
        " half numeric GENERATED ALWAYS AS (price / 2) STORED)",
        "CREATE TABLE items_b (id int PRIMARY KEY, price numeric(10,2), quantity int, label text, total numeric)",
    )
    mapping = {"items": {"target": "items_a", "rename": {"qty": "quantity"}}}
    report = bulk_migrate(fresh_db, target_db, mapping=mapping)
    assert "MISMATCH" not in report["tables"][0]["validation"]
    rows = "SELECT id, price, {}, label, total, label_len, half FROM {} ORDER BY id"
    assert _fetch(target_db, rows.format("quantity", "items_a")) == _fetch(fresh_db, rows.format("qty", "items"))

    mapping = {"items": {"target": "items_b", "rename": {"qty": "quantity"}}}
    with pytest.raises(UserError) as err:
        bulk_migrate(fresh_db, target_db, mapping=mapping)
    assert str(err.value) == (
        "existing target table public.items_b has no columns ['label_len', 'half'] (generated in public.items); "
        "add them, drop the table so the copy creates it, or drop them in the mapping"
    )
    mapping["items"]["drop"] = ["label_len", "half"]
    bulk_migrate(fresh_db, target_db, mapping=mapping)
    assert _fetch(target_db, "SELECT sum(total) FROM items_b") == _fetch(fresh_db, "SELECT sum(total) FROM items")


@pytest.mark.parametrize(
    "mapping",
    [None, {"payments": {"cast": {"amount": "integer"}}}],
    ids=["identical", "mapped"],  # both try the target table directly first, then diagnose via a stage
)
def test_bad_rows_fail_the_chunk_naming_keys_then_quarantine_loads_the_rest(fresh_db, target_db, mapping):
    _exec(
        fresh_db,
        "CREATE TABLE payments (id int PRIMARY KEY, amount int)",
        "INSERT INTO payments SELECT g, CASE WHEN g IN (17, 230, 231) THEN -g ELSE g END FROM generate_series(1, 1000) g",
    )
    _exec(
        target_db,
        "CREATE TABLE payments (id int PRIMARY KEY, amount int CONSTRAINT positive CHECK (amount >= 0))",
    )
    with pytest.raises(
        UserError, match=r"1 of 4 chunks failed.*3 rows .*offending rows: id=17; id=230; id=231\."
    ) as failure:
        bulk_migrate(fresh_db, target_db, chunk_rows=300, mapping=mapping)
    assert "positive" in str(failure.value) and "quarantine=True" in str(failure.value)
    assert "\n" not in str(failure.value)
    status = run_cli("bulk", "status", "--target", target_db).stdout
    assert f"(failed: {failure.value}; run the same copy again to resume): 3/4 chunks" in status
    with pytest.raises(UserError, match=r"at least 2 rows .*offending rows: id=17; id=230\."):
        bulk_migrate(fresh_db, target_db, chunk_rows=300, report_rows=2, mapping=mapping)
    assert _fetch(target_db, "SELECT count(*) FROM payments") == [(700,)], "the other chunks committed"

    report = bulk_migrate(fresh_db, target_db, chunk_rows=300, quarantine=True, mapping=mapping)
    assert report["tables"][0]["rows"] == 997
    assert "MISMATCH" not in report["tables"][0]["validation"]
    quarantined = _fetch(target_db, "SELECT row_data->>'id', error FROM flowyard.bulk_quarantine ORDER BY 1")
    assert [q[0] for q in quarantined] == ["17", "230", "231"]
    assert all("positive" in q[1] for q in quarantined)
    assert _fetch(target_db, "SELECT count(*) FROM payments WHERE amount < 0") == [(0,)]
    assert "(completed): 4/4 chunks, 997 rows" in run_cli("bulk", "status", "--target", target_db).stdout


EMPLOYEES = "SELECT id, manager_id, salary FROM employees ORDER BY id"


def _employees(source: str, target: str, managers: str) -> None:
    """40 employees, in key order (the chunk's), managed by employee 1 but for ``managers``
    (``(id, manager_id, salary)`` rows); the target's reference their managers through a
    foreign key that is not deferrable, and a CHECK wants salaries positive."""
    _exec(
        source,
        "CREATE TABLE employees (id int PRIMARY KEY, manager_id int, salary int)",
        "INSERT INTO employees SELECT g, CASE WHEN s.id IS NULL THEN 1 ELSE s.manager_id END,"
        f" coalesce(s.salary, g) FROM generate_series(1, 40) g LEFT JOIN (VALUES {managers})"
        " s (id, manager_id, salary) ON s.id = g ORDER BY g",
    )
    _exec(
        target,
        "CREATE TABLE employees (id int PRIMARY KEY, manager_id int REFERENCES employees,"
        " salary int CONSTRAINT salary_positive CHECK (salary > 0))",
    )


def _loaded_but_17(source: str, target: str) -> None:
    assert _fetch(target, "SELECT row_data->>'id' FROM flowyard.bulk_quarantine") == [("17",)]
    assert _fetch(target, EMPLOYEES) == _fetch(source, EMPLOYEES.replace("ORDER", "WHERE id <> 17 ORDER"))


@pytest.mark.parametrize(
    ("bad_row", "reason"),
    [("(17, NULL, -1)", "salary_positive"), ("(17, 999, 1)", "employees_manager_id_fkey")],
    ids=["check", "dangling-reference"],
)
def test_bisection_loads_rows_it_tried_before_the_row_of_their_table_they_reference(
    fresh_db, target_db, bad_row, reason
):
    """A chunk holding one bad row is bisected, and employee 3 (manager 30, manager 35) came out
    in a half loaded before its managers': a foreign key rejected it alone, and it used to be
    named, or quarantined, with the bad row although it loads once its managers have. With
    ``report_rows=1`` it used to be the one row named, the bad one never reached."""
    _employees(fresh_db, target_db, f"(3, 30, 1), (30, 35, 1), (35, NULL, 1), {bad_row}")
    named = r"rejected: {}1 rows violate the target \(.*{}.*\); offending rows: id=17\. Fix"
    with pytest.raises(UserError) as failure:
        bulk_migrate(fresh_db, target_db)
    assert re.search(named.format("", reason), str(failure.value))
    with pytest.raises(UserError) as failure:
        bulk_migrate(fresh_db, target_db, report_rows=1)
    assert re.search(named.format("at least ", reason), str(failure.value))

    report = bulk_migrate(fresh_db, target_db, quarantine=True)
    assert report["tables"][0]["rows"] == 39 and "MISMATCH" not in report["tables"][0]["validation"]
    _loaded_but_17(fresh_db, target_db)


def test_bisection_loads_rows_of_a_table_that_reference_each_other(fresh_db, target_db):
    """Employees 5 and 25 manage each other: they load only in one statement, and the bisection of
    a chunk with a bad row tries them apart. A CHECK rejecting the bad row, they load together."""
    _employees(fresh_db, target_db, "(5, 25, 1), (25, 5, 1), (17, NULL, -1)")
    with pytest.raises(UserError, match=r"rejected: 1 rows violate .*salary_positive.*offending rows: id=17\. Fix"):
        bulk_migrate(fresh_db, target_db)
    report = bulk_migrate(fresh_db, target_db, quarantine=True)
    assert report["tables"][0]["rows"] == 39
    _loaded_but_17(fresh_db, target_db)


def test_mapping_renaming_a_column_onto_another_is_one_line_and_a_swap_copies(fresh_db, target_db):
    """A rename onto a name another column keeps used to fail at CREATE TABLE with a traceback."""
    _exec(fresh_db, "CREATE TABLE e (id int PRIMARY KEY, a int, b int)", "INSERT INTO e VALUES (1, 10, 20)")
    with pytest.raises(UserError) as err:
        bulk_migrate(fresh_db, target_db, mapping={"e": {"rename": {"a": "b"}}})
    assert str(err.value) == (
        "mapping for public.e renames columns onto names another column keeps or gets: ['b']; rename the "
        "other column too (and drop it by its new name if it should go)"
    )
    bulk_migrate(fresh_db, target_db, mapping={"e": {"rename": {"a": "b", "b": "a"}}})
    assert _fetch(target_db, "SELECT id, a, b FROM e") == [(1, 20, 10)]


def test_source_column_named_like_the_stage_ordinal_copies_and_quarantines(fresh_db, target_db, tmp_path):
    """The staging table's row ordinal was always fy_ord: a source column of that name failed the
    stage (and the sample check) with DuplicateColumn."""
    _exec(
        fresh_db,
        "CREATE TABLE nn (id int PRIMARY KEY, fy_ord int)",
        "INSERT INTO nn SELECT g, g * 10 FROM generate_series(1, 20) g",
    )
    report = bulk_migrate(fresh_db, target_db, mapping={"nn": {"filter": "fy_ord > 50"}}, mode="incremental")
    assert report["tables"][0]["rows"] == 15 and "MISMATCH" not in report["tables"][0]["validation"]
    assert _fetch(target_db, "SELECT count(*), sum(fy_ord) FROM nn") == [(15, sum(range(60, 201, 10)))]
    path = tmp_path / "legacy.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE q (id INTEGER PRIMARY KEY, fy_ord INTEGER, amount NUMERIC)")
        db.executemany("INSERT INTO q VALUES (?, ?, ?)", [(1, 7, "1.5"), (2, 8, "n/a"), (3, 9, "3")])
    report = bulk_migrate(f"sqlite:///{path}", target_db, quarantine=True)
    assert report["tables"][0]["rows"] == 2 and "MISMATCH" not in report["tables"][0]["validation"]
    assert _fetch(target_db, "SELECT id, fy_ord, amount::text FROM q ORDER BY id") == [(1, 7, "1.5"), (3, 9, "3")]
    assert _fetch(target_db, "SELECT row_data FROM flowyard.bulk_quarantine") == [
        ({"id": "2", "fy_ord": "8", "amount": "n/a"},)
    ]


def test_table_without_primary_key_copies_by_ctid(fresh_db, target_db):
    _exec(
        fresh_db,
        "CREATE TABLE logs (line text, n int)",
        "INSERT INTO logs SELECT 'same line', 1 FROM generate_series(1, 50)",
        "INSERT INTO logs SELECT 'line ' || g, g FROM generate_series(1, 5000) g",
        "ANALYZE logs",
    )
    report = bulk_migrate(fresh_db, target_db, chunk_rows=700)
    assert report["tables"][0]["chunks"] > 3
    assert _sum(target_db, "public.logs", ["line", "n"]) == _sum(fresh_db, "public.logs", ["line", "n"])
    assert _fetch(target_db, "SELECT count(*) FROM logs WHERE line = 'same line'") == [(50,)]


def test_empty_table_and_empty_source(fresh_db, target_db, tmp_path):
    _exec(fresh_db, "CREATE TABLE nothing (id int PRIMARY KEY, v text)")
    report = bulk_migrate(fresh_db, target_db)
    assert report["tables"][0]["rows"] == 0 and "ok" in report["tables"][0]["validation"]
    assert _fetch(target_db, "SELECT count(*) FROM nothing") == [(0,)]

    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    assert bulk_migrate(str(empty_dir), target_db)["tables"] == []


def test_static_files_load_into_tables(target_db, tmp_path):
    data = tmp_path / "reference"
    data.mkdir()
    (data / "countries.json").write_text(
        json.dumps([{"code": "KR", "name": "대한민국"}, {"code": "DE", "name": "Deutschland", "dial": 49}])
    )
    (data / "currencies.jsonl").write_text('{"code": "KRW", "digits": 0}\n{"code": "EUR", "digits": 2}\n')
    (data / "rates.csv").write_text('code,rate,note\nKRW,1350.5,"comma, inside"\nEUR,0.92,\n')
    pq.write_table(
        pa.table({"id": [1, 2, 3], "tag": ["a", None, "ü"], "raw": [b"\x00\x01", None, b"\xff"]}),
        data / "tags.parquet",
    )
    report = bulk_migrate(str(data), target_db, mapping={"countries": {"key": ["code"]}}, chunk_rows=2)
    # every table validated against what its chunks sent (whole table: file chunks are row
    # positions, not key ranges) and sampled from a chunk re-read through the file reader
    rows = {"public.countries": 2, "public.currencies": 2, "public.rates": 2, "public.tags": 3}
    assert {t["table"]: t["rows"] for t in report["tables"]} == rows
    for table in report["tables"]:
        expected = rf"checksum: ok \(1 chunk\), count: ok \({rows[table['table']]}\), sample: ok \([12] rows\)"
        assert re.fullmatch(expected, table["validation"]), table
    # a key the first object lacks is a column too (it used to be dropped without a word)
    assert _fetch(target_db, "SELECT code, name, dial FROM countries ORDER BY code") == [
        ("DE", "Deutschland", 49),
        ("KR", "대한민국", None),
    ]
    assert _fetch(target_db, "SELECT code, digits FROM currencies ORDER BY code") == [("EUR", 2), ("KRW", 0)]
    assert _fetch(target_db, "SELECT code, rate, note FROM rates ORDER BY code") == [
        ("EUR", 0.92, None),
        ("KRW", 1350.5, "comma, inside"),
    ]
    assert _fetch(target_db, "SELECT id, tag, encode(raw, 'hex') FROM tags ORDER BY id") == [
        (1, "a", "0001"),
        (2, None, None),
        (3, "ü", "ff"),
    ]
    assert _fetch(
        target_db, "SELECT count(*) FROM pg_index WHERE indrelid = 'countries'::regclass AND indisprimary"
    ) == [(1,)]


TYPED_COLUMNS = (
    "SELECT column_name, data_type FROM information_schema.columns "
    "WHERE table_name = 'events' AND column_name <> 'id' ORDER BY column_name"
)
TYPED_VALUES = "SELECT id, doc::text, tags::text, at::text FROM events ORDER BY id"


def _events_jsonl(directory) -> str:
    directory.mkdir()
    (directory / "events.jsonl").write_text(
        '{"id": 1, "doc": {"k": "ü", "n": [1, 2]}, "tags": ["a", "b"], "at": "2024-01-01T10:00:00+02:00"}\n'
        '{"id": 2, "doc": null, "tags": [], "at": null}\n'
    )
    return str(directory)


def test_json_lines_objects_arrays_and_offsets_land_in_jsonb_and_timestamptz(target_db, tmp_path):
    """JSON objects and arrays load as jsonb; an offset timestamp keeps its instant, into a
    timestamptz declared by a mapping cast or by an existing target table."""
    files = _events_jsonl(tmp_path / "files")
    report = bulk_migrate(files, target_db, mapping={"events": {"cast": {"at": "timestamp with time zone"}}})
    assert "MISMATCH" not in report["tables"][0]["validation"]
    assert _fetch(target_db, TYPED_COLUMNS) == [
        ("at", "timestamp with time zone"),
        ("doc", "jsonb"),
        ("tags", "jsonb"),
    ]
    expected = [(1, '{"k": "ü", "n": [1, 2]}', '["a", "b"]', "2024-01-01 08:00:00+00"), (2, None, "[]", None)]
    assert _fetch(target_db, TYPED_VALUES) == expected

    _exec(
        target_db,
        "DROP TABLE events",
        "CREATE TABLE events (id int PRIMARY KEY, doc jsonb, tags jsonb, at timestamptz)",
    )
    report = bulk_migrate(files, target_db, restart=True)
    assert "MISMATCH" not in report["tables"][0]["validation"]
    assert _fetch(target_db, TYPED_VALUES) == expected


def test_json_lines_arrays_into_postgres_arrays_fail_in_one_line(target_db, tmp_path):
    """A JSON array is not a PostgreSQL array literal: declaring text[] is refused, whether by a
    mapping cast or by an existing target column."""
    files = _events_jsonl(tmp_path / "files")
    with pytest.raises(UserError, match=r"cannot cast column 'tags' to text\[\]: .*leave it uncast") as cast:
        bulk_migrate(files, target_db, mapping={"events": {"cast": {"tags": "text[]"}}})
    _exec(
        target_db,
        "DROP TABLE events",
        "CREATE TABLE events (id int PRIMARY KEY, doc jsonb, tags text[], at timestamptz)",
    )
    with pytest.raises(UserError, match=r"malformed array literal.*column tags") as column:
        bulk_migrate(files, target_db)
    assert "\n" not in str(cast.value) + str(column.value)


def test_sqlite_json_arrays_and_offsets_land_in_declared_types(target_db, tmp_path):
    """SQLite has no such types: JSON text and offset timestamps become jsonb and timestamptz by
    their declared types (JSON used to become numeric, failing every object), PostgreSQL array
    literals text[] by a mapping cast."""
    path = tmp_path / "app.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE events (id INTEGER PRIMARY KEY, doc JSON, tags TEXT, at TIMESTAMPTZ)")
        db.executemany(
            "INSERT INTO events VALUES (?, ?, ?, ?)",
            [(1, '{"k": "ü", "n": [1, 2]}', '{a,"b c"}', "2024-01-01 10:00:00+02:00"), (2, None, None, None)],
        )
    report = bulk_migrate(f"sqlite:///{path}", target_db, mapping={"events": {"cast": {"tags": "text[]"}}})
    assert "MISMATCH" not in report["tables"][0]["validation"]
    assert _fetch(target_db, TYPED_COLUMNS) == [
        ("at", "timestamp with time zone"),
        ("doc", "jsonb"),
        ("tags", "ARRAY"),
    ]
    assert _fetch(target_db, TYPED_VALUES) == [
        (1, '{"k": "ü", "n": [1, 2]}', '{a,"b c"}', "2024-01-01 08:00:00+00"),
        (2, None, None, None),
    ]


def test_seed_upserts_all_tables_in_one_transaction(target_db, tmp_path):
    data = tmp_path / "seed"
    data.mkdir()
    (data / "plans.jsonl").write_text('{"id": 1, "name": "free"}\n{"id": 2, "name": "pro"}\n')
    (data / "limits.jsonl").write_text('{"plan_id": 1, "seats": 1}\n')
    keys = {"plans": {"key": ["id"]}, "limits": {"key": ["plan_id"]}}
    bulk_migrate(str(data), target_db, mapping=keys, mode="seed")
    (data / "plans.jsonl").write_text(
        '{"id": 1, "name": "free"}\n{"id": 2, "name": "professional"}\n{"id": 3, "name": "team"}\n'
    )
    bulk_migrate(str(data), target_db, mapping=keys, mode="seed")
    assert _fetch(target_db, "SELECT id, name FROM plans ORDER BY id") == [
        (1, "free"),
        (2, "professional"),
        (3, "team"),
    ]

    _exec(target_db, "ALTER TABLE limits ADD CONSTRAINT seats_positive CHECK (seats > 0)")
    (data / "plans.jsonl").write_text('{"id": 4, "name": "enterprise"}\n')
    (data / "limits.jsonl").write_text('{"plan_id": 2, "seats": 0}\n')
    with pytest.raises(UserError, match="plan_id=2"):
        bulk_migrate(str(data), target_db, mapping=keys, mode="seed")
    assert _fetch(target_db, "SELECT count(*) FROM plans WHERE id = 4") == [(0,)], "all or nothing"


def test_sqlite_source(target_db, tmp_path):
    path = tmp_path / "app.db"
    with sqlite3.connect(path) as db:
        db.execute(
            "CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT NOT NULL, score REAL, avatar BLOB, bio TEXT)"
        )
        db.executemany(
            "INSERT INTO users VALUES (?, ?, ?, ?, ?)",
            [
                (i, f"user {i} ✓", i / 3, bytes([i % 256, 0]), None if i % 5 == 0 else f"bio\n{i}")
                for i in range(1, 2501)
            ],
        )
    report = bulk_migrate(f"sqlite:///{path}", target_db, chunk_rows=400)
    assert report["tables"][0]["rows"] == 2500 and "MISMATCH" not in report["tables"][0]["validation"]
    assert _fetch(
        target_db,
        "SELECT id, name, score, encode(avatar, 'hex'), bio FROM users WHERE id IN (5, 6) ORDER BY id",
    ) == [
        (5, "user 5 ✓", 5 / 3, "0500", None),
        (6, "user 6 ✓", 2.0, "0600", "bio\n6"),
    ]
    assert _fetch(
        target_db, "SELECT count(*) FROM pg_index WHERE indrelid = 'users'::regclass AND indisprimary"
    ) == [(1,)]


def _sqlite_orders(path, rows: list[tuple[int, int, float, str]]) -> None:
    with sqlite3.connect(path) as db:
        db.execute(
            "CREATE TABLE IF NOT EXISTS orders (id INTEGER PRIMARY KEY, qty INT, price REAL, "
            "total REAL GENERATED ALWAYS AS (qty * price) STORED, label TEXT AS ('#' || id || 'x' || qty) VIRTUAL, "
            "updated_at DATETIME NOT NULL)"
        )
        db.executemany("INSERT OR REPLACE INTO orders (id, qty, price, updated_at) VALUES (?, ?, ?, ?)", rows)


def test_sqlite_generated_columns_are_copied_as_plain_columns_with_their_values(target_db, tmp_path):
    """``PRAGMA table_info`` leaves out generated columns, so their values were silently lost;
    SQLite's expressions are not PostgreSQL's, so they land as plain columns holding the source's
    values, in full and incremental copies, and validation covers them."""
    path = tmp_path / "shop.db"
    _sqlite_orders(path, [(i, i % 7, i / 4, f"2024-01-01 00:{i // 60:02d}:{i % 60:02d}") for i in range(900)])
    source = f"sqlite:///{path}"
    copied = "SELECT id, qty, price, total, label, to_char(updated_at, 'YYYY-MM-DD HH24:MI:SS') FROM orders ORDER BY id"
    expected = "SELECT id, qty, price, total, label, updated_at FROM orders ORDER BY id"

    first = bulk_migrate(source, target_db, mode="incremental", cursor_column="updated_at", chunk_rows=200)
    assert first["tables"][0]["rows"] == 900 and first["tables"][0]["chunks"] == 5
    assert "MISMATCH" not in first["tables"][0]["validation"]
    assert _fetch(
        target_db,
        "SELECT column_name, data_type, is_generated FROM information_schema.columns "
        "WHERE table_name = 'orders' AND column_name IN ('total', 'label') ORDER BY column_name",
    ) == [("label", "text", "NEVER"), ("total", "double precision", "NEVER")]
    with sqlite3.connect(path) as db:
        assert _fetch(target_db, copied) == db.execute(expected).fetchall()

    _sqlite_orders(path, [(3, 50, 2.5, "2025-01-01 00:00:00"), (901, 4, 0.5, "2025-01-01 00:00:00")])
    second = bulk_migrate(source, target_db, mode="incremental", cursor_column="updated_at", chunk_rows=200)
    assert second["tables"][0]["rows"] == 2 and "MISMATCH" not in second["tables"][0]["validation"]
    with sqlite3.connect(path) as db:
        assert _fetch(target_db, copied) == db.execute(expected).fetchall()
    assert _fetch(target_db, "SELECT total, label FROM orders WHERE id IN (3, 901) ORDER BY id") == [
        (125.0, "#3x50"),
        (2.0, "#901x4"),
    ]


def test_lost_connection_mid_chunk_is_retried(fresh_db, target_db):
    _exec(
        fresh_db,
        "CREATE TABLE big (id int PRIMARY KEY, pad text)",
        "INSERT INTO big SELECT g, repeat('x', 500) FROM generate_series(1, 200000) g",
    )
    killed: list[int] = []
    target_name = target_db.rsplit("/", 1)[1]

    def cut_first_copy() -> None:
        with psycopg.connect(fresh_db, autocommit=True) as admin:
            while not killed:
                rows = admin.execute(
                    "SELECT pid FROM pg_stat_activity WHERE datname = %s AND query LIKE 'COPY%%FROM STDIN%%' AND state = 'active'",
                    (target_name,),
                ).fetchall()
                for (pid,) in rows[:1]:
                    admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
                    killed.append(pid)
                time.sleep(0.005)

    cutter = threading.Thread(target=cut_first_copy, daemon=True)
    cutter.start()
    state = bulk_migrate(fresh_db, target_db, chunk_rows=20000, parallelism=2, return_state=True)
    report = state.result()
    cutter.join(timeout=5)
    assert killed, "a COPY into the target was cut"
    assert _fetch(target_db, "SELECT count(*), count(DISTINCT id) FROM big") == [(200000, 200000)]
    runs = _copy_runs(state, report["tables"][0]["chunks"])
    assert max(r.run_count for r in runs) >= 2


def test_dask_runner_by_configuration(fresh_db, target_db):
    from prefect_dask import DaskTaskRunner

    from tasks.task_runners import build_task_runner

    assert isinstance(build_task_runner("dask", 2), DaskTaskRunner)
    _exec(fresh_db, "CREATE TABLE t (id int PRIMARY KEY)", "INSERT INTO t SELECT generate_series(1, 500)")
    report = bulk_migrate(fresh_db, target_db, chunk_rows=100, parallelism=2, task_runner="dask")
    assert report["tables"][0]["rows"] == 500
    with pytest.raises(UserError, match="unknown task runner"):
        bulk_migrate(fresh_db, target_db, task_runner="spark", restart=True)


def _peak_overlap(runs: list) -> int:
    """The most task runs that were running at one instant (a run ending as another starts does
    not overlap it)."""
    edges = sorted([(r.start_time, 1) for r in runs] + [(r.end_time, -1) for r in runs])
    running = peak = 0
    for _, step in edges:
        running += step
        peak = max(peak, running)
    return peak


def test_an_external_dask_cluster_runs_at_most_parallelism_chunks_at_once(fresh_db, target_db):
    """A cluster runs as many tasks as it has threads: every chunk used to be submitted at once,
    so a six-thread cluster ran (and held connections for) more chunks than parallelism allows."""
    from distributed import LocalCluster

    _exec(
        fresh_db,
        "CREATE TABLE t (id int PRIMARY KEY, pad text)",
        "INSERT INTO t SELECT g, repeat('x', 200) FROM generate_series(1, 12000) g",
    )
    with LocalCluster(n_workers=1, threads_per_worker=6, processes=False, dashboard_address=None) as cluster:
        state = bulk_migrate(
            fresh_db,
            target_db,
            chunk_rows=1000,
            parallelism=2,
            task_runner="dask",
            dask_address=cluster.scheduler_address,
            return_state=True,
        )
    assert state.result()["tables"][0]["rows"] == 12000
    runs = _copy_runs(state, 12)
    assert len(runs) == 12
    assert _peak_overlap(runs) <= 2


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"parallelism": -1}, "parallelism must be at least 1"),
        ({"task_runner": "spark"}, "unknown task runner"),
        ({"report_rows": 0}, "report_rows must be at least 1, got 0"),
        ({"sample_rows": -1}, "sample_rows must be at least 0, got -1"),
        ({"lock_timeout_seconds": -0.5}, "lock_timeout_seconds must be at least 0, got -0.5"),
    ],
)
def test_bad_parameters_fail_before_the_target_is_emptied(fresh_db, target_db, options, message):
    """Checked with the other parameters: a negative parallelism used to be a raw ValueError, and
    both used to surface only after the new plan had emptied the target tables. report_rows=0
    loaded nothing while the checkpoints recorded every row as written; sample_rows=-1 failed with
    a raw error after the copy had committed."""
    _exec(fresh_db, "CREATE TABLE t (id int PRIMARY KEY)", "INSERT INTO t SELECT generate_series(1, 50)")
    bulk_migrate(fresh_db, target_db, validate=["count"])
    with pytest.raises(UserError) as err:
        bulk_migrate(fresh_db, target_db, validate=["count"], restart=True, **options)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
    assert _fetch(target_db, "SELECT count(*) FROM t") == [(50,)]


def test_source_value_the_target_type_rejects_names_table_row_and_column(target_db, tmp_path):
    """A text value that the column's type cannot parse fails at the staging COPY: the error used
    to be PostgreSQL's bare 'invalid input syntax', naming neither the table nor a fix."""
    path = tmp_path / "legacy.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE prices (id INTEGER PRIMARY KEY, amount NUMERIC)")
        db.executemany("INSERT INTO prices VALUES (?, ?)", [(1, 2.5), (2, "n/a"), (3, 4)])
    with pytest.raises(UserError, match=r"chunk prices rowid\[,\) holds a value") as err:
        bulk_migrate(f"sqlite:///{path}", target_db)
    assert "row 2 of the chunk, column amount" in str(err.value) and "\n" not in str(err.value)


def test_quarantine_takes_rows_whose_values_their_types_reject_and_loads_the_rest(target_db, tmp_path):
    """SQLite keeps text in INTEGER and NUMERIC columns, and a REAL that is not a whole number in an
    INTEGER column (it used to load truncated); with quarantine those rows go aside, with
    PostgreSQL's reason, and the rest of the chunk loads and validates."""
    path = tmp_path / "legacy.db"
    rows = [(i, i * 10, f"{i}.5") for i in range(1, 1001)]
    rows[16] = (17, "lots", "17.5")  # INTEGER column: the Arrow batch cannot even be built
    rows[229] = (230, 2300, "n/a")  # NUMERIC column (read as text): PostgreSQL rejects it
    rows[500] = (501, 5010.5, "501.5")  # INTEGER column keeps the REAL: Arrow would truncate it
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE prices (id INTEGER PRIMARY KEY, qty INTEGER, amount NUMERIC)")
        db.executemany("INSERT INTO prices VALUES (?, ?, ?)", rows)
    with pytest.raises(UserError, match=r"SQLite column prices.qty holds a value .*quarantine=True"):
        bulk_migrate(f"sqlite:///{path}", target_db, chunk_rows=300)

    report = bulk_migrate(f"sqlite:///{path}", target_db, chunk_rows=300, quarantine=True)
    assert report["tables"][0]["rows"] == 997
    assert "MISMATCH" not in report["tables"][0]["validation"]
    assert _fetch(target_db, "SELECT count(*), sum(qty), sum(amount) FROM prices") == [
        (
            997,
            sum(r[1] for r in rows if isinstance(r[1], int)) - 2300,
            sum(r[0] + 0.5 for r in rows) - 17.5 - 230.5 - 501.5,
        )
    ]
    quarantined = _fetch(target_db, "SELECT row_data, error FROM flowyard.bulk_quarantine ORDER BY (row_data->>'id')::int")
    assert [(q[0]["id"], q[0]["qty"], q[0]["amount"]) for q in quarantined] == [
        ("17", "lots", "17.5"),
        ("230", "2300", "n/a"),
        ("501", "5010.5", "501.5"),
    ]
    assert 'invalid input syntax for type bigint: "lots"' in quarantined[0][1]
    assert 'invalid input syntax for type numeric: "n/a"' in quarantined[1][1]
    assert 'invalid input syntax for type bigint: "5010.5"' in quarantined[2][1]


def test_quarantine_takes_file_rows_an_existing_target_column_rejects(target_db, tmp_path):
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "rates.csv").write_text("code,rate\nEUR,1.08\nXXX,unknown\nGBP,1.27\n")
    _exec(target_db, "CREATE TABLE rates (code text PRIMARY KEY, rate numeric(6,2) NOT NULL)")
    with pytest.raises(UserError, match=r'holds a value the target column cannot take: invalid input syntax for type numeric: "unknown" \(row 2 of the chunk, column rate\)'):
        bulk_migrate(str(tmp_path / "files"), target_db)
    report = bulk_migrate(str(tmp_path / "files"), target_db, quarantine=True)
    assert report["tables"][0]["rows"] == 2 and "MISMATCH" not in report["tables"][0]["validation"]
    assert _fetch(target_db, "SELECT code, rate::text FROM rates ORDER BY code") == [("EUR", "1.08"), ("GBP", "1.27")]
    assert _fetch(target_db, "SELECT row_data->>'code', row_data->>'rate' FROM flowyard.bulk_quarantine") == [
        ("XXX", "unknown")
    ]


def test_a_target_made_read_only_once_it_holds_flowyards_schema_is_refused_in_one_line(fresh_db, target_db):
    """The first copy made flowyard's schema in the target, then a DBA set
    ``default_transaction_read_only`` on it: the next run's first write failed with PostgreSQL's
    words and the fallback naming neither a standby nor where the setting is. It names both."""
    _exec(fresh_db, "CREATE TABLE t (id int PRIMARY KEY)", "INSERT INTO t SELECT generate_series(1, 10)")
    state_url(target_db)
    database = database_name(target_db)
    with psycopg.connect(target_db, autocommit=True) as conn:
        conn.execute(
            sql.SQL("ALTER DATABASE {} SET default_transaction_read_only = on").format(sql.Identifier(database))
        )
    with pytest.raises(ServerReadOnly) as refused:
        bulk_migrate(source_url=fresh_db, target_url=target_db)
    assert str(refused.value).startswith(
        f"{target_db} accepts no writes (transaction_read_only is on): default_transaction_read_only is on, "
        f"set for database {database} (pg_settings.source: database)"
    )
    assert str(refused.value).endswith("; nothing was copied")
