"""Which tables a bulk run copies, resolved against a real SQLite source and the mapping."""

from __future__ import annotations

import sqlite3
import uuid

import psycopg
import pytest
from psycopg import sql

from tasks.bulk_tables import same_database, table_specs
from tasks.column_mapping import parse_mapping
from tasks.errors import UserError


def test_mapping_keyed_by_a_table_the_source_lacks_is_refused_not_ignored(tmp_path):
    """A misspelt table in the mapping used to be skipped silently: the table copied unmapped."""
    with sqlite3.connect(tmp_path / "app.db") as db:
        db.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY, kind TEXT)")
        db.execute("CREATE TABLE users (id INTEGER PRIMARY KEY)")
    url = f"sqlite:///{tmp_path / 'app.db'}"
    typo = parse_mapping({"ordrs": {"target": "orders_v2", "drop": ["kind"]}})
    with pytest.raises(UserError, match=r"mapping names tables the source does not have: \['ordrs'\]"):
        table_specs(url, None, typo, "public", "full", None)
    other = parse_mapping({"orders": {"target": "orders_v2", "drop": ["kind"]}})
    (spec,) = table_specs(url, ["users"], other, "public", "full", None)  # mapped table not selected: fine
    assert spec.target_label == "public.users"


def test_same_database_is_told_for_an_ordinary_role_whatever_the_url_spelling(pg, fresh_db):
    """The role needs no privilege (no superuser, no pg_monitor); another database of the same
    server, or the same database reached by another host name, is told apart."""
    role = f"plain_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg.url(), autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE ROLE {} LOGIN NOSUPERUSER").format(sql.Identifier(role)))
    try:
        plain = fresh_db.replace("postgres@", f"{role}@")
        assert same_database(plain, fresh_db.replace("127.0.0.1", "localhost"))
        assert not same_database(plain, pg.url())
        assert not same_database(pg.url(), fresh_db)
    finally:
        with psycopg.connect(pg.url(), autocommit=True) as admin:
            admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


@pytest.mark.parametrize("server", ["fresh_db", "older_db"])
def test_mapped_table_keeps_generated_columns_whose_expression_reads_only_kept_columns(server, request):
    """PostgreSQL 18 records the columns a generation expression reads as dependencies of its
    default (pg_attrdef), 14-17 of the column itself: both must tell which stay generated."""
    url = request.getfixturevalue(server)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE items (id int PRIMARY KEY, price numeric, qty int, label text,"
            " total numeric GENERATED ALWAYS AS (price * qty) STORED,"
            " shout text GENERATED ALWAYS AS (upper(label)) STORED,"
            " one int GENERATED ALWAYS AS (1) STORED)"
        )
    mapping = parse_mapping({"items": {"rename": {"label": "title", "one": "uno"}, "drop": ["shout"]}})
    (spec,) = table_specs(url, ["items"], mapping, "public", "full", None)
    assert [(c.name, c.generated) for c in spec.target.columns] == [
        ("id", False),
        ("price", False),
        ("qty", False),
        ("title", False),
        ("total", True),
        ("uno", True),
    ]
    assert [d.name for d in spec.generation] == ["total", "one"]
    assert spec.generation[0].reads == ("price", "qty")
    assert spec.generated_values == ()  # shout reads a renamed column, but is dropped: not read at all
    assert spec.source.copy_columns == ["id", "price", "qty", "label"]

    mapping = parse_mapping(
        {"items": {"cast": {"price": "double precision"}, "filter": "uno > 0", "rename": {"one": "uno"}}}
    )
    (spec,) = table_specs(url, ["items"], mapping, "public", "full", None)
    assert spec.generated_values == ("total", "one")  # reads a cast column; read by the filter
    assert [d.name for d in spec.generation] == ["shout"]
    assert [(c.name, c.pg_type, c.generated) for c in spec.target.columns][4:] == [
        ("total", "numeric", False),
        ("shout", "text", True),
        ("uno", "integer", False),
    ]
