"""bulk-migrate on the table kinds beyond plain keyed tables: sources that repeat their declared
key, partitioned PostgreSQL tables, SQLite WITHOUT ROWID tables, seeds into tables that reference
each other. Real embedded PostgreSQL, real SQLite files, real Prefect server, the real CLI in a
subprocess."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator

import psycopg
import pytest
import yaml
from psycopg import sql

from flows.bulk_migrate import bulk_migrate
from tasks.errors import UserError
from tests.conftest import Server, run_cli, scratch_database

pytestmark = pytest.mark.usefixtures("prefect_api")


@pytest.fixture()
def target_db(pg: Server) -> Iterator[str]:
    """A second scratch database (``fresh_db`` is the source where one is needed)."""
    with scratch_database(pg) as url:
        yield url


def _exec(url: str, *statements: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement)


def _fetch(url: str, query: str) -> list[tuple]:
    with psycopg.connect(url) as conn:
        return conn.execute(query).fetchall()


def test_a_file_repeating_its_key_fails_naming_the_duplicates_in_one_line(target_db, tmp_path):
    """The primary key is built after the load; duplicates used to escape as a raw UniqueViolation
    (a traceback from the CLI) that named no key value."""
    data = tmp_path / "reference"
    data.mkdir()
    (data / "countries.csv").write_text(
        "code,name\nKR,Korea\nDE,Germany\nKR,South Korea\nFR,France\nDE,Deutschland\n"
    )
    keys = {"countries": {"key": ["code"]}}
    with pytest.raises(UserError) as err:
        bulk_migrate(str(data), target_db, mapping=keys, chunk_rows=2)
    message = str(err.value)
    assert "public.countries" in message and "(code)" in message
    assert "code=DE (2 rows)" in message and "code=KR (2 rows)" in message and "FR" not in message
    assert "restart" in message and "filter" in message and "\n" not in message

    mapping = tmp_path / "mapping.yaml"
    mapping.write_text(yaml.safe_dump(keys))
    cli = run_cli("bulk", "copy", str(data), "--target", target_db, "--mapping", str(mapping))
    assert cli.returncode == 2
    assert "Traceback" not in cli.stderr
    last = cli.stderr.strip().splitlines()[-1]
    assert last.startswith("flowyard: error: ") and "code=KR (2 rows)" in last

    (data / "countries.csv").write_text("code,name\nKR,Korea\n,Nowhere\n")
    with pytest.raises(
        UserError, match=r'public\.countries: column "code" of relation "countries" contains null'
    ):
        bulk_migrate(str(data), target_db, mapping=keys, chunk_rows=2, restart=True)

    # the advice holds: a deduplicated source copies on a restarted run
    (data / "countries.csv").write_text("code,name\nKR,Korea\nDE,Germany\nFR,France\n")
    report = bulk_migrate(str(data), target_db, mapping=keys, chunk_rows=2, restart=True)
    assert report["tables"][0]["rows"] == 3
    assert _fetch(target_db, "SELECT code FROM countries ORDER BY code") == [("DE",), ("FR",), ("KR",)]


def test_seed_builds_the_key_before_loading_so_duplicates_never_land(target_db, tmp_path):
    """A seed into a new table used to insert plainly (no key yet to upsert on) and fail only when
    the key was added afterwards, with a raw UniqueViolation."""
    data = tmp_path / "seed"
    data.mkdir()
    (data / "plans.jsonl").write_text(
        '{"id": 1, "name": "free"}\n{"id": 2, "name": "pro"}\n{"id": 1, "name": "gratis"}\n'
    )
    with pytest.raises(UserError, match=r"public\.plans .*id=1 \(2 rows\).*") as err:
        bulk_migrate(str(data), target_db, mapping={"plans": {"key": ["id"]}}, mode="seed")
    assert "\n" not in str(err.value)
    assert _fetch(target_db, "SELECT count(*) FROM plans") == [(0,)]
    assert _fetch(
        target_db, "SELECT count(*) FROM pg_index WHERE indrelid = 'plans'::regclass AND indisprimary"
    ) == [(1,)]


def test_upsert_into_a_table_without_a_unique_index_on_the_key_is_refused(target_db, tmp_path):
    """An existing target whose primary key is on other columns: upserts by the mapping's key used
    to fall back to a plain INSERT, duplicating every row a second seed sent."""
    data = tmp_path / "seed"
    data.mkdir()
    (data / "plans.jsonl").write_text('{"id": 1, "code": "free"}\n')
    _exec(target_db, "CREATE TABLE plans (id bigint PRIMARY KEY, code text NOT NULL)")
    with pytest.raises(UserError, match=r"no unique index on its key \(code\)") as err:
        bulk_migrate(str(data), target_db, mapping={"plans": {"key": ["code"]}}, mode="seed")
    assert "\n" not in str(err.value)
    assert _fetch(target_db, "SELECT count(*) FROM plans") == [(0,)]


PLANS = "SELECT id, name, parent_id FROM plans ORDER BY id"
FEATURES = "SELECT id, plan_id, name FROM features ORDER BY id"


def test_reseed_loads_new_parents_before_the_children_that_sort_first(fresh_db, target_db):
    """``features`` references ``plans`` and sorts before it: a re-seed used to upsert it first,
    so a new feature of a new plan violated the target's foreign key and the seed failed. A
    self-reference (a new plan under another new plan) loads too. The report lists the tables in
    the order they loaded (it used to list them alphabetically whatever the order)."""
    _exec(
        fresh_db,
        "CREATE TABLE plans (id int PRIMARY KEY, name text NOT NULL, parent_id int REFERENCES plans)",
        "CREATE TABLE features (id int PRIMARY KEY, plan_id int NOT NULL REFERENCES plans, name text)",
        "INSERT INTO plans VALUES (1, 'free', NULL)",
        "INSERT INTO features VALUES (1, 1, 'export')",
    )
    report = bulk_migrate(fresh_db, target_db, mode="seed")
    assert [t["table"] for t in report["tables"]] == ["public.features", "public.plans"]  # no keys yet
    assert _fetch(
        target_db,
        "SELECT count(*) FROM pg_constraint WHERE contype = 'f' AND connamespace = 'public'::regnamespace",
    ) == [(2,)]

    _exec(
        fresh_db,
        "INSERT INTO plans VALUES (3, 'team', NULL), (2, 'pro', NULL)",
        "UPDATE plans SET parent_id = 2 WHERE id = 3",  # the child row precedes its parent on disk
        "UPDATE plans SET name = 'gratis' WHERE id = 1",
        "INSERT INTO features VALUES (2, 3, 'sso'), (3, 2, 'audit')",
    )
    report = bulk_migrate(fresh_db, target_db, mode="seed")
    assert [(t["table"], t["rows"]) for t in report["tables"]] == [("public.plans", 3), ("public.features", 3)]
    assert (
        _fetch(target_db, PLANS)
        == _fetch(fresh_db, PLANS)
        == [(1, "gratis", None), (2, "pro", None), (3, "team", 2)]
    )
    assert _fetch(target_db, FEATURES) == _fetch(fresh_db, FEATURES)
    assert report["integrity"]["fk_orphans"] == []


CYCLE = (
    "CREATE TABLE departments (id int PRIMARY KEY, name text, manager_id int)",
    "CREATE TABLE employees (id int PRIMARY KEY, name text, department_id int)",
)
REFERENCES = (
    "ALTER TABLE departments ADD CONSTRAINT departments_manager_fkey FOREIGN KEY (manager_id) REFERENCES employees{}",
    "ALTER TABLE employees ADD CONSTRAINT employees_department_fkey FOREIGN KEY (department_id) REFERENCES departments{}",
)
DEPARTMENTS = "SELECT id, name, manager_id FROM departments ORDER BY id"
EMPLOYEES = "SELECT id, name, department_id FROM employees ORDER BY id"


def _new_department_and_manager(url: str) -> None:
    with psycopg.connect(url) as conn:
        conn.execute("SET CONSTRAINTS ALL DEFERRED")
        conn.execute("INSERT INTO departments VALUES (2, 'ops', 20)")
        conn.execute("INSERT INTO employees VALUES (20, 'grace', 2)")


def _seed_deferrable_cycle(source: str, target: str) -> None:
    """Departments and employees referencing each other through DEFERRABLE keys, seeded."""
    _exec(source, *CYCLE, *(r.format(" DEFERRABLE") for r in REFERENCES))
    with psycopg.connect(source) as conn:
        conn.execute("SET CONSTRAINTS ALL DEFERRED")
        conn.execute("INSERT INTO departments VALUES (1, 'eng', 10)")
        conn.execute("INSERT INTO employees VALUES (10, 'ada', 1), (11, 'alan', 1)")
    bulk_migrate(source, target, mode="seed")


def _department_without_its_manager(source: str) -> None:
    """A new source department whose manager does not exist (the source drops its key), and an
    update of a row already seeded."""
    _exec(source, "ALTER TABLE departments DROP CONSTRAINT departments_manager_fkey")
    _exec(
        source,
        "INSERT INTO departments VALUES (3, 'sales', 99)",
        "UPDATE employees SET name = 'ADA' WHERE id = 10",
    )


def test_reseed_of_rows_referencing_each_other_defers_deferrable_foreign_keys(fresh_db, target_db):
    """Departments and employees reference each other through DEFERRABLE keys: a new department
    and its new manager cannot be inserted one after the other in any order; the seed used to
    fail on the first, now it defers those keys to the end of its transaction."""
    _seed_deferrable_cycle(fresh_db, target_db)
    deferrable = "SELECT conname, condeferrable FROM pg_constraint WHERE contype = 'f' AND connamespace = 'public'::regnamespace ORDER BY 1"
    assert _fetch(target_db, deferrable) == [
        ("departments_manager_fkey", True),
        ("employees_department_fkey", True),
    ]

    _new_department_and_manager(fresh_db)
    bulk_migrate(fresh_db, target_db, mode="seed")
    assert _fetch(target_db, DEPARTMENTS) == _fetch(fresh_db, DEPARTMENTS)
    assert _fetch(target_db, EMPLOYEES) == _fetch(fresh_db, EMPLOYEES)

    # the deferred keys still hold at the end: a department whose manager does not exist fails in one
    # line naming it, and nothing of the seed lands
    _department_without_its_manager(fresh_db)
    with pytest.raises(UserError) as err:
        bulk_migrate(fresh_db, target_db, mode="seed")
    assert str(err.value) == (
        'seed rows violate the target: insert or update on table "departments" violates foreign key constraint '
        '"departments_manager_fkey" (Key (manager_id)=(99) is not present in table "employees"); fix the source '
        "rows and seed again (nothing was loaded)"
    )
    assert _fetch(target_db, "SELECT name FROM employees WHERE id = 10") == [("ada",)]


def test_quarantine_takes_the_seed_rows_a_deferred_foreign_key_rejects_and_loads_the_rest(fresh_db, target_db):
    """A seeded row that references a missing row through a DEFERRABLE key used to fail the whole
    seed at its deferred check even with quarantine; now it goes to flowyard.bulk_quarantine with
    the rows that referenced it, and the rest loads and validates. A row that was already in the
    target (or one referencing it) is never deleted: the seed fails in one line naming them."""
    _seed_deferrable_cycle(fresh_db, target_db)
    _department_without_its_manager(fresh_db)
    with pytest.raises(UserError, match=r"^seed rows violate the target: .*\(nothing was loaded\)$"):
        bulk_migrate(fresh_db, target_db, mode="seed")

    _exec(fresh_db, "INSERT INTO departments VALUES (4, 'hr', NULL)")  # no manager: the key does not apply
    report = bulk_migrate(fresh_db, target_db, mode="seed", quarantine=True)
    quarantine = "SELECT row_data, error FROM flowyard.bulk_quarantine ORDER BY row_data->>'id'"
    assert _fetch(target_db, quarantine) == [
        (
            {"id": 3, "name": "sales", "manager_id": 99},
            'insert or update on table "departments" violates foreign key constraint "departments_manager_fkey" '
            '(Key (manager_id)=(99) is not present in table "employees")',
        )
    ]
    assert _fetch(target_db, DEPARTMENTS) == [(1, "eng", 10), (4, "hr", None)]
    assert _fetch(target_db, EMPLOYEES) == [(10, "ADA", 1), (11, "alan", 1)]
    assert [(t["table"], t["rows"], t["validation"]) for t in report["tables"]] == [
        (
            "public.departments",
            2,
            "checksum: skipped (rows quarantined: the whole table's source and target differ by them), "
            "count: ok (2), sample: skipped (no chunk without quarantined rows)",
        ),
        ("public.employees", 2, "checksum: ok (1 chunk), count: ok (2), sample: ok (2 rows)"),
    ]

    # a row that references a quarantined row goes with it, whatever key it references it by
    _exec(fresh_db, "INSERT INTO employees VALUES (12, 'bob', 3)")
    bulk_migrate(fresh_db, target_db, mode="seed", quarantine=True)
    department_3 = (
        'insert or update on table "departments" violates foreign key constraint "departments_manager_fkey" '
        '(Key (manager_id)=(99) is not present in table "employees")'
    )
    employee_12 = (
        'insert or update on table "employees" violates foreign key constraint "employees_department_fkey" '
        '(Key (department_id)=(3) is not present in table "departments")'
    )
    assert _fetch(target_db, "SELECT row_data->>'id', error FROM flowyard.bulk_quarantine ORDER BY 1") == [
        ("12", employee_12),
        ("3", department_3),
        ("3", department_3),  # the first run's
    ]
    assert _fetch(target_db, EMPLOYEES) == [(10, "ADA", 1), (11, "alan", 1)]

    # a row already in the target that the seed updates into a violation is not deleted
    _exec(fresh_db, "DELETE FROM employees WHERE id = 12", "DELETE FROM departments WHERE id = 3")
    _exec(fresh_db, "UPDATE departments SET manager_id = 98 WHERE id = 1")
    with pytest.raises(UserError) as err:
        bulk_migrate(fresh_db, target_db, mode="seed", quarantine=True)
    assert str(err.value) == (
        'seed rows violate the target: insert or update on table "departments" violates foreign key constraint '
        '"departments_manager_fkey" (Key (manager_id)=(98) is not present in table "employees"); quarantine does '
        "not delete rows the target held before the seed, which it would take out: public.departments id=1, "
        "public.employees id=10, public.employees id=11; fix the source rows and seed again (nothing was loaded)"
    )
    assert _fetch(target_db, DEPARTMENTS) == [(1, "eng", 10), (4, "hr", None)]


def _foreign_keys_violated(url: str) -> list[str]:
    """The target's foreign keys its rows violate, each checked afresh by PostgreSQL (dropped and
    added again in a transaction rolled back): every row, not only those a seed's check looked at."""
    violated = []
    with psycopg.connect(url, autocommit=True) as conn:
        keys = conn.execute(
            "SELECT n.nspname, c.relname, con.conname, pg_get_constraintdef(con.oid) FROM pg_constraint con "
            "JOIN pg_class c ON c.oid = con.conrelid JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE con.contype = 'f' AND n.nspname = 'public' ORDER BY 3"
        ).fetchall()
        for schema, table, name, definition in keys:
            try:
                with conn.transaction(force_rollback=True):
                    conn.execute(
                        sql.SQL("ALTER TABLE {0} DROP CONSTRAINT {1}, ADD CONSTRAINT {1} {2}").format(
                            sql.Identifier(schema, table), sql.Identifier(name), sql.SQL(definition)
                        )
                    )
            except psycopg.errors.ForeignKeyViolation:
                violated.append(name)
    return violated


