"""Seed mode (every table upserted in one transaction) into targets whose tables reference each
other: parents before children, deferrable cycles deferred, a cycle that cannot be ordered named
in one line. Real embedded PostgreSQL, real Prefect server."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest

from flows.bulk_migrate import bulk_migrate
from tasks.errors import UserError
from tests.conftest import Server, scratch_database

pytestmark = pytest.mark.usefixtures("prefect_api")


@pytest.fixture()
def target_db(pg: Server) -> Iterator[str]:
    """A second scratch database (``fresh_db`` is the source)."""
    with scratch_database(pg) as url:
        yield url


def _exec(url: str, *statements: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement)


def _fetch(url: str, query: str) -> list[tuple]:
    with psycopg.connect(url) as conn:
        return conn.execute(query).fetchall()


PLANS = "SELECT id, name, parent_id FROM plans ORDER BY id"
FEATURES = "SELECT id, plan_id, name FROM features ORDER BY id"


def test_reseed_loads_new_parents_before_the_children_that_sort_first(fresh_db, target_db):
    """``features`` references ``plans`` and sorts before it: a re-seed used to upsert it first,
    so a new feature of a new plan violated the target's foreign key and the seed failed. A
    self-reference (a new plan under another new plan) loads too."""
    _exec(
        fresh_db,
        "CREATE TABLE plans (id int PRIMARY KEY, name text NOT NULL, parent_id int REFERENCES plans)",
        "CREATE TABLE features (id int PRIMARY KEY, plan_id int NOT NULL REFERENCES plans, name text)",
        "INSERT INTO plans VALUES (1, 'free', NULL)",
        "INSERT INTO features VALUES (1, 1, 'export')",
    )
    bulk_migrate(fresh_db, target_db, mode="seed")
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
    assert [t["rows"] for t in report["tables"]] == [3, 3]
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


def test_reseed_of_rows_referencing_each_other_defers_deferrable_foreign_keys(fresh_db, target_db):
    """Departments and employees reference each other through DEFERRABLE keys: a new department
    and its new manager cannot be inserted one after the other in any order; the seed used to
    fail on the first, now it defers those keys to the end of its transaction."""
    _exec(fresh_db, *CYCLE, *(r.format(" DEFERRABLE") for r in REFERENCES))
    with psycopg.connect(fresh_db) as conn:
        conn.execute("SET CONSTRAINTS ALL DEFERRED")
        conn.execute("INSERT INTO departments VALUES (1, 'eng', 10)")
        conn.execute("INSERT INTO employees VALUES (10, 'ada', 1), (11, 'alan', 1)")
    bulk_migrate(fresh_db, target_db, mode="seed")
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
    _exec(fresh_db, "ALTER TABLE departments DROP CONSTRAINT departments_manager_fkey")
    _exec(
        fresh_db,
        "INSERT INTO departments VALUES (3, 'sales', 99)",
        "UPDATE employees SET name = 'ADA' WHERE id = 10",
    )
    with pytest.raises(UserError) as err:
        bulk_migrate(fresh_db, target_db, mode="seed")
    assert str(err.value) == (
        'seed rows violate the target: insert or update on table "departments" violates foreign key constraint '
        '"departments_manager_fkey" (Key (manager_id)=(99) is not present in table "employees"); fix the source '
        "rows and seed again (nothing was loaded)"
    )
    assert _fetch(target_db, "SELECT name FROM employees WHERE id = 10") == [("ada",)]


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
