"""Bulk copies run again: into a target database that was dropped and re-created (whose old
chunk results Prefect still holds), chunks whose connection the server refused at first, and
copies whose chunk checksums an older flowyard saved."""

from __future__ import annotations

import logging
import re
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from typing import Any

import psycopg
import pytest
from psycopg import sql

from flows.bulk_migrate import bulk_migrate
from tasks.db import connection, database_name, drop_database, ensure_database
from tests.conftest import ROOT, recorded_task_runs, scratch_database
from tests.process_support import Told

pytestmark = pytest.mark.usefixtures("prefect_api")


def _exec(url: str, *statements: str | sql.Composable) -> None:
    with connection(url, autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement)


def _fetch_one(url: str, query: str) -> tuple[Any, ...] | None:
    with psycopg.connect(url) as conn:
        return conn.execute(query).fetchone()


_COPY = (
    "import sys; from flows.bulk_migrate import bulk_migrate; "
    "print(bulk_migrate(sys.argv[1], sys.argv[2], chunk_rows=300, return_state=True).state_details.flow_run_id)"
)


def _copy_in_new_process(source: str, target: str) -> Any:  # noqa: ANN401 - a Prefect State
    """Copy in a process of its own, as each run `flowyard demo` triggers is, and return the
    flow run's final state as the Prefect server recorded it."""
    from prefect.client.orchestration import get_client

    done = subprocess.run(
        [sys.executable, "-c", _COPY, source, target], capture_output=True, text=True, cwd=ROOT, check=True
    )
    with get_client(sync_client=True) as client:
        return client.read_flow_run(uuid.UUID(done.stdout.strip().splitlines()[-1])).state


def test_a_recreated_target_is_copied_again_not_served_from_cache(pg, fresh_db):
    """`flowyard demo` drops and re-creates its database: the same copy into the new, empty
    database must load the rows, not answer every chunk with the old run's cached result."""
    _exec(
        fresh_db,
        "CREATE TABLE items (id int PRIMARY KEY, label text)",
        "INSERT INTO items SELECT g, 'item ' || g FROM generate_series(1, 900) g",
    )
    with scratch_database(pg) as target:
        assert _copy_in_new_process(fresh_db, target).is_completed()
        assert _fetch_one(target, "SELECT count(*) FROM items") == (900,)

        drop_database(pg.url(), database_name(target))
        ensure_database(pg.url(), database_name(target))
        again = _copy_in_new_process(fresh_db, target)

        states = [r.state.name for r in recorded_task_runs(again, "copy ", 3)]
        assert len(states) == 3 and "Cached" not in states
        assert again.is_completed(), again.message
        assert _fetch_one(target, "SELECT count(*) FROM items") == (900,)


_ACTIVE_COPY = (
    "SELECT 1 FROM pg_stat_activity WHERE datname = current_database() AND usename = %s"
    " AND query LIKE 'COPY%%FROM STDIN%%' AND state = 'active'"
)


def test_a_chunk_the_server_turns_away_at_first_is_retried(limited_role, pg, fresh_db):
    """While the first chunk copies, the target role's CONNECTION LIMIT drops to the one
    connection the run's lock holds: the next chunk's connection is refused with SQLSTATE
    53300, as by a server at max_connections. Once the refused chunk's retry is logged the limit
    is lifted, and the chunk gets in on that retry instead of failing the run."""
    role = sql.Identifier(limited_role.name)
    _exec(
        fresh_db,
        sql.SQL("ALTER DATABASE {} OWNER TO {}").format(sql.Identifier(database_name(fresh_db)), role),
    )
    target = limited_role.url(fresh_db)
    lowered = threading.Event()
    done = threading.Event()
    refused = Told(" - Retry 1/")  # Prefect's line for a failed task run it retries

    def wait_for(admin: psycopg.Connection, query: str, params: tuple[Any, ...] = ()) -> None:
        while not done.is_set() and admin.execute(query, params).fetchone() is None:
            time.sleep(0.005)

    def refuse_while_the_first_chunk_copies() -> None:
        with connection(fresh_db, autocommit=True) as admin:
            wait_for(admin, _ACTIVE_COPY, (limited_role.name,))
            admin.execute(sql.SQL("ALTER ROLE {} CONNECTION LIMIT 1").format(role))
            lowered.set()
            while not (done.is_set() or refused.seen.wait(0.05)):
                pass  # the refusal, however long the next chunk takes to try (or the run's end)
            admin.execute(sql.SQL("ALTER ROLE {} CONNECTION LIMIT -1").format(role))

    with scratch_database(pg) as source:
        _exec(
            source,
            "CREATE TABLE big (id int PRIMARY KEY, pad text)",
            "INSERT INTO big SELECT g, repeat('x', 300) FROM generate_series(1, 200000) g",
        )
        limiter = threading.Thread(target=refuse_while_the_first_chunk_copies)
        limiter.start()
        task_runs = logging.getLogger("prefect.task_runs")
        level = task_runs.level
        task_runs.setLevel(logging.INFO)  # the retry's line is INFO; the suite logs WARNING and up
        task_runs.addHandler(refused)
        try:
            state = bulk_migrate(source, target, chunk_rows=100000, parallelism=1, return_state=True)
        finally:
            task_runs.removeHandler(refused)
            task_runs.setLevel(level)
            done.set()
            limiter.join()

    state.result()
    assert lowered.is_set(), "the limit was lowered while the first chunk copied"
    assert "too many connections" in refused.message, refused.message
    assert _fetch_one(target, "SELECT count(*), count(DISTINCT id) FROM big") == (200000, 200000)
    runs = recorded_task_runs(state, "copy ", 2)
    assert sorted(r.run_count for r in runs)[-1] >= 2