QUARANTINED = "SELECT source_table, row_data, error FROM flowyard.bulk_quarantine ORDER BY (row_data->>'id')::int"
STORES = "SELECT id, country, region FROM stores ORDER BY id"


def _not_present(table: str, constraint: str, key: str, parent: str) -> str:
    return (
        f'insert or update on table "{table}" violates foreign key constraint "{constraint}" '
        f'(Key {key} is not present in table "{parent}")'
    )


@pytest.mark.parametrize(
    ("match", "loaded", "quarantined"),
    [
        pytest.param(
            "SIMPLE",
            [(1, "KR", "11"), (2, "KR", None), (3, None, None), (5, None, "26")],  # a NULL: the key does not apply
            {4: ("KR", "99"), 6: ("JP", "11")},
            id="simple",
        ),
        pytest.param(
            "FULL",
            [(1, "KR", "11"), (3, None, None)],  # all NULL: the key does not apply
            {2: ("KR", None), 4: ("KR", "99"), 5: (None, "26"), 6: ("JP", "11")},
            id="full",
        ),
    ],
)
def test_quarantine_of_a_deferred_multi_column_key_follows_its_match_type(
    fresh_db, target_db, match, loaded, quarantined
):
    """A two-column DEFERRABLE INITIALLY DEFERRED key of the target: MATCH SIMPLE accepts a row
    with any key column NULL, MATCH FULL only one with all of them NULL. The seed's quarantine
    takes exactly the rows PostgreSQL's deferred check rejects (all the key's columns matched
    together), the rest commits and validates as the source less them."""
    tables = (
        "CREATE TABLE regions (country text, code text, name text, PRIMARY KEY (country, code))",
        "CREATE TABLE stores (id int PRIMARY KEY, country text, region text)",
    )
    _exec(
        fresh_db,
        *tables,
        "INSERT INTO regions VALUES ('KR', '11', 'Seoul'), ('KR', '26', 'Busan')",
        "INSERT INTO stores VALUES (1, 'KR', '11'), (2, 'KR', NULL), (3, NULL, NULL), (4, 'KR', '99'), "
        "(5, NULL, '26'), (6, 'JP', '11')",
    )
    _exec(
        target_db,
        *tables,
        "ALTER TABLE stores ADD CONSTRAINT stores_region_fkey FOREIGN KEY (country, region) "
        f"REFERENCES regions (country, code) MATCH {match} DEFERRABLE INITIALLY DEFERRED",
    )
    report = bulk_migrate(fresh_db, target_db, mode="seed", quarantine=True)

    assert _fetch(target_db, STORES) == loaded
    mixed = (
        'insert or update on table "stores" violates foreign key constraint "stores_region_fkey" '
        "(MATCH FULL does not allow mixing of null and nonnull key values)"
    )
    assert _fetch(target_db, QUARANTINED) == [
        (
            "public.stores",
            {"id": id_, "country": country, "region": region},
            mixed
            if None in (country, region)
            else _not_present("stores", "stores_region_fkey", f"(country, region)=({country}, {region})", "regions"),
        )
        for id_, (country, region) in quarantined.items()
    ]
    assert _foreign_keys_violated(target_db) == []
    assert [(t["table"], t["rows"], t["validation"]) for t in report["tables"]] == [
        ("public.regions", 2, "checksum: ok (1 chunk), count: ok (2), sample: ok (2 rows)"),
        (
            "public.stores",
            len(loaded),
            "checksum: skipped (rows quarantined: the whole table's source and target differ by them), "
            f"count: ok ({len(loaded)}), sample: skipped (no chunk without quarantined rows)",
        ),
    ]


