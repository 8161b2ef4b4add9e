"""The quality-check flow end to end on a real database and Prefect server."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import uuid
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
from psycopg import sql

from flows.quality_check import quality_check
from quality.alerts import AlertConfig
from quality.sample_data import DEMO_SCHEMA, demo_parameters
from quality.sql_rules import TimeWindow
from tasks.errors import ServerReadOnly, UserError
from tasks.state import state_url
from tests.conftest import run_cli
from tests.process_support import cli_until, sigkill, until_its_sessions_end
from tests.quality.test_alerts import Receiver

pytestmark = pytest.mark.usefixtures("prefect_api")


async def _artifacts(flow_run_id):
    async with get_client() as client:
        found = await client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return {a.key: a for a in found}


def _expected_counts(url: str) -> dict[str, int]:
    """Violations straight from the generated data, in hand-written SQL."""
    with psycopg.connect(url) as conn:
        conn.execute(f"SET search_path TO {DEMO_SCHEMA}")
        one = lambda q: conn.execute(q).fetchone()[0]  # noqa: E731
        return {
            "users.valid_email": one(
                r"SELECT count(*) FROM users WHERE email !~ '^[^\s@]+@[^\s@]+\.[^\s@]+$'"
            ),
            "users.not_null_id": one("SELECT count(*) FROM users WHERE id IS NULL"),
            "agents.valid_agent_type": one("SELECT count(*) FROM agents WHERE right(type, 5) <> 'Agent'"),
            "tasks.project_exists": one(
                "SELECT count(*) FROM tasks t LEFT JOIN projects p ON p.id = t.project_id WHERE p.id IS NULL"
            ),
        }


def test_flow_scores_reports_and_trends(fresh_db, tmp_path, state_db):
    params = demo_parameters(fresh_db)
    expected = _expected_counts(fresh_db)
    with psycopg.connect(state_db, autocommit=True) as conn:  # earlier runs on the same demo data
        conn.execute(
            "DELETE FROM flowyard.quality_alerts WHERE suite IN ('users', 'projects', 'agents', 'tasks')"
        )
    receiver = Receiver()
    alerts = AlertConfig(webhook_url=receiver.url, emit_event=False)

    try:
        state = quality_check(**params, output_dir=str(tmp_path), alerts=alerts, return_state=True)
    finally:
        receiver.server.shutdown()
    first = state.result()

    assert set(first["suites"]) == {"users", "projects", "agents", "tasks"}
    assert all(s["rows"] == 2000 and not s["success"] for s in first["suites"].values())
    assert first["overall_score"] == pytest.approx(sum(s["score"] for s in first["suites"].values()) / 4)
    artifacts = asyncio.run(_artifacts(state.state_details.flow_run_id))
    rules = {(r["suite"], r["rule"]): r for r in json.loads(artifacts["quality-rules"].data)}
    for key, count in expected.items():
        suite, rule = key.split(".")
        assert rules[(suite, rule)]["unexpected_count"] == count > 0
    # One webhook call per failing critical rule, and nothing for the other severities.
    critical = {
        (r["suite"], r["rule"]) for r in rules.values() if r["severity"] == "critical" and not r["success"]
    }
    assert {(b["suite"], b["rule"]) for b in receiver.bodies} == critical
    assert first["alerts_sent"] == len(receiver.bodies) == len(critical) >= 2
    dashboard = artifacts["quality-dashboard"].data
    assert f"# Data quality: {first['overall_score']:.2f} / 100" in dashboard
    assert "data:image/png;base64," in dashboard and "## Recommendations" in dashboard
    assert "quality-profile-users" in artifacts
    assert artifacts["quality-score-trend"].data.startswith("data:image/png;base64,")
    assert (tmp_path / "score_trend.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "data_docs" / "index.html").is_file()
    assert first["anomalies"] > 0  # injected outliers and the e-mail pattern break

    # Second run after the data got worse: trends go down for users only.
    with psycopg.connect(fresh_db, autocommit=True) as conn:
        conn.execute(f"UPDATE {DEMO_SCHEMA}.users SET email = 'broken' WHERE random() < 0.3")
    second = quality_check(**params, output_dir=str(tmp_path), profile=False)
    assert second["alerts_sent"] == 0  # the critical violations did not change
    assert second["trends"]["users"] == "down"
    assert {second["trends"][s] for s in ("projects", "agents", "tasks")} == {"stable"}
    assert second["suites"]["users"]["score"] < first["suites"]["users"]["score"]
    assert second["recommendations"] >= 1  # valid_email now fails on >10% of rows


def test_default_run_on_a_database_without_entity_tables(fresh_db, tmp_path, state_db):
    """The hourly deployment runs with defaults: missing entity tables are skipped, not fatal."""
    result = quality_check(database_url=fresh_db, output_dir=str(tmp_path))
    assert (result["suites"], result["overall_score"], result["alerts_sent"]) == ({}, 100.0, 0)
    with psycopg.connect(fresh_db, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE users (id uuid, email text, username text, role text, status text,"
            " version int, created_at timestamptz)"
        )
    assert set(quality_check(database_url=fresh_db, output_dir=str(tmp_path))["suites"]) == {"users"}


def test_flow_checks_files(tmp_path, state_db):
    path = tmp_path / "users.csv"
    path.write_text(
        "id,email,username,role,status,version,created_at\n"
        "1,a@b.io,alice,admin,active,1,2024-01-01T00:00:00Z\n"
        "2,not-an-email,bob,admin,active,1,2024-01-01T00:00:00Z\n"
        "2,c@d.io,carol,root,active,0,2999-01-01T00:00:00Z\n"
    )
    result = quality_check(suites=[], files={"users": str(path)}, output_dir=str(tmp_path), profile=False)
    # row 1: 100; row 2: dup id (10) + email (5) = 85; row 3: dup id (10) + role (2) + future (5) + version (2) = 81
    assert result["suites"]["users"]["score"] == pytest.approx((100 + 85 + 81) / 3)


def test_output_dir_that_is_a_file_is_one_line_before_the_run_is_recorded(tmp_path, state_db):
    # It used to be a FileExistsError from the dashboard step, after the run's scores were stored.
    path = tmp_path / "users.csv"
    path.write_text(
        "id,email,username,role,status,version,created_at\n1,a@b.io,alice,admin,active,1,2024-01-01T00:00:00Z\n"
    )
    a_file = tmp_path / "out"
    a_file.write_text("")
    with psycopg.connect(state_db) as conn:
        before = conn.execute("SELECT count(*) FROM flowyard.quality_scores").fetchone()
    with pytest.raises(
        UserError,
        match=f"^output directory {a_file} cannot be used as a directory: File exists; pass a directory path$",
    ):
        quality_check(suites=[], files={"users": str(path)}, output_dir=str(a_file), profile=False)
    with psycopg.connect(state_db) as conn:
        assert conn.execute("SELECT count(*) FROM flowyard.quality_scores").fetchone() == before


def test_a_read_only_state_role_is_one_line_before_anything_is_checked(limited_role, fresh_db, tmp_path):
    """A DBA's ``ALTER ROLE … SET default_transaction_read_only = on`` for the role of the state
    database: the run checked every table, then failed on the first score it recorded with the
    driver's "cannot execute INSERT in a read-only transaction", naming neither the setting nor the
    fix. It is one line before any check, and nothing is recorded."""
    state_url(fresh_db)  # flowyard's schema, made by the database's owner
    role = sql.Identifier(limited_role.name)
    with psycopg.connect(fresh_db, autocommit=True) as conn:
        conn.execute("CREATE TABLE items (id int)")
        conn.execute("INSERT INTO items VALUES (1), (NULL)")
        conn.execute(sql.SQL("GRANT USAGE ON SCHEMA flowyard TO {}").format(role))
        conn.execute(
            sql.SQL("GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA flowyard TO {}").format(role)
        )
        conn.execute(sql.SQL("GRANT USAGE ON ALL SEQUENCES IN SCHEMA flowyard TO {}").format(role))
        conn.execute(sql.SQL("GRANT SELECT ON items TO {}").format(role))
    advice = limited_role.freeze_read_only(fresh_db)
    suite = tmp_path / "items.yaml"
    suite.write_text(
        "name: items\ntable: items\nrules:\n  - {name: id_present, check: not_null, column: id, severity: critical}\n"
    )
    url = limited_role.url(fresh_db)
    with pytest.raises(ServerReadOnly) as err:
        quality_check(database_url=url, suites=[str(suite)], state_database_url=url, output_dir=str(tmp_path))
    line = str(err.value)
    assert "\n" not in line
    assert advice in line
    assert line.endswith("; nothing was checked or recorded")
    with psycopg.connect(fresh_db) as conn:
        assert conn.execute("SELECT count(*) FROM flowyard.quality_scores").fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM flowyard.quality_alerts").fetchone() == (0,)


def test_cli_check_and_profile(fresh_db, tmp_path, state_db):
    demo_parameters(fresh_db)
    proc = run_cli(
        "quality",
        "check",
        "--database-url",
        fresh_db,
        "--schema",
        DEMO_SCHEMA,
        "-s",
        "agents",
        "--output-dir",
        str(tmp_path),
        "--no-profile",
    )
    assert proc.returncode == 0, proc.stderr
    assert "overall score:" in proc.stdout and "agents" in proc.stdout
    proc = run_cli("quality", "profile", f"{DEMO_SCHEMA}.agents", "--database-url", fresh_db)
    assert proc.returncode == 0, proc.stderr
    assert "2000 rows" in proc.stdout and "temperature" in proc.stdout
    proc = run_cli("quality", "profile", "nope", "--database-url", fresh_db)
    assert proc.returncode == 2 and "table public.nope not found" in proc.stderr


def test_cli_check_errors_are_one_line_without_traceback(fresh_db, state_db):
    unknown = run_cli("quality", "check", "--database-url", fresh_db, "-s", "nope")
    assert unknown.returncode == 2 and "Traceback" not in unknown.stderr
    assert unknown.stderr.strip().splitlines() == [
        "flowyard: error: unknown suite 'nope'; use one of users, projects, agents, tasks, "
        "a .yaml file or module:attribute"
    ]
    # A suite whose table is missing fails inside the run: Prefect logs it, the terminal gets no traceback.
    missing = run_cli("quality", "check", "--database-url", fresh_db, "-s", "users", "--no-profile")
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert missing.stderr.strip().splitlines()[-1] == (
        "flowyard: error: suite 'users': table public.users not found; check its table and the schema"
    )
    builtin = run_cli("quality", "validate-suite", "users")
    assert builtin.returncode == 0 and "users: 9 rules on users" in builtin.stdout


def test_cli_refuses_a_data_file_that_is_a_directory_before_any_server_starts(tmp_path):
    # It used to start the servers and fail the run with "file not found" for a file that exists.
    a_dir = tmp_path / "users.csv"
    a_dir.mkdir()
    env = {"FLOWYARD_HOME": str(tmp_path / "home"), "FLOWYARD_DATABASE_URL": "postgresql://u@127.0.0.1:1/none"}
    result = run_cli("quality", "check", "-f", f"users={a_dir}", env=env)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == (
        f"flowyard: error: cannot read data file {a_dir}: it is a directory; "
        "pass a .csv, .parquet, .json or .jsonl file\n"
    )
    assert not (tmp_path / "home" / "run").exists(), "no server started"


_MISFITS = [
    (
        {"check": "regex", "column": "amount", "pattern": "^[0-9]+$"},
        'regex on "amount" (integer) needs a text column; cast it in a view or use range',
    ),
    (
        {"check": "range", "column": "code", "min": 0, "max": 9},
        'range on "code" (text) needs a numeric column (its min and max are numbers); use regex or in_set',
    ),
    (
        {"check": "range", "column": "placed", "max": 20240101},
        'range on "placed" (date) needs a numeric column (its min and max are numbers); cast it to a number in a view',
    ),
    (
        {"check": "in_set", "column": "code", "values": [1, "A"]},
        "in_set on \"code\" (text) mixes numbers and text in its values; give them all as text (quote the numbers: '1')",
    ),
    (
        {"check": "in_set", "column": "code", "values": [1, 2]},
        "in_set on \"code\" (text) has numbers, which its type does not compare with; quote them ('1') or check a numeric column",
    ),
    (
        {"check": "in_set", "column": "tags", "values": ["{1,2}"]},
        'in_set on "tags" (integer[]) cannot list whole arrays as values; check its elements in a view (unnest)',
    ),
]


@pytest.mark.parametrize(("rule", "why"), _MISFITS, ids=[f"{r['check']}-{r['column']}" for r, _ in _MISFITS])
def test_a_check_that_does_not_fit_its_columns_type_is_one_line_before_any_check(
    fresh_db, tmp_path, state_db, rule, why
):
    """PostgreSQL has no ``integer ~ text`` nor ``text < double precision``, and psycopg dumps no list
    of numbers and text: GX reported the driver's error as the rule's, and the score query failed
    the run with its traceback. The suite check refuses such a rule, naming its column's type."""
    with psycopg.connect(fresh_db, autocommit=True) as conn:
        conn.execute("CREATE TABLE orders (amount int, code text, placed date, tags int[])")
        conn.execute("INSERT INTO orders VALUES (5, 'A', '2024-01-01')")
    _refused_before_any_score(fresh_db, tmp_path, state_db, [{"name": "r", "severity": "low", **rule}], why)


