"""GX runs on real PostgreSQL tables and on files: exact unexpected counts, samples and seed scores."""

from __future__ import annotations

import datetime as dt
import tempfile
import uuid

import pandas as pd
import psycopg
import pytest

from quality.profiling import profile_table
from quality.runner import GxSession, check_file, check_table, run_suites
from quality.sql_rules import TableSource, TimeWindow, bound
from quality.suite_spec import Rule, Suite, parse_suite
from quality.suites import ENTITY_SUITES, USERS
from tasks.errors import UserError
from tests.quality.conftest import INFINITY, NOW, expected_for_users, injected_users, insert_users, uid


def _by_rule(result):
    return {r.rule: r for r in result.rules}


def test_table_counts_samples_and_score_are_exact(entity_db):
    rows = injected_users()
    with psycopg.connect(entity_db, autocommit=True) as conn:
        insert_users(conn, rows)
    expected = expected_for_users(rows)

    result = check_table(GxSession(), entity_db, USERS, sample_size=3)

    rules = _by_rule(result)
    assert result.row_count == expected.rows == 40
    assert {name: rules[name].unexpected_count for name in expected.counts} == expected.counts
    assert result.score == pytest.approx(expected.score, abs=1e-9)
    for name, count in expected.counts.items():
        assert rules[name].success is (count == 0)
        assert rules[name].unexpected_percent == pytest.approx(100 * count / 40)
        assert len(rules[name].sample) <= 3
    assert set(rules["valid_email"].sample) <= expected.samples["valid_email"]
    assert set(rules["valid_role"].sample) == expected.samples["valid_role"]
    # The future/infinite timestamps come back as text samples rather than crashing the run.
    assert rules["valid_timestamps"].error is None
    full_sample = _by_rule(check_table(GxSession(), entity_db, USERS, sample_size=50))[
        "valid_timestamps"
    ].sample
    assert INFINITY in full_sample and None in full_sample
    assert rules["row_count_bounds"].success and rules["row_count_bounds"].observed == 40
    assert not result.success


def test_foreign_keys_and_window(entity_db):
    """Every task's project must exist; a daily window checks only that day's rows."""
    yesterday = NOW - dt.timedelta(days=1)
    projects = [uid(1000 + i) for i in range(5)]
    tasks = []
    for i in range(30):
        dangling = i in (2, 7, 11, 29)
        project = str(uuid.uuid4()) if dangling else projects[i % 5]
        when = yesterday if i % 3 == 0 else NOW - dt.timedelta(minutes=1)
        tasks.append(
            (uid(2000 + i), None if i == 20 else project, "task", f"t{i}", "todo", "low", "S", 1, 1, when)
        )
    with psycopg.connect(entity_db, autocommit=True) as conn:
        for p in projects:
            conn.execute(
                "INSERT INTO projects (id, name, owner_id, type, status, visibility, version, created_at) "
                "VALUES (%s, 'p', NULL, 'web', 'active', 'team', 1, now() - interval '2 days')",
                (p,),
            )
        conn.cursor().executemany(
            "INSERT INTO tasks (id, project_id, type, title, status, priority, complexity, actual_hours, version, created_at)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
            tasks,
        )
    suite = ENTITY_SUITES["tasks"]
    session = GxSession()

    whole = _by_rule(check_table(session, entity_db, suite))
    assert whole["project_exists"].unexpected_count == 4  # the NULL project_id is not a dangling reference
    assert set(whole["project_exists"].sample) == {t[1] for i, t in enumerate(tasks) if i in (2, 7, 11, 29)}

    window = TimeWindow.containing("day", yesterday)
    in_window = [t for t in tasks if t[9] == yesterday]
    windowed = check_table(session, entity_db, suite, window=window)
    assert windowed.window == yesterday.strftime("%Y-%m-%d")
    assert windowed.row_count == len(in_window) == 10
    expected_dangling = sum(1 for i, t in enumerate(tasks) if t[9] == yesterday and i in (2, 7, 11, 29))
    assert _by_rule(windowed)["project_exists"].unexpected_count == expected_dangling
    assert windowed.score == pytest.approx(100 - 5 * expected_dangling / 10)

    # Hourly: only the rows created in the hour holding "yesterday".
    hourly = check_table(session, entity_db, suite, window=TimeWindow.containing("hour", yesterday))
    assert hourly.row_count == len(in_window) and hourly.window.endswith(":00Z")
    empty_hour = check_table(
        session, entity_db, suite, window=TimeWindow.containing("hour", NOW - dt.timedelta(days=3))
    )
    assert (empty_hour.row_count, empty_hour.score) == (0, 100.0)


