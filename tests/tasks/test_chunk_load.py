"""Which chunks may be copied straight into the target table, skipping the staging table."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from tasks.bulk_sources import Column, TableInfo
from tasks.chunk_load import ChunkJob, Mode
from tasks.chunk_plan import Chunk, Method
from tasks.column_mapping import mapped_table, parse_mapping


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