def _refused_before_any_score(url: str, tmp_path: Path, state_db: str, rules: list[dict], why: str) -> None:
    """A suite of ``rules`` on ``orders`` is refused with rule ``r``'s one line, and no score is recorded."""
    path = tmp_path / "orders.yaml"
    path.write_text(json.dumps({"name": "orders", "table": "orders", "rules": rules}))
    with psycopg.connect(state_db) as conn:
        before = conn.execute("SELECT count(*) FROM flowyard.quality_scores").fetchone()
    with pytest.raises(UserError) as refused:
        quality_check(database_url=url, suites=[str(path)], output_dir=str(tmp_path / "out"), profile=False)
    assert str(refused.value) == f"suite 'orders' rule 'r': {why}"
    with psycopg.connect(state_db) as conn:
        assert conn.execute("SELECT count(*) FROM flowyard.quality_scores").fetchone() == before


def test_cli_names_a_check_that_does_not_fit_its_columns_type_in_one_line(fresh_db, tmp_path, state_db):
    with psycopg.connect(fresh_db, autocommit=True) as conn:
        conn.execute("CREATE TABLE orders (amount int)")
    path = tmp_path / "orders.yaml"
    path.write_text(
        "name: orders\ntable: orders\nrules:\n"
        "  - {name: amount_shape, check: regex, column: amount, pattern: '^[0-9]+$', severity: low}\n"
    )
    proc = run_cli("quality", "check", "--database-url", fresh_db, "-s", str(path), "--no-profile")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "flowyard: error: suite 'orders' rule 'amount_shape': regex on \"amount\" (integer) needs a text column; "
        "cast it in a view or use range"
    )


