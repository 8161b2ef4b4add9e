"""Backups with matching client tools, verified archives, and restores that rebuild a database exactly."""

from __future__ import annotations

import os
import shlex
import shutil
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from urllib.parse import quote

import psycopg
import pytest
from psycopg import sql

from tasks.db import database_name, drop_database, ensure_database
from tasks.embedded_pg import BIN_DIR
from tasks.errors import UserError
from tasks.pg_backup import (
    backup_database,
    maintenance_url,
    pg_binaries,
    remove_stale_partials,
    restore_command,
    restore_database,
    server_major,
)
from tests.conftest import Role, Server
from tests.migration_helpers import fingerprint
from tests.process_support import until_not

DEBIAN_15 = Path("/usr/lib/postgresql/15/bin")


def test_client_tools_match_the_server_major():
    assert pg_binaries(18) == BIN_DIR
    if (DEBIAN_15 / "pg_dump").exists():
        assert pg_binaries(15) == DEBIAN_15
    with pytest.raises(UserError, match=r"^no pg_dump for PostgreSQL 11 .*install postgresql-client-11"):
        pg_binaries(11, search_path=str(BIN_DIR))


def _populate(url: str) -> None:
    with psycopg.connect(url) as conn:
        conn.execute("CREATE SCHEMA app")
        conn.execute("CREATE TABLE app.items (id serial PRIMARY KEY, name text NOT NULL)")
        conn.execute("INSERT INTO app.items (name) SELECT 'item ' || g FROM generate_series(1, 200) g")
        conn.execute("CREATE TABLE public.notes (id int PRIMARY KEY, item_id int REFERENCES app.items)")
        conn.execute("INSERT INTO public.notes VALUES (1, 1), (2, 2)")
        conn.execute("CREATE INDEX items_name ON app.items (name)")
    with psycopg.connect(url, autocommit=True) as conn:
        _set_work_mem(conn, "7MB")


def _set_work_mem(conn: psycopg.Connection, value: str) -> None:
    statement = sql.SQL("ALTER DATABASE {} SET work_mem = {}").format(
        sql.Identifier(conn.info.dbname), sql.Literal(value)
    )
    conn.execute(statement)


def _work_mem(url: str) -> str:
    with psycopg.connect(url) as conn:
        return conn.execute("SHOW work_mem").fetchone()[0]


