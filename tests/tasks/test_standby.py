"""flowyard against a real hot standby of the session's server, built with the wheel's
``pg_basebackup``: reads work whatever the isolation a DBA set as the default, and writes are
refused in one line naming the standby."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from psycopg import sql

from tasks import alembic_deploy
from tasks.bulk_sources import Column, TableInfo
from tasks.db import connect, database_name, one_row
from tasks.embedded_pg import BIN_DIR, SERVER_USER, EmbeddedPostgres
from tasks.errors import ServerReadOnly, UserError
from tasks.migration_preflight import run_preflight
from tasks.schema_copy import copy_table_ddl
from tasks.state import state_url
from tests.conftest import Server, run_cli, scratch_database
from tests.migration_helpers import migrations_dir


def _as_server_user(*argv: str | Path) -> None:
    """Run a PostgreSQL tool as the embedded server's user when this is root, which PostgreSQL refuses."""
    root = os.geteuid() == 0
    subprocess.run(
        [str(arg) for arg in argv],
        check=True,
        capture_output=True,
        user=SERVER_USER if root else None,
        group=SERVER_USER if root else None,
        extra_groups=[] if root else None,
    )


@pytest.fixture(scope="module")
def standby(pg: Server) -> Iterator[str]:
    """A hot standby of a new database on the session's server whose DBA made ``serializable``
    the database's default isolation (replicated with it), holding flowyard's state schema; yields
    its URL. It listens on a Unix socket only (no TCP port), and is stopped after the module."""
    if not (BIN_DIR / "pg_basebackup").exists():
        pytest.skip(f"no pg_basebackup in {BIN_DIR}")
    if not isinstance(pg, EmbeddedPostgres):
        pytest.skip("a standby is built from the embedded server (its replication is trusted locally)")
    with scratch_database(pg) as primary:
        state_url(primary)
        with connect(primary, autocommit=True) as conn:
            conn.execute("CREATE TABLE orders (id bigint PRIMARY KEY, note text NOT NULL DEFAULT 'n/a')")
            conn.execute(
                sql.SQL("ALTER DATABASE {} SET default_transaction_isolation = 'serializable'").format(
                    sql.Identifier(conn.info.dbname)
                )
            )
        home = Path(tempfile.mkdtemp(prefix="fy-standby-"))  # short: a socket's path is at most 107 bytes
        if os.geteuid() == 0:
            shutil.chown(home, SERVER_USER, SERVER_USER)
        data = home / "data"
        _as_server_user(BIN_DIR / "pg_basebackup", "-d", pg.url(), "-D", data, "-R", "-X", "stream", "-c", "fast")
        options = f"-c listen_addresses='' -c unix_socket_directories='{home}' -c max_connections=300 -c shared_buffers=32MB"
        _as_server_user(BIN_DIR / "pg_ctl", "-D", data, "-w", "-t", "60", "-l", home / "log", "-o", options, "start")
        try:
            yield f"postgresql://postgres@/{database_name(primary)}?host={home}"
        finally:
            _as_server_user(BIN_DIR / "pg_ctl", "-D", data, "-w", "-t", "60", "-m", "fast", "stop")
            shutil.rmtree(home, ignore_errors=True)


def test_a_standby_under_a_serializable_default_is_read_and_refuses_writes_in_one_line(standby: str) -> None:
    """PostgreSQL refuses serializable on a hot standby ("cannot use serializable mode in a hot
    standby"), so under a DBA's serializable default every connection failed its first statement
    with a traceback, reads too: ``queue list`` of a replica, a bulk copy from one. Reads work;
    a write names the standby and the fix."""
    for autocommit in (False, True):
        with connect(standby, autocommit=autocommit) as conn:
            assert one_row(conn, "SELECT pg_is_in_recovery(), current_setting('transaction_isolation')") == (
                True,
                "read committed",
            )
    listed = run_cli("queue", "list", "--database-url", standby)
    assert (listed.returncode, listed.stderr) == (0, "")
    created = run_cli("queue", "create", "on a replica", "--database-url", standby)
    assert created.returncode == UserError.exit_code
    assert created.stderr.splitlines() == [
        f"flowyard: error: {standby} accepts no writes (cannot execute INSERT in a read-only transaction): "
        "it is a standby (in recovery); point the URL at the primary"
    ]


def test_a_deploy_to_a_standby_is_refused_before_its_backup_and_its_status_and_dry_run_read_it(
    standby: str, tmp_path: Path
) -> None:
    """A deploy's preflight refuses a standby before any backup, in one line saying nothing was
    changed; the reads a status or a dry run make (through the project's own ``env.py``) work
    under the DBA's serializable default, which SQLAlchemy's first statement met as a traceback."""
    directory = str(migrations_dir(tmp_path))
    with pytest.raises(ServerReadOnly, match="it is a standby .in recovery.; point the URL at the primary; nothing was changed"):
        run_preflight(standby, directory, "head", tmp_path / "backups", 50)
    assert not (tmp_path / "backups").exists()
    status = run_preflight(standby, directory, "head", None, 50, writes=False).status
    assert (status.current, [r.revision for r in status.pending]) == ((), ["d001", "d002", "d003"])
    assert "CREATE TABLE accounts" in alembic_deploy.offline_plan(standby, directory, status)


def test_a_bulk_copys_ddl_is_read_from_a_standby_under_a_serializable_default(standby: str, fresh_db: str) -> None:
    """A PG→PG copy takes its tables' DDL from ``pg_dump`` of the source: from a replica under a
    DBA's serializable default, pg_dump's first statement failed ("cannot use serializable mode in
    a hot standby"), so no copy could read a replica."""
    table = TableInfo("orders", (Column("id", "bigint", True), Column("note", "text")), schema="public")
    copy_table_ddl(standby, fresh_db, [table])
    with connect(fresh_db) as conn:
        assert one_row(conn, "SELECT count(*) FROM pg_attrdef WHERE adrelid = 'public.orders'::regclass") == (1,)
