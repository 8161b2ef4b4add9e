"""The deploy, status and rollback flows against real databases, a real Prefect server and real
concurrent runs: happy path, dry run, restore after failures, edited revisions, the lock."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import psycopg
import pytest
from psycopg import sql

from flows.deploy_migrations import MigrationFailed, deploy_migrations, migration_rollback, migration_status
from tasks.db import database_name, with_database
from tasks.errors import ServerReadOnly, UserError
from tasks.migration_report import artifact_key
from tasks.revision_checksums import file_checksum
from tests.conftest import run_cli
from tests.migration_helpers import fingerprint, migrations_dir, tables, write_revision

pytestmark = pytest.mark.usefixtures("prefect_api")


def _deploy(url: str, directory: Path, tmp_path: Path, **kwargs: object):
    return deploy_migrations(
        database_url=url, migrations_dir=str(directory), backup_dir=str(tmp_path / "backups"), **kwargs
    )


def _seed_legacy(url: str) -> None:
    """Data that exists before flowyard's first deploy, so backups and restores have content."""
    with psycopg.connect(url) as conn:
        conn.execute("CREATE TABLE legacy (id serial PRIMARY KEY, note text NOT NULL)")
        conn.execute("INSERT INTO legacy (note) SELECT 'row ' || g FROM generate_series(1, 50) g")


def _artifacts(api: str, key: str) -> list[dict]:
    response = httpx.post(f"{api}/artifacts/filter", json={"artifacts": {"key": {"any_": [key]}}}, timeout=10)
    response.raise_for_status()
    return response.json()


def test_happy_path_applies_validates_records_and_reports(fresh_db, tmp_path, prefect_api):
    _seed_legacy(fresh_db)
    directory = migrations_dir(tmp_path)
    report = _deploy(fresh_db, directory, tmp_path, validation_queries=["SELECT count(*) = 3 FROM accounts"])

    assert report.outcome == "completed"
    assert [(r.revision, r.direction) for r in report.revisions] == [
        ("d001", "upgrade"),
        ("d002", "upgrade"),
        ("d003", "upgrade"),
    ]
    assert all(r.seconds > 0 for r in report.revisions)
    assert Path(report.backup.path).exists() and report.backup.contents["TABLE DATA"] == 1
    assert report.row_counts_before == {"public.legacy": 50}
    assert report.row_counts_after == {
        "public.accounts": 3,
        "public.alembic_version": 1,
        "public.legacy": 50,
        "public.transfers": 2,
    }
    assert [q.passed for q in report.validation.queries] == [True]
    with psycopg.connect(fresh_db) as conn:
        recorded = dict(conn.execute("SELECT revision, sha256 FROM flowyard.applied_revisions").fetchall())
    assert recorded == {
        p.stem.split("_")[0]: file_checksum(p) for p in (directory / "versions").glob("d*.py")
    }

    key = artifact_key("migrations-deploy", fresh_db)
    revisions_table = _artifacts(prefect_api, f"{key}-revisions")
    assert revisions_table and "d003" in revisions_table[0]["data"]
    counts_table = _artifacts(prefect_api, f"{key}-row-counts")
    assert counts_table and "public.transfers" in counts_table[0]["data"]
    summary = _artifacts(prefect_api, key)
    assert summary and summary[0]["type"] == "markdown" and "completed" in summary[0]["data"]

    again = _deploy(fresh_db, directory, tmp_path)
    assert again.outcome == "completed" and again.revisions == []
    assert again.preflight.status.current == ("d003",)


def test_dry_run_prints_the_plan_and_changes_nothing(fresh_db, tmp_path):
    _seed_legacy(fresh_db)
    directory = migrations_dir(tmp_path)
    _deploy(fresh_db, directory, tmp_path, target="d001")
    before = fingerprint(fresh_db)

    report = _deploy(fresh_db, directory, tmp_path, dry_run=True)

    assert report.outcome == "completed" and report.backup is None and report.revisions == []
    assert (
        "CREATE TABLE transfers" in report.plan
        and "UPDATE alembic_version SET version_num='d003'" in report.plan
    )
    assert "CREATE TABLE accounts" not in report.plan
    assert fingerprint(fresh_db) == before
    assert len(list((tmp_path / "backups").iterdir())) == 1  # only the first deploy's backup


