"""``flowyard migrate`` as a user runs it (real subprocesses, real databases, real Prefect server)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import psutil
import psycopg
import pytest
from psycopg import sql

from tasks.advisory_lock import lock_holder
from tasks.db import database_name, mask_url, with_database
from tasks.embedded_pg import free_port
from tests.conftest import run_cli
from tests.migration_helpers import fingerprint, migrations_dir, tables, write_revision
from tests.process_support import GUARD_SECONDS, cli_until, sigkill, until_its_sessions_end

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
    for asked, error in (
        (["--steps", "0"], "--steps must be at least 1, got 0"),
        (["--steps", "1", "--to", "d001"], "give --steps or --to, not both"),
    ):
        _one_line_error(run_cli("migrate", "rollback", *asked, "-d", fresh_db, "-m", str(directory)), error)
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


# SIGKILL of a running `flowyard migrate deploy`: the real CLI in its own process group, killed
# whole once the database shows it at the stage under test (a session of it waiting on what the
# test holds), never after a sleep.


def _kill_when_waiting(
    tmp_path: Path,
    url: str,
    app: str,
    query: str,
    *args: str,
    stop: Callable[[subprocess.Popen[bytes]], int] = sigkill,
) -> int:
    """Run ``flowyard migrate *args``, and once a session named ``app`` runs a statement like
    ``query`` and waits (on a lock, or in the test's gate), ``stop`` it (SIGKILL its group unless
    told otherwise); return its exit status."""
    seen = (
        "SELECT count(*) > 0 FROM pg_stat_activity WHERE application_name = %s AND query LIKE %s"
        " AND wait_event_type IN ('Lock', 'Timeout')"
    )
    with psycopg.connect(with_database(url, "postgres"), autocommit=True) as conn:
        cli = cli_until(("migrate", *args), tmp_path / "cli.log", lambda: conn.execute(seen, (app, query)).fetchone()[0])
    return stop(cli)


def _nothing_left_behind(tmp_path: Path, url: str) -> None:
    """No pg_dump/pg_restore of the killed run still runs, and its deploy lock is free (its session
    ends once the server reads the closed socket)."""
    tools = [
        p.info["cmdline"]
        for p in psutil.process_iter(["cmdline"])
        if p.info["cmdline"]
        and Path(p.info["cmdline"][0]).name in ("pg_dump", "pg_restore")
        and any(str(tmp_path) in arg for arg in p.info["cmdline"])
    ]
    assert tools == [], "orphaned client tools outlived the killed run"
    deadline = time.monotonic() + GUARD_SECONDS
    with psycopg.connect(with_database(url, "postgres"), autocommit=True) as conn:
        while lock_holder(conn, f"flowyard.deploy:{database_name(url)}") is not None:
            assert time.monotonic() < deadline, "the killed run's deploy lock is still held"
            time.sleep(0.02)


def _deploy_args(url: str, directory: Path, backups: Path) -> tuple[str, ...]:
    return ("-d", url, "-m", str(directory), "--backup-dir", str(backups))


def _dump_gate(url: str) -> psycopg.Connection:
    """A session holding a table pg_dump must lock, so that a backup waits there. The preflight
    counts no table of the flowyard schema; pg_dump locks every table."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA flowyard")
        conn.execute("CREATE TABLE flowyard.dump_gate (id int)")
    holder = psycopg.connect(url)
    holder.execute("LOCK TABLE flowyard.dump_gate IN ACCESS EXCLUSIVE MODE")
    return holder


def test_sigkill_during_the_backup_leaves_no_dump_that_passes_for_a_backup(tmp_path, fresh_db):
    directory, backups = migrations_dir(tmp_path), tmp_path / "backups"
    holder = _dump_gate(fresh_db)
    _kill_when_waiting(tmp_path, fresh_db, "pg_dump", "%", "deploy", *_deploy_args(fresh_db, directory, backups))

    _nothing_left_behind(tmp_path, fresh_db)
    holder.rollback()
    holder.close()
    until_its_sessions_end(fresh_db)
    assert list(backups.glob("*.dump")) == [], "a truncated dump is named like a good backup"
    assert len(list(backups.glob("*.dump.partial"))) == 1
    assert "public.accounts" not in tables(fresh_db)

    rerun = run_cli("migrate", "deploy", *_deploy_args(fresh_db, directory, backups))
    assert rerun.returncode == 0, rerun.stderr
    assert "Migration deploy: completed" in rerun.stdout
    assert len(list(backups.glob("*.dump"))) == 1
    assert list(backups.glob("*.partial")) == [], "the killed run's partial dump was never removed"


