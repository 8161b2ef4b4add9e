"""``flowyard online``: plan prints every phase and runs nothing; start/complete/rollback/status drive real runs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowFilter, FlowFilterName
from prefect.client.schemas.objects import FlowRun

from tasks.db import connect
from tasks.embedded_pg import free_port
from tasks.online_phases import PHASE_STATES
from tasks.online_state import active_migration, target_key
from tests.conftest import run_cli
from tests.online_support import WIDEN_AMOUNT, checksum, make_schema, plan_for, run, schema_dump
from tests.process_support import cli_until, sigkill, until_its_sessions_end, until_not

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
        "===== checks (read-only, before start runs anything) =====",
        "-- operation 0 (alter_column): field 'up'\nSELECT (amount::bigint) FROM \"public\".\"orders\" WHERE false;",
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


def test_unreadable_migration_files_are_one_line(tmp_path: Path) -> None:
    not_utf8 = tmp_path / "latin1.yaml"
    not_utf8.write_bytes(b"name: caf\xe9\noperations: []\n")
    directory = tmp_path / "dir.yaml"
    directory.mkdir()
    for path, message in (
        (not_utf8, f"cannot read migration file {not_utf8}: 'utf-8' codec can't decode byte 0xe9"),
        (directory, f"cannot read migration file {directory}: it is a directory"),
    ):
        result = run_cli("online", "plan", str(path))
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith(f"flowyard: error: {message}"), result.stderr
        assert result.stderr.count("\n") == 1


# What a user's shell has of Prefect's settings: nothing. The CLI must still report to
# flowyard's server, not to the ephemeral SQLite one Prefect starts when it has no API URL.
USER_SHELL = tuple(k for k in os.environ if k.startswith("PREFECT_"))


def _flow_runs_of(migration_file: str) -> list[FlowRun]:
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["online-migrate"])), limit=200
        )
    return [r for r in runs if r.parameters.get("migration_file") == migration_file]


def test_start_from_a_user_shell_runs_on_flowyards_server(
    fresh_db: str, state_db: str, tmp_path: Path
) -> None:
    make_schema(fresh_db, rows=10)
    migration = _file(tmp_path, {**SPEC, "name": "from_shell"})
    result = run_cli("online", "start", migration, "--database-url", fresh_db, unset=USER_SHELL)
    assert result.returncode == 0, result.stderr
    assert "temporary server" not in result.stdout + result.stderr
    assert [r.state_name for r in _flow_runs_of(migration)] == ["Completed"]
    assert run_cli("online", "rollback", "--database-url", fresh_db, unset=USER_SHELL).returncode == 0


def test_start_with_a_missing_file_fails_in_one_line_without_traceback(state_db: str, tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.yaml")
    result = run_cli("online", "start", missing, unset=USER_SHELL)
    assert result.returncode == 2
    assert "Traceback" not in result.stdout + result.stderr
    assert result.stderr == (
        f"flowyard: error: cannot read migration file {missing}: no such file; "
        "pass the path of a .yaml or .json migration\n"
    )
    assert _flow_runs_of(missing) == [], "refused by the CLI before any flow run"


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
    assert result.stdout.strip().splitlines()[-1] == "cli_widen: rolled_back"  # no version to point at
    assert "rolled_back" in _status_line(fresh_db)
    assert schema_dump(fresh_db) == before
    with connect(fresh_db) as conn:
        assert conn.execute("SELECT count(*) FROM orders").fetchone() == (50,)


def test_status_given_the_database_url_names_a_broken_sync(fresh_db: str, state_db: str) -> None:
    """Status read only the state, which keeps no URL (it would hold a password): a sync trigger a
    DBA dropped under a running migration, which complete refuses, showed nowhere before complete.
    Rollback then refuses too (new-version writes since are only in the shadow column) until --force."""
    make_schema(fresh_db, rows=10)
    run(fresh_db, state_db, plan_for(fresh_db, state_db, {"name": "cli_sync", "operations": [WIDEN_AMOUNT]}), "start")
    healthy = run_cli("online", "status", "--database-url", fresh_db)
    assert healthy.returncode == 0, healthy.stderr
    assert "\n    sync public.orders: healthy\n" in healthy.stdout

    with connect(fresh_db, autocommit=True) as dba:
        dba.execute("DROP TRIGGER _fy_sync_cli_sync ON orders")
    broken = run_cli("online", "status", "--database-url", fresh_db)
    assert broken.returncode == 0, broken.stderr
    assert (
        "\n    sync public.orders: broken: sync trigger _fy_sync_cli_sync on public.orders is gone, so old-version "
        "writes since did not reach its new columns; roll back (`flowyard online rollback`"
    ) in broken.stdout
    without = run_cli("online", "status")
    assert "sync public.orders" not in without.stdout
    assert "(give --database-url to also check each table's sync trigger, as complete does)" in without.stdout

    refused = run_cli("online", "rollback", "--database-url", fresh_db)
    assert refused.returncode == 2 and "cli_sync: cannot roll back, nothing was changed: sync trigger" in refused.stderr
    assert run_cli("online", "rollback", "--database-url", fresh_db, "--force").returncode == 0


def test_an_empty_database_url_is_named_by_its_option_before_any_server_starts(tmp_path: Path) -> None:
    """`online start/complete/rollback --database-url ""` (an unset variable) was left to the flow:
    said only after flowyard's PostgreSQL and Prefect server were started (down here, so their
    connection error came instead), and naming the flow's ``database_url``."""
    down = {"FLOWYARD_DATABASE_URL": "postgresql://u@127.0.0.1:1/x", "FLOWYARD_PREFECT_PORT": str(free_port())}
    migration = _file(tmp_path, {**SPEC, "name": "unreached"})
    for url, given in (("", "empty"), (" ", "only whitespace (' ')")):
        for command in (("start", migration), ("complete",), ("rollback",)):
            result = run_cli("online", *command, "--database-url", url, env=down, timeout=120)
            assert result.returncode == 2, result.stderr
            assert result.stderr.splitlines() == [
                f"flowyard: error: --database-url (database_url) is {given}; give a postgresql:// URL, or leave it "
                "out for flowyard's state database (FLOWYARD_DATABASE_URL, else the embedded server)"
            ], (command, result.stderr)