def test_quarantine_takes_the_seed_rows_whose_parent_the_seed_did_not_load_and_leaves_the_parent(
    fresh_db, target_db
):
    """The target's deferred key points at a table the seed does not load: a seeded row whose
    parent is missing there is quarantined; the parent table is only read."""
    _exec(fresh_db, "CREATE TABLE cities (id int PRIMARY KEY, country text)")
    _exec(fresh_db, "INSERT INTO cities VALUES (1, 'KR'), (2, 'XX'), (3, NULL)")
    _exec(
        target_db,
        "CREATE TABLE countries (code text PRIMARY KEY, name text)",
        "INSERT INTO countries VALUES ('KR', 'Korea'), ('DE', 'Germany')",
        "CREATE TABLE cities (id int PRIMARY KEY, country text "
        "CONSTRAINT cities_country_fkey REFERENCES countries DEFERRABLE INITIALLY DEFERRED)",
    )
    countries = "SELECT xmin::text, code, name FROM countries ORDER BY code"
    before = _fetch(target_db, countries)
    report = bulk_migrate(fresh_db, target_db, mode="seed", quarantine=True)

    assert _fetch(target_db, "SELECT id, country FROM cities ORDER BY id") == [(1, "KR"), (3, None)]
    assert _fetch(target_db, QUARANTINED) == [
        (
            "public.cities",
            {"id": 2, "country": "XX"},
            _not_present("cities", "cities_country_fkey", "(country)=(XX)", "countries"),
        )
    ]
    assert _fetch(target_db, countries) == before  # not even updated in place
    assert _foreign_keys_violated(target_db) == []
    assert [(t["table"], t["rows"], t["validation"]) for t in report["tables"]] == [
        (
            "public.cities",
            2,
            "checksum: skipped (rows quarantined: the whole table's source and target differ by them), "
            "count: ok (2), sample: skipped (no chunk without quarantined rows)",
        )
    ]