def _three_revisions(directory: Path) -> None:
    """x1..x3 after the demo's d003; x2's ALTER TABLE accounts (both ways) waits while the test reads accounts."""
    write_revision(directory, "x1", "d003", ["CREATE TABLE t1 (id int)"], ["DROP TABLE t1"])
    write_revision(
        directory,
        "x2",
        "x1",
        ["CREATE TABLE t2 (id int)", "ALTER TABLE accounts ADD COLUMN note text"],
        ["DROP TABLE t2", "ALTER TABLE accounts DROP COLUMN note"],
    )
    write_revision(directory, "x3", "x2", ["CREATE TABLE t3 (id int)"], ["DROP TABLE t3"])


def _note_columns(url: str) -> int:
    with psycopg.connect(url) as conn:
        return conn.execute(
            "SELECT count(*) FROM information_schema.columns WHERE table_name = 'accounts' AND column_name = 'note'"
        ).fetchone()[0]


def _version(url: str) -> list[tuple]:
    with psycopg.connect(url) as conn:
        return conn.execute("SELECT version_num FROM alembic_version").fetchall()


@pytest.mark.parametrize(
    ("stage", "app", "query"),
    [
        ("inside x2, after its first statement", "", "ALTER TABLE accounts%"),
        ("between x1 and x2, recording x1's checksum", "flowyard", "%INSERT INTO flowyard.applied_revisions%"),
    ],
)
def test_sigkill_inside_or_between_revisions_leaves_a_whole_revision_and_a_rerun_finishes(
    stage, app, query, tmp_path, fresh_db
):
    directory, backups = migrations_dir(tmp_path), tmp_path / "backups"
    assert run_cli("migrate", "deploy", *_deploy_args(fresh_db, directory, backups)).returncode == 0
    _three_revisions(directory)
    holder = psycopg.connect(fresh_db)
    if app:  # x1's checksum waits for the test's uncommitted row of the same revision
        holder.execute(
            "INSERT INTO flowyard.applied_revisions (revision, filename, sha256) VALUES ('x1', 'x1.py', '')"
        )
    else:  # x2's ALTER TABLE waits for the test's read of accounts
        holder.execute("SELECT count(*) FROM accounts")
    _kill_when_waiting(tmp_path, fresh_db, app, query, "deploy", *_deploy_args(fresh_db, directory, backups))

    _nothing_left_behind(tmp_path, fresh_db)
    holder.rollback()
    holder.close()
    until_its_sessions_end(fresh_db)
    assert _version(fresh_db) == [("x1",)] and _note_columns(fresh_db) == 0, stage
    assert {"public.t1"} <= tables(fresh_db) and not {"public.t2", "public.t3"} & tables(fresh_db)
    status = run_cli("migrate", "status", "-d", fresh_db, "-m", str(directory))
    assert status.returncode == 0 and "- current: `x1`" in status.stdout, status.stderr

    dumps = len(list(backups.glob("*.dump")))
    rerun = run_cli("migrate", "deploy", *_deploy_args(fresh_db, directory, backups))
    assert rerun.returncode == 0, rerun.stderr
    assert "Migration deploy: completed" in rerun.stdout
    assert len(list(backups.glob("*.dump"))) == dumps + 1, "the re-run took a fresh backup"
    assert _version(fresh_db) == [("x3",)]
    assert {"x1", "x2", "x3"} <= _recorded(fresh_db)


def _recorded(url: str) -> set[str]:
    with psycopg.connect(url) as conn:
        return {r[0] for r in conn.execute("SELECT revision FROM flowyard.applied_revisions")}