def test_file_input_matches_table_semantics(tmp_path):
    rows = injected_users()
    frame = pd.DataFrame(
        {
            "id": [r.id for r in rows],
            "email": [r.email for r in rows],
            "username": [r.username for r in rows],
            "role": [r.role for r in rows],
            "status": [r.status for r in rows],
            "version": [r.version for r in rows],
            "created_at": [
                r.created_at.isoformat() if isinstance(r.created_at, dt.datetime) else r.created_at
                for r in rows
            ],
        }
    )
    path = tmp_path / "users.csv"
    frame.to_csv(path, index=False)
    expected = expected_for_users(rows)

    result = check_file(GxSession(), USERS, path)

    rules = _by_rule(result)
    assert result.row_count == 40 and result.target == str(path)
    assert {name: rules[name].unexpected_count for name in expected.counts} == expected.counts
    assert result.score == pytest.approx(expected.score, abs=1e-9)


def test_a_data_file_that_cannot_be_read_is_one_line_naming_it(tmp_path):
    """A directory used to be "file not found", and content pandas cannot parse a traceback."""
    a_dir = tmp_path / "users.csv"
    a_dir.mkdir()
    latin1 = tmp_path / "latin1.csv"
    latin1.write_bytes(b"id,email\n1,caf\xe9@b.io\n")
    not_parquet = tmp_path / "users.parquet"
    not_parquet.write_text("id\n1\n")
    notes = tmp_path / "users.txt"
    notes.write_text("id\n1\n")
    fix = "pass a .csv, .parquet, .json or .jsonl file"
    for path, message in (
        (a_dir, f"cannot read data file {a_dir}: it is a directory; {fix}"),
        (tmp_path / "gone.csv", f"cannot read data file {tmp_path / 'gone.csv'}: no such file; {fix}"),
        (notes, f"cannot read data file {notes}: its suffix says no format a check reads; {fix}"),
        (latin1, f"cannot read data file {latin1}: 'utf-8' codec can't decode byte 0xe9"),
        (not_parquet, f"cannot read data file {not_parquet}: "),
    ):
        with pytest.raises(UserError) as error:
            check_file(GxSession(), USERS, path)
        assert str(error.value).startswith(message) and "\n" not in str(error.value), path


def test_empty_table_scores_100_and_fails_row_count(entity_db):
    result = check_table(GxSession(), entity_db, USERS)
    rules = _by_rule(result)
    assert result.row_count == 0 and result.score == 100.0
    assert not rules["row_count_bounds"].success and rules["row_count_bounds"].observed == 0
    assert all(r.success and r.unexpected_count == 0 for r in result.rules if r.rule != "row_count_bounds")


def test_suites_run_concurrently_with_bounded_workers(entity_db):
    from quality.sample_data import fill_entity_tables

    with psycopg.connect(entity_db, autocommit=True) as conn:
        fill_entity_tables(conn, 1000)
        # Independent expectations straight from the data.
        bad_status = conn.execute(
            "SELECT count(*) FROM projects WHERE status <> ALL('{planning,active,paused,completed,archived}')"
        ).fetchone()[0]
        bad_agent = conn.execute("SELECT count(*) FROM agents WHERE type NOT LIKE '%Agent'").fetchone()[0]
        dangling = conn.execute(
            "SELECT count(*) FROM tasks t WHERE NOT EXISTS (SELECT 1 FROM projects p WHERE p.id = t.project_id)"
        ).fetchone()[0]

    results = {r.suite: r for r in run_suites(entity_db, list(ENTITY_SUITES.values()), max_workers=2)}

    assert set(results) == {"users", "projects", "agents", "tasks"}
    assert _by_rule(results["projects"])["valid_status"].unexpected_count == bad_status > 0
    assert _by_rule(results["agents"])["valid_agent_type"].unexpected_count == bad_agent > 0
    assert _by_rule(results["tasks"])["project_exists"].unexpected_count == dangling > 0
    assert all(r.row_count == 1000 for r in results.values())


