"""The migration report: artifact keys Prefect accepts, and a summary that says what happened."""

from __future__ import annotations

import re

from tasks.alembic_deploy import RevisionRun
from tasks.migration_report import PLAN_LIMIT, MigrationReport, artifact_key
from tasks.pg_backup import RestoreReport


def test_artifact_keys_are_valid_for_prefect():
    key = artifact_key("migrations-deploy", "postgresql://u:p@h:5432/My_App.DB?sslmode=require")
    assert key == "migrations-deploy-my-app-db"
    assert re.fullmatch(r"[a-z0-9-]+", key)


def test_summary_of_a_restored_run_and_a_long_plan():
    report = MigrationReport("deploy", "postgresql://h/app", "/m", outcome="failed, restored from backup")
    report.revisions.append(RevisionRun("a1", "first", "upgrade", 0.25))
    report.error = "upgrade a2 failed: DivisionByZero: division by zero"
    report.restore = RestoreReport(
        "/b/app.dump", "postgresql://h/app", 3, {"TABLE": 2, "TABLE DATA": 2}, {"public.t": 1_500}, 1.5
    )
    text = report.markdown()
    assert text.startswith("# Migration deploy: failed, restored from backup")
    assert "| a1 | first | upgrade | 0.250 |" in text
    assert "**Error:** upgrade a2 failed" in text
    assert (
        "**Restored** `postgresql://h/app` from `/b/app.dump`" in text
        and "3 other sessions terminated" in text
    )
    assert "| public.t | — | 1,500 |" in text
    assert report.revision_rows() == [
        {"revision": "a1", "description": "first", "direction": "upgrade", "seconds": 0.25}
    ]

    report.plan = "SELECT 1;\n" * (PLAN_LIMIT // 5)
    assert "-- (truncated)" in report.markdown() and len(report.markdown()) < PLAN_LIMIT + 5_000
