"""Target tables for bulk copies, created in a real PostgreSQL database."""

from __future__ import annotations

import psycopg
import pytest
from psycopg import sql

from tasks.bulk_sources import Column, TableInfo
from tasks.db import connection, database_name, drop_database, ensure_database
from tasks.errors import UserError, tool_error
from tasks.schema_copy import (
    ForeignKey,
    add_foreign_keys,
    copy_table_ddl,
    create_mapped_table,
    replayable_on,
    table_exists,
)


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


def test_pre_data_ddl_replays_on_an_older_server(older_pg, older_db):
    """The bundled pg_dump 18 writes ``SET transaction_timeout``, which PostgreSQL 14-16 reject;
    a PG→PG copy between two databases of such a server still creates the target table."""
    target_name = f"{database_name(older_db)}_target"
    ensure_database(older_pg.url(), target_name)
    target = older_pg.url(target_name)
    try:
        with psycopg.connect(older_db, autocommit=True) as conn:
            conn.execute("CREATE TABLE orders (id bigint PRIMARY KEY, note text NOT NULL DEFAULT 'n/a')")
        table = TableInfo("orders", (Column("id", "bigint", True), Column("note", "text")), schema="public")
        copy_table_ddl(older_db, target, [table])
        with connection(target) as conn:
            default = conn.execute(
                "SELECT pg_get_expr(adbin, adrelid) FROM pg_attrdef WHERE adrelid = 'public.orders'::regclass"
            ).fetchone()
        assert default == ("'n/a'::text",)
    finally:
        drop_database(older_pg.url(), target_name)


def test_replayable_on_drops_only_the_setting_older_servers_lack():
    script = "SET statement_timeout = 0;\nSET transaction_timeout = 0;\nCREATE TABLE t (a int);\n"
    assert replayable_on(script, 160004) == "SET statement_timeout = 0;\nCREATE TABLE t (a int);\n"
    assert replayable_on(script, 170000) == script


@pytest.mark.parametrize("server", ["fresh_db", "older_db"])
def test_foreign_key_of_a_partitioned_table_is_added_and_checked_on_every_server(server, request):
    """PostgreSQL 14-17 refuse a foreign key ``NOT VALID`` on a partitioned table (18 takes it):
    the copy's key is added there all the same, and rows it does not hold for are still named."""
    url = request.getfixturevalue(server)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE owners (id int PRIMARY KEY)")
        conn.execute("CREATE TABLE events (id int, owner int) PARTITION BY RANGE (id)")
        conn.execute("CREATE TABLE events_low PARTITION OF events FOR VALUES FROM (0) TO (100)")
        conn.execute("CREATE TABLE visits (id int, owner int) PARTITION BY RANGE (id)")
        conn.execute("CREATE TABLE visits_low PARTITION OF visits FOR VALUES FROM (0) TO (100)")
        conn.execute("INSERT INTO owners VALUES (1)")
        conn.execute("INSERT INTO events VALUES (5, 1)")
        conn.execute("INSERT INTO visits VALUES (6, 2)")
    definition = "FOREIGN KEY (owner) REFERENCES owners(id)"
    keys = [
        ForeignKey(sql.Identifier("public", t), f"{t}_owner_fkey", definition) for t in ("events", "visits")
    ]
    with connection(url, autocommit=True) as conn:
        assert add_foreign_keys(conn, keys[:1]) == ["events_owner_fkey"]
        validated = conn.execute(
            "SELECT convalidated FROM pg_constraint WHERE conrelid = 'events'::regclass AND conname = %s",
            (keys[0].name,),
        ).fetchone()
        with pytest.raises(UserError, match=r"^foreign key visits_owner_fkey on .*does not hold") as err:
            add_foreign_keys(conn, keys[1:])
    assert validated == (True,) and "\n" not in str(err.value)


def test_a_source_table_the_role_may_not_read_names_the_cause_not_pg_dumps_context(limited_role, fresh_db):
    """pg_dump prints the error, then the query it ran; the message keeps the error."""
    with psycopg.connect(fresh_db, autocommit=True) as conn:
        conn.execute("CREATE TABLE secrets (id bigint PRIMARY KEY)")
    table = TableInfo("secrets", (Column("id", "bigint", True),), schema="public")
    with pytest.raises(UserError) as err:
        copy_table_ddl(limited_role.url(fresh_db), fresh_db, [table])
    message = str(err.value)
    assert "permission denied for table secrets" in message and "Query was" not in message
    assert "\n" not in message and limited_role.password not in message


def test_a_statement_the_target_rejects_names_psqls_error_line():
    stderr = 'psql:<stdin>:12: ERROR:  type "mood" does not exist\nLINE 3:     m mood\n              ^\n'
    assert tool_error(stderr, 3) == 'psql:<stdin>:12: ERROR: type "mood" does not exist'
    assert tool_error("pg_restore: warning: something\n", 1) == "pg_restore: warning: something"
    assert tool_error("", 1) == "exit code 1"