@pytest.mark.parametrize("server", ["fresh_db", "older_db"])
def test_backup_then_restore_rebuilds_the_database_exactly(server, request, tmp_path):
    """On the embedded 18 and on the machine's older PostgreSQL package (its own client tools)."""
    fresh_db = request.getfixturevalue(server)
    _populate(fresh_db)
    backup = backup_database(fresh_db, tmp_path / "backups")
    assert Path(backup.path).stat().st_size == backup.size_bytes > 0
    with psycopg.connect(fresh_db) as conn:
        major = server_major(conn)
    assert backup.server_major == major and backup.contents["TABLE DATA"] == 2 and backup.contents["INDEX"] == 1
    before = fingerprint(fresh_db)

    with psycopg.connect(fresh_db, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA extra")
        conn.execute("CREATE TABLE extra.t (id int)")
        conn.execute("DROP TABLE public.notes")
        conn.execute("INSERT INTO app.items (name) VALUES ('late')")
        _set_work_mem(conn, "9MB")
    bystander = psycopg.connect(fresh_db, autocommit=True)

    report = restore_database(fresh_db, backup)

    assert fingerprint(fresh_db) == before
    assert _work_mem(fresh_db) == "7MB"
    assert report.terminated_connections >= 1
    assert report.row_counts == {"app.items": 200, "public.notes": 2}
    with pytest.raises(psycopg.OperationalError):
        bystander.execute("SELECT 1")
    bystander.close()


def test_a_failed_restore_puts_the_database_back(fresh_db, tmp_path):
    _populate(fresh_db)
    backup = backup_database(fresh_db, tmp_path)
    truncated = tmp_path / "truncated.dump"
    shutil.copy(backup.path, truncated)
    with truncated.open("r+b") as f:
        f.truncate(truncated.stat().st_size // 2)
    with psycopg.connect(fresh_db) as conn:
        conn.execute("INSERT INTO app.items (name) VALUES ('after the backup')")
    before = fingerprint(fresh_db)

    with pytest.raises(UserError, match=r"^pg_restore of .*truncated.dump failed: "):
        restore_database(fresh_db, replace(backup, path=str(truncated)))

    assert fingerprint(fresh_db) == before


def test_password_goes_to_the_environment_not_the_command_line():
    from tasks.db import libpq_target

    uri, env = libpq_target("postgresql://app:p%40ss%25w@db.example:5433/app?sslmode=require")
    assert uri == "postgresql://app@db.example:5433/app?sslmode=require"
    assert env["PGPASSWORD"] == "p@ss%w"
    # Given as a query option instead, it was left in the URI: in pg_dump's argv, and in the note a
    # cut-off restore leaves on the database, which any role can read.
    uri, env = libpq_target("postgresql://app@db.example/app?password=p%40ss&sslmode=require")
    assert uri == "postgresql://app@db.example/app?sslmode=require"
    assert env["PGPASSWORD"] == "p@ss"


def test_a_database_whose_name_needs_percent_encoding_is_backed_up_and_restored(pg, tmp_path):
    """Its URL names it ``with%20space``: the restore renamed a database of that literal name,
    which does not exist, and failed."""
    name = f"with space {uuid.uuid4().hex[:6]}"
    ensure_database(pg.url(), name)
    url = pg.url(quote(name))
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CREATE TABLE t AS SELECT g AS id FROM generate_series(1, 5) g")
        backup = backup_database(url, tmp_path)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("DELETE FROM t")
        report = restore_database(url, backup)
        assert report.row_counts == {"public.t": 5}
    finally:
        drop_database(pg.url(), name)


def test_an_unreadable_archive_is_refused(fresh_db, tmp_path):
    from tasks.pg_backup import archive_contents

    _populate(fresh_db)
    backup = backup_database(fresh_db, tmp_path)
    assert archive_contents(BIN_DIR, Path(backup.path)) == backup.contents
    cut = tmp_path / "cut.dump"
    cut.write_bytes(Path(backup.path).read_bytes()[:64])  # the table of contents is gone
    garbage = tmp_path / "garbage.dump"
    garbage.write_bytes(b"not an archive" * 100)
    for broken in (cut, garbage):
        with pytest.raises(UserError, match=r"^pg_restore --list failed: "):
            archive_contents(BIN_DIR, broken)


FROZEN = {
    "default_transaction_read_only": "on",
    "default_transaction_isolation": "serializable",
    "search_path": "nowhere",
}
"""A DBA's database settings a restore recreates before the contents, and then restores under."""


def _database_settings(url: str) -> list[str]:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT s.setconfig FROM pg_db_role_setting s JOIN pg_database d ON d.oid = s.setdatabase"
            " WHERE d.datname = current_database() AND s.setrole = 0"
        ).fetchone()
        return sorted(row[0])


def test_a_database_frozen_read_only_is_restored_whole_and_stays_frozen(fresh_db: str, tmp_path: Path) -> None:
    _populate(fresh_db)
    with psycopg.connect(fresh_db, autocommit=True) as conn:
        for name, value in FROZEN.items():
            conn.execute(
                sql.SQL("ALTER DATABASE {} SET {} = {}").format(
                    sql.Identifier(conn.info.dbname), sql.Identifier(name), sql.Literal(value)
                )
            )
    settings = _database_settings(fresh_db)
    backup = backup_database(fresh_db, tmp_path)
    before = fingerprint(fresh_db)
    with psycopg.connect(fresh_db, options="-c default_transaction_read_only=off") as conn:
        conn.execute("DELETE FROM public.notes")

    report = restore_database(fresh_db, backup)

    assert report.row_counts == {"app.items": 200, "public.notes": 2}
    assert fingerprint(fresh_db) == before
    assert _database_settings(fresh_db) == settings
    with psycopg.connect(fresh_db) as conn, pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
        conn.execute("INSERT INTO public.notes VALUES (3, 3)")


def test_pg_restore_gets_startup_options_only_for_a_frozen_database(fresh_db: str, tmp_path: Path) -> None:
    """``PGOPTIONS`` went to every ``pg_restore``: a connection pooler (pgbouncer) refuses startup
    options, so every restore through one failed, though only a frozen database's archive needs them."""
    _populate(fresh_db)
    maintenance = maintenance_url(fresh_db)
    argv, env = restore_command(maintenance, backup_database(fresh_db, tmp_path))
    assert env.get("PGOPTIONS") == os.environ.get("PGOPTIONS") and "default_transaction_read_only" not in " ".join(argv)
    with psycopg.connect(fresh_db, autocommit=True) as conn:
        conn.execute(
            sql.SQL("ALTER DATABASE {} SET default_transaction_read_only = on").format(sql.Identifier(conn.info.dbname))
        )
    _, env = restore_command(maintenance, backup_database(fresh_db, tmp_path))
    assert env["PGOPTIONS"].endswith("-c default_transaction_read_only=off")


def test_a_role_frozen_read_only_after_the_backup_is_told_in_one_line_and_nothing_changes(
    limited_role: Role, fresh_db: str, pg: Server, tmp_path: Path
) -> None:
    """A DBA froze the deploy's role (``ALTER ROLE … SET default_transaction_read_only = on``)
    after its backup: the restore's rename was refused with psycopg's raw ReadOnlySqlTransaction,
    naming neither the setting, nor the backup kept, nor how to finish."""
    role, database = sql.Identifier(limited_role.name), database_name(fresh_db)
    with psycopg.connect(pg.url(), autocommit=True) as conn:
        conn.execute(sql.SQL("ALTER ROLE {} CREATEDB").format(role))
        conn.execute(sql.SQL("ALTER DATABASE {} OWNER TO {}").format(sql.Identifier(database), role))
    url = limited_role.url(fresh_db)
    with psycopg.connect(url) as conn:
        conn.execute("CREATE TABLE notes (id int PRIMARY KEY)")
        conn.execute("INSERT INTO notes VALUES (1), (2)")
    backup = backup_database(url, tmp_path)
    with psycopg.connect(url) as conn:
        conn.execute("INSERT INTO notes VALUES (3)")  # the failed run's change
    before = fingerprint(fresh_db)
    advice = limited_role.freeze_read_only(pg.url())

    with pytest.raises(UserError) as refused:
        restore_database(url, backup)

    argv, _ = restore_command(maintenance_url(url), backup)
    assert str(refused.value) == (
        f"cannot restore {database} from {backup.path}: the server accepts no writes (cannot execute ALTER "
        f"DATABASE in a read-only transaction): {advice} if flowyard may write there, or point the URL at a role and database that "
        f"may write; nothing was changed and the backup is kept at {backup.path}: once writes are allowed, "
        f"restore it by hand (rename {database} aside, run {shlex.join(argv)}, then drop the renamed copy)"
    )
    assert fingerprint(fresh_db) == before and Path(backup.path).exists()


def test_a_backup_removes_a_killed_runs_partial_dump_never_one_being_written(fresh_db, tmp_path):
    """A real backup, held in its pg_dump by a table lock, keeps its partial dump through a
    cleanup, while the partial of a backup no process writes any more is removed, and one that
    cannot be removed is left without failing the backup."""
    backups = tmp_path / "backups"
    backups.mkdir()
    stale = backups / f"{database_name(fresh_db)}-20260101T000000-0a1b2c.dump.partial"
    stale.write_bytes(b"PGDMP, cut off by a kill")
    (backups / "not-a-file.dump.partial").mkdir()  # cannot be unlinked: left, and no reason to fail
    with psycopg.connect(fresh_db) as conn:
        conn.execute("CREATE TABLE gate (id int)")
    holder = psycopg.connect(fresh_db)
    holder.execute("LOCK TABLE gate IN ACCESS EXCLUSIVE MODE")
    waiting = "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pg_dump' AND wait_event_type = 'Lock'"
    with ThreadPoolExecutor(1) as pool, psycopg.connect(fresh_db, autocommit=True) as watch:
        running = pool.submit(backup_database, fresh_db, backups)
        until_not(lambda: watch.execute(waiting).fetchone() == (0,) and not running.done(), "pg_dump never waited")
        assert not stale.exists(), "the backup left a killed run's partial dump"
        [live] = (p for p in backups.glob("*.dump.partial") if p.is_file())
        assert remove_stale_partials(backups) == [] and live.exists()
        holder.rollback()
        backup = running.result()
    holder.close()
    assert sorted(p.name for p in backups.iterdir()) == sorted([Path(backup.path).name, "not-a-file.dump.partial"])