def test_lock_and_backfill_options_reach_the_flow_and_bad_values_are_one_line(
    fresh_db: str, state_db: str, tmp_path: Path
) -> None:
    make_schema(fresh_db, rows=10)
    migration = _file(tmp_path, {**SPEC, "name": "tuned"})
    for option, value, message in (
        ("--lock-timeout-ms", "0", "--lock-timeout-ms (lock_timeout_ms) 0 is out of range; give 1 to 2147483647"),
        ("--batch-size", "-1", "--batch-size (batch_size) -1 is out of range; give 1 to 9223372036854775807"),
        # below 1 ms: PostgreSQL would read the 0 ms it rounds to as no limit at all
        ("--batch-timeout-seconds", "0.0004", "--batch-timeout-seconds (batch_timeout_seconds) 0.0004 is out of range; give 0.001 to 2147483.647"),
        ("--batch-delay-seconds", "-0.5", "--batch-delay-seconds (batch_delay_seconds) -0.5 is out of range; give 0 to 31536000"),
        # PostgreSQL takes at most 2^31-1 ms: a bigger value used to fail start's first step
        # with the migration already recorded as started.
        ("--lock-timeout-ms", "10" * 10, f"--lock-timeout-ms (lock_timeout_ms) {'10' * 10} is out of range; give 1 to 2147483647"),
        # nan passed every "> 0" check; inf seconds sleep (or retry) forever: refused naming the
        # option typed (it was the flow parameter's name, "parameter retry_deadline_seconds is Infinity")
        ("--batch-delay-seconds", "nan", "--batch-delay-seconds is NaN; give a finite number of seconds"),
        ("--retry-deadline-seconds", "inf", "--retry-deadline-seconds is Infinity; give a finite number of seconds"),
        ("--max-rows-per-second", "-inf", "--max-rows-per-second is -Infinity; give a finite number of rows per second"),
    ):
        result = run_cli("online", "start", migration, "--database-url", fresh_db, option, value)
        assert result.returncode == 2
        assert result.stderr.strip().splitlines()[-1] == f"flowyard: error: {message}"
    assert "tuned" not in run_cli("online", "status").stdout, "a refused start records nothing"
    tuned = ("--lock-timeout-ms", "150", "--statement-timeout-ms", "5000", "--retry-deadline-seconds", "30")
    started = run_cli(
        "online", "start", migration, "--database-url", fresh_db, "--batch-delay-seconds", "0.01",
        "--batch-timeout-seconds", "90", *tuned,
    )
    assert started.returncode == 0, started.stderr
    rolled_back = run_cli("online", "rollback", "--database-url", fresh_db, *tuned)
    assert rolled_back.returncode == 0, rolled_back.stderr
    (run,) = [r for r in _flow_runs_of(migration) if r.state_name == "Completed"]
    assert (run.parameters["lock_timeout_ms"], run.parameters["batch_delay_seconds"]) == (150, 0.01)
    assert run.parameters["batch_timeout_seconds"] == 90.0
    assert (run.parameters["statement_timeout_ms"], run.parameters["retry_deadline_seconds"]) == (5000, 30.0)


def _left(url: str) -> tuple[bool, bool, bool, bool]:
    """What a phase of cli_widen has done to the schema: its version schema, the shadow column,
    the sync trigger, the renamed column."""
    with connect(url) as conn:
        row = conn.execute(
            """
            SELECT to_regnamespace('public_cli_widen') IS NOT NULL,
                   EXISTS (SELECT FROM pg_attribute WHERE attrelid = 'orders'::regclass
                           AND attname = '_fy_new_amount' AND NOT attisdropped),
                   EXISTS (SELECT FROM pg_trigger WHERE tgrelid = 'orders'::regclass AND tgname = '_fy_sync_cli_widen'),
                   EXISTS (SELECT FROM pg_attribute WHERE attrelid = 'orders'::regclass
                           AND attname = 'comment' AND NOT attisdropped)
            """
        ).fetchone()
    return row[0], row[1], row[2], row[3]


