"""Target tables for bulk copies, created in a real PostgreSQL database."""

from __future__ import annotations

import psycopg
import pytest

from tasks.bulk_sources import Column, TableInfo
from tasks.db import connection
from tasks.errors import UserError
from tasks.schema_copy import create_mapped_table, table_exists


@pytest.mark.parametrize("pg_type", ["dubble", "integer); DROP TABLE victim; --"])
def test_mapped_table_with_a_type_the_target_does_not_know_is_a_one_line_error(fresh_db, pg_type):
    """A mapping's cast/types text reaches CREATE TABLE only once PostgreSQL parsed it as a type."""
    with psycopg.connect(fresh_db, autocommit=True) as conn:
        conn.execute("CREATE TABLE victim (id int)")
    table = TableInfo("orders", (Column("id", "bigint", True), Column("amount", pg_type)))
    with connection(fresh_db) as conn, pytest.raises(UserError, match=r"orders\.amount has type") as err:
        create_mapped_table(conn, "public", table)
    assert "\n" not in str(err.value)
    with connection(fresh_db) as conn:
        assert table_exists(conn, "public", "victim") and not table_exists(conn, "public", "orders")


def test_mapped_table_takes_multiword_and_modified_types(fresh_db):
    table = TableInfo(
        "t", (Column("a", "double precision"), Column("b", "numeric(12,2)"), Column("c", "text[]"))
    )
    with connection(fresh_db) as conn:
        create_mapped_table(conn, "public", table)
        types = conn.execute(
            "SELECT format_type(atttypid, atttypmod) FROM pg_attribute "
            "WHERE attrelid = 'public.t'::regclass AND attnum > 0 ORDER BY attnum"
        ).fetchall()
    assert types == [("double precision",), ("numeric(12,2)",), ("text[]",)]