def test_a_copy_failed_by_checksums_of_an_older_recipe_validates_on_a_plain_rerun(pg, fresh_db):
    """An enum was checksummed by its ``pg_enum`` OID until flowyard hashed it as text: a copy
    validated before then saved its chunks' OID checksums, and every plain re-run compared the
    target's text checksum with them and failed again (only ``restart`` passed). A saved checksum
    of another recipe is recomputed instead."""
    from alembic import command

    from tasks.state import migration_config, upgrade_state_schema

    _exec(
        fresh_db,
        "CREATE TYPE mood AS ENUM ('ok', 'sad')",
        "CREATE TABLE moods (id int PRIMARY KEY, m mood)",
        "INSERT INTO moods SELECT g, CASE WHEN g % 3 = 0 THEN 'sad' ELSE 'ok' END::mood FROM generate_series(1, 90) g",
    )
    with scratch_database(pg) as target:
        _exec(target, "CREATE TYPE mood AS ENUM ('ok', 'sad')")  # a copy creates tables, not types
        bulk_migrate(fresh_db, target, chunk_rows=1000, validate=["count", "checksum"])
        # The state as an older flowyard left it: the OID checksum it took in the source, a failed run.
        command.downgrade(migration_config(target), "bulk@bulk_0001")
        old = _fetch_one(fresh_db, "SELECT sum(hash_record_extended(ROW(id, m), 0)) FROM moods")
        _exec(
            target,
            sql.SQL("UPDATE flowyard.bulk_chunks SET sent_checksum = {}").format(sql.Literal(old[0] if old else None)),
            "UPDATE flowyard.bulk_runs SET status = 'failed'",
        )
        upgrade_state_schema(target)

        again = bulk_migrate(fresh_db, target, chunk_rows=1000, validate=["count", "checksum"])
        assert again["resumed"] and "checksum: ok" in again["tables"][0]["validation"], again


def _from_an_older_recipe(target: str) -> None:
    """The state as an older flowyard left it: chunk checksums it took another way, with no
    recipe recorded, and a failed run."""
    _exec(
        target,
        "UPDATE flowyard.bulk_chunks SET checksum_recipe = NULL, sent_checksum = sent_checksum + 1",
        "UPDATE flowyard.bulk_runs SET status = 'failed'",
    )


def test_a_quarantined_chunk_whose_checksum_an_older_recipe_saved_is_not_compared_with_zero(pg, fresh_db):
    """A checksum of an older recipe is recomputed on both sides, but the source's range of a chunk
    with quarantined rows holds those rows too: only its saved checksum stood for the rows loaded,
    and with it gone the chunk was compared with 0, so a plain re-run of a good copy failed."""
    _exec(
        fresh_db,
        "CREATE TABLE pay (id int PRIMARY KEY, amount int)",
        "INSERT INTO pay SELECT g, CASE WHEN g = 17 THEN -g ELSE g END FROM generate_series(1, 40) g",
    )
    options: dict[str, Any] = {"chunk_rows": 10, "quarantine": True, "validate": ["count", "checksum"]}
    with scratch_database(pg) as target:
        _exec(target, "CREATE TABLE pay (id int PRIMARY KEY, amount int CHECK (amount >= 0))")
        assert "checksum: ok (4 chunks)" in bulk_migrate(fresh_db, target, **options)["tables"][0]["validation"]
        _from_an_older_recipe(target)
        again = bulk_migrate(fresh_db, target, **options)
    assert again["tables"][0]["validation"] == (
        "checksum: ok (3 chunks); 1 chunk with quarantined rows not compared (checksum saved by an older "
        "flowyard): rerun with restart=True (--restart) to copy and checksum the tables afresh, count: ok (39)"
    )