def test_sigkill_inside_a_downgrade_leaves_a_whole_revision(tmp_path, fresh_db):
    directory, backups = migrations_dir(tmp_path), tmp_path / "backups"
    _three_revisions(directory)
    assert run_cli("migrate", "deploy", *_deploy_args(fresh_db, directory, backups)).returncode == 0
    holder = psycopg.connect(fresh_db)
    holder.execute("SELECT count(*) FROM accounts")
    rollback = ("migrate", "rollback", "--to", "x1", *_deploy_args(fresh_db, directory, backups))
    _kill_when_waiting(tmp_path, fresh_db, "", "ALTER TABLE accounts%", *rollback[1:])

    _nothing_left_behind(tmp_path, fresh_db)
    holder.rollback()
    holder.close()
    until_its_sessions_end(fresh_db)
    # x3 was undone and committed; x2's downgrade (its DROP TABLE t2 too) rolled back whole.
    assert _version(fresh_db) == [("x2",)] and _note_columns(fresh_db) == 1
    assert "public.t2" in tables(fresh_db) and "public.t3" not in tables(fresh_db)
    assert "x3" not in _recorded(fresh_db)

    # The same command again finishes the rollback at x1 (`--steps 2` would now undo x1 too), and
    # once there, undoes nothing.
    for _ in range(2):
        rerun = run_cli(*rollback)
        assert rerun.returncode == 0, rerun.stderr
        assert _version(fresh_db) == [("x1",)] and _note_columns(fresh_db) == 0
        assert "public.t1" in tables(fresh_db) and "public.t2" not in tables(fresh_db)


ODD_NAME = "Dé'Q'" + "é" * 28
"""62 bytes in 33 characters: the copy's name, cut at 40 characters, went past PostgreSQL's 63 bytes
and was cut by the server, so no restore of it was ever found cut off."""


@pytest.fixture()
def restored_db(request, fresh_db):
    """``fresh_db``, or (param ``odd``) a database named :data:`ODD_NAME` on its server with a
    sibling sharing the first 40 bytes of its name; yields the URL and the sibling's (or None)."""
    if request.param != "odd":
        yield fresh_db, None
        return
    names = [ODD_NAME, ODD_NAME[:-1] + "x"]
    server = with_database(fresh_db, "postgres")
    with psycopg.connect(server, autocommit=True) as conn:
        for name in names:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield with_database(fresh_db, names[0]), with_database(fresh_db, names[1])
    with psycopg.connect(server, autocommit=True) as conn:
        for name in names:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.mark.parametrize("restored_db", ["fresh", "odd"], indirect=True)
