"""The reusable quality gate fails the calling flow, or only warns, as configured."""

from __future__ import annotations

import psycopg
import pytest
from prefect import flow

from quality.gate import QualityGateFailed, quality_gate

pytestmark = pytest.mark.usefixtures("prefect_api")


@flow(name="gate-host")
def _host(url: str, mode: str) -> str:
    results = quality_gate(url, "users,projects", mode=mode)
    return ",".join(f"{r.suite}:{r.success}" for r in results)


def _insert_users(url: str, bad_emails: int) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        for i in range(10):
            email = "broken" if i < bad_emails else f"u{i}@example.com"
            conn.execute(
                "INSERT INTO users (id, email, username, role, status, version, created_at)"
                " VALUES (gen_random_uuid(), %s, %s, 'admin', 'active', 1, now())",
                (email, f"user{i}"),
            )
        conn.execute(
            "INSERT INTO projects (id, name, owner_id, type, status, visibility, version, created_at)"
            " SELECT gen_random_uuid(), 'p', id, 'web', 'active', 'team', 1, now() FROM users LIMIT 1"
        )


def test_gate_fails_the_flow_on_a_failing_suite(entity_db):
    _insert_users(entity_db, bad_emails=2)
    state = _host(entity_db, "fail", return_state=True)
    assert state.is_failed()
    with pytest.raises(QualityGateFailed, match=r"quality gate failed: users: valid_email \(2 rows\)"):
        state.result()


def test_gate_warns_and_lets_the_flow_finish(entity_db):
    _insert_users(entity_db, bad_emails=2)
    assert _host(entity_db, "warn") == "users:False,projects:True"


def test_gate_passes_clean_data(entity_db):
    _insert_users(entity_db, bad_emails=0)
    assert _host(entity_db, "fail") == "users:True,projects:True"
