"""Validation queries must return one truthy value, read-only; only problems a run introduced fail it."""

from __future__ import annotations

import psycopg
import pytest

from tasks.integrity import check_integrity
from tasks.migration_validation import ValidationFailed, check_query, require_valid, validate


def test_query_checks(fresh_db):
    with psycopg.connect(fresh_db, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int)")
        conn.execute("INSERT INTO t VALUES (1), (2)")
        assert check_query(conn, "SELECT count(*) = 2 FROM t").passed
        assert not check_query(conn, "SELECT count(*) = 3 FROM t").passed
        assert not check_query(conn, "SELECT NULL").passed
        assert "one row with one value" in check_query(conn, "SELECT id FROM t").detail
        assert "one row with one value" in check_query(conn, "SELECT 1, 2").detail
        assert check_query(conn, "SELECT * FROM nope").detail.startswith(
            'error: relation "nope" does not exist'
        )
        writer = check_query(conn, "WITH x AS (INSERT INTO t VALUES (3) RETURNING 1) SELECT true FROM x")
        assert not writer.passed and "read-only transaction" in writer.detail
        assert conn.execute("SELECT count(*) FROM t").fetchone() == (2,)


def test_only_introduced_integrity_problems_fail(fresh_db):
    with psycopg.connect(fresh_db, autocommit=True) as conn:
        conn.execute("CREATE TABLE parent (id int PRIMARY KEY)")
        conn.execute("CREATE TABLE child (id int, parent_id int)")
        conn.execute("INSERT INTO child VALUES (1, 5)")
        conn.execute("ALTER TABLE child ADD FOREIGN KEY (parent_id) REFERENCES parent NOT VALID")
        before = check_integrity(conn)

    unchanged = validate(fresh_db, ["SELECT true"], before)
    assert unchanged.ok and len(unchanged.integrity.problems) == 1
    require_valid(unchanged)

    with psycopg.connect(fresh_db, autocommit=True) as conn:
        conn.execute("ALTER TABLE child DROP CONSTRAINT child_parent_id_fkey")
        conn.execute("INSERT INTO child VALUES (2, 6)")
        conn.execute("ALTER TABLE child ADD FOREIGN KEY (parent_id) REFERENCES parent NOT VALID")
    grown = validate(fresh_db, ["SELECT true"], before)
    assert not grown.ok and [p.count for p in grown.new_problems] == [2]
    with pytest.raises(
        ValidationFailed, match=r"^post-migration validation failed: fk_orphans in public.child"
    ):
        require_valid(grown)
