"""Which chunks may be copied straight into the target table, skipping the staging table."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from tasks.bulk_sources import Column, TableInfo, pg_describe
from tasks.chunk_checkpoint import ChunkCheckpoint, open_run, save_plan
from tasks.chunk_load import ChunkJob, Mode, load_chunk
from tasks.chunk_plan import Chunk, Method
from tasks.column_mapping import mapped_table, parse_mapping
from tasks.db import database_name, one_row
from tasks.state import state_url
from tests.conftest import Server, scratch_database


def _job(source: str, key_type: str, mapping: dict | None, mode: Mode, method: Method) -> ChunkJob:
    info = TableInfo(
        "events", (Column("id", key_type, True), Column("amount", "numeric(12,2)")), ("id",), "public"
    )
    table_mapping = parse_mapping({"events": mapping})["events"] if mapping else None
    return ChunkJob(
        "run",
        source,
        "postgresql://u@localhost/dst",
        info,
        mapped_table(info, table_mapping),
        "public",
        Chunk(0, method, ("1",), ("100",)),
        table_mapping,
        mode,
    )


@pytest.mark.parametrize(
    ("source", "key_type", "mapping", "mode", "method", "direct"),
    [
        ("pg", "bigint", None, "full", "key", True),
        ("pg", "bigint", None, "full", "ctid", True),
        ("pg", "bigint", {"cast": {"amount": "double precision"}}, "full", "key", True),
        (
            "pg",
            "bigint",
            {"rename": {"id": "event_id"}, "compute": {"cents": "amount * 100"}},
            "full",
            "key",
            True,
        ),
        ("pg", "uuid", {"filter": "amount > 0"}, "full", "key", True),
        ("pg", "numeric(20,0)", {"filter": "amount > 0"}, "full", "key", True),
        ("pg", "timestamp(3) with time zone", {"filter": "amount > 0"}, "full", "key", True),
        ("pg", "character varying(20)", {"filter": "amount > 0"}, "full", "key", False),
        # the key's values or their order could change: the chunk's bounds would not select its rows
        ("pg", "bigint", {"cast": {"id": "text"}}, "full", "key", False),
        ("pg", "text", {"cast": {"amount": "double precision"}}, "full", "key", False),
        ("pg", "bigint", {"key": ["amount"], "rename": {"id": "event_id"}}, "full", "key", False),
        ("pg", "bigint", {"cast": {"amount": "real"}}, "full", "ctid", False),
        # upserts and non-PostgreSQL sources always stage
        ("pg", "bigint", {"cast": {"amount": "real"}}, "incremental", "key", False),
        ("pg", "bigint", None, "seed", "key", False),
        ("sqlite", "bigint", None, "full", "key", False),
        ("sqlite", "bigint", {"cast": {"amount": "real"}}, "full", "key", False),
    ],
)
def test_direct_load_only_where_the_chunk_bounds_select_its_rows_in_the_target(
    tmp_path: Path, source: str, key_type: str, mapping: dict | None, mode: Mode, method: Method, direct: bool
):
    url = "postgresql://u@localhost/src"
    if source == "sqlite":
        sqlite3.connect(tmp_path / "devices.db").close()
        url = f"sqlite:///{tmp_path / 'devices.db'}"
    assert _job(url, key_type, mapping, mode, method).direct is direct


def test_a_direct_load_outlives_an_idle_in_transaction_timeout(fresh_db: str, pg: Server) -> None:
    """The chunk's transaction idles on the target while the source is read on its own session: a
    DBA's idle_in_transaction_session_timeout ended it there, and every retry of the chunk failed alike."""
    table = "CREATE TABLE events (id bigint PRIMARY KEY, amount numeric(12,2))"
    with scratch_database(pg) as target_url:
        state_url(target_url)  # the checkpoint tables
        with psycopg.connect(fresh_db, autocommit=True) as source:
            source.execute(table)
            source.execute("INSERT INTO events SELECT g, g FROM generate_series(1, 100) g")
            info = pg_describe(source, "public", "events")
        chunk = Chunk(0, "key", None, None)
        with psycopg.connect(target_url, autocommit=True) as target:
            target.execute(table)
            run_key = open_run(target, "config", "full", restart=False).run_key
            save_plan(target, run_key, "public.events", "public.events", [chunk])
            target.execute(
                sql.SQL("ALTER DATABASE {} SET idle_in_transaction_session_timeout = 50").format(
                    sql.Identifier(database_name(target_url))
                )
            )
        job = ChunkJob(run_key, fresh_db, target_url, info, info, "public", chunk, None, "full")
        assert job.direct
        outcome: list[ChunkCheckpoint | Exception] = []

        def load() -> None:
            try:
                outcome.append(load_chunk(job))
            except Exception as exc:  # noqa: BLE001 - the test reports it
                outcome.append(exc)

        with psycopg.connect(fresh_db) as lock, psycopg.connect(pg.url(), autocommit=True) as watch:
            lock.execute("LOCK TABLE events IN ACCESS EXCLUSIVE MODE")  # a slow source read, held open
            loader = threading.Thread(target=load)
            loader.start()
            waiting = "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND wait_event_type = 'Lock'"
            while loader.is_alive() and not one_row(watch, waiting, (database_name(fresh_db),))[0]:
                time.sleep(0.01)
            time.sleep(0.5)  # the target's transaction idles past the timeout meanwhile
            lock.rollback()
            loader.join()
    assert [getattr(o, "rows_written", o) for o in outcome] == [100]
