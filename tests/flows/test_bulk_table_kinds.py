"""bulk-migrate on the table kinds beyond plain keyed tables: sources that repeat their declared
key, partitioned PostgreSQL tables, SQLite WITHOUT ROWID tables. Real embedded PostgreSQL, real
SQLite files, real Prefect server, the real CLI in a subprocess."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator

import psycopg
import pytest
import yaml

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