def _slow_suites(url: str, count: int) -> list:
    """``count`` suites over views that take a real 0.2 s per scan, so overlapping checks are visible."""
    from quality.suite_spec import parse_suite

    with psycopg.connect(url, autocommit=True) as conn:
        for i in range(count):
            conn.execute(
                psycopg.sql.SQL(
                    "CREATE VIEW {} AS SELECT g AS id FROM generate_series(1, 2) g, LATERAL (SELECT pg_sleep(0.1)) AS s"
                ).format(psycopg.sql.Identifier(f"slow_{i}"))
            )
    return [
        parse_suite(
            {
                "name": f"slow-{i}",
                "table": f"slow_{i}",
                "rules": [{"name": "id_present", "check": "not_null", "column": "id", "severity": "low"}],
            }
        )
        for i in range(count)
    ]


SCANNING_SLOW_VIEWS = (
    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
    "AND state = 'active' AND query LIKE '%slow\\_%' AND pid <> pg_backend_pid()"
)


def _peak_concurrent_scans(url: str, run) -> int:
    """Run ``run()`` while sampling how many sessions are scanning a slow view at the same moment."""
    import threading

    samples: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        with psycopg.connect(url, autocommit=True) as conn:
            while not stop.wait(0.01):
                samples.append(conn.execute(SCANNING_SLOW_VIEWS).fetchone()[0])

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        run()
    finally:
        stop.set()
        sampler.join()
    return max(samples, default=0)


@pytest.mark.parametrize("workers", [1, 2])
def test_suites_overlap_up_to_max_workers_and_never_more(fresh_db, workers):
    suites = _slow_suites(fresh_db, 4)
    results: list = []
    peak = _peak_concurrent_scans(
        fresh_db, lambda: results.extend(run_suites(fresh_db, suites, max_workers=workers))
    )
    assert peak == workers
    assert [(r.suite, r.row_count, r.success) for r in results] == [(s.name, 2, True) for s in suites]


def test_a_roles_statement_timeout_does_not_cut_a_check(limited_role, entity_db):
    """A production role often has a short statement_timeout. GX's own SQLAlchemy sessions go
    through flowyard's ``connect`` too, so a check over a large table is not cancelled half way.

    Row-level security makes every query of the role on ``users`` last ≥ 50 ms (one sleep per
    query, in an InitPlan), longer than the role's 20 ms limit."""
    rows = injected_users()
    with psycopg.connect(entity_db, autocommit=True) as conn:
        insert_users(conn, rows)
        role = psycopg.sql.Identifier(limited_role.name)
        conn.execute(psycopg.sql.SQL("GRANT SELECT ON ALL TABLES IN SCHEMA public TO {}").format(role))
        conn.execute("ALTER TABLE users ENABLE ROW LEVEL SECURITY")
        conn.execute(
            psycopg.sql.SQL(
                "CREATE POLICY slow ON users TO {} USING ((SELECT pg_sleep(0.05)) IS NOT NULL)"
            ).format(role)
        )
        conn.execute(psycopg.sql.SQL("ALTER ROLE {} SET statement_timeout = '20ms'").format(role))
    role_url = limited_role.url(entity_db)
    with psycopg.connect(role_url) as raw, pytest.raises(psycopg.errors.QueryCanceled):
        raw.execute("SELECT count(*) FROM users")  # what the role's own sessions get

    result = check_table(GxSession(), role_url, USERS, sample_size=3)

    expected = expected_for_users(rows)
    assert [r.rule for r in result.rules if r.error] == []
    assert result.row_count == expected.rows
    assert {name: _by_rule(result)[name].unexpected_count for name in expected.counts} == expected.counts


