"""``flowyard bulk`` through the real CLI in a subprocess, and the bulk demo step."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import uuid
from pathlib import Path

import psycopg
import pytest
import yaml

from deployments.bulk_demo import BULK_DEMO_ASSETS, bulk_demo_parameters
from deployments.cli_bulk import load_mapping
from tasks.db import drop_database, ensure_database
from tasks.embedded_pg import free_port
from tasks.errors import UserError
from tasks.process_group import spawn_group
from tests.conftest import ROOT, run_cli
from tests.process_support import cli_until, sigkill, until_not

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
    a_dir = tmp_path / "mapping.yaml"
    a_dir.mkdir()
    result = run_cli("bulk", "copy", str(BULK_DEMO_ASSETS), "--target", fresh_db, "--mapping", str(a_dir))
    assert result.returncode == 2 and result.stderr == (
        f"flowyard: error: cannot read mapping file {a_dir}: it is a directory; pass a JSON or YAML mapping file\n"
    )
    missing = run_cli("bulk", "copy", str(tmp_path / "legacy.db"), "--target", fresh_db)
    assert missing.returncode == 2 and missing.stderr == (
        f"flowyard: error: cannot read SQLite file {tmp_path / 'legacy.db'}: no such file; pass an existing .db file\n"
    )
    (tmp_path / "folder.db").mkdir()  # was "does not exist", of a path that does
    folder = run_cli("bulk", "copy", f"sqlite:///{tmp_path / 'folder.db'}", "--target", fresh_db)
    assert folder.returncode == 2 and folder.stderr == (
        f"flowyard: error: cannot read SQLite file {tmp_path / 'folder.db'}: it is a directory; "
        "pass an existing .db file\n"
    )
    assert _one(fresh_db, "SELECT to_regclass('flowyard.bulk_runs')") == (None,), "no run recorded for a typo"


def test_a_bad_target_is_one_line_before_flowyards_servers_are_reached(tmp_path):
    """`bulk copy --target ""` (an unset variable) or a target that is no PostgreSQL URL was said
    only after flowyard's PostgreSQL and Prefect server were started (or, down, failed first);
    with both unreachable here, the target's own line still comes. So does a target that
    refuses connections: it is connected to before the Prefect server is started for nothing."""
    down = {"FLOWYARD_DATABASE_URL": "postgresql://u@127.0.0.1:1/x", "FLOWYARD_PREFECT_PORT": str(free_port())}
    for target, expected in (
        ("", "--target (target_url) is empty; give a postgresql:// URL, or leave it out for flowyard's state database"),
        (" ", "--target (target_url) is only whitespace (' '); give a postgresql:// URL"),
        ("mysql://root@h/app", "not a PostgreSQL URL: 'mysql://root@h/app'; expected postgresql://"),
        ("postgresql://u@127.0.0.1:1/target", "cannot connect to postgresql://u@127.0.0.1:1/target: "),
    ):
        result = run_cli("bulk", "copy", str(BULK_DEMO_ASSETS), "--target", target, env=down, timeout=120)
        assert result.returncode == 2 and result.stderr.startswith(f"flowyard: error: {expected}"), result.stderr
        assert len(result.stderr.splitlines()) == 1, result.stderr


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


def test_ctrl_c_stops_the_copy_with_one_line_and_the_same_command_resumes(fresh_db, pg, tmp_path):
    """SIGINT to the CLI's process group, as a terminal sends it: exit 130 and one line, the run
    recorded as failed (not left 'running'), and the same command finishes the copy."""
    with psycopg.connect(fresh_db, autocommit=True) as conn:
        conn.execute("CREATE TABLE events (id bigint PRIMARY KEY, payload text)")
        conn.execute("INSERT INTO events SELECT g, repeat(md5(g::text), 16) FROM generate_series(1, 300000) g")
    target = pg.url(f"tgt_{uuid.uuid4().hex[:10]}")
    ensure_database(pg.url(), target.rsplit("/", 1)[1])
    args = ["bulk", "copy", fresh_db, "--target", target, "--chunk-rows", "10000", "--validate", "count"]
    err = tmp_path / "stderr.log"
    with err.open("wb") as sink, psycopg.connect(target, autocommit=True) as watch:
        # A terminal's foreground job starts with SIGINT at its default. A test run started in the
        # background by a script (`make test &`) ignores SIGINT, and an ignored signal stays ignored
        # across exec: the CLI would finish the copy and exit 0 (seen in such a run).
        inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            cli = spawn_group(
                [sys.executable, "-m", "deployments.cli", *args], cwd=ROOT, env=os.environ, stdout=sink, stderr=sink
            )
        finally:
            signal.signal(signal.SIGINT, inherited)
        committed = 0
        while committed < 2:
            assert cli.poll() is None, err.read_text()[-2000:]
            try:
                committed = watch.execute("SELECT count(*) FROM flowyard.bulk_chunks").fetchone()[0]
            except psycopg.errors.UndefinedTable:
                pass
            time.sleep(0.02)
        os.killpg(cli.pid, signal.SIGINT)
        assert cli.wait(timeout=300) == 130, err.read_text()[-2000:]
    assert err.read_text().strip().splitlines()[-1] == "flowyard: interrupted"
    stopped_at = _one(target, "SELECT count(*) FROM flowyard.bulk_chunks")[0]
    assert stopped_at < 30, "the interrupt must land while chunks are still to copy"
    status = run_cli("bulk", "status", "--target", target).stdout
    assert f"(failed: interrupted (KeyboardInterrupt); run the same copy again to resume): {stopped_at}/30" in status

    again = run_cli(*args)
    assert again.returncode == 0, again.stderr[-2000:]
    assert _one(target, "SELECT count(*), count(DISTINCT id) FROM events") == (300000, 300000)
    assert "(completed): 30/30 chunks, 300,000 rows" in run_cli("bulk", "status", "--target", target).stdout
    drop_database(pg.url(), target.rsplit("/", 1)[1])


def test_a_mapping_file_that_is_not_yaml_says_what_is_wrong_and_where(tmp_path: Path) -> None:
    """The parser error's first line is only its context (``while parsing a flow sequence``)."""
    broken = tmp_path / "mapping.yaml"
    broken.write_text("events:\n  columns: [id, kind\n")
    with pytest.raises(UserError) as info:
        load_mapping(broken)
    assert str(info.value) == (
        f"cannot read mapping file {broken}: expected ',' or ']', but got '<stream end>' at line 3, column 1"
    )


def _waits_for_events(url: str) -> bool:
    """Does a session wait for a lock on events (the CLI's, behind the test's)?"""
    query = "SELECT EXISTS (SELECT FROM pg_locks WHERE relation = 'events'::regclass AND NOT granted)"
    return bool(_one(url, query)[0])


def test_a_copy_killed_while_it_waits_for_a_lock_leaves_no_session_waiting(fresh_db, tmp_path):
    """The real CLI, SIGKILLed with its process group while its restart waits to empty events behind
    the test's lock: its backend leaves the lock queue. A backend waiting for a lock never reads
    its socket, so it waited on for as long as the lock was held, and then emptied the table the
    resumed run (or anyone) had loaded meanwhile; every writer queued behind it."""
    args = ("bulk", "copy", str(BULK_DEMO_ASSETS), "--target", fresh_db, "--table", "events")
    assert run_cli(*args).returncode == 0
    with psycopg.connect(fresh_db) as holder:
        holder.execute("LOCK TABLE events IN ACCESS SHARE MODE")
        sigkill(cli_until((*args, "--restart"), tmp_path / "cli.log", lambda: _waits_for_events(fresh_db)))
        until_not(lambda: _waits_for_events(fresh_db), "the killed CLI's session still waits for its lock")