TEAMS = "SELECT id, name, league FROM teams ORDER BY id"
PLAYERS = "SELECT id, team_id FROM players ORDER BY id"


def test_quarantine_never_deletes_a_row_of_a_table_the_seed_did_not_load(fresh_db, target_db):
    """``players``, which the seed does not load, references ``teams`` through a key added NOT
    VALID over rows that referenced teams not there yet. A seeded team the deferred key rejects is
    quarantined when no player references it (a player referencing another missing team is no
    reason to stop); when a player references it, taking it out would leave that player (which
    the target held) without its team, so the seed fails in one line naming the player's table, and
    nothing changes."""
    teams = "CREATE TABLE teams (id int PRIMARY KEY, name text, league text)"
    _exec(
        fresh_db,
        teams,
        "INSERT INTO teams VALUES (1, 'red', 'A'), (2, 'blue', 'Z'), (3, 'green', 'A')",
    )
    _exec(
        target_db,
        "CREATE TABLE leagues (code text PRIMARY KEY)",
        "INSERT INTO leagues VALUES ('A')",
        teams,
        "ALTER TABLE teams ADD CONSTRAINT teams_league_fkey FOREIGN KEY (league) REFERENCES leagues "
        "DEFERRABLE INITIALLY DEFERRED",
        "INSERT INTO teams VALUES (1, 'red', 'A')",
        "CREATE TABLE players (id int PRIMARY KEY, team_id int)",
        "INSERT INTO players VALUES (10, 1), (11, 99)",
        "ALTER TABLE players ADD CONSTRAINT players_team_fkey FOREIGN KEY (team_id) REFERENCES teams NOT VALID",
    )
    report = bulk_migrate(fresh_db, target_db, mode="seed", quarantine=True)
    assert _fetch(target_db, TEAMS) == [(1, "red", "A"), (3, "green", "A")]
    assert _fetch(target_db, PLAYERS) == [(10, 1), (11, 99)]
    blue = _not_present("teams", "teams_league_fkey", "(league)=(Z)", "leagues")
    assert _fetch(target_db, QUARANTINED) == [
        ("public.teams", {"id": 2, "name": "blue", "league": "Z"}, blue)
    ]
    assert [(t["table"], t["rows"]) for t in report["tables"]] == [("public.teams", 2)]
    assert "count: ok (2)" in report["tables"][0]["validation"]

    # a player the target held references the rejected team: the seed fails, nothing is deleted
    _exec(
        target_db,
        "ALTER TABLE players DROP CONSTRAINT players_team_fkey",
        "INSERT INTO players VALUES (12, 2)",
        "ALTER TABLE players ADD CONSTRAINT players_team_fkey FOREIGN KEY (team_id) REFERENCES teams NOT VALID",
    )
    with pytest.raises(UserError) as err:
        bulk_migrate(fresh_db, target_db, mode="seed", quarantine=True)
    assert str(err.value) == (
        f"seed rows violate the target: {blue}; quarantine does not delete rows the target held before the seed, "
        "which it would take out: public.players; fix the source rows and seed again (nothing was loaded)"
    )
    assert _fetch(target_db, TEAMS) == [(1, "red", "A"), (3, "green", "A")]
    assert _fetch(target_db, PLAYERS) == [(10, 1), (11, 99), (12, 2)]
    assert _fetch(target_db, "SELECT count(*) FROM flowyard.bulk_quarantine") == [(1,)]

    # so does a team the target held, updated into a violation, that a player references
    _exec(fresh_db, "UPDATE teams SET league = 'A' WHERE id = 2", "UPDATE teams SET league = 'Y' WHERE id = 1")
    with pytest.raises(UserError) as err:
        bulk_migrate(fresh_db, target_db, mode="seed", quarantine=True)
    assert str(err.value) == (
        "seed rows violate the target: "
        + _not_present("teams", "teams_league_fkey", "(league)=(Y)", "leagues")
        + "; quarantine does not delete rows the target held before the seed, which it would take out: "
        "public.players, public.teams id=1; fix the source rows and seed again (nothing was loaded)"
    )
    assert _fetch(target_db, TEAMS) == [(1, "red", "A"), (3, "green", "A")]
    assert _fetch(target_db, PLAYERS) == [(10, 1), (11, 99), (12, 2)]
    assert _foreign_keys_violated(target_db) == []