def test_a_table_the_role_may_not_read_is_one_line_naming_the_grant(limited_role, entity_db):
    """GX reports a missing privilege as a failed connection test with a traceback; flowyard
    names the table and the grant instead, for the checked table and a foreign key's target."""
    role = psycopg.sql.Identifier(limited_role.name)
    role_url = limited_role.url(entity_db)
    with pytest.raises(UserError) as err:
        check_table(GxSession(), role_url, ENTITY_SUITES["tasks"])
    assert "permission denied for table tasks" in str(err.value)
    assert str(err.value).endswith("grant it SELECT on public.tasks") and "\n" not in str(err.value)

    with psycopg.connect(entity_db, autocommit=True) as conn:
        conn.execute(psycopg.sql.SQL("GRANT SELECT ON tasks TO {}").format(role))
    with pytest.raises(
        UserError, match=r"permission denied for table projects .*grant it SELECT on public\.projects$"
    ):
        check_table(GxSession(), role_url, ENTITY_SUITES["tasks"])

    with psycopg.connect(entity_db, autocommit=True) as conn:
        conn.execute(psycopg.sql.SQL("GRANT SELECT ON projects TO {}").format(role))
    assert check_table(GxSession(), role_url, ENTITY_SUITES["tasks"]).row_count == 0


def test_mixed_case_and_reserved_names_are_checked_as_named(fresh_db):
    """GX's table asset lowercased an unquoted schema and never quoted the table, so a suite on
    ``Shop.Orders`` had GX check ``shop.orders``, another table, while the score and row count
    came from ``"Shop"."Orders"``: its broken rules passed."""
    with psycopg.connect(fresh_db, autocommit=True) as conn:
        conn.execute('CREATE SCHEMA "Shop"')
        conn.execute('CREATE TABLE "Shop"."Orders" ("Id" int, "order" int)')
        conn.execute('INSERT INTO "Shop"."Orders" VALUES (1, 1), (1, NULL), (NULL, 2)')
        conn.execute("CREATE SCHEMA shop")
        conn.execute('CREATE TABLE shop.orders ("Id" int, "order" int)')  # what the names fold to
        conn.execute("INSERT INTO shop.orders VALUES (5, 5)")
        conn.execute('CREATE TABLE "user" ("order" int)')
        conn.execute('INSERT INTO "user" VALUES (1), (1), (2)')
    rules = [
        Rule(name="id_present", check="not_null", column="Id", severity="critical"),
        Rule(name="id_unique", check="unique", column="Id", severity="critical"),
        Rule(name="order_present", check="not_null", column="order", severity="high"),
    ]
    result = check_table(GxSession(), fresh_db, Suite(name="orders", table="Shop.Orders", rules=rules))
    assert (result.target, result.row_count) == ("Shop.Orders", 3)
    assert {r.rule: (r.success, r.unexpected_count) for r in result.rules} == {
        "id_present": (False, 1),
        "id_unique": (False, 2),
        "order_present": (False, 1),
    }
    reserved = Suite(
        name="user", table="user", rules=[Rule(name="order_unique", check="unique", column="order", severity="high")]
    )
    result = check_table(GxSession(), fresh_db, reserved)
    assert [(r.rule, r.success, r.unexpected_count, r.error) for r in result.rules] == [
        ("order_unique", False, 2, None)
    ]


def test_data_docs_are_written_only_where_asked(entity_db, tmp_path, monkeypatch):
    """GX's ephemeral context carries a default docs site in a fresh temporary directory; building
    it on every run left ~4 MB of HTML behind in /tmp per quality run (a scheduled deployment's
    disk filled up without a word)."""
    temp = tmp_path / "system-temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    with psycopg.connect(entity_db, autocommit=True) as conn:
        insert_users(conn, injected_users())
    session = GxSession(docs_dir=tmp_path / "docs")
    check_table(session, entity_db, USERS, sample_size=3)

    index = session.build_docs()

    assert index == tmp_path / "docs" / "index.html" and index.is_file()
    assert list(temp.iterdir()) == []