def test_failing_revision_restores_the_pre_run_state(fresh_db, tmp_path, prefect_api):
    _seed_legacy(fresh_db)
    directory = migrations_dir(tmp_path)
    _deploy(fresh_db, directory, tmp_path)
    with psycopg.connect(fresh_db) as conn:
        conn.execute("INSERT INTO accounts (id, owner) VALUES (10, 'late'), (11, 'later')")
        conn.execute("SELECT nextval('legacy_id_seq')")
    write_revision(
        directory,
        "x1",
        "d003",
        [
            "CREATE TABLE audit (id int PRIMARY KEY)",
            "ALTER TABLE accounts ADD COLUMN email text",
            "DELETE FROM legacy WHERE id > 25",
        ],
        ["DROP TABLE audit"],
    )
    write_revision(directory, "x2", "x1", ["INSERT INTO accounts (id, owner) VALUES (1, 'duplicate')"], [])
    before = fingerprint(fresh_db)
    bystander = psycopg.connect(fresh_db, autocommit=True)

    with pytest.raises(MigrationFailed, match=r"upgrade x2 failed: .*UniqueViolation.*; restored"):
        _deploy(fresh_db, directory, tmp_path)

    assert fingerprint(fresh_db) == before
    assert "public.audit" not in tables(fresh_db)
    with pytest.raises(psycopg.OperationalError):
        bystander.execute("SELECT 1")
    bystander.close()
    # The failed run still leaves its summary and tables: what ran, and what the restore brought back.
    key = artifact_key("migrations-deploy", fresh_db)
    [summary] = [a for a in _artifacts(prefect_api, key) if "failed, restored from backup" in a["data"]]
    assert "UniqueViolation" in summary["data"]
    assert any('"x1"' in a["data"] for a in _artifacts(prefect_api, f"{key}-revisions"))
    with psycopg.connect(with_database(fresh_db, "postgres")) as conn:
        leftovers = conn.execute(
            "SELECT datname FROM pg_database WHERE datname LIKE %s",
            (database_name(fresh_db)[:40] + "_pre_restore%",),
        ).fetchall()
    assert leftovers == []


def test_failed_validation_and_new_fk_orphans_restore(fresh_db, tmp_path):
    directory = migrations_dir(tmp_path)
    _deploy(fresh_db, directory, tmp_path)
    before = fingerprint(fresh_db)
    with pytest.raises(MigrationFailed, match=r"validation failed: 'SELECT count\(\*\) = 99 FROM accounts'"):
        _deploy(fresh_db, directory, tmp_path, validation_queries=["SELECT count(*) = 99 FROM accounts"])
    assert fingerprint(fresh_db) == before

    write_revision(
        directory,
        "o1",
        "d003",
        [
            "CREATE TABLE notes (id int PRIMARY KEY, account_id int NOT NULL)",
            "INSERT INTO notes VALUES (1, 1), (2, 404)",
            "ALTER TABLE notes ADD FOREIGN KEY (account_id) REFERENCES accounts NOT VALID",
        ],
        ["DROP TABLE notes"],
    )
    with pytest.raises(MigrationFailed, match=r"fk_orphans in public.notes.*; restored") as failure:
        _deploy(fresh_db, directory, tmp_path)
    assert "public.notes" not in tables(fresh_db)
    assert fingerprint(fresh_db) == before
    assert "restored" in str(failure.value)


def test_edited_applied_revision_is_refused(fresh_db, tmp_path):
    directory = migrations_dir(tmp_path)
    _deploy(fresh_db, directory, tmp_path)
    write_revision(directory, "x1", "d003", ["CREATE TABLE later (id int)"], ["DROP TABLE later"])
    edited = directory / "versions" / "d002_transfers.py"
    edited.write_text(edited.read_text() + "\n# tweaked after the fact\n")
    before = fingerprint(fresh_db)

    with pytest.raises(UserError, match=r"edited after they were applied: d002 \(d002_transfers.py"):
        _deploy(fresh_db, directory, tmp_path)

    assert fingerprint(fresh_db) == before
    assert len(list((tmp_path / "backups").iterdir())) == 1