_UNREADABLE = [
    (
        {"check": "in_set", "column": "amount", "values": ["1", "abc"]},
        'in_set on "amount" (integer) cannot read its value \'abc\' (invalid input syntax for type integer: "abc"); '
        "give values of its type",
    ),
    (
        {"check": "in_set", "column": "placed", "values": ["2026-13-01"]},
        'in_set on "placed" (date) cannot read its value \'2026-13-01\' (date/time field value out of range: '
        '"2026-13-01"); give values of its type',
    ),
    (
        {"check": "in_set", "column": "ref", "values": ["abc"]},
        'in_set on "ref" (uuid) cannot read its value \'abc\' (invalid input syntax for type uuid: "abc"); '
        "give values of its type",
    ),
    (
        {"check": "in_set", "column": "doc", "values": ["{}"]},
        'in_set on "doc" (json) cannot be compared with its values (operator does not exist: json = unknown); '
        "cast it in a view",
    ),
    (
        {"check": "range", "column": "owner", "min": 1},
        'range on "owner" (oid) cannot be compared with its values (operator does not exist: oid < double precision); '
        "cast it in a view",
    ),
]


@pytest.mark.parametrize(("rule", "why"), _UNREADABLE, ids=[r["column"] for r, _ in _UNREADABLE])
def test_a_value_its_column_cannot_read_is_one_line_before_any_check(fresh_db, tmp_path, state_db, rule, why):
    """PostgreSQL reads an in_set's text values as the column's type when the query is bound, and has
    no json = json nor oid < double precision: GX reported the driver's error as the rule's and the
    score query failed the run with its traceback. The suite is refused naming the value; the rules
    beside it that PostgreSQL can compare (text values on text, integers on bigint) are not."""
    with psycopg.connect(fresh_db, autocommit=True) as conn:
        conn.execute("CREATE TABLE orders (amount int, placed date, ref uuid, doc json, owner oid, code text, big bigint)")
        conn.execute("INSERT INTO orders VALUES (5, '2024-01-01', gen_random_uuid(), '{}', 1, '3', 7)")
    near = [
        {"name": "code_known", "check": "in_set", "column": "code", "values": ["1", "2"], "severity": "low"},
        {"name": "big_known", "check": "in_set", "column": "big", "values": [1, 2], "severity": "low"},
    ]
    _refused_before_any_score(fresh_db, tmp_path, state_db, [*near, {"name": "r", "severity": "low", **rule}], why)


