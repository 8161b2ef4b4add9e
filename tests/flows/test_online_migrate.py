"""The online-migrate flow on a real Prefect server: pause for input, resume with complete or rollback."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from uuid import UUID

import pytest
import yaml
from prefect.client.orchestration import get_client

from flows.online_migrate import online_migrate
from tasks.db import connect
from tasks.errors import UserError
from tasks.online_state import target_key
from tests.conftest import ROOT
from tests.online_support import WIDEN_AMOUNT, checksum, make_schema, schema_dump

pytestmark = pytest.mark.usefixtures("prefect_api")

SPEC = {
    "name": "widen_amount",
    "operations": [
        WIDEN_AMOUNT,
        {"rename_column": {"table": "orders", "from": "note", "to": "comment"}},
    ],
}


def _write(tmp_path: Path, spec: dict) -> str:
    path = tmp_path / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def _flow_run_id(state: str, url: str, name: str) -> UUID | None:
    with connect(state) as conn:
        row = conn.execute(
            "SELECT flow_run_id FROM flowyard.online_migrations WHERE target = %s AND name = %s",
            (target_key(url), name),
        ).fetchone()
    return row[0] if row else None


def _start_paused(url: str, state: str, migration_file: str) -> tuple[subprocess.Popen[str], UUID]:
    """Run the flow in a real process until it pauses for input."""
    code = "import sys; from flows.online_migrate import online_migrate; online_migrate(database_url=sys.argv[1], migration_file=sys.argv[2])"
    child = subprocess.Popen(
        [sys.executable, "-c", code, url, migration_file], cwd=ROOT, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 180
    with get_client(sync_client=True) as client:
        while True:
            assert child.poll() is None, child.stderr.read() if child.stderr else "flow exited"
            assert time.monotonic() < deadline, "flow never paused"
            run_id = _flow_run_id(state, url, SPEC["name"])
            if run_id and client.read_flow_run(run_id).state.is_paused():
                return child, run_id
            time.sleep(0.5)


def _resume(run_id: UUID, action: str, child: subprocess.Popen[str]) -> None:
    with get_client(sync_client=True) as client:
        client.resume_flow_run(run_id, run_input={"action": action})
    child.wait(timeout=180)
    assert child.returncode == 0, child.stderr.read() if child.stderr else ""
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(run_id).state.is_completed()


def test_pause_then_complete_through_the_prefect_api(fresh_db: str, state_db: str, tmp_path: Path) -> None:
    make_schema(fresh_db, rows=5000)
    expected = checksum(fresh_db, "SELECT id, amount::bigint, note FROM orders")
    child, run_id = _start_paused(fresh_db, state_db, _write(tmp_path, SPEC))

    # Paused in expand: the old version and the new version both work, and writes sync both ways.
    with connect(fresh_db, autocommit=True) as conn:
        conn.execute("INSERT INTO orders (id, amount, note) VALUES (900001, 5, 'old app')")
        conn.execute("SET search_path = public_widen_amount")
        conn.execute("INSERT INTO orders (id, amount, comment) VALUES (900002, 3000, 'new app')")
        assert conn.execute("SELECT amount FROM orders WHERE id = 900001").fetchone() == (5,)
        conn.execute("UPDATE orders SET amount = 7 WHERE id = 1")
        conn.execute("SET search_path = public")
        assert conn.execute("SELECT amount, note FROM orders WHERE id = 1").fetchone() == (7, "note 1")
        conn.execute("DELETE FROM orders WHERE id IN (900001, 900002)")
        conn.execute("UPDATE orders SET amount = 2 WHERE id = 1")  # back to the seeded value (1 % 700 + 1)

    _resume(run_id, "complete", child)
    assert checksum(fresh_db, "SELECT id, amount, comment FROM orders") == expected
    with connect(fresh_db) as conn:
        assert conn.execute(
            "SELECT data_type FROM information_schema.columns WHERE table_schema = 'public' AND table_name = 'orders' AND column_name = 'amount'"
        ).fetchone() == ("bigint",)


def test_pause_then_rollback_through_the_prefect_api(fresh_db: str, state_db: str, tmp_path: Path) -> None:
    make_schema(fresh_db, rows=2000)
    dump, data = schema_dump(fresh_db), checksum(fresh_db, "SELECT * FROM orders")
    child, run_id = _start_paused(fresh_db, state_db, _write(tmp_path, SPEC))
    _resume(run_id, "rollback", child)
    assert schema_dump(fresh_db) == dump
    assert checksum(fresh_db, "SELECT * FROM orders") == data


def test_a_second_migration_on_the_same_schema_is_refused(
    fresh_db: str, state_db: str, tmp_path: Path
) -> None:
    make_schema(fresh_db, rows=100)
    first = online_migrate(database_url=fresh_db, migration_file=_write(tmp_path, SPEC), action="start")
    assert first["phase"] == "expanded"
    other = {"name": "other_change", "operations": [{"drop_column": {"table": "orders", "column": "legacy"}}]}
    with pytest.raises(
        UserError, match="'widen_amount' is expanded .* only one migration can run on a schema"
    ):
        online_migrate(database_url=fresh_db, migration_file=_write(tmp_path, other), action="start")
    assert online_migrate(database_url=fresh_db, action="rollback")["phase"] == "rolled_back"
    assert (
        online_migrate(database_url=fresh_db, migration_file=_write(tmp_path, other), auto_complete=True)[
            "phase"
        ]
        == "completed"
    )


def test_health_gate_decides_without_a_human(fresh_db: str, state_db: str, tmp_path: Path) -> None:
    make_schema(fresh_db, rows=100)
    unhealthy = online_migrate(
        database_url=fresh_db,
        migration_file=_write(tmp_path, SPEC),
        health_query="SELECT count(*) > 1e9 FROM orders",
        health_checks=1,
    )
    assert unhealthy["phase"] == "rolled_back"
    healthy = online_migrate(
        database_url=fresh_db,
        migration_file=_write(tmp_path, SPEC),
        health_query="SELECT count(*) = 100 FROM orders",
        health_checks=2,
        health_interval_seconds=0.1,
    )
    assert healthy["phase"] == "completed"
    # The next migration keeps the previous version's views during expand and drops them at complete.
    nxt = {
        "name": "add_flag",
        "operations": [
            {
                "add_column": {
                    "table": "orders",
                    "column": {"name": "flag", "type": "boolean", "default": "false"},
                }
            }
        ],
    }
    online_migrate(database_url=fresh_db, migration_file=_write(tmp_path, nxt), action="start")
    assert checksum(fresh_db, "SELECT id, comment FROM orders", "public_widen_amount")[0] == 100
    assert checksum(fresh_db, "SELECT id, comment, flag FROM orders", "public_add_flag")[0] == 100
    online_migrate(database_url=fresh_db, action="complete")
    with connect(fresh_db) as conn:
        schemas = {
            r[0] for r in conn.execute("SELECT nspname FROM pg_namespace WHERE nspname LIKE 'public\\_%'")
        }
    assert schemas == {"public_add_flag"}


def test_demo_change_completes_unattended(fresh_db: str, state_db: str) -> None:
    from deployments.online_demo import online_demo_parameters

    result = online_migrate(**online_demo_parameters(fresh_db))
    assert result["phase"] == "completed"
    with connect(fresh_db) as conn:
        assert conn.execute(
            "SELECT count(*), count(*) FILTER (WHERE priority = 9), pg_typeof(min(amount))::text FROM demo_orders"
        ).fetchone() == (50_000, 24_950, "bigint")
