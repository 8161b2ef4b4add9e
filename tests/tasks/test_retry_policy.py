"""Transient errors (real ones, raised by a real server) are retried; permanent ones are not."""

from __future__ import annotations

import uuid

import psycopg
import pytest
from psycopg import sql

from tasks.db import connect
from tasks.errors import ConnectionUnavailable, UserError
from tasks.retry_policy import is_transient
from tests.conftest import Role


def _raise(url: str, statement: str) -> BaseException:
    with psycopg.connect(url, autocommit=True) as conn, pytest.raises(psycopg.Error) as caught:
        conn.execute(statement)
    return caught.value


@pytest.mark.parametrize("sqlstate", ["40001", "40P01"])
def test_serialization_failures_and_deadlocks_are_transient(fresh_db, sqlstate):
    error = _raise(fresh_db, f"DO $$ BEGIN RAISE EXCEPTION 'boom' USING ERRCODE = '{sqlstate}'; END $$")
    assert error.sqlstate == sqlstate and is_transient(error)


def test_a_terminated_connection_is_transient(fresh_db):
    with (
        psycopg.connect(fresh_db, autocommit=True) as victim,
        psycopg.connect(fresh_db, autocommit=True) as admin,
    ):
        admin.execute("SELECT pg_terminate_backend(%s)", (victim.info.backend_pid,))
        with pytest.raises(psycopg.OperationalError) as caught:
            victim.execute("SELECT 1")
    assert is_transient(caught.value)


def test_constraint_violations_and_user_errors_are_permanent(fresh_db):
    error = _raise(fresh_db, "CREATE TABLE u (id int PRIMARY KEY); INSERT INTO u VALUES (1), (1)")
    assert isinstance(error, psycopg.errors.UniqueViolation) and not is_transient(error)
    assert not is_transient(UserError("fix the mapping"))


def test_a_connection_refused_for_too_many_connections_is_transient(limited_role, fresh_db):
    """The server turns a connection away while the role is at its CONNECTION LIMIT: a later
    attempt can get in, so the one-line error keeps SQLSTATE 53300 and is retried."""
    with connect(fresh_db, autocommit=True) as admin:
        admin.execute(sql.SQL("ALTER ROLE {} CONNECTION LIMIT 1").format(sql.Identifier(limited_role.name)))
    url = limited_role.url(fresh_db)
    with connect(url), pytest.raises(ConnectionUnavailable, match="too many connections for role") as caught:
        connect(url)
    assert caught.value.sqlstate == "53300" and is_transient(caught.value)
    assert isinstance(caught.value, UserError) and "\n" not in str(caught.value)
    assert str(caught.value).endswith("the server is running but turns connections away for now; try again shortly")


def test_a_missing_database_or_role_fails_to_connect_for_good(pg):
    """A wrong URL fails the same way every time: permanent, the one-line message kept."""
    missing_role = Role(f"r_{uuid.uuid4().hex[:12]}", "secret")
    for url, reason in [
        (pg.url("no_such_db"), 'database "no_such_db" does not exist'),
        (missing_role.url(pg.url()), f'role "{missing_role.name}" does not exist'),
    ]:
        with pytest.raises(ConnectionUnavailable, match=reason) as caught:
            connect(url)
        assert not is_transient(caught.value) and "\n" not in str(caught.value)
        # The server answered: sending the user to check that it runs sent them the wrong way.
        assert str(caught.value).endswith("the server answered, so check the URL's user, password and database name")
