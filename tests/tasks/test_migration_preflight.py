"""Preflight against a real database: refusals for hard problems, warnings for soft ones."""

from __future__ import annotations

import psycopg
import pytest

from tasks.errors import UserError
from tasks.migration_preflight import free_space, require_free_space, run_preflight
from tasks.pg_backup import server_major
from tests.migration_helpers import migrations_dir


def test_backup_location_needs_twice_the_database_size(tmp_path):
    free = free_space(tmp_path / "not" / "yet" / "created")
    assert free > 0
    # Margins of 10% of the free space: other processes write to this disk meanwhile.
    assert require_free_space(tmp_path, int(free * 0.4)) > 0
    with pytest.raises(UserError, match=r"MiB free at .* \(need 2x\); free space there"):
        require_free_space(tmp_path, int(free * 0.6))


def test_preflight_reports_state_and_soft_problems(fresh_db, tmp_path):
    with psycopg.connect(fresh_db) as conn:
        conn.execute("CREATE TABLE parent (id int PRIMARY KEY)")
        conn.execute("CREATE TABLE child (id int, parent_id int)")
        conn.execute("INSERT INTO parent VALUES (1)")
        conn.execute("INSERT INTO child VALUES (1, 1), (2, 7)")
        conn.execute(
            "ALTER TABLE child ADD CONSTRAINT child_parent FOREIGN KEY (parent_id) REFERENCES parent NOT VALID"
        )
    bystander = psycopg.connect(fresh_db)
    try:
        report = run_preflight(fresh_db, str(migrations_dir(tmp_path)), "head", tmp_path / "backups", 0)
    finally:
        bystander.close()

    with psycopg.connect(fresh_db) as conn:
        major = server_major(conn)
    assert report.server_major == major and report.server_version.startswith(str(major))
    assert report.database_bytes > 0 and report.free_bytes >= 2 * report.database_bytes
    assert report.active_connections >= 1
    assert report.unvalidated_constraints == ["child.child_parent"]
    assert report.integrity.row_counts == {"public.child": 2, "public.parent": 1}
    assert [r.revision for r in report.status.pending] == ["d001", "d002", "d003"]
    assert any("other sessions are connected (threshold 0)" in w for w in report.warnings)
    assert any("constraints not validated: child.child_parent" in w for w in report.warnings)
    assert any(w.startswith("before the run: fk_orphans in public.child") for w in report.warnings)
    assert not any("state database" in w for w in report.warnings)
    assert not (tmp_path / "backups").exists(), "preflight creates nothing"


def test_deploying_into_flowyard_state_database_is_warned(state_db, tmp_path):
    report = run_preflight(state_db, str(migrations_dir(tmp_path)), "head", None, 1000)
    assert any("flowyard's own state database" in w for w in report.warnings)


def test_unreachable_database_is_refused(tmp_path):
    from tasks.embedded_pg import free_port

    url = f"postgresql://postgres@127.0.0.1:{free_port()}/nowhere"
    with pytest.raises(UserError, match="cannot connect to"):
        run_preflight(url, str(migrations_dir(tmp_path)), "head", None, 50)
