"""Flows as a user's own Python uses them (their parameters, the Prefect API they report to),
checked in a fresh interpreter: pytest resets warning filters around collection and each test, and
Prefect fixes its settings at import, so only a new process shows what a user gets."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from uuid import UUID

from prefect.client.orchestration import get_client

from tasks.settings import get_settings
from tests.conftest import ROOT


def test_parameters_named_like_pydantic_attributes_validate_without_warnings():
    script = (
        "from flows.bulk_migrate import bulk_migrate\n"
        "from flows.online_migrate import online_migrate\n"
        "b = bulk_migrate.validate_parameters({'source_url': 'postgresql://h/db', 'validate': ['count']})\n"
        "o = online_migrate.validate_parameters({'migration_file': 'm.yaml', 'schema': 'app'})\n"
        "print(b['validate'], o['schema'])\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["['count']", "app"]
    assert "shadows an attribute" not in done.stderr


def _in_plain_python(script: str, home: Path, **env: str) -> str:
    """What ``script`` prints, run by a fresh interpreter in this process's environment as a user's
    shell has it (flowyard's settings, no Prefect ones, plus ``env``)."""
    plain = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    plain["HOME"] = str(home)  # where Prefect's default profile and its SQLite database would live
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=plain | env, capture_output=True, text=True, check=True
    )
    return done.stdout


_API_URL = "from prefect.settings import get_current_settings\nprint(get_current_settings().api.url)\n"


def test_a_flow_imported_into_plain_python_runs_on_flowyards_server_not_an_ephemeral_sqlite_one(
    prefect_api, state_db, tmp_path
):
    script = (
        "from flows.sync_controls import sync_status\n"
        "state = sync_status(return_state=True)\n"
        "print(state.name, state.state_details.flow_run_id)\n"
    )
    name, flow_run_id = _in_plain_python(script, tmp_path).split()
    assert name == "Completed"
    with get_client(sync_client=True) as client:  # the test session's flowyard server
        assert client.read_flow_run(UUID(flow_run_id)).name
    assert list(tmp_path.rglob("*.db")) == []


def test_a_prefect_api_url_set_in_the_environment_wins(tmp_path):
    printed = _in_plain_python("import flows\n" + _API_URL, tmp_path, PREFECT_API_URL="http://127.0.0.1:9/api")
    assert printed.strip() == "http://127.0.0.1:9/api"


def test_the_quality_gate_imported_into_plain_python_reports_to_flowyards_server(tmp_path):
    """docs/quality.md's gate snippet, run as a script: the gate is a task imported without a flow,
    and without flowyard's API URL it started Prefect's ephemeral SQLite server."""
    assert _in_plain_python("import quality.gate\n" + _API_URL, tmp_path).strip() == get_settings().prefect_api_url