def _wait_for(condition, what: str, timeout: float = 120.0) -> None:
    """Poll a condition; the timeout only guards against a hang, it measures nothing."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.05)


def test_concurrent_deploys_are_serialized_by_the_lock(fresh_db, tmp_path):
    directory = migrations_dir(tmp_path)
    # The last revision waits on an advisory lock the test holds: the first deploy stays inside
    # its migration (holding the deploy lock) until the test lets it go.
    write_revision(
        directory,
        "gate",
        "d003",
        ["SELECT pg_advisory_xact_lock(4242)", "CREATE TABLE gate_passed (id int)"],
        ["DROP TABLE gate_passed"],
    )
    gate = psycopg.connect(fresh_db, autocommit=True)
    gate.execute("SELECT pg_advisory_lock(4242)")
    maintenance = psycopg.connect(with_database(fresh_db, "postgres"), autocommit=True)
    lock_app = f"flowyard lock flowyard.deploy:{database_name(fresh_db)}"
    results: dict[str, object] = {}

    def run(name: str, timeout: float) -> None:
        try:
            results[name] = _deploy(fresh_db, directory, tmp_path, lock_timeout=timeout)
        except Exception as exc:  # recorded and asserted below
            results[name] = exc

    def lock_sessions() -> int:
        return maintenance.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (lock_app,)
        ).fetchone()[0]

    first = threading.Thread(target=run, args=("first", 60))
    first.start()
    _wait_for(
        lambda: (
            gate.execute(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = 4242 AND NOT granted"
            ).fetchone()[0]
            == 1
        ),
        "the first deploy to block inside its migration",
    )

    impatient = run_cli(
        "migrate",
        "deploy",
        "-d",
        fresh_db,
        "-m",
        str(directory),
        "--lock-timeout",
        "0.5",
        "--backup-dir",
        str(tmp_path / "backups"),
    )
    assert impatient.returncode == 2, impatient.stderr
    assert "Traceback" not in impatient.stderr
    [line] = [x for x in impatient.stderr.splitlines() if x.startswith("flowyard")]
    assert f"'flowyard.deploy:{database_name(fresh_db)}'" in line and "is held by pid" in line

    second = threading.Thread(target=run, args=("second", 300))
    second.start()
    _wait_for(lambda: lock_sessions() == 2, "the second deploy to wait for the lock")
    assert "second" not in results and "gate_passed" not in str(tables(fresh_db))

    gate.execute("SELECT pg_advisory_unlock(4242)")
    first.join()
    second.join()
    gate.close()
    maintenance.close()

    assert [r.revision for r in results["first"].revisions] == ["d001", "d002", "d003", "gate"]
    assert results["second"].outcome == "completed" and results["second"].revisions == []
    assert results["second"].preflight.status.current == ("gate",)


def test_lock_timeout_out_of_range_is_refused_before_anything_runs(fresh_db, tmp_path):
    # The flow's parameter, as the UI or a deployment passes it: nan used to wait forever.
    directory = migrations_dir(tmp_path)
    for value in (-1.0, 10.0**20):
        with pytest.raises(UserError, match=r"^lock_timeout \S+ is out of range; give 0 to 31536000$"):
            _deploy(fresh_db, directory, tmp_path, lock_timeout=value)
    with pytest.raises(UserError, match=r"^deploy-migrations: parameter lock_timeout is NaN: not a finite number"):
        _deploy(fresh_db, directory, tmp_path, lock_timeout=float("nan"))  # refused before the flow run
    assert tables(fresh_db) == set()


def test_status_and_rollback(fresh_db, tmp_path):
    directory = migrations_dir(tmp_path)
    fresh = migration_status(database_url=fresh_db, migrations_dir=str(directory))
    assert fresh.current == () and [r.revision for r in fresh.pending] == ["d001", "d002", "d003"]
    _deploy(fresh_db, directory, tmp_path)
    status = migration_status(database_url=fresh_db, migrations_dir=str(directory))
    assert status.current == ("d003",) and status.heads == ("d003",) and status.pending == ()
    assert [r.revision for r in status.applied] == ["d001", "d002", "d003"]

    report = migration_rollback(
        steps=2, database_url=fresh_db, migrations_dir=str(directory), backup_dir=str(tmp_path / "backups")
    )
    assert [(r.revision, r.direction) for r in report.revisions] == [
        ("d003", "downgrade"),
        ("d002", "downgrade"),
    ]
    after = migration_status(database_url=fresh_db, migrations_dir=str(directory))
    assert after.current == ("d001",) and [r.revision for r in after.pending] == ["d002", "d003"]
    assert "public.transfers" not in tables(fresh_db) and "public.accounts" in tables(fresh_db)
    with psycopg.connect(fresh_db) as conn:
        assert conn.execute("SELECT array_agg(revision) FROM flowyard.applied_revisions").fetchone()[0] == [
            "d001"
        ]

    before = fingerprint(fresh_db)
    with pytest.raises(UserError, match="cannot roll back 5 revisions: only 1 are applied"):
        migration_rollback(
            steps=5,
            database_url=fresh_db,
            migrations_dir=str(directory),
            backup_dir=str(tmp_path / "backups"),
        )
    assert fingerprint(fresh_db) == before


SABOTAGE = '''"""Deletes the run's backup, then fails: the restore itself must fail, loudly."""

