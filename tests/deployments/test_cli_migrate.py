"""``flowyard migrate`` as a user runs it (real subprocesses, real databases, real Prefect server)."""

from __future__ import annotations

import psycopg
import pytest

from tasks.embedded_pg import free_port
from tests.conftest import run_cli
from tests.migration_helpers import fingerprint, migrations_dir, write_revision

pytestmark = pytest.mark.usefixtures("prefect_api")


def _one_line_error(result, expected: str) -> str:
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("flowyard")]
    assert len(lines) == 1 and expected in lines[0], result.stderr
    return lines[0]


@pytest.mark.parametrize("command", ["deploy", "status", "rollback"])
def test_bad_url_is_one_line(command, tmp_path):
    directory = migrations_dir(tmp_path)
    result = run_cli("migrate", command, "-d", "mysql://root@localhost/app", "-m", str(directory))
    _one_line_error(result, "not a PostgreSQL URL: 'mysql://root@localhost/app'")


@pytest.mark.parametrize("command", ["deploy", "status", "rollback"])
def test_missing_dir_is_one_line(command, tmp_path, fresh_db):
    result = run_cli("migrate", command, "-d", fresh_db, "-m", str(tmp_path / "nope"))
    _one_line_error(result, "does not exist; pass the path of your Alembic folder")


def test_dir_without_env_py_is_one_line(tmp_path, fresh_db):
    (tmp_path / "versions").mkdir()
    result = run_cli("migrate", "deploy", "-d", fresh_db, "-m", str(tmp_path))
    _one_line_error(result, "has no env.py; it must be an Alembic script directory")


@pytest.mark.parametrize("command", ["deploy", "status", "rollback"])
def test_unreachable_database_is_one_line(command, tmp_path):
    directory = migrations_dir(tmp_path)
    url = f"postgresql://app:secret@127.0.0.1:{free_port()}/app"
    line = _one_line_error(run_cli("migrate", command, "-d", url, "-m", str(directory)), "cannot connect to")
    assert "secret" not in line and "app:***@" in line


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("nan", "--lock-timeout is NaN; give a finite number of seconds"),
        ("inf", "--lock-timeout is Infinity; give a finite number of seconds"),
        ("-1", "--lock-timeout -1.0 is out of range; give 0 to 31536000"),
    ],
)
def test_bad_lock_timeout_is_one_line(value, message, tmp_path, fresh_db):
    # nan used to wait forever on a held lock (a nan deadline never arrives)
    directory = migrations_dir(tmp_path)
    result = run_cli("migrate", "deploy", "-d", fresh_db, "-m", str(directory), "--lock-timeout", value)
    _one_line_error(result, message)
    with psycopg.connect(fresh_db) as conn:
        assert conn.execute("SELECT to_regclass('accounts')").fetchone() == (None,)


def test_empty_or_undecodable_url_is_one_line_not_the_default_database(tmp_path):
    # An unset shell variable (-d "$TARGET_URL") used to deploy into flowyard's own database.
    directory = migrations_dir(tmp_path)
    for url, expected in (
        ("", "--database-url (database_url) is empty; give a postgresql:// URL, or leave it out for flowyard's"),
        (" ", "--database-url (database_url) is only whitespace (' '); give a postgresql:// URL, or leave it out"),
    ):
        result = run_cli("migrate", "deploy", "-d", url, "-m", str(directory))
        _one_line_error(result, expected)
    # A non-UTF-8 byte (here 0xe9, as a Latin-1 shell passes it) used to be a UnicodeEncodeError traceback.
    result = run_cli("migrate", "status", "-d", "postgresql://localhost/caf\udce9", "-m", str(directory))
    _one_line_error(result, "not a PostgreSQL URL: 'postgresql://localhost/caf\\udce9'")