def _waits_for_orders(url: str) -> bool:
    """Does a session wait for a lock on orders (the CLI's DDL, behind the test's lock)?"""
    with connect(url) as conn:
        return bool(
            conn.execute(
                "SELECT EXISTS (SELECT FROM pg_locks WHERE relation = 'orders'::regclass AND NOT granted)"
            ).fetchone()[0]
        )


EXPANDED = (True, True, True, False)


@pytest.mark.parametrize(
    ("phase", "steps_done", "at_kill", "finished"),
    [
        ("start", 1, (True, False, False, False), EXPANDED),  # waits to add the shadow column
        ("complete", 0, EXPANDED, (True, False, False, True)),  # waits to contract orders
        ("rollback", 0, EXPANDED, None),  # waits to drop the version schema and with it the trigger on orders
    ],
)
def test_a_phase_killed_while_its_ddl_waits_for_a_lock_is_stopped_in_status_and_finished_by_running_it_again(
    fresh_db: str,
    state_db: str,
    tmp_path: Path,
    phase: str,
    steps_done: int,
    at_kill: tuple[bool, bool, bool, bool],
    finished: tuple[bool, bool, bool, bool] | None,
) -> None:
    """The real CLI, SIGKILLed with its process group while the phase's DDL waits in pg_locks for
    the test's lock on orders: the state names the phase under way and the steps the schema shows
    done, status tells that no process runs it any more (it said "starting" / "completing" /
    "rolling_back" as for a live run, for good), and the same command again finishes it."""
    make_schema(fresh_db, rows=300)
    before, data = schema_dump(fresh_db), checksum(fresh_db, "SELECT id, amount::bigint, note FROM orders")
    migration = _file(tmp_path, SPEC)
    if phase != "start":
        run(fresh_db, state_db, plan_for(fresh_db, state_db, SPEC), "start")
    command = ("online", phase, *([migration] if phase == "start" else []), "--database-url", fresh_db)
    with connect(fresh_db) as holder:
        holder.execute("LOCK TABLE orders IN ACCESS SHARE MODE")
        cli = cli_until(command, tmp_path / "cli.log", lambda: _waits_for_orders(fresh_db))
        alive = run_cli("online", "status", "--database-url", fresh_db)
        assert f"\n    {phase} is running (pid " in alive.stdout, alive.stdout + alive.stderr
        sigkill(cli)
        until_its_sessions_end(fresh_db)
        record = active_migration(state_db, target_key(fresh_db), "public")
        assert record is not None and record.phase == PHASE_STATES[phase][0]
        assert record.steps_done(phase) == steps_done
        assert _left(fresh_db) == at_kill

    status = run_cli("online", "status", "--database-url", fresh_db)
    assert status.returncode == 0, status.stderr
    assert PHASE_STATES[phase][0] in _status_line(fresh_db)
    assert (
        f"\n    {phase} stopped before it finished (no process holds its lock: it failed or was killed); "
        f"run `flowyard online {phase}"
    ) in status.stdout, status.stdout
    again = run_cli(*command)
    assert again.returncode == 0, again.stderr
    assert f"cli_widen: {PHASE_STATES[phase][1]}" in again.stdout
    assert PHASE_STATES[phase][1] in _status_line(fresh_db)
    if finished is None:
        assert schema_dump(fresh_db) == before
        assert checksum(fresh_db, "SELECT id, amount::bigint, note FROM orders") == data
    else:
        assert _left(fresh_db) == finished
        select = "SELECT id, _fy_new_amount, note FROM orders" if phase == "start" else "SELECT id, amount, comment FROM orders"
        assert checksum(fresh_db, select) == data


_SLEEP = "SELECT pg_sleep(600)"
"""A raw_sql step far longer than :data:`GUARD_SECONDS`: its backend ending at all, before the
guard, proves the server ended it, not the statement."""


def _sleeps(url: str) -> bool:
    """Does a session of ``url``'s database run :data:`_SLEEP`?"""
    with connect(url) as conn:
        query = "SELECT EXISTS (SELECT FROM pg_stat_activity WHERE datname = current_database() AND query = %s)"
        return bool(conn.execute(query, (_SLEEP,)).fetchone()[0])


def test_a_start_killed_mid_statement_leaves_no_statement_running(fresh_db: str, state_db: str, tmp_path: Path) -> None:
    """The real CLI, SIGKILLed with its process group while a raw_sql step runs: the step's backend
    ends. The server notices a gone client only at its next read or write, so the statement ran on
    (600 s here; a VALIDATE or a backfill batch as long as its table), holding its locks, and the
    re-run after the kill waited behind it."""
    make_schema(fresh_db, rows=10)
    spec = {"name": "cli_sleep", "operations": [{"raw_sql": {"up": _SLEEP, "down": "SELECT 1"}}]}
    command = ("online", "start", _file(tmp_path, spec), "--database-url", fresh_db, "--statement-timeout-ms", "3600000")
    sigkill(cli_until(command, tmp_path / "cli.log", lambda: _sleeps(fresh_db)))
    until_not(lambda: _sleeps(fresh_db), "the killed CLI's statement still runs on the server")