def test_quarantine_leaves_a_deferred_unique_key_violation_to_its_one_line_error(fresh_db, target_db):
    """``SET CONSTRAINTS ALL IMMEDIATE`` checks deferrable unique keys too, and the quarantine
    finds no foreign-key row to take for them: the seed used to fail with a raw SyntaxError from an
    empty delete; it fails in one line naming the key, as without quarantine, and nothing lands."""
    _exec(fresh_db, "CREATE TABLE codes (id int PRIMARY KEY, code text)", "INSERT INTO codes VALUES (1, 'a'), (2, 'a')")
    _exec(
        target_db,
        "CREATE TABLE codes (id int PRIMARY KEY, code text "
        "CONSTRAINT codes_code_key UNIQUE DEFERRABLE INITIALLY DEFERRED)",
    )
    with pytest.raises(UserError) as err:
        bulk_migrate(fresh_db, target_db, mode="seed", quarantine=True)
    assert str(err.value) == (
        'seed rows violate the target: duplicate key value violates unique constraint "codes_code_key" '
        "(Key (code)=(a) already exists); fix the source rows and seed again (nothing was loaded)"
    )
    assert _fetch(target_db, "SELECT count(*) FROM codes") == [(0,)]

def test_reseed_through_a_cycle_of_foreign_keys_that_are_not_deferrable(fresh_db, target_db):
    """Not DEFERRABLE, the same cycle has no load order for a new department and its new manager.
    Rows that need no order still seed; those that do fail in one line naming the cycle and the
    fix, which works."""
    _exec(
        fresh_db,
        *CYCLE,
        "INSERT INTO departments VALUES (1, 'eng', NULL)",
        "INSERT INTO employees VALUES (10, 'ada', 1)",
    )
    bulk_migrate(fresh_db, target_db, mode="seed")
    _exec(target_db, *(r.format("") for r in REFERENCES))

    _exec(fresh_db, "UPDATE departments SET manager_id = 10", "UPDATE employees SET name = 'Ada'")
    bulk_migrate(fresh_db, target_db, mode="seed")
    assert _fetch(target_db, DEPARTMENTS) == [(1, "eng", 10)]

    # a row of the table loaded second that references a missing row is bad data, not the order's fault
    _exec(fresh_db, "INSERT INTO employees VALUES (30, 'nobody', 99)")
    with pytest.raises(
        UserError, match=r"^chunk public\.employees .* rejected: .*offending rows: id=30\. Fix"
    ):
        bulk_migrate(fresh_db, target_db, mode="seed")
    _exec(fresh_db, "DELETE FROM employees WHERE id = 30")

    _new_department_and_manager(fresh_db)
    with pytest.raises(UserError) as err:
        bulk_migrate(fresh_db, target_db, mode="seed")
    assert str(err.value) == (
        "seed loads public.departments before public.employees, and its foreign key departments_manager_fkey "
        "rejects rows (id=2) that reference rows of public.employees not loaded yet (or missing); the foreign "
        "keys public.departments → public.employees → public.departments form a cycle and none is DEFERRABLE, "
        "so no load order fits rows that reference each other's new rows: make them DEFERRABLE (ALTER TABLE … "
        "ALTER CONSTRAINT … DEFERRABLE) and seed again (seed mode defers them to its commit)"
    )
    assert _fetch(target_db, "SELECT count(*) FROM departments") == [(1,)]

    _exec(
        target_db,
        "ALTER TABLE departments ALTER CONSTRAINT departments_manager_fkey DEFERRABLE",
        "ALTER TABLE employees ALTER CONSTRAINT employees_department_fkey DEFERRABLE",
    )
    bulk_migrate(fresh_db, target_db, mode="seed")
    assert _fetch(target_db, DEPARTMENTS) == [(1, "eng", 10), (2, "ops", 20)]
    assert _fetch(target_db, EMPLOYEES) == [(10, "Ada", 1), (20, "grace", 2)]