def test_columns_named_as_real_tables_name_them_are_checked(fresh_db):
    """A suite refused any column but a plain lowercase name ("must be a plain column name"), so
    tables with columns such as "Order Date", "Total" or "select" could not be checked; past that,
    GX's unique check cannot name a column holding a double quote, GX read braces in a column name
    as query placeholders and a colon after a space as a bind parameter, and psycopg read the % of
    "Discount %" as a placeholder in the score query. Each rule here counts its own column only
    (``total`` beside ``Total`` would pass)."""
    now = dt.datetime.now(dt.UTC)
    with psycopg.connect(fresh_db, autocommit=True) as conn:
        conn.execute('CREATE TABLE customers ("Customer Id" int)')
        conn.execute("INSERT INTO customers VALUES (1), (2)")
        conn.execute(
            'CREATE TABLE orders ("Order Date" timestamptz, "Total" numeric, total numeric, "select" text, '
            '"Customer ""Ref""" int, "Discount %" numeric, "Tag {x}" int, "ratio :r" int)'
        )
        conn.cursor().executemany(
            "INSERT INTO orders VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
            [
                (now - dt.timedelta(days=1), 10, 500, "EUR", 1, 5, 1, 1),
                (now + dt.timedelta(days=400), 20, 500, "usd", 1, 50, 1, 2),
                (None, 2000, 0, "EUR", 2, None, 5, 3),
                (now - dt.timedelta(days=2), 30, 500, None, 7, 10, None, 3),
            ],
        )
    rules = [
        {"name": "date_present", "check": "not_null", "column": "Order Date", "severity": "critical"},
        {"name": "date_past", "check": "not_future", "column": "Order Date", "severity": "high"},
        {"name": "total_range", "check": "range", "column": "Total", "min": 0, "max": 1000, "severity": "medium"},
        {"name": "currency", "check": "in_set", "column": "select", "values": ["EUR", "USD"], "severity": "low"},
        {"name": "currency_shape", "check": "regex", "column": "select", "pattern": "^[A-Z]{3}$", "severity": "low"},
        {"name": "ref_unique", "check": "unique", "column": 'Customer "Ref"', "severity": "high"},
        {
            "name": "ref_exists",
            "check": "foreign_key",
            "column": 'Customer "Ref"',
            "references": "customers.Customer Id",
            "severity": "high",
        },
        {"name": "discount_range", "check": "range", "column": "Discount %", "min": 0, "max": 20, "severity": "medium"},
        {"name": "tag_exists", "check": "foreign_key", "column": "Tag {x}", "references": "customers.Customer Id", "severity": "low"},
        {"name": "ratio_exists", "check": "foreign_key", "column": "ratio :r", "references": "customers.Customer Id", "severity": "low"},
    ]
    suite = parse_suite({"name": "orders", "table": "orders", "rules": rules})

    result = check_table(GxSession(), fresh_db, suite)

    assert {r.rule: (r.unexpected_count, r.error) for r in result.rules} == {
        "date_present": (1, None),
        "date_past": (2, None),
        "total_range": (1, None),
        "currency": (1, None),
        "currency_shape": (1, None),
        "ref_unique": (2, None),
        "ref_exists": (1, None),
        "discount_range": (1, None),
        "tag_exists": (1, None),
        "ratio_exists": (2, None),
    }
    # rows lose 5, 5+1+1+5+2, 10+5+2+1+1 and 5+1 points
    assert (result.row_count, result.score) == (4, pytest.approx((95 + 86 + 81 + 94) / 4))


def test_an_unpopulated_materialized_view_is_one_line_naming_the_refresh(fresh_db):
    """A materialized view created WITH NO DATA refuses every read: the check and the profile
    failed with the driver's ObjectNotInPrerequisiteState and its traceback."""
    with psycopg.connect(fresh_db, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int)")
        conn.execute("CREATE MATERIALIZED VIEW later AS SELECT id FROM t WITH NO DATA")
    suite = Suite(name="later", table="later", rules=[Rule(name="r", check="not_null", column="id", severity="low")])
    expected = 'materialized view public.later has not been populated; run REFRESH MATERIALIZED VIEW "public"."later" first'
    with pytest.raises(UserError) as checked:
        check_table(GxSession(), fresh_db, suite)
    with psycopg.connect(fresh_db) as conn, pytest.raises(UserError) as profiled:
        profile_table(conn, TableSource("public", "later"))
    assert str(checked.value) == str(profiled.value) == expected


