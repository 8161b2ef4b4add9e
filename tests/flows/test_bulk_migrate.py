"""bulk-migrate end to end on the real embedded PostgreSQL and a real Prefect server."""

from __future__ import annotations

import psycopg
import pytest

from flows.bulk_migrate import bulk_migrate
from tasks.copy_pipe import normalize_session
from tasks.table_checksum import checksum

pytestmark = pytest.mark.usefixtures("prefect_api")


def _exec(url: str, *statements: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement)


def _fetch(url: str, query: str) -> list[tuple]:
    with psycopg.connect(url) as conn:
        return conn.execute(query).fetchall()


def _table_sum(url: str, table: str, columns: list[str]):
    from psycopg import sql

    with psycopg.connect(url) as conn:
        normalize_session(conn)
        schema, name = table.split(".")
        return checksum(conn, sql.Identifier(schema, name), columns)


@pytest.fixture()
def target_db(pg):
    import uuid

    from tasks.db import drop_database, ensure_database

    name = f"tgt_{uuid.uuid4().hex[:10]}"
    ensure_database(pg.url(), name)
    yield pg.url(name)
    drop_database(pg.url(), name)


def test_full_copy_equals_source(fresh_db, target_db):
    _exec(
        fresh_db,
        "CREATE TABLE accounts (id bigserial PRIMARY KEY, name text NOT NULL UNIQUE)",
        "CREATE TABLE orders (id int PRIMARY KEY, account_id bigint REFERENCES accounts, amount numeric(12,2),"
        " placed timestamptz, tags text[], doc jsonb, blob bytea, note text CHECK (note <> 'x'))",
        "CREATE INDEX orders_account ON orders (account_id)",
        "INSERT INTO accounts (name) SELECT 'acct ' || g FROM generate_series(1, 50) g",
        "INSERT INTO orders SELECT g, 1 + g % 50, g * 1.25, '2024-01-01 00:00+02'::timestamptz + g * interval '1 h',"
        " ARRAY['a', NULL, 'ü ' || g], jsonb_build_object('g', g, 'ключ', 'значение'), decode(md5(g::text), 'hex'),"
        " CASE WHEN g % 7 = 0 THEN NULL WHEN g % 11 = 0 THEN '' ELSE 'naïve \"q\" , ' || chr(10) || 'line' END"
        " FROM generate_series(1, 2000) g",
    )
    report = bulk_migrate(fresh_db, target_db, chunk_rows=300, parallelism=3)
    cols = ["id", "account_id", "amount", "placed", "tags", "doc", "blob", "note"]
    assert _table_sum(target_db, "public.orders", cols) == _table_sum(fresh_db, "public.orders", cols)
    assert {t["table"]: t["rows"] for t in report["tables"]} == {"public.accounts": 50, "public.orders": 2000}
    print(report)