def test_cli_names_an_unreadable_value_in_one_line_and_checks_the_comparable_ones(fresh_db, tmp_path, state_db):
    with psycopg.connect(fresh_db, autocommit=True) as conn:
        conn.execute("CREATE TABLE orders (amount int, code text, big bigint)")
        conn.execute("INSERT INTO orders VALUES (5, '3', 7)")
    near = (
        "name: orders\ntable: orders\nrules:\n"
        "  - {name: code_known, check: in_set, column: code, values: ['1', '2'], severity: low}\n"
        "  - {name: big_known, check: in_set, column: big, values: [1, 2], severity: low}\n"
    )
    path = tmp_path / "orders.yaml"
    path.write_text(near)
    checked = run_cli("quality", "check", "--database-url", fresh_db, "-s", str(path), "--no-profile")
    assert checked.returncode == 0, checked.stderr
    assert "violations   2" in checked.stdout
    path.write_text(near + "  - {name: amount_known, check: in_set, column: amount, values: [abc], severity: low}\n")
    proc = run_cli("quality", "check", "--database-url", fresh_db, "-s", str(path), "--no-profile")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "flowyard: error: suite 'orders' rule 'amount_known': in_set on \"amount\" (integer) cannot read its value "
        "'abc' (invalid input syntax for type integer: \"abc\"); give values of its type"
    )