def test_sigkill_during_the_restore_is_refused_until_it_is_finished_as_told(tmp_path, restored_db):
    """Revision x2 fails; the restore is killed while pg_restore loads the gated table, whose CHECK
    waits while the test's role exists, in a pg_restore session only (the original's rows passed)."""
    fresh_db, sibling = restored_db
    directory, backups = migrations_dir(tmp_path), tmp_path / "backups"
    gate = f"gate_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(fresh_db, autocommit=True) as conn:
        conn.execute(
            """
            CREATE FUNCTION public.restore_gate(role text) RETURNS boolean LANGUAGE plpgsql AS $$
            BEGIN
                WHILE current_setting('application_name') = 'pg_restore'
                      AND EXISTS (SELECT FROM pg_roles WHERE rolname = role) LOOP
                    PERFORM pg_sleep(0.01);
                END LOOP;
                RETURN true;
            END $$
            """
        )
        conn.execute(
            sql.SQL("CREATE TABLE gated (id int PRIMARY KEY CHECK (public.restore_gate({})))").format(
                sql.Literal(gate)
            )
        )
        conn.execute("INSERT INTO gated VALUES (1), (2)")
        conn.execute(sql.SQL("COMMENT ON DATABASE {} IS 'its own'").format(sql.Identifier(database_name(fresh_db))))
    write_revision(directory, "x1", "d003", ["CREATE TABLE t1 (id int)"], ["DROP TABLE t1"])
    write_revision(directory, "x2", "x1", ["SELECT 1/0"], [])
    before = fingerprint(fresh_db)
    server = with_database(fresh_db, "postgres")
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {}").format(sql.Identifier(gate)))
    try:
        _kill_when_waiting(tmp_path, fresh_db, "pg_restore", "COPY public.gated%", "deploy", *_deploy_args(fresh_db, directory, backups))
        _nothing_left_behind(tmp_path, fresh_db)
    finally:
        with psycopg.connect(server, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(gate)))
    until_its_sessions_end(fresh_db)

    name = database_name(fresh_db)
    status_args = ("status", "-d", fresh_db, "-m", str(directory))
    for args in [status_args, ("deploy", *_deploy_args(fresh_db, directory, backups))]:
        line = _one_line_error(run_cli("migrate", *args), f"a restore of {name} from {backups}")
        assert "was cut off" in line and "; nothing was changed" in line
    assert "public.t1" not in tables(fresh_db), "the refused deploy built on the half-restored database"
    with psycopg.connect(fresh_db) as conn:  # half restored: the post-data section (keys) never ran
        keys = "SELECT count(*) FROM pg_constraint WHERE conrelid = 'gated'::regclass AND contype = 'p'"
        assert conn.execute(keys).fetchone() == (0,)
    assert len(list(backups.glob("*.dump"))) == 1
    if sibling is not None:  # the other database whose copy's name begins the same is not refused
        other = run_cli("migrate", "status", "-d", sibling, "-m", str(directory))
        assert other.returncode == 0 and "- current: none" in other.stdout, other.stderr

    finish = line.split("finish the restore first: ", 1)[1].removesuffix("; nothing was changed")
    done = subprocess.run(finish, shell=True, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert fingerprint(fresh_db) == before
    status = run_cli("migrate", *status_args)
    assert status.returncode == 0 and "- current: none" in status.stdout, status.stderr
    with psycopg.connect(fresh_db) as conn:
        comment = "SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = current_database()"
        assert conn.execute(comment).fetchone() == ("its own",)


def _sigterm(cli: subprocess.Popen[bytes]) -> int:
    """SIGTERM to the CLI's process only, and its exit status."""
    os.kill(cli.pid, signal.SIGTERM)
    return cli.wait()


def test_sigterm_during_the_backup_leaves_no_pg_dump_session_holding_locks(tmp_path, fresh_db):
    """SIGTERM to the CLI's process only, as a supervisor or a Prefect cancellation sends it: the
    run stops its pg_dump, which must cancel its statement on the server. Killed outright, it left
    its session waiting on the gate, holding the ACCESS SHARE locks of every table it had locked
    (which blocked the re-run's migrations), for as long as the gate was held."""
    directory, backups = migrations_dir(tmp_path), tmp_path / "backups"
    holder = _dump_gate(fresh_db)
    code = _kill_when_waiting(
        tmp_path, fresh_db, "pg_dump", "%", "deploy", *_deploy_args(fresh_db, directory, backups), stop=_sigterm
    )
    assert code == -signal.SIGTERM, (tmp_path / "cli.log").read_text()[-3000:]

    _nothing_left_behind(tmp_path, fresh_db)
    sessions = "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pg_dump' AND datname = %s"
    deadline = time.monotonic() + GUARD_SECONDS
    with psycopg.connect(with_database(fresh_db, "postgres"), autocommit=True) as conn:
        while conn.execute(sessions, (database_name(fresh_db),)).fetchone() != (0,):
            assert time.monotonic() < deadline, "the stopped pg_dump's session still waits, holding its locks"
            time.sleep(0.02)
    holder.rollback()
    holder.close()
    assert list(backups.iterdir()) == [], "the stopped run left its partial dump"


def test_status_works_for_a_role_that_may_not_connect_to_the_maintenance_database(limited_role, tmp_path, fresh_db):
    """Status checks for a cut-off restore through the database itself (the catalogs it reads are
    shared): a role a DBA keeps out of ``postgres`` (REVOKE CONNECT ... FROM PUBLIC) had its status
    fail, which needs nothing there. A deploy does need it (its lock and a restore live there)."""
    directory = migrations_dir(tmp_path)
    role_url = limited_role.url(fresh_db)
    server = with_database(fresh_db, "postgres")
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute("REVOKE CONNECT ON DATABASE postgres FROM PUBLIC")
    try:
        status = run_cli("migrate", "status", "-d", role_url, "-m", str(directory))
        deploy = run_cli("migrate", "deploy", *_deploy_args(role_url, directory, tmp_path / "backups"))
    finally:
        with psycopg.connect(server, autocommit=True) as conn:
            conn.execute("GRANT CONNECT ON DATABASE postgres TO PUBLIC")
    assert status.returncode == 0 and "- current: none" in status.stdout, status.stderr
    assert limited_role.password not in deploy.stderr
    _one_line_error(deploy, f"cannot connect to {mask_url(with_database(role_url, 'postgres'))}: ")
    assert 'permission denied for database "postgres"' in deploy.stderr
