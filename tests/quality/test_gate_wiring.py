"""The optional quality gate after deploy-migrations and bulk-migrate: fail or warn, as configured."""

from __future__ import annotations

import uuid

import psycopg
import pytest

from deployments.runtime import PROJECT_DIR
from flows.bulk_migrate import bulk_migrate
from flows.deploy_migrations import deploy_migrations
from quality.gate import QualityGateFailed
from tasks.db import drop_database, ensure_database

pytestmark = pytest.mark.usefixtures("prefect_api")

# The demo migrations seed accounts with balances 120.00, 75.50 and 0.00: one row breaks this rule.
ACCOUNTS_SUITE = """
name: accounts
table: accounts
rules:
  - {name: owner_present, check: not_null, column: owner, severity: critical}
  - {name: balance_positive, check: range, column: balance_cents, min: 1, severity: high}
"""


@pytest.fixture()
def accounts_suite(tmp_path):
    path = tmp_path / "accounts.yaml"
    path.write_text(ACCOUNTS_SUITE)
    return str(path)


def _deploy(url, tmp_path, **kwargs):
    return deploy_migrations(
        database_url=url,
        migrations_dir=str(PROJECT_DIR / "deployments" / "demo_assets" / "migrations"),
        backup_dir=str(tmp_path / "backups"),
        return_state=True,
        **kwargs,
    )


def test_deploy_migrations_gate_fails_or_warns(fresh_db, tmp_path, accounts_suite):
    failed = _deploy(fresh_db, tmp_path, quality_suite=accounts_suite)
    assert failed.is_failed()
    with pytest.raises(QualityGateFailed, match=r"accounts: balance_positive \(1 rows\)"):
        failed.result()

    with psycopg.connect(fresh_db, autocommit=True) as conn:
        conn.execute("UPDATE accounts SET balance_cents = 0 WHERE owner = 'ada'")
    warned = _deploy(fresh_db, tmp_path, quality_suite=accounts_suite, quality_gate_mode="warn")
    assert warned.is_completed()


def test_deploy_migrations_without_a_suite_skips_the_gate(fresh_db, tmp_path):
    assert _deploy(fresh_db, tmp_path).is_completed()


def test_bulk_migrate_gate_checks_the_target(pg, fresh_db, accounts_suite):
    with psycopg.connect(fresh_db, autocommit=True) as conn:
        conn.execute("CREATE TABLE accounts (id int PRIMARY KEY, owner text, balance_cents bigint)")
        conn.execute("INSERT INTO accounts VALUES (1, 'ada', 100), (2, NULL, 0), (3, 'linus', 5)")
    target_name = f"t_{uuid.uuid4().hex[:12]}"
    ensure_database(pg.url(), target_name)
    try:
        state = bulk_migrate(fresh_db, pg.url(target_name), quality_suite=accounts_suite, return_state=True)
        assert state.is_failed()
        with pytest.raises(QualityGateFailed, match=r"owner_present \(1 rows\), balance_positive \(1 rows\)"):
            state.result()
        warned = bulk_migrate(
            fresh_db,
            pg.url(target_name),
            quality_suite=accounts_suite,
            quality_gate_mode="warn",
            restart=True,
        )
        assert warned["tables"]
    finally:
        drop_database(pg.url(), target_name)
