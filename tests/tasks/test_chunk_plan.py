"""Chunk plans cover every row exactly once: key ranges (any orderable key), ctid ranges, ordinals."""

from __future__ import annotations

import psycopg
from psycopg import sql

from tasks.chunk_plan import Chunk, plan_by_ctid, plan_by_key, plan_by_ordinal


def _rows_per_chunk(conn, table, chunks, key):
    counts = []
    for chunk in chunks:
        where, params = chunk.pg_filter(key)
        counts.append(
            conn.execute(sql.SQL("SELECT count(*) FROM {} WHERE {}").format(table, where), params).fetchone()[
                0
            ]
        )
    return counts


def test_key_ranges_over_a_composite_text_key_cover_each_row_once(fresh_db):
    with psycopg.connect(fresh_db, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (tenant text, n int, PRIMARY KEY (tenant, n))")
        conn.execute("INSERT INTO t SELECT chr(65 + g % 5) || 'é', g FROM generate_series(1, 1003) g")
        table = sql.Identifier("t")
        chunks = plan_by_key(conn, table, ["tenant", "n"], 100)
        counts = _rows_per_chunk(conn, table, chunks, ["tenant", "n"])
        assert sum(counts) == 1003 and len(chunks) == 11
        assert counts[:-1] == [100] * 10
        assert chunks[0].lo is None and chunks[-1].hi is None
        assert all(a.hi == b.lo for a, b in zip(chunks, chunks[1:], strict=False))
        assert len({c.chunk_id for c in chunks}) == len(chunks)


def test_ctid_ranges_cover_a_table_without_key_once(fresh_db):
    with psycopg.connect(fresh_db, autocommit=True) as conn:
        conn.execute("CREATE TABLE heap (v text)")
        conn.execute("INSERT INTO heap SELECT repeat('x', g % 300) FROM generate_series(1, 20000) g")
        conn.execute("DELETE FROM heap WHERE random() < 0.1")
        conn.execute("ANALYZE heap")
        total = conn.execute("SELECT count(*) FROM heap").fetchone()[0]
        chunks = plan_by_ctid(conn, sql.Identifier("heap"), 2000)
        counts = _rows_per_chunk(conn, sql.Identifier("heap"), chunks, [])
        assert sum(counts) == total and len(chunks) > 5


def test_ordinal_plans_and_chunk_round_trip():
    chunks = plan_by_ordinal(25, 10, "rowid", start=5)
    assert [(c.lo, c.hi) for c in chunks] == [(None, ("15",)), (("15",), ("25",)), (("25",), None)]
    assert plan_by_ordinal(0, 10, "ordinal")[0].lo is None
    for chunk in chunks:
        assert Chunk.from_json(chunk.to_json()) == chunk