def test_bad_backup_dir_and_empty_validation_are_refused_before_any_change(tmp_path, fresh_db):
    # Both used to be found only mid-run: a backup dir that is a file as a FileExistsError
    # traceback, an empty --validate after every revision was applied (and then restored).
    directory = migrations_dir(tmp_path)
    a_file = tmp_path / "backups"
    a_file.write_text("")
    before = fingerprint(fresh_db)
    for options, expected in (
        (
            ("--backup-dir", str(a_file)),
            f"backup directory {a_file} cannot be used as a directory: File exists; pass a directory path",
        ),
        (("--validate", " "), "a validation query is empty; give SQL returning one truthy value"),
    ):
        result = run_cli("migrate", "deploy", "-d", fresh_db, "-m", str(directory), *options)
        _one_line_error(result, expected)
        assert fingerprint(fresh_db) == before


def test_revision_with_a_syntax_error_is_one_line(tmp_path, fresh_db):
    directory = migrations_dir(tmp_path)
    bad = directory / "versions" / "d004_bad.py"
    bad.write_text('revision = "d004"\ndown_revision = "d003"\ndef upgrade(:\n    pass\n')
    result = run_cli("migrate", "status", "-d", fresh_db, "-m", str(directory))
    _one_line_error(result, f"{bad}, line 3: ")


def test_migrations_dir_that_is_a_file_is_named_so(tmp_path, fresh_db):
    file = tmp_path / "migrations.py"
    file.write_text("")
    result = run_cli("migrate", "status", "-d", fresh_db, "-m", str(file))
    _one_line_error(result, f"migrations directory {str(file)!r} is a file;")


def test_bad_steps_and_unknown_target(tmp_path, fresh_db):
    directory = migrations_dir(tmp_path)
    result = run_cli("migrate", "rollback", "--steps", "0", "-d", fresh_db, "-m", str(directory))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    _one_line_error(
        run_cli("migrate", "deploy", "-d", fresh_db, "-m", str(directory), "--target", "zzz"),
        "Can't locate revision identified by 'zzz'",
    )
    _one_line_error(
        run_cli("migrate", "rollback", "--steps", "2", "-d", fresh_db, "-m", str(directory)),
        "cannot roll back 2 revisions: only 0 are applied",
    )


def test_deploy_status_rollback_and_a_failing_deploy(tmp_path, fresh_db):
    directory = migrations_dir(tmp_path)
    backups = str(tmp_path / "backups")
    dry = run_cli("migrate", "deploy", "-d", fresh_db, "-m", str(directory), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "CREATE TABLE accounts" in dry.stdout and "Migration dry-run: completed" in dry.stdout

    deploy = run_cli(
        "migrate",
        "deploy",
        "-d",
        fresh_db,
        "-m",
        str(directory),
        "--backup-dir",
        backups,
        "--validate",
        "SELECT count(*) = 3 FROM accounts",
        "--validate",
        "SELECT count(*) = 2 FROM transfers",
    )
    assert deploy.returncode == 0, deploy.stderr
    assert "Migration deploy: completed" in deploy.stdout and "| d003 |" in deploy.stdout

    status = run_cli("migrate", "status", "-d", fresh_db, "-m", str(directory))
    assert status.returncode == 0, status.stderr
    assert "- current: `d003`" in status.stdout and "- pending: none" in status.stdout

    rollback = run_cli(
        "migrate", "rollback", "--steps", "1", "-d", fresh_db, "-m", str(directory), "--backup-dir", backups
    )
    assert rollback.returncode == 0, rollback.stderr
    with psycopg.connect(fresh_db) as conn:
        assert conn.execute("SELECT version_num FROM alembic_version").fetchone() == ("d002",)

    write_revision(directory, "bad", "d003", ["SELECT 1/0"], [])
    before = fingerprint(fresh_db)
    failed = run_cli("migrate", "deploy", "-d", fresh_db, "-m", str(directory), "--backup-dir", backups)
    line = _one_line_error(failed, "upgrade bad failed: ")
    assert "DivisionByZero" in line and "; restored " in line
    assert fingerprint(fresh_db) == before
