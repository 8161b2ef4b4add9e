"""One-line errors: what ``first_line`` keeps of a PostgreSQL message (its LINE/HINT/CONTEXT go),
and what an entry point prints for a user error or a privilege PostgreSQL refused."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest

from tasks.db import connect
from tasks.errors import (
    UserError,
    check_user_dir,
    check_user_file,
    exit_on_user_error,
    first_line,
    make_user_dir,
    printable,
)


def test_a_postgres_error_keeps_only_its_message(fresh_db: str) -> None:
    with connect(fresh_db, autocommit=True) as conn, pytest.raises(psycopg.Error) as error:
        conn.execute("SELECT 1 +* 2")
    assert "\n" in str(error.value)  # PostgreSQL points at the position on a second line
    assert first_line(error.value) == "operator does not exist: integer +* integer"


def test_an_empty_message_still_says_something() -> None:
    assert first_line(ValueError()) == "ValueError"
    assert first_line("  \n") == ""
    assert first_line("  first\nsecond") == "first"


def test_a_listing_cell_shows_control_characters_as_escapes_and_keeps_the_rest() -> None:
    shown = printable("a\tb\r\nc\x1b[0m\u2028d\u2029é ✓ 漢")
    assert shown == "a\\tb\\r\\nc\\x1b[0m\\u2028d\\u2029é ✓ 漢"
    assert shown.isprintable()


def test_a_refused_privilege_is_one_line_at_the_entry_point(limited_role, fresh_db, capsys) -> None:
    with connect(fresh_db, autocommit=True) as conn:
        conn.execute("CREATE TABLE secret (id int)")

    def entry_point() -> None:
        with connect(limited_role.url(fresh_db)) as conn:
            conn.execute("SELECT * FROM secret")

    with pytest.raises(SystemExit) as exit_:
        exit_on_user_error(entry_point, "prog")
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("prog: error: PostgreSQL refused a privilege: ")
    assert "permission denied for table secret" in err and "grant it to the role" in err


@pytest.mark.parametrize("wrapped", [False, True], ids=["psycopg", "sqlalchemy"])
def test_a_write_a_read_only_server_refused_is_one_line_at_the_entry_point(
    fresh_db: str, capsys: pytest.CaptureFixture[str], wrapped: bool
) -> None:
    """A read-only server (a standby, ``default_transaction_read_only``) refusing a write no caller
    explained, also inside SQLAlchemy's error (Alembic): a traceback, which named neither cause."""
    from sqlalchemy import create_engine, text

    from tasks.db import sqlalchemy_url

    def entry_point() -> None:
        if wrapped:
            with create_engine(sqlalchemy_url(fresh_db)).connect() as sa:
                sa.execute(text("SET TRANSACTION READ ONLY"))
                sa.execute(text("CREATE TABLE t (id int)"))
        with connect(fresh_db) as conn:
            conn.execute("SET TRANSACTION READ ONLY")
            conn.execute("CREATE TABLE t (id int)")

    with pytest.raises(SystemExit) as exit_:
        exit_on_user_error(entry_point, "prog")
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("prog: error: the database accepts no writes (cannot execute CREATE TABLE in a read-only ")
    assert "it is a standby, or default_transaction_read_only is on; point the URL at the primary" in err


def test_a_directory_check_refuses_a_file_in_the_way_and_creates_nothing(tmp_path: Path) -> None:
    """check_user_dir says what make_user_dir would, without making anything (a preflight)."""
    a_file = tmp_path / "notes"
    a_file.write_text("")
    missing = tmp_path / "a" / "b"
    assert check_user_dir(missing, "backup directory") == missing
    assert not (tmp_path / "a").exists()
    for path, reason in ((a_file, "File exists"), (a_file / "sub", "Not a directory")):
        message = f"backup directory {path} cannot be used as a directory: {reason}; pass a directory path"
        with pytest.raises(UserError) as checked:
            check_user_dir(path, "backup directory")
        with pytest.raises(UserError) as made:
            make_user_dir(path, "backup directory")
        assert str(checked.value) == str(made.value) == message


@pytest.mark.parametrize("regular", [False, True])
def test_a_file_name_no_file_system_takes_is_one_line_naming_it(tmp_path: Path, regular: bool) -> None:
    """A path with a name over 255 bytes (a pasted blob, a variable expanded twice) made
    ``Path.is_dir()`` raise OSError: ``sync migrate up``, ``sync trigger --store`` and every other
    command that checks a file it is given showed a traceback."""
    long = tmp_path / ("a" * 300 + ".db")
    with pytest.raises(UserError) as error:
        check_user_file(long, "device store", "give the path of the device's SQLite file", regular=regular)
    assert str(error.value) == f"cannot read device store {long}: File name too long; give the path of the device's SQLite file"


def test_a_file_under_a_file_is_no_such_directory(tmp_path: Path) -> None:
    (tmp_path / "plain").write_text("x")
    with pytest.raises(UserError, match=r"plain/store\.db: Not a directory; fix it$"):
        check_user_file(tmp_path / "plain" / "store.db", "device store", "fix it", regular=True)