def test_a_schema_name_gx_reads_a_parameter_in_is_one_line_naming_the_rules(fresh_db, tmp_path, state_db):
    """GX writes the table's name into the query of the rules flowyard states itself (not_future,
    foreign_key, unique on a quoted column) and runs it as SQLAlchemy text(), where ':x' of schema
    "shop :x" is a bind parameter: each of those rules failed with "A value is required for bind
    parameter 'x'" and counted nothing. The suite is refused up front, naming them and the remedy."""
    with psycopg.connect(fresh_db, autocommit=True) as conn:
        conn.execute('CREATE SCHEMA "shop :x"')
        conn.execute('CREATE TABLE "shop :x".orders (id int, placed timestamptz, cust int)')
        conn.execute('CREATE TABLE "shop :x".customers (id int)')
        conn.execute("""INSERT INTO "shop :x".orders VALUES (1, now() + interval '9 days', 2)""")
    rules = [
        {"name": "id_present", "check": "not_null", "column": "id"},
        {"name": "placed_ok", "check": "not_future", "column": "placed"},
        {"name": "customer_exists", "check": "foreign_key", "column": "cust", "references": "customers.id"},
    ]
    path = tmp_path / "orders.yaml"
    path.write_text(json.dumps({"name": "orders", "table": "orders", "rules": [{**r, "severity": "low"} for r in rules]}))
    with pytest.raises(UserError) as refused:
        quality_check(
            database_url=fresh_db, suites=[str(path)], table_schema="shop :x", output_dir=str(tmp_path / "out"), profile=False
        )
    assert str(refused.value) == (
        "suite 'orders': 'placed_ok' (not_future), 'customer_exists' (foreign_key) cannot run on \"shop :x\".\"orders\" "
        "(Great Expectations reads ':x' in its name as a parameter); check a view of it under a plain name, "
        "or one window of it"
    )


def test_a_windowed_suite_on_an_older_server_is_scored_and_recorded_there(older_db, tmp_path):
    """The checked table and flowyard's state on the oldest major tested (14-17): GX's SQL datasource,
    the score query and the recorded scores, for every row-level check over one day's window
    (tomorrow's, so its rows are all in the future; a duplicate and bad values outside it count for
    nothing)."""
    start = dt.datetime.now(dt.UTC) + dt.timedelta(days=1)
    day = TimeWindow.containing("day", start)
    with psycopg.connect(older_db, autocommit=True) as conn:
        conn.execute("CREATE TABLE customers (id int PRIMARY KEY)")
        conn.execute("INSERT INTO customers VALUES (1), (2)")
        conn.execute("CREATE TABLE orders (id int, amount numeric, status text, code text, cust int, placed timestamptz)")
        conn.cursor().executemany(
            "INSERT INTO orders VALUES (%s, %s, %s, %s, %s, %s)",
            [  # each row in the window breaks placed_ok, and:
                (1, 5, "open", "A-1", 1, day.start),
                (2, -1, "open", "A-2", 2, day.start),  # amount_range; id_unique with the next row
                (2, 7, "lost", "A-3", 1, day.start),  # id_unique; status_known
                (None, 3, "open", "bad", 9, day.start),  # id_present, code_shape, customer_exists
                (1, -100, "lost", "bad", 9, day.end),  # outside the window
            ],
        )
    rules = [
        {"name": "amount_range", "check": "range", "column": "amount", "min": 0},
        {"name": "id_unique", "check": "unique", "column": "id"},
        {"name": "status_known", "check": "in_set", "column": "status", "values": ["open", "closed"]},
        {"name": "id_present", "check": "not_null", "column": "id"},
        {"name": "code_shape", "check": "regex", "column": "code", "pattern": "^A-[0-9]+$"},
        {"name": "customer_exists", "check": "foreign_key", "column": "cust", "references": "customers.id"},
        {"name": "placed_ok", "check": "not_future", "column": "placed"},
    ]
    path = tmp_path / "orders.yaml"
    path.write_text(
        json.dumps(
            {"name": "orders", "table": "orders", "timestamp_column": "placed", "rules": [{**r, "severity": "low"} for r in rules]}
        )
    )
    result = quality_check(
        database_url=older_db, state_database_url=older_db, suites=[str(path)], window="day", window_start=start,
        output_dir=str(tmp_path / "out"), profile=False,
    )  # fmt: skip
    # one point off per rule a row breaks: 1, 3, 3 and 4
    assert result["suites"]["orders"] == {"score": 97.25, "rows": 4, "success": False, "violations": 7}
    with psycopg.connect(older_db) as conn:
        recorded = conn.execute("SELECT score, row_count, details FROM flowyard.quality_scores").fetchall()
    counts = {"amount_range": 1, "id_unique": 2, "status_known": 1, "id_present": 1, "code_shape": 1}
    assert recorded == [(97.25, 4, {**counts, "customer_exists": 1, "placed_ok": 4, "window": day.label})]


