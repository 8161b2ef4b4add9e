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
