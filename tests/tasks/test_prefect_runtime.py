"""The Prefect API server runs on PostgreSQL, and flows report to it."""

from __future__ import annotations

import httpx
import psycopg
from prefect import flow


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
