"""The Prefect API server runs on PostgreSQL, and flows report to it."""

from __future__ import annotations

import sys

import httpx
import psycopg
import pytest
from prefect import flow

from tasks import services
from tasks.errors import UserError
from tasks.prefect_runtime import server_database_url
from tasks.services import log_file
from tests.conftest import TEST_SETTINGS


@flow(name="hello-postgres")
def _hello(n: int) -> int:
    return n * 2


def test_prefect_server_stores_runs_in_postgres(prefect_api, pg):
    assert httpx.get(f"{prefect_api}/health").json() is True
    assert _hello(21) == 42
    with psycopg.connect(pg.url("prefect")) as conn:
        states = conn.execute(
            "SELECT r.state_type FROM flow_run r JOIN flow f ON f.id = r.flow_id WHERE f.name = %s",
            ("hello-postgres",),
        ).fetchall()
    assert states == [("COMPLETED",)], "the flow run was not stored in the prefect database on PostgreSQL"


def test_prefect_server_batches_the_task_run_recorder(prefect_api):
    """The running server took flowyard's recorder batching: the setting names are ones Prefect
    reads (a misspelt one would leave the defaults, batch size 1 and a 5 s flush)."""
    recorder = httpx.get(f"{prefect_api}/admin/settings").json()["server"]["services"]["task_run_recorder"]
    assert (recorder["batch_size"], recorder["flush_interval"]) == (50, 1.0)


def test_a_prefect_database_holding_another_roles_prefect_is_one_line(prefect_api, state_db, limited_role):
    """On a shared server the ``prefect`` database may belong to someone else's flowyard; the
    Prefect server would die at start-up on its migrations table, and only its log would say why."""
    with pytest.raises(
        UserError,
        match=r"^database prefect \(.*\) holds another role's Prefect schema; set FLOWYARD_PREFECT_DATABASE",
    ):
        server_database_url(TEST_SETTINGS, limited_role.url(state_db))
    assert server_database_url(TEST_SETTINGS, state_db).startswith("postgresql+asyncpg://")


def test_a_service_that_dies_at_start_up_names_its_root_cause(tmp_path):
    """The first exception line of this start's output: a chained traceback prints the root cause
    first; a failure logged by an earlier start is not this one's."""
    log_file(tmp_path, "dies").write_text("OldError: from an earlier start\n")
    script = "try:\n    raise KeyError('root cause')\nexcept KeyError as exc:\n    raise RuntimeError('wrapper') from exc\n"
    service = services.Service("dies", [sys.executable, "-c", script], ready=lambda: False, ready_timeout=60)
    with pytest.raises(UserError) as err:
        services.start(service, tmp_path)
    assert str(err.value).endswith(": KeyError: 'root cause'")
    assert services.running_pid(tmp_path, "dies") is None
