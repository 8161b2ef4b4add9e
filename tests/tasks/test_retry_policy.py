"""Transient errors (real ones, raised by a real server) are retried; permanent ones are not."""

from __future__ import annotations

import psycopg
import pytest

from tasks.errors import UserError
from tasks.retry_policy import is_transient


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
