"""Integrity checks against real tables with injected problems."""

from __future__ import annotations

import psycopg
import pytest

from tasks.integrity import check_integrity
from tasks.pg_backup import server_major


def test_counts_orphans_and_invalid_indexes(fresh_db):
    with psycopg.connect(fresh_db, autocommit=True) as conn:
        conn.execute("CREATE TABLE parent (id int PRIMARY KEY)")
        conn.execute("CREATE TABLE child (id int PRIMARY KEY, parent_id int NOT NULL, note text)")
        conn.execute("INSERT INTO parent VALUES (1), (2)")
        conn.execute("INSERT INTO child VALUES (1, 1, 'a'), (2, 2, 'b'), (3, 9, 'c'), (4, 8, 'd')")
        # Orphans can only exist when the FK was added NOT VALID (as bulk loads do).
        conn.execute(
            "ALTER TABLE child ADD CONSTRAINT child_parent FOREIGN KEY (parent_id) REFERENCES parent NOT VALID"
        )
        report = check_integrity(conn)
        assert report.row_counts == {"public.child": 4, "public.parent": 2}
        assert [(p.check, p.table, p.count) for p in report.problems] == [("fk_orphans", "public.child", 2)]
        assert not report.ok

        conn.execute("DELETE FROM child WHERE parent_id > 2")
        conn.execute("INSERT INTO child VALUES (5, 1, 'x'), (6, 1, 'x')")
        try:
            conn.execute("CREATE UNIQUE INDEX CONCURRENTLY child_note ON child (note)")
        except psycopg.errors.UniqueViolation:
            pass
        report = check_integrity(conn)
        assert [(p.check, p.detail) for p in report.problems] == [
            ("invalid_index", "index child_note is invalid")
        ]
        assert check_integrity(conn, schemas=["other"]).row_counts == {}


def test_nulls_in_not_null_columns_are_counted(fresh_db):
    if server_major(fresh_db) < 18:
        pytest.skip("rows that break NOT NULL need PostgreSQL 18's NOT NULL ... NOT VALID")
    with psycopg.connect(fresh_db, autocommit=True) as conn:
        conn.execute("CREATE TABLE people (id int PRIMARY KEY, email text, nick text)")
        conn.execute("INSERT INTO people VALUES (1, 'a@x', NULL), (2, NULL, NULL), (3, NULL, 'c')")
        assert check_integrity(conn).ok, "a nullable column may hold NULLs"
        # PostgreSQL 18 can add NOT NULL without checking existing rows: the rows that slipped in count.
        conn.execute("ALTER TABLE people ADD CONSTRAINT people_email_nn NOT NULL email NOT VALID")
        conn.execute("ALTER TABLE people ADD CONSTRAINT people_nick_nn NOT NULL nick NOT VALID")
        report = check_integrity(conn)
        assert [(p.check, p.table, p.detail, p.count) for p in report.problems] == [
            ("not_null", "public.people", "email is NULL", 2),
            ("not_null", "public.people", "nick is NULL", 2),
        ]
        # New rows are checked, so repairs go through: fix row 1's nick, delete row 2.
        conn.execute("UPDATE people SET nick = 'n' WHERE id = 1")
        conn.execute("DELETE FROM people WHERE id = 2")
        assert [(p.detail, p.count) for p in check_integrity(conn).problems] == [("email is NULL", 1)]