def test_checks_that_fit_their_columns_type_are_checked(fresh_db):
    """What PostgreSQL compares is checked, not refused as a type misfit: ranges on integers and
    numerics, in_set of integers on a bigint, regex on varchar, char and a domain over text; and
    in_set of integers beside decimals, which psycopg could not send as one list (the score query
    failed with "cannot dump lists of mixed types") and GX bound as the first value's type."""
    with psycopg.connect(fresh_db, autocommit=True) as conn:
        conn.execute("CREATE DOMAIN sku AS text")
        conn.execute("CREATE TABLE items (qty int, price numeric, id bigint, code varchar(5), kind char(3), ref sku)")
        conn.execute(
            "INSERT INTO items VALUES (1, 2.5, 10, 'A1', 'abc', 'S-1'), (50, 0.5, 11, 'b2', 'xyz', 'T-2'),"
            " (NULL, 1, 99, NULL, NULL, NULL)"
        )
    rules = [
        {"name": "qty_range", "check": "range", "column": "qty", "min": 0, "max": 10},
        {"name": "price_range", "check": "range", "column": "price", "min": 1},
        {"name": "id_known", "check": "in_set", "column": "id", "values": [10, 11]},
        {"name": "price_known", "check": "in_set", "column": "price", "values": [1, 2.5]},
        {"name": "code_shape", "check": "regex", "column": "code", "pattern": "^[A-Z][0-9]$"},
        {"name": "kind_shape", "check": "regex", "column": "kind", "pattern": "^a"},
        {"name": "ref_shape", "check": "regex", "column": "ref", "pattern": "^S-"},
    ]
    suite = parse_suite({"name": "items", "table": "items", "rules": [{**r, "severity": "low"} for r in rules]})

    result = check_table(GxSession(), fresh_db, suite)

    assert {r.rule: (r.unexpected_count, r.error) for r in result.rules} == {
        "qty_range": (1, None),
        "price_range": (1, None),
        "id_known": (1, None),
        "price_known": (1, None),
        "code_shape": (1, None),
        "kind_shape": (1, None),
        "ref_shape": (1, None),
    }


@pytest.mark.parametrize("at", ["at :utc", "at 50%"])
def test_a_window_on_a_timestamp_column_gx_would_misread_is_checked(fresh_db, at):
    """GX runs a window's query asset as SQLAlchemy ``text()``, then compiles it into each check's
    query and parses that again, so ``"at :utc"`` was read as the bind parameter ``:utc`` and
    every rule of the window failed (column "at NULL" does not exist); SQLAlchemy doubles the ``%``
    of ``"at 50%"`` for psycopg, which GX's parameterless queries send as written."""
    day = TimeWindow.containing("day", NOW - dt.timedelta(days=1))
    inside, outside = day.start + dt.timedelta(hours=1), day.start - dt.timedelta(hours=1)
    with psycopg.connect(fresh_db, autocommit=True) as conn:
        conn.execute(
            psycopg.sql.SQL('CREATE TABLE events (id int, {} timestamptz, "done :at" timestamptz)').format(
                psycopg.sql.Identifier(at)
            )
        )
        conn.cursor().executemany(
            "INSERT INTO events VALUES (%s, %s, %s)",
            [(1, inside, inside), (None, inside, NOW + dt.timedelta(days=9)), (1, inside, None), (None, outside, None)],
        )
    rules = [
        {"name": "id_present", "check": "not_null", "column": "id", "severity": "high"},
        {"name": "id_unique", "check": "unique", "column": "id", "severity": "low"},
        {"name": "done_past", "check": "not_future", "column": "done :at", "severity": "medium"},
    ]
    suite = parse_suite({"name": "events", "table": "events", "timestamp_column": at, "rules": rules})

    result = check_table(GxSession(), fresh_db, suite, window=day)

    assert result.row_count == 3
    assert {r.rule: (r.unexpected_count, r.error) for r in result.rules} == {
        "id_present": (1, None),
        "id_unique": (2, None),
        "done_past": (2, None),
    }


