"""Integrity checks against real tables with injected problems."""

from __future__ import annotations

import psycopg
import pytest
from psycopg import sql

from tasks.integrity import check_integrity, missing_indexes, missing_key
from tasks.pg_backup import server_major
from tests.conftest import scratch_database


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


@pytest.mark.parametrize(("match", "orphans"), [("SIMPLE", 1), ("FULL", 3)])
def test_orphans_of_a_two_column_key_follow_its_match_type(fresh_db, match, orphans):
    """MATCH SIMPLE lets a row with a NULL key column through; MATCH FULL only one with all of
    them NULL. Counted as PostgreSQL would reject them, checked against its own validation."""
    with psycopg.connect(fresh_db, autocommit=True) as conn:
        conn.execute("CREATE TABLE region (country text, code int, PRIMARY KEY (country, code))")
        conn.execute("CREATE TABLE store (id int PRIMARY KEY, country text, code int)")
        conn.execute("INSERT INTO region VALUES ('KR', 1)")
        # set and present, both NULL, one NULL each way, set and absent
        conn.execute(
            "INSERT INTO store VALUES (1, 'KR', 1), (2, NULL, NULL), (3, 'KR', NULL), (4, NULL, 1), (5, 'KR', 9)"
        )
        conn.execute(
            sql.SQL(
                "ALTER TABLE store ADD CONSTRAINT store_region FOREIGN KEY (country, code) "
                "REFERENCES region MATCH {} NOT VALID"
            ).format(sql.SQL(match))
        )
        problems = check_integrity(conn).problems
        assert [(p.check, p.table, p.count) for p in problems] == [("fk_orphans", "public.store", orphans)]
        conn.execute("DELETE FROM store WHERE id = 5")
        if match == "FULL":
            with pytest.raises(psycopg.errors.ForeignKeyViolation, match="MATCH FULL"):
                conn.execute("ALTER TABLE store VALIDATE CONSTRAINT store_region")
            conn.execute("DELETE FROM store WHERE id IN (3, 4)")
        assert check_integrity(conn).problems == []
        conn.execute("ALTER TABLE store VALIDATE CONSTRAINT store_region")  # PostgreSQL agrees


def test_nulls_in_not_null_columns_are_counted(fresh_db):
    with psycopg.connect(fresh_db) as conn:
        major = server_major(conn)
    if major < 18:
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


SOURCE_INDEXES = (
    "CREATE TABLE items (id int PRIMARY KEY, sku text NOT NULL, name text, price numeric)",
    "CREATE UNIQUE INDEX items_sku ON items (sku)",
    "CREATE INDEX items_pricey ON items (price) WHERE price > 100",
    "CREATE INDEX items_lower_name ON items (lower(name))",
)


def test_indexes_present_compares_the_copy_with_its_source_by_shape_not_name(fresh_db, pg):
    """The copy lives in another database under another schema and name, and its indexes are named
    after it: only an index of another shape (or none) counts as missing, whatever its name."""
    with scratch_database(pg) as copy_url, psycopg.connect(fresh_db, autocommit=True) as source:
        for statement in SOURCE_INDEXES:
            source.execute(statement)
        with psycopg.connect(copy_url, autocommit=True) as target:
            target.execute("CREATE SCHEMA shop")
            target.execute("CREATE TABLE shop.stock (id int PRIMARY KEY, sku text NOT NULL, name text, price numeric)")
            target.execute("CREATE UNIQUE INDEX ON shop.stock (sku)")
            target.execute("CREATE INDEX ON shop.stock (lower(name))")

            def missing() -> list[tuple[str, str, str]]:
                found = missing_indexes(source, sql.Identifier("public", "items"), target, "shop", "stock")
                return [(p.check, p.table, p.detail) for p in found]

            partial = "index items_pricey (USING btree (price) WHERE (price > (100)::numeric))"
            assert missing() == [("index_missing", "shop.stock", f"no {partial} as in the source")]
            target.execute("CREATE INDEX items_pricey ON shop.stock (price)")
            assert [m[2] for m in missing()] == [f"no {partial} as in the source"], "same name, no predicate"
            target.execute("CREATE INDEX ON shop.stock (price) WHERE price > 100")
            assert missing() == []
            # a unique index on the key is not the primary key constraint the source has
            target.execute("ALTER TABLE shop.stock DROP CONSTRAINT stock_pkey")
            target.execute("CREATE UNIQUE INDEX stock_id ON shop.stock (id)")
            assert [m[2] for m in missing()] == ["no constraint items_pkey (PRIMARY KEY (id)) as in the source"]


def test_declared_key_present_needs_a_primary_key_or_unique_index_on_it(fresh_db):
    with psycopg.connect(fresh_db, autocommit=True) as conn:
        conn.execute("CREATE TABLE rates (code text NOT NULL, day date NOT NULL, rate numeric)")
        conn.execute("CREATE INDEX rates_code_day ON rates (code, day)")
        assert [(p.check, p.table, p.detail) for p in missing_key(conn, "public", "rates", ["code", "day"])] == [
            ("key_missing", "public.rates", "no primary key or unique index on (code, day)")
        ]
        assert missing_key(conn, "public", "rates", []) == []
        conn.execute("ALTER TABLE rates ADD PRIMARY KEY (day, code)")
        assert missing_key(conn, "public", "rates", ["code", "day"]) == []
