"""A user's Alembic directory driven revision by revision: status, timed upgrades, plans, downgrades."""

from __future__ import annotations

import psycopg
import pytest

from tasks.alembic_deploy import (
    MigrationStatus,
    Revision,
    check_migrations_dir,
    downgrade_revision,
    migration_status,
    offline_plan,
    rollback_revisions,
    upgrade_revision,
)
from tasks.errors import UserError
from tests.migration_helpers import fingerprint, migrations_dir, write_revision


def test_directory_problems_are_one_line(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        check_migrations_dir(tmp_path / "missing")
    with pytest.raises(UserError, match="has no env.py"):
        check_migrations_dir(tmp_path)
    (tmp_path / "env.py").write_text("")
    with pytest.raises(UserError, match="has no versions/ folder"):
        check_migrations_dir(tmp_path)


def test_status_upgrade_plan_and_downgrade(fresh_db, tmp_path):
    directory = migrations_dir(tmp_path)
    status = migration_status(fresh_db, directory, "d002")
    assert status.current == () and status.heads == ("d003",)
    assert [r.revision for r in status.pending] == ["d001", "d002"]
    assert status.pending[0].doc == "Create accounts with a few seed rows."

    run = upgrade_revision(fresh_db, directory, status.pending[0])
    assert run.revision == "d001" and run.direction == "upgrade" and run.seconds > 0
    with psycopg.connect(fresh_db) as conn:
        assert conn.execute("SELECT version_num FROM alembic_version").fetchall() == [("d001",)]
        assert conn.execute("SELECT revision FROM flowyard.applied_revisions").fetchall() == [("d001",)]

    status = migration_status(fresh_db, directory)
    assert [r.revision for r in status.applied] == ["d001"]
    before = fingerprint(fresh_db)
    plan = offline_plan(fresh_db, directory, status)
    assert "-- Running upgrade d001 -> d002" in plan and "-- Running upgrade d002 -> d003" in plan
    assert "CREATE TABLE accounts" not in plan
    assert fingerprint(fresh_db) == before

    for revision in status.pending:
        upgrade_revision(fresh_db, directory, revision)
    done = migration_status(fresh_db, directory)
    assert offline_plan(fresh_db, directory, done).startswith("-- nothing to apply")
    [newest] = rollback_revisions(done, 1)
    assert downgrade_revision(fresh_db, directory, newest).revision == "d003"
    with psycopg.connect(fresh_db) as conn:
        assert conn.execute("SELECT version_num FROM alembic_version").fetchone() == ("d002",)
        assert sorted(r[0] for r in conn.execute("SELECT revision FROM flowyard.applied_revisions")) == [
            "d001",
            "d002",
        ]


def test_unknown_target_and_impossible_rollbacks(fresh_db, tmp_path):
    directory = migrations_dir(tmp_path)
    with pytest.raises(UserError, match=r"^alembic \(.*\): Can't locate revision identified by 'nope'"):
        migration_status(fresh_db, directory, "nope")
    status = migration_status(fresh_db, directory)
    with pytest.raises(UserError, match="only 0 are applied"):
        rollback_revisions(status, 1)
    with pytest.raises(UserError, match="at least 1"):
        rollback_revisions(status, 0)


def test_branches_are_applied_parents_first(fresh_db, tmp_path):
    directory = migrations_dir(tmp_path, with_demo_revisions=False)
    write_revision(directory, "root", None, ["CREATE TABLE r (id int)"], [])
    write_revision(directory, "left", "root", ["CREATE TABLE l (id int)"], [])
    write_revision(directory, "right", "root", ["CREATE TABLE rt (id int)"], [])
    status = migration_status(fresh_db, directory, "heads")
    order = [r.revision for r in status.pending]
    assert order[0] == "root" and sorted(order[1:]) == ["left", "right"]
    for revision in status.pending:
        upgrade_revision(fresh_db, directory, revision)
    after = migration_status(fresh_db, directory, "heads")
    assert sorted(after.current) == ["left", "right"] and after.pending == ()
    with pytest.raises(UserError, match="several current heads"):
        rollback_revisions(after, 1)


def test_rollback_to_a_revision_a_prefix_or_base():
    applied = tuple(Revision(r, "", "") for r in ("ae1f", "b27c", "b2d0"))
    status = MigrationStatus(("b2d0",), ("b2d0",), applied, (), "heads")

    def undone(to: str) -> list[str]:
        return [r.revision for r in rollback_revisions(status, to=to)]

    assert undone("ae") == ["b2d0", "b27c"] and undone("b27c") == ["b2d0"] and undone("b2d0") == []
    assert undone("base") == ["b2d0", "b27c", "ae1f"]
    assert [r.revision for r in rollback_revisions(status)] == ["b2d0"]
    applied_list = r"\(applied: ae1f, b27c, b2d0\); give one of them, or base$"
    with pytest.raises(UserError, match=r"^cannot roll back to 'b2': it matches several applied revisions " + applied_list):
        undone("b2")
    with pytest.raises(UserError, match=r"^cannot roll back to 'c0': it is not an applied revision " + applied_list):
        undone("c0")
    with pytest.raises(UserError, match=r"^give --steps or --to, not both"):
        rollback_revisions(status, 1, "ae1f")