_EVERY_KIND = [
    {"name": "id_present", "check": "not_null", "column": "id"},
    {"name": "id_unique", "check": "unique", "column": "id"},
    {"name": "code_known", "check": "in_set", "column": "code", "values": ["A", "B"]},
    {"name": "code_shape", "check": "regex", "column": "code", "pattern": "^[A-Z]$"},
    {"name": "amount_range", "check": "range", "column": "amount", "min": 0, "max": 10},
    {"name": "placed_past", "check": "not_future", "column": "placed"},
    {"name": "customer_exists", "check": "foreign_key", "column": "cust", "references": "customers.id"},
    {"name": "size", "check": "row_count", "max": 2},
]


def _table_of_every_kind(url: str, name: str) -> Suite:
    """Table ``name`` (and ``customers``) holding two rows of today and one of tomorrow; the suite of
    :data:`_EVERY_KIND` on it."""
    today = TimeWindow.containing("day", NOW).start
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE customers (id int)")
        conn.execute("INSERT INTO customers VALUES (1)")
        table = psycopg.sql.Identifier(name)
        conn.execute(
            psycopg.sql.SQL("CREATE TABLE {} (id int, code text, amount int, placed timestamptz, cust int)").format(table)
        )
        conn.cursor().executemany(
            bound(psycopg.sql.SQL("INSERT INTO {} VALUES (%s, %s, %s, %s, %s)").format(table)),
            [(1, "A", 5, today, 1), (1, "c", 50, today, 2), (None, "B", 7, today + dt.timedelta(days=1), 1)],
        )
    rules = [{**r, "severity": "low"} for r in _EVERY_KIND]
    return parse_suite({"name": "lines", "table": name, "timestamp_column": "placed", "rules": rules})


def _counts(result) -> dict[str, tuple[bool, int, str | None]]:
    return {r.rule: (r.success, r.unexpected_count, r.error) for r in result.rules}


# (success, unexpected count, error) of each rule over the whole table and over today's window.
_WHOLE = {
    "id_present": (False, 1, None),
    "id_unique": (False, 2, None),
    "code_known": (False, 1, None),
    "code_shape": (False, 1, None),
    "amount_range": (False, 1, None),
    "placed_past": (False, 1, None),
    "customer_exists": (False, 1, None),
    "size": (False, 0, None),
}
_TODAY = {**_WHOLE, "id_present": (True, 0, None), "placed_past": (True, 0, None), "size": (True, 0, None)}


def test_a_table_name_holding_a_space_is_checked_by_every_rule_kind(fresh_db):
    """A table is named as written (``"order lines"``), but a suite's ``table`` had to be a plain
    identifier: "suite 'lines' field 'table': must be table or schema.table", whatever its rules. GX
    quotes the name in its own checks and flowyard in its queries, so each kind counts its rows,
    with and without a window."""
    suite = _table_of_every_kind(fresh_db, "order lines")
    assert _counts(check_table(GxSession(), fresh_db, suite)) == _WHOLE
    assert _counts(check_table(GxSession(), fresh_db, suite, window=TimeWindow.containing("day", NOW))) == _TODAY


def test_a_table_name_holding_a_percent_sign_is_checked_in_a_window_and_refused_whole(fresh_db):
    """SQLAlchemy doubles a ``%`` for psycopg's placeholders and GX runs its queries without
    parameters, so PostgreSQL looked for ``"margin %%"``: every rule of a window failed, as did the
    rules flowyard states itself over the whole table, where GX spells the table's name. A window
    spells it as a Unicode escape and is checked; the whole table is one line naming those rules."""
    suite = _table_of_every_kind(fresh_db, "margin %")
    assert _counts(check_table(GxSession(), fresh_db, suite, window=TimeWindow.containing("day", NOW))) == _TODAY
    with pytest.raises(UserError) as refused:
        check_table(GxSession(), fresh_db, suite)
    assert str(refused.value) == (
        "suite 'lines': 'placed_past' (not_future), 'customer_exists' (foreign_key) cannot run on "
        "\"public\".\"margin %\" (Great Expectations doubles the '%' in its name); check a view of it under a "
        "plain name, or one window of it"
    )