def test_partitioned_table_copies_with_its_partitions_once(fresh_db, target_db):
    """``pg_dump -t parent`` used to create the parent alone: every row was then rejected for
    want of a partition. Partitions are copied through their parent only."""
    _exec(
        fresh_db,
        "CREATE TABLE readings (id int, taken date NOT NULL, value numeric, PRIMARY KEY (id, taken))"
        " PARTITION BY RANGE (taken)",
        "CREATE TABLE readings_2023 PARTITION OF readings FOR VALUES FROM ('2023-01-01') TO ('2024-01-01')",
        "CREATE TABLE readings_2024 PARTITION OF readings FOR VALUES FROM ('2024-01-01') TO ('2025-01-01')",
        "CREATE INDEX readings_value ON readings (value)",
        "INSERT INTO readings SELECT g, date '2023-07-01' + g, g * 1.5 FROM generate_series(1, 300) g",
        "CREATE TABLE logs (line text, n int) PARTITION BY LIST (n)",
        "CREATE TABLE logs_odd PARTITION OF logs FOR VALUES IN (1)",
        "CREATE TABLE logs_even PARTITION OF logs FOR VALUES IN (0)",
        "INSERT INTO logs SELECT 'line ' || g, g % 2 FROM generate_series(1, 120) g",
        "CREATE TABLE sites (id int PRIMARY KEY, name text)",
        "INSERT INTO sites SELECT g, 'site ' || g FROM generate_series(1, 40) g",
    )
    report = bulk_migrate(fresh_db, target_db, chunk_rows=70)

    assert {t["table"]: t["rows"] for t in report["tables"]} == {
        "public.logs": 120,
        "public.readings": 300,
        "public.sites": 40,
    }
    assert all("MISMATCH" not in t["validation"] and "ok" in t["validation"] for t in report["tables"])
    per_partition = "SELECT tableoid::regclass::text, count(*), count(DISTINCT (id, taken)), sum(value) FROM readings GROUP BY 1 ORDER BY 1"
    assert _fetch(target_db, per_partition) == _fetch(fresh_db, per_partition)
    assert [r[0] for r in _fetch(target_db, per_partition)] == ["readings_2023", "readings_2024"]
    logs = "SELECT tableoid::regclass::text, count(*), count(DISTINCT line) FROM logs GROUP BY 1 ORDER BY 1"
    assert _fetch(target_db, logs) == [("logs_even", 60, 60), ("logs_odd", 60, 60)]
    # the parent's index reaches every partition instead of staying an invalid parent-only shell
    assert _fetch(
        target_db,
        "SELECT count(*) FILTER (WHERE NOT i.indisvalid), count(*) FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid"
        " WHERE c.relname LIKE 'readings%'",
    ) == [(0, 6)]


