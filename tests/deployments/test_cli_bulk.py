"""``flowyard bulk`` through the real CLI in a subprocess, and the bulk demo step."""

from __future__ import annotations

import json

import psycopg
import pytest
import yaml

from deployments.bulk_demo import BULK_DEMO_ASSETS, bulk_demo_parameters
from tests.conftest import ROOT, run_cli

pytestmark = pytest.mark.usefixtures("prefect_api")


def _one(url: str, query: str):
    with psycopg.connect(url) as conn:
        return conn.execute(query).fetchone()


def test_cli_copies_files_with_a_mapping_file_and_reports(fresh_db, tmp_path):
    mapping = tmp_path / "mapping.yaml"
    mapping.write_text(yaml.safe_dump({"events": {"key": ["id"], "filter": "kind == 'purchase'"}}))
    result = run_cli(
        "bulk",
        "copy",
        str(BULK_DEMO_ASSETS),
        "--target",
        fresh_db,
        "--table",
        "events",
        "--mapping",
        str(mapping),
        "--chunk-rows",
        "300",
        "--target-schema",
        "reference",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    purchases = sum(
        1 for line in (BULK_DEMO_ASSETS / "events.csv").read_text().splitlines() if ",purchase," in line
    )
    assert f"reference.events: {purchases:,} rows" in result.stdout
    assert _one(fresh_db, "SELECT count(*), count(*) FILTER (WHERE kind <> 'purchase') FROM reference.events") == (
        purchases,
        0,
    )

    status = run_cli("bulk", "status", "--target", fresh_db)
    assert status.returncode == 0 and "completed" in status.stdout and "7/7 chunks" in status.stdout


def test_cli_user_errors_are_one_line(fresh_db, tmp_path):
    bad = tmp_path / "mapping.json"
    bad.write_text(json.dumps({"events": {"renmae": {}}}))
    result = run_cli("bulk", "copy", str(BULK_DEMO_ASSETS), "--target", fresh_db, "--mapping", str(bad))
    assert result.returncode == 2
    assert (
        result.stderr.strip().splitlines()[-1].startswith("flowyard: error: invalid mapping at events.renmae")
    )
    assert "Traceback" not in result.stderr


def test_demo_step_parameters_load_the_shipped_assets(fresh_db):
    from flows.bulk_migrate import bulk_migrate

    report = bulk_migrate(**bulk_demo_parameters(fresh_db))
    assert {t["table"] for t in report["tables"]} == {
        "bulk_demo.countries",
        "bulk_demo.currencies",
        "bulk_demo.events",
    }
    assert _one(
        fresh_db, "SELECT count(*), sum(amount_cents) = sum(round(amount * 100)) FROM bulk_demo.events"
    ) == (2000, True)
    deployments = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
    entry = next(d for d in deployments if d["name"] == "bulk-migrate")
    assert entry["entrypoint"] == "flows/bulk_migrate.py:bulk_migrate" and entry["parameters"]["source_url"]


def test_status_of_a_database_without_runs_leaves_it_untouched(fresh_db):
    status = run_cli("bulk", "status", "--target", fresh_db)
    assert status.returncode == 0, status.stderr
    assert status.stdout.strip() == "no bulk runs on this target"
    assert _one(fresh_db, "SELECT to_regnamespace('flowyard')") == (None,)
