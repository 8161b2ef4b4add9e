"""End to end, as a user runs it: ``flowyard up`` → deployments served → a run created over
the Prefect REST API completes → ``flowyard down`` leaves nothing running.

This test brings up its own embedded PostgreSQL and Prefect server on fresh ports, exactly
as ``make demo`` does, rather than reusing the session fixtures.
"""

from __future__ import annotations

import textwrap
import time

import httpx
import psutil
import psycopg
import pytest

from deployments.trigger import create_flow_run, wait_for_flow_run
from tasks.db import ensure_database
from tasks.embedded_pg import EmbeddedPostgres, free_port
from tasks.errors import UserError
from tasks.prefect_runtime import ZOMBIE_AUTOMATION
from tests.conftest import run_cli

ENV_PY = """
from alembic import context
from sqlalchemy import create_engine

engine = create_engine(context.config.get_main_option("sqlalchemy.url"))
with engine.connect() as connection:
    context.configure(connection=connection)
    with context.begin_transaction():
        context.run_migrations()
"""

REVISION = """
from alembic import op

revision = "a1"
down_revision = None


def upgrade():
    op.execute("CREATE TABLE e2e_items (id int PRIMARY KEY, name text NOT NULL)")
    op.execute("INSERT INTO e2e_items VALUES (1, 'one'), (2, 'two')")


def downgrade():
    op.execute("DROP TABLE e2e_items")
"""


def _write_migrations(path):
    (path / "versions").mkdir(parents=True)
    (path / "env.py").write_text(textwrap.dedent(ENV_PY))
    (path / "versions" / "a1_items.py").write_text(textwrap.dedent(REVISION))


def _first_completed_run(api: str, deployment: str, timeout: float) -> dict:
    dep_id = httpx.get(f"{api}/deployments/name/{deployment}/{deployment}", timeout=10).json()["id"]
    query = {"flow_runs": {"deployment_id": {"any_": [dep_id]}, "state": {"type": {"any_": ["COMPLETED"]}}}}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = httpx.post(f"{api}/flow_runs/filter", json=query, timeout=10).json()
        if runs:
            return runs[0]
        time.sleep(2)
    raise AssertionError(f"no scheduled run of {deployment} completed within {timeout:g}s")


def test_up_trigger_over_rest_down(tmp_path):
    home = tmp_path / "home"
    prefect_port, pg_port = free_port(), free_port()
    api = f"http://127.0.0.1:{prefect_port}/api"
    env = {
        "FLOWYARD_HOME": str(home),
        "FLOWYARD_PG_PORT": str(pg_port),
        "FLOWYARD_PREFECT_PORT": str(prefect_port),
        "FLOWYARD_PREFECT_DATABASE": "prefect",  # the default a user's shell leaves (each worker of the suite has its own)
        "FLOWYARD_DATABASE_URL": "",
        "PREFECT_API_URL": api,
        "PREFECT_HOME": str(home / "prefect"),
    }
    up = run_cli("up", env=env)
    try:
        assert up.returncode == 0, up.stderr
        status = run_cli("status", env=env).stdout
        assert (
            "embedded postgres: running" in status
            and "(healthy)" in status
            and "deployments:       pid" in status
        )

        # `up` gave the server it started the zombie-flow automation (killed runs stayed Running).
        automations = httpx.post(f"{api}/automations/filter", json={}, timeout=10).json()
        assert [(a["name"], a["enabled"]) for a in automations] == [(ZOMBIE_AUTOMATION, True)]

        server = EmbeddedPostgres(home / "pg", pg_port)
        with psycopg.connect(server.url("prefect")) as conn:
            assert conn.execute("SELECT to_regclass('flow_run')").fetchone() == ("flow_run",)

        # `up` returns only once every deployment is registered: trigger at once, no polling.
        assert httpx.get(f"{api}/deployments/name/deploy-migrations/deploy-migrations").status_code == 200
        ensure_database(server.url(), "e2e_target")
        migrations = tmp_path / "migrations"
        _write_migrations(migrations)
        run_id = create_flow_run(
            api,
            "deploy-migrations",
            "deploy-migrations",
            {"database_url": server.url("e2e_target"), "migrations_dir": str(migrations)},
        )
        outcome = wait_for_flow_run(api, run_id, timeout=300)
        assert outcome.state == "COMPLETED", outcome
        with psycopg.connect(server.url("e2e_target")) as conn:
            assert conn.execute("SELECT count(*) FROM e2e_items").fetchone() == (2,)

        # A "Quick run" from the UI sends no parameters: the deployment's defaults must work.
        quick = wait_for_flow_run(
            api, create_flow_run(api, "deploy-migrations", "deploy-migrations", {}), 300
        )
        assert quick.state == "COMPLETED", quick

        # A misspelt parameter over the REST API is refused, naming it, and no run is made (the run
        # was created, then crashed in the serve process: "Process exited with status code: 1").
        of_the_flow = {"flows": {"name": {"any_": ["deploy-migrations"]}}}
        runs_before = httpx.post(f"{api}/flow_runs/count", json=of_the_flow, timeout=10).json()
        with pytest.raises(UserError) as refused:
            create_flow_run(api, "deploy-migrations", "deploy-migrations", {"migration_dir": str(migrations)})
        assert str(refused.value) == (
            "Prefect refused the parameters for deploy-migrations/deploy-migrations: Error creating flow run: "
            "Validation failed. Failure reason: Additional properties are not allowed ('migration_dir' was unexpected)"
        )
        assert runs_before == 2 and httpx.post(f"{api}/flow_runs/count", json=of_the_flow, timeout=10).json() == 2
        with psycopg.connect(server.url("flowyard_demo")) as conn:
            assert conn.execute("SELECT to_regclass('public.accounts')").fetchone() == ("accounts",)
        with psycopg.connect(server.url("flowyard")) as conn:
            assert conn.execute("SELECT to_regclass('public.accounts')").fetchone() == (None,), (
                "state DB untouched"
            )

        # Schedules work end to end: the scheduler creates runs of run-agent-queue (every
        # minute), and the serve process executes them. Nothing here triggers it by hand.
        scheduled = _first_completed_run(api, "run-agent-queue", timeout=300)
        assert scheduled["auto_scheduled"] is True
        pids = [int((home / "run" / f"{name}.pid").read_text()) for name in ("prefect-server", "deployments")]
    finally:
        down = run_cli("down", env=env)
    assert down.returncode == 0, down.stderr
    assert (
        "deployments" in down.stdout
        and "prefect-server" in down.stdout
        and "embedded-postgres" in down.stdout
    )
    assert not EmbeddedPostgres(home / "pg", pg_port).is_running()
    assert not [pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]
    assert "embedded postgres: stopped" in run_cli("status", env=env).stdout