def _in_set_results(url: str, tmp_path: Path, column_type: str, rows: list[str], rules: dict[str, list]) -> tuple[dict, dict]:
    """:func:`_rule_results` of in_set ``rules`` (name -> values, severity low) over column ``v`` of
    ``orders`` holding ``rows`` and a NULL."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TYPE mood AS ENUM ('ok', 'bad', 'meh')")
        conn.execute(sql.SQL("CREATE TABLE orders (v {})").format(sql.SQL(column_type)))
        conn.cursor().executemany("INSERT INTO orders VALUES (%s)", [(v,) for v in [*rows, None]])
    in_sets = [{"name": n, "check": "in_set", "column": "v", "values": v, "severity": "low"} for n, v in rules.items()]
    return _rule_results(url, tmp_path, in_sets)


def _rule_results(url: str, tmp_path: Path, rules: list[dict]) -> tuple[dict, dict]:
    """The summary of suite ``orders`` of ``rules`` on table ``orders``, and each rule's row of the
    ``quality-rules`` artifact, through the flow."""
    path = tmp_path / "orders.yaml"
    path.write_text(json.dumps({"name": "orders", "table": "orders", "rules": rules}))
    state = quality_check(
        database_url=url, suites=[str(path)], output_dir=str(tmp_path / "out"), profile=False, return_state=True
    )
    artifacts = asyncio.run(_artifacts(state.state_details.flow_run_id))
    checked = {r["rule"]: r for r in json.loads(artifacts["quality-rules"].data)}
    return state.result()["suites"]["orders"], checked


_TYPED_ROWS = [
    ("date", ["2024-01-01", "2024-01-02", "2024-03-01"]),
    ("integer", ["1", "2", "3"]),
    ("mood", ["ok", "bad", "meh"]),
    ("bytea", ["\\x0102", "\\x0a", "\\x0304"]),
]


@pytest.mark.parametrize(("column_type", "rows"), _TYPED_ROWS, ids=[t for t, _ in _TYPED_ROWS])
def test_in_set_text_values_on_a_column_that_is_not_text_count_as_the_score_does(
    fresh_db, tmp_path, state_db, column_type, rows
):
    """PostgreSQL reads an in_set's quoted values as the column's type in the score query, but GX's
    own check bound them as varchar (SQLAlchemy's psycopg dialect casts every str): "operator does
    not exist: date <> character varying", and the rule was reported failed with 0 failing rows. A
    bytea value in PostgreSQL's hex spelling (``'\\x0102'``) failed so too, with "No literal value
    renderer is available ... NULL": GX's query for the failing rows, which flowyard never shows,
    lost the backslash. The rule now fails with the one row outside its set, as the score counts
    it, and a set holding every row passes."""
    summary, checked = _in_set_results(fresh_db, tmp_path, column_type, rows, {"known": rows[:2], "all_known": rows})
    assert {name: (r["success"], r["unexpected_count"], r["sample"], r["error"]) for name, r in checked.items()} == {
        "known": (False, 1, rows[2], ""),
        "all_known": (True, 0, "", ""),
    }
    assert summary["score"] == pytest.approx((4 * 100 - 1) / 4)


_BEYOND_INTEGER = {
    "numbers": ([1, 2, 2**40, 10**20], [10**20, 1, 2, 3]),
    "text": (["1", "2", "99999999999", " 100000000000000000000"], ["99999999999", "1", "2", "3"]),
}


@pytest.mark.parametrize(("known", "all_known"), list(_BEYOND_INTEGER.values()), ids=list(_BEYOND_INTEGER))
def test_an_in_set_number_no_integer_column_holds_is_not_in_its_set(fresh_db, tmp_path, state_db, known, all_known):
    """SQLAlchemy casts every value of GX's IN to the first one's type: ``INTEGER`` for 1, where
    ``10**20`` or ``2**40`` is out of range, so GX failed the rule with "integer out of range" (or
    "bigint out of range") and 0 failing rows while the score counted the row outside the set; the
    same numbers quoted were refused before the run as values the column cannot read ("value
    "99999999999" is out of range for type integer"). A number the column cannot hold can never
    match: the rule counts that row, and a set holding every row beside it passes."""
    summary, checked = _in_set_results(
        fresh_db, tmp_path, "integer", ["1", "2", "3"], {"known": known, "all_known": all_known}
    )
    assert {name: (r["success"], r["unexpected_count"], r["sample"], r["error"]) for name, r in checked.items()} == {
        "known": (False, 1, "3", ""),
        "all_known": (True, 0, "", ""),
    }
    assert summary["score"] == pytest.approx((4 * 100 - 1) / 4)


# A duplicated value of each type whose Python value (as psycopg returns it) GX could not write
# into its results, as PostgreSQL prints it, and another value of the type for an in_set.
_UNSERIALISED = [
    ("interval", "1 day 02:00:00", "00:00:01"),
    ("inet", "10.0.0.1", "10.0.0.2"),
    ("cidr", "10.0.0.0/8", "11.0.0.0/8"),
    ("bytea", "\\x0102", None),
    ("int4range", "[1,5)", "[1,6)"),
    ("daterange", "[2024-01-01,2024-01-05)", "empty"),
    ("interval[]", "{01:00:00}", None),
    ("numeric", "NaN", None),
    ("double precision", "NaN", "1"),
    ("date", "infinity", "2024-01-01"),
    ("timestamp", "-infinity", "2024-01-01 00:00:00"),
    ("jsonb", '{"a": [1, 2.5]}', None),
]


@pytest.mark.parametrize(("column_type", "value", "other"), _UNSERIALISED, ids=[f"{t}-{v}" for t, v, _ in _UNSERIALISED])
def test_a_failing_rule_on_a_value_gx_cannot_serialise_is_reported_with_a_readable_sample(
    fresh_db, tmp_path, state_db, column_type, value, other
):
    """GX writes each rule's unexpected values into its results as JSON: a failing unique (or
    in_set) on an interval, inet, range... column ended the whole run with "... is of type timedelta
    which cannot be serialized"; an infinite date or a numeric NaN failed GX's query or its handling
    (the rule's error, 0 rows); a float NaN failed the alert's write to the state database; bytea and
    jsonb samples were in Python's spelling. The rule fails with its count and the values as
    PostgreSQL prints them."""
    with psycopg.connect(fresh_db, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE TABLE orders (v {})").format(sql.SQL(column_type)))
        conn.cursor().executemany(
            sql.SQL("INSERT INTO orders VALUES (%s::text::{})").format(sql.SQL(column_type)),
            [(value,), (value,), (None,)],
        )
    rules = [{"name": "v_unique", "check": "unique", "column": "v", "severity": "critical"}]
    if other is not None:
        rules.append({"name": "v_known", "check": "in_set", "column": "v", "values": [other], "severity": "low"})
    _, checked = _rule_results(fresh_db, tmp_path, rules)
    assert {name: (r["success"], r["unexpected_count"], r["sample"], r["error"]) for name, r in checked.items()} == {
        rule["name"]: (False, 2, f"{value}, {value}", "") for rule in rules
    }


GATE_KEY = 4242
"""The advisory lock a test holds to stop a check's reads of ``orders_checked`` where they are."""


def _crash_suite(url: str, tmp_path: Path) -> tuple[str, Path]:
    """A unique suite name and its YAML: several rules over ``orders_checked``, a view of 200 rows of
    ``orders`` whose reads wait while the test holds the advisory lock ``GATE_KEY`` (flowyard's own
    checks before GX read no row, so only GX's validation queries wait). 3 NULL ids and 2 equal ones
    break the critical rules, 20 amounts the high one: rows score 90 (5), 95 (20) or 100, 99.25 in all."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE orders (id int, amount int, sku text)")
        conn.execute(
            "INSERT INTO orders SELECT CASE WHEN g <= 3 THEN NULL WHEN g = 4 THEN 5 ELSE g END,"
            " CASE WHEN g % 10 = 0 THEN -1 ELSE g END, 'SKU-' || lpad(g::text, 4, '0') FROM generate_series(1, 200) g"
        )
        conn.execute(
            sql.SQL(
                "CREATE FUNCTION gate() RETURNS boolean LANGUAGE plpgsql VOLATILE AS"
                " $$ BEGIN PERFORM pg_advisory_xact_lock_shared({}); RETURN true; END $$"
            ).format(sql.Literal(GATE_KEY))
        )
        conn.execute("CREATE VIEW orders_checked AS SELECT * FROM orders WHERE gate()")
    name = f"crash_{uuid.uuid4().hex[:8]}"  # the state database is the session's: other runs' rows stay apart
    rules = [
        {"name": "id_present", "check": "not_null", "column": "id", "severity": "critical"},
        {"name": "id_unique", "check": "unique", "column": "id", "severity": "critical"},
        {"name": "amount_range", "check": "range", "column": "amount", "min": 0, "max": 1000, "severity": "high"},
        {"name": "sku_shape", "check": "regex", "column": "sku", "pattern": "^SKU-[0-9]{4}$", "severity": "medium"},
        {"name": "size", "check": "row_count", "min": 1, "max": 1000, "severity": "low"},
    ]
    path = tmp_path / "orders.yaml"
    path.write_text(json.dumps({"name": name, "table": "orders_checked", "rules": rules}))
    return name, path


def _check_args(url: str, suite: Path, tmp_path: Path) -> list[str]:
    return ["quality", "check", "--database-url", url, "-s", str(suite), "--output-dir", str(tmp_path / "out"), "--no-profile"]


def _kill_check_once(args: list[str], webhook: str, reached: Callable[[], bool], log: Path) -> None:
    """Run the real ``flowyard quality check`` in its own process group; SIGKILL the group once ``reached()``."""
    sigkill(cli_until(tuple(args), log, reached, env={"FLOWYARD_QUALITY_WEBHOOK_URL": webhook}))


def _recorded(state: str, suite: str) -> tuple[list[tuple], list[str]]:
    """The suite's score rows (score, rows, violations) and its claimed alert rules."""
    with psycopg.connect(state) as conn:
        scores = conn.execute(
            "SELECT score, row_count, violations FROM flowyard.quality_scores WHERE suite = %s ORDER BY id", (suite,)
        ).fetchall()
        alerts = conn.execute("SELECT rule FROM flowyard.quality_alerts WHERE suite = %s ORDER BY rule", (suite,))
        return scores, [rule for (rule,) in alerts]


def _rerun_alerts(args: list[str], receiver: Receiver) -> list[tuple[str, int]]:
    """Check again after the kill; returns the (rule, unexpected count) of every alert received."""
    proc = run_cli(*args, env={"FLOWYARD_QUALITY_WEBHOOK_URL": receiver.url})
    assert proc.returncode == 0, proc.stderr
    assert "99.25" in proc.stdout
    return sorted((b["rule"], b["unexpected_count"]) for b in receiver.bodies)


def test_sigkill_while_gx_validates_records_nothing_and_the_rerun_scores_and_alerts(fresh_db, tmp_path, state_db):
    suite, path = _crash_suite(fresh_db, tmp_path)
    args = _check_args(fresh_db, path, tmp_path)
    receiver = Receiver()
    waiting = (
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid::bigint = %s AND NOT granted"
        " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    )
    try:
        with psycopg.connect(fresh_db, autocommit=True) as gate:
            gate.execute("SELECT pg_advisory_lock(%s)", (GATE_KEY,))
            _kill_check_once(
                args, receiver.url, lambda: gate.execute(waiting, (GATE_KEY,)).fetchone() != (0,), tmp_path / "check.log"
            )
            # GX's backend, waiting for the gate still held, ends by itself: it polls its client's socket.
            until_its_sessions_end(fresh_db)
        assert _recorded(state_db, suite) == ([], [])
        assert receiver.bodies == []
        assert _rerun_alerts(args, receiver) == [("id_present", 3), ("id_unique", 2)]
        assert _recorded(state_db, suite) == ([(99.25, 200, 3)], ["id_present", "id_unique"])
    finally:
        receiver.server.shutdown()


def test_sigkill_while_an_alert_is_sent_sends_it_on_the_rerun(fresh_db, tmp_path, state_db):
    """The first critical rule's claim used to commit before its webhook was called: a run killed before
    the webhook answered left the alert marked sent, and no later run sent it (the second rule's was)."""
    suite, path = _crash_suite(fresh_db, tmp_path)
    args = _check_args(fresh_db, path, tmp_path)
    receiver = Receiver()
    receiver.hold = True
    try:
        _kill_check_once(args, receiver.url, receiver.holding.is_set, tmp_path / "check.log")
        receiver.hold = False
        receiver.let_go.set()
        # Every score of the run was measured before any alert: they are recorded, all of them.
        assert _recorded(state_db, suite) == ([(99.25, 200, 3)], [])
        assert _rerun_alerts(args, receiver) == [("id_present", 3), ("id_unique", 2)]
        assert _recorded(state_db, suite)[1] == ["id_present", "id_unique"]
        assert run_cli(*args, env={"FLOWYARD_QUALITY_WEBHOOK_URL": receiver.url}).returncode == 0
        assert len(receiver.bodies) == 2, "an alert sent once is not sent again"
    finally:
        receiver.let_go.set()
        receiver.server.shutdown()
