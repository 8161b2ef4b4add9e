"""Checksums are order independent, sensitive to any change, and equal across session settings."""

from __future__ import annotations

import psycopg
import pytest
from psycopg import sql

from tasks.db import connect
from tasks.table_checksum import checksum

COLUMNS = ["id", "at", "v", "f"]


def test_checksum_is_order_independent_and_pinned_across_sessions(fresh_db):
    with psycopg.connect(fresh_db, autocommit=True) as conn:
        conn.execute("CREATE TABLE a (id int, at timestamptz, v text, f float8)")
        conn.execute("CREATE TABLE b (id int, at timestamptz, v text, f float8)")
        conn.execute(
            "INSERT INTO a SELECT g, now() - g * interval '1 h', 'v' || g, g / 3.0 FROM generate_series(1, 500) g"
        )
        conn.execute("INSERT INTO b SELECT * FROM a ORDER BY random()")
    # Sessions that start with other settings (here from the URL) get flowyard's pinned ones.
    seoul = f"{fresh_db}?options=-c%20TimeZone%3DAsia/Seoul%20-c%20DateStyle%3DSQL,DMY"
    lima = f"{fresh_db}?options=-c%20TimeZone%3DAmerica/Lima%20-c%20extra_float_digits%3D0"
    with connect(seoul, utc=True) as one, connect(lima, utc=True) as two:
        assert checksum(one, sql.Identifier("a"), COLUMNS) == checksum(two, sql.Identifier("b"), COLUMNS)
        two.execute("UPDATE b SET v = 'changed' WHERE id = 250")
        assert checksum(one, sql.Identifier("a"), COLUMNS) != checksum(two, sql.Identifier("b"), COLUMNS)
        part = checksum(one, sql.Identifier("a"), COLUMNS, sql.SQL("id <= 100"))
        rest = checksum(one, sql.Identifier("a"), COLUMNS, sql.SQL("id > 100"))
        assert part + rest == checksum(one, sql.Identifier("a"), COLUMNS)
        assert part.rows == 100


def test_types_without_hash_functions_fall_back_to_text_hashes(fresh_db):
    with connect(fresh_db, utc=True) as conn:
        conn.execute("CREATE TABLE j (id int, doc json, p point)")
        conn.execute(
            """INSERT INTO j SELECT g, json_build_object('g', g), point(g, g) FROM generate_series(1, 50) g"""
        )
        conn.execute("CREATE TABLE k AS SELECT * FROM j ORDER BY id DESC")
        first = checksum(conn, sql.Identifier("j"), ["id", "doc", "p"])
        assert first == checksum(conn, sql.Identifier("k"), ["id", "doc", "p"]) and first.rows == 50
        conn.execute("UPDATE k SET doc = '{\"g\": 0}' WHERE id = 7")
        assert checksum(conn, sql.Identifier("j"), ["id", "doc", "p"]) != checksum(
            conn, sql.Identifier("k"), ["id", "doc", "p"]
        )


@pytest.mark.parametrize("server", ["fresh_db", "older_db"])
def test_enum_columns_hash_alike_whatever_their_types_oids(server, request):
    """An enum hashes by its ``pg_enum`` OID: the same rows under two copies of the type (as in a
    bulk copy's source and target databases) must still have one checksum."""
    url = request.getfixturevalue(server)
    with connect(url, utc=True) as conn:
        for schema in ("one", "two"):
            conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
            conn.execute(sql.SQL("CREATE TYPE {}.mood AS ENUM ('ok', 'sad')").format(sql.Identifier(schema)))
            conn.execute(
                sql.SQL("CREATE TABLE {0}.t (id int, m {0}.mood, ms {0}.mood[])").format(sql.Identifier(schema))
            )
            conn.execute(
                sql.SQL("INSERT INTO {}.t SELECT g, 'sad', ARRAY['ok', 'sad']::{}.mood[] FROM generate_series(1, 20) g")
                .format(sql.Identifier(schema), sql.Identifier(schema))
            )
        columns = ["id", "m", "ms"]
        first = checksum(conn, sql.Identifier("one", "t"), columns)
        assert first == checksum(conn, sql.Identifier("two", "t"), columns) and first.rows == 20
        conn.execute("UPDATE two.t SET m = 'ok' WHERE id = 3")
        assert first != checksum(conn, sql.Identifier("two", "t"), columns)