import pathlib

from alembic import op

revision = "sabotage"
down_revision = "d003"


def upgrade() -> None:
    op.execute("CREATE TABLE half_done (id int)")
    for dump in pathlib.Path({backups!r}).glob("*.dump"):
        dump.unlink()
    op.execute("SELECT 1/0")


def downgrade() -> None:
    pass
'''


def test_a_failed_restore_is_reported_and_leaves_the_database_in_place(fresh_db, tmp_path):
    directory = migrations_dir(tmp_path)
    _deploy(fresh_db, directory, tmp_path)
    (directory / "versions" / "sabotage.py").write_text(SABOTAGE.format(backups=str(tmp_path / "backups")))
    before = fingerprint(fresh_db)

    with pytest.raises(
        MigrationFailed, match=r"upgrade sabotage failed: .*; restoring .* failed too: pg_restore"
    ):
        _deploy(fresh_db, directory, tmp_path)

    # The migration's transaction rolled back, and the database (renamed aside for the restore) is back.
    assert fingerprint(fresh_db) == before


def test_a_read_only_target_is_refused_before_the_backup_and_a_dry_run_still_plans(fresh_db, tmp_path):
    """A DBA's ``ALTER DATABASE … SET default_transaction_read_only = on``: a deploy took a backup,
    met PostgreSQL's ``cannot execute CREATE TABLE in a read-only transaction`` at its first revision,
    and then rebuilt the database from that backup (ending its sessions) though nothing was written.
    It is refused first, naming the setting, its fix and that nothing was changed; a dry run reads."""
    _seed_legacy(fresh_db)
    database = database_name(fresh_db)
    with psycopg.connect(fresh_db, autocommit=True) as conn:
        conn.execute(
            sql.SQL("ALTER DATABASE {} SET default_transaction_read_only = on").format(sql.Identifier(database))
        )
        oid = conn.execute("SELECT oid FROM pg_database WHERE datname = current_database()").fetchone()
    directory = migrations_dir(tmp_path)

    with pytest.raises(ServerReadOnly) as refused:
        _deploy(fresh_db, directory, tmp_path)

    assert str(refused.value) == (
        f"{fresh_db} accepts no writes (transaction_read_only is on): default_transaction_read_only is on, "
        f'set for database {database} (pg_settings.source: database); run ALTER DATABASE "{database}" RESET '
        "default_transaction_read_only if flowyard may write there, or point the URL at a role and database "
        "that may write; nothing was changed (no backup taken, no revision run)"
    )
    assert not (tmp_path / "backups").exists()
    with psycopg.connect(fresh_db) as conn:  # not rebuilt from a backup
        assert conn.execute("SELECT oid FROM pg_database WHERE datname = current_database()").fetchone() == oid
    assert "CREATE TABLE accounts" in _deploy(fresh_db, directory, tmp_path, dry_run=True).plan