def test_sqlite_without_rowid_table_copies_fully(target_db, tmp_path):
    """``min(rowid)`` of a WITHOUT ROWID table used to fail with a raw sqlite3.OperationalError."""
    path = tmp_path / "app.db"
    rows = [(f"k{i:04d}", i % 3, f"value {i} ✓", i / 7) for i in range(1, 701)]
    with sqlite3.connect(path) as db:
        db.execute(
            "CREATE TABLE settings (scope TEXT NOT NULL, part INTEGER NOT NULL, val TEXT, weight REAL,"
            " PRIMARY KEY (scope, part)) WITHOUT ROWID"
        )
        db.executemany("INSERT INTO settings VALUES (?, ?, ?, ?)", rows)
        db.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)")
        db.executemany("INSERT INTO notes VALUES (?, ?)", [(i, f"note {i}") for i in range(1, 301)])

    report = bulk_migrate(f"sqlite:///{path}", target_db, chunk_rows=100)

    tables = {t["table"]: t for t in report["tables"]}
    assert tables["public.settings"]["rows"] == 700 and tables["public.notes"]["rows"] == 300
    assert tables["public.notes"]["chunks"] == 3
    assert all("MISMATCH" not in t["validation"] for t in report["tables"])
    copied = _fetch(target_db, "SELECT scope, part, val, weight FROM settings ORDER BY scope, part")
    assert copied == sorted(rows)
    assert _fetch(
        target_db, "SELECT count(*) FROM pg_index WHERE indrelid = 'settings'::regclass AND indisprimary"
    ) == [(1,)]