def test_a_keyless_table_with_quarantined_rows_and_checksums_an_older_recipe_saved_names_restart(pg, fresh_db):
    """Without a key, validation can only checksum both sides whole, which the quarantined rows
    tell apart: the step was skipped as for a seed, nothing saying that the checksums it could
    have compared were an older flowyard's, nor that a restart takes them anew."""
    _exec(fresh_db, "CREATE TABLE logs (n int)", "INSERT INTO logs SELECT g - 3 FROM generate_series(1, 30) g")
    options: dict[str, Any] = {"quarantine": True, "validate": ["count", "checksum"]}
    with scratch_database(pg) as target:
        _exec(target, "CREATE TABLE logs (n int CHECK (n >= 0))")
        assert "checksum: ok" in bulk_migrate(fresh_db, target, **options)["tables"][0]["validation"]
        _from_an_older_recipe(target)
        again = bulk_migrate(fresh_db, target, **options)
    assert again["tables"][0]["validation"] == (
        "checksum: skipped (rows quarantined: the whole table's source and target differ by them; checksums "
        "saved by an older flowyard: rerun with restart=True (--restart) to copy and checksum the tables "
        "afresh), count: ok (28)"
    )


@pytest.mark.parametrize("kind", ["mapping", "sqlite", "files"])
def test_a_copy_validation_cannot_checksum_again_names_its_older_checksums_and_restart(
    pg, fresh_db, tmp_path, kind
):
    """A mapped copy's or a file's source cannot be checksummed as the target holds it, so checksums
    an older flowyard saved cannot be taken again; the step said "skipped (full load with a mapping
    or retyped columns: see sample)", of a copy from a file too, and nothing of why or what to do."""
    _exec(
        fresh_db,
        "CREATE TABLE items (id int PRIMARY KEY, label text)",
        "INSERT INTO items SELECT g, 'item ' || g FROM generate_series(1, 30) g",
    )
    source, mapping, why = fresh_db, {"items": {"rename": {"label": "name"}}}, "with a mapping or retyped columns"
    if kind == "sqlite":
        source, mapping, why = f"sqlite:///{tmp_path / 'app.db'}", None, "from a SQLite file"
        with sqlite3.connect(tmp_path / "app.db") as db:
            db.execute("CREATE TABLE items (id INTEGER PRIMARY KEY, label TEXT)")
            db.executemany("INSERT INTO items VALUES (?, ?)", [(i, f"item {i}") for i in range(1, 31)])
    elif kind == "files":
        (tmp_path / "items.jsonl").write_text("".join(f'{{"id": {i}, "label": "item {i}"}}\n' for i in range(1, 31)))
        source, mapping, why = str(tmp_path), None, "from files"
    options: dict[str, Any] = {"mapping": mapping, "chunk_rows": 10, "validate": ["count", "checksum"]}
    with scratch_database(pg) as target:
        assert "checksum: ok" in bulk_migrate(source, target, **options)["tables"][0]["validation"]
        _from_an_older_recipe(target)
        again = bulk_migrate(source, target, **options)["tables"][0]["validation"]
        afresh = bulk_migrate(source, target, **options, restart=True)["tables"][0]["validation"]
    said = re.fullmatch(r"checksum: skipped \((\d+)/(\d+) chunks' (.*); see sample\), count: ok \(30\)", again)
    assert said and said[1] == said[2], again
    assert said[3] == (
        f"checksums were saved by an older flowyard, and the source of a copy {why} cannot be checksummed as "
        "the target holds it: rerun with restart=True (--restart) to copy and checksum the tables afresh"
    )
    assert afresh.startswith("checksum: ok"), afresh


def test_a_seed_from_a_sqlite_file_says_why_its_checksum_is_skipped(pg, tmp_path):
    """A seed's checksum step is skipped unless source and target can both be checksummed; from a
    SQLite file without a mapping it said "seed load with a mapping or retyped columns"."""
    with sqlite3.connect(tmp_path / "app.db") as db:
        db.execute("CREATE TABLE items (id INTEGER PRIMARY KEY, label TEXT)")
        db.executemany("INSERT INTO items VALUES (?, ?)", [(1, "a"), (2, "b")])
    with scratch_database(pg) as target:
        report = bulk_migrate(f"sqlite:///{tmp_path / 'app.db'}", target, mode="seed", validate=["checksum"])
    assert report["tables"][0]["validation"] == "checksum: skipped (seed load from a SQLite file: see sample)"
