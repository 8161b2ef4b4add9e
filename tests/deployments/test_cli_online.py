"""``flowyard online``: plan prints every phase and runs nothing; start/complete/rollback/status drive real runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tasks.db import connect
from tasks.online_state import target_key
from tests.conftest import run_cli
from tests.online_support import WIDEN_AMOUNT, checksum, make_schema, schema_dump

pytestmark = pytest.mark.usefixtures("prefect_api")

SPEC = {
    "name": "cli_widen",
    "operations": [WIDEN_AMOUNT, {"rename_column": {"table": "orders", "from": "note", "to": "comment"}}],
}


def _file(tmp_path: Path, data: object, name: str = "m.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _status_line(url: str) -> str:
    result = run_cli("online", "status")
    assert result.returncode == 0, result.stderr
    return next(
        line
        for line in result.stdout.splitlines()
        if line.startswith("cli_widen") and target_key(url) in line
    )


def test_plan_prints_every_phase_and_runs_nothing(fresh_db: str, state_db: str, tmp_path: Path) -> None:
    make_schema(fresh_db, rows=10)
    before = schema_dump(fresh_db)
    result = run_cli("online", "plan", _file(tmp_path, SPEC), "--database-url", fresh_db)
    assert result.returncode == 0, result.stderr
    for marker in (
        "===== start =====",
        "===== complete =====",
        "===== rollback =====",
        "_fy_new_amount",
        "RENAME COLUMN",
    ):
        assert marker in result.stdout
    assert schema_dump(fresh_db) == before


def test_bad_file_is_one_line_exit_2(fresh_db: str, state_db: str, tmp_path: Path) -> None:
    make_schema(fresh_db, rows=10)
    bad = _file(tmp_path, {"name": "bad", "operations": [{"add_column": {"table": "orders"}}]})
    result = run_cli("online", "plan", bad, "--database-url", fresh_db)
    assert result.returncode == 2
    assert (
        result.stderr.strip().count("\n") == 0 and "operation 0 (add_column): field 'column'" in result.stderr
    )


def test_start_status_complete(fresh_db: str, state_db: str, tmp_path: Path) -> None:
    make_schema(fresh_db, rows=300)
    expected = checksum(fresh_db, "SELECT id, amount::bigint, note FROM orders")
    result = run_cli(
        "online", "start", _file(tmp_path, SPEC), "--database-url", fresh_db, "--batch-size", "100"
    )
    assert result.returncode == 0, result.stderr
    assert "cli_widen: expanded (new version: search_path=public_cli_widen)" in result.stdout
    assert "expanded" in _status_line(fresh_db)
    assert "backfill orders: 300 rows (done)" in run_cli("online", "status").stdout

    refused = run_cli(
        "online", "start", _file(tmp_path, {**SPEC, "name": "other"}, "o.yaml"), "--database-url", fresh_db
    )
    assert refused.returncode == 2 and "only one migration can run on a schema" in refused.stderr

    result = run_cli("online", "complete", "--database-url", fresh_db)
    assert result.returncode == 0, result.stderr
    assert "completed" in _status_line(fresh_db)
    assert checksum(fresh_db, "SELECT id, amount, comment FROM orders") == expected


def test_start_then_rollback(fresh_db: str, state_db: str, tmp_path: Path) -> None:
    make_schema(fresh_db, rows=50)
    before = schema_dump(fresh_db)
    assert run_cli("online", "start", _file(tmp_path, SPEC), "--database-url", fresh_db).returncode == 0
    result = run_cli("online", "rollback", "--database-url", fresh_db)
    assert result.returncode == 0, result.stderr
    assert "rolled_back" in _status_line(fresh_db)
    assert schema_dump(fresh_db) == before
    with connect(fresh_db) as conn:
        assert conn.execute("SELECT count(*) FROM orders").fetchone() == (50,)
