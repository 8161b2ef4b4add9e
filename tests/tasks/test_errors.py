"""``first_line``: what a one-line error keeps of a PostgreSQL message (its LINE/HINT/CONTEXT go)."""

from __future__ import annotations

import psycopg
import pytest

from tasks.db import connect
from tasks.errors import first_line


def test_a_postgres_error_keeps_only_its_message(fresh_db: str) -> None:
    with connect(fresh_db, autocommit=True) as conn, pytest.raises(psycopg.Error) as error:
        conn.execute("SELECT 1 +* 2")
    assert "\n" in str(error.value)  # PostgreSQL points at the position on a second line
    assert first_line(error.value) == "operator does not exist: integer +* integer"


def test_an_empty_message_still_says_something() -> None:
    assert first_line(ValueError()) == "ValueError"
    assert first_line("  \n") == ""
    assert first_line("  first\nsecond") == "first"
