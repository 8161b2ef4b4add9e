"""COPY streaming: binary pipe row counts, and the Arrow CSV path keeping NULL, "" and odd text apart."""

from __future__ import annotations

import psycopg
import pyarrow as pa
from psycopg import sql

from tasks.copy_pipe import pipe_binary, read_csv_batches, write_batches
from tasks.db import connect

TRICKY = [None, "", "a,b", 'say "hi"', "two\nlines", "ünï ☃", "\\N", "NULL"]


def test_arrow_round_trip_keeps_nulls_empty_strings_and_quotes(fresh_db):
    with connect(fresh_db, utc=True) as conn:
        conn.execute("CREATE TABLE src (id int, v text, at timestamptz, ok boolean, n numeric(8,3))")
        conn.cursor().executemany(
            "INSERT INTO src VALUES (%s, %s, '2024-02-29 23:59:59.123456+09', %s, 12.5)",
            [(i, v, None if i % 3 == 0 else i % 2 == 0) for i, v in enumerate(TRICKY)],
        )
        schema = pa.schema(
            [
                ("id", pa.int32()),
                ("v", pa.string()),
                ("at", pa.timestamp("us", tz="UTC")),
                ("ok", pa.bool_()),
                ("n", pa.decimal128(8, 3)),
            ]
        )
        query = sql.SQL("SELECT * FROM src ORDER BY id")
        batches = list(read_csv_batches(conn, query, schema))
        assert pa.Table.from_batches(batches).column("v").to_pylist() == TRICKY
        conn.execute("CREATE TABLE dst (LIKE src)")
        assert write_batches(conn, sql.Identifier("dst"), batches) == len(TRICKY)
        assert write_batches(conn, sql.Identifier("dst"), []) == 0
        same = conn.execute("SELECT count(*) FROM (SELECT * FROM src EXCEPT SELECT * FROM dst) d").fetchone()[
            0
        ]
        assert same == 0


def test_binary_pipe_between_databases_counts_rows(fresh_db, pg):
    from tasks.db import drop_database, ensure_database

    ensure_database(pg.url(), "pipe_target")
    try:
        with psycopg.connect(fresh_db) as src, psycopg.connect(pg.url("pipe_target")) as dst:
            src.execute("CREATE TABLE t (id int, doc jsonb, arr int[], b bytea)")
            src.execute(
                "INSERT INTO t SELECT g, jsonb_build_object('g', g), ARRAY[g, NULL], '\\x00ff' FROM generate_series(1, 5000) g"
            )
            dst.execute("CREATE TABLE t (id int, doc jsonb, arr int[], b bytea)")
            rows = pipe_binary(
                src,
                sql.SQL("SELECT * FROM t WHERE id > %s"),
                dst,
                sql.Identifier("t"),
                ["id", "doc", "arr", "b"],
                [100],
            )
            assert rows == 4900
            assert dst.execute(
                "SELECT count(*), sum(id), max(arr::text), min(encode(b, 'hex')) FROM t"
            ).fetchone() == (4900, sum(range(101, 5001)), "{999,NULL}", "00ff")
    finally:
        drop_database(pg.url(), "pipe_target")
