"""Split a source table into chunks that can be copied, checkpointed and verified independently.

- Key ranges over the primary key (any orderable type, composite keys compared as rows),
  with boundaries taken from the data so every chunk holds about ``chunk_rows`` rows.
- ``ctid`` block ranges when a PostgreSQL table has no key (TID range scans, PG 14+).
- ``rowid`` ranges for SQLite (a ``WITHOUT ROWID`` table is one chunk), row-ordinal ranges
  for static files.

Bounds travel as text and are compared against untyped literals, so PostgreSQL casts
them to the key's own type. A plan is persisted per run (see ``chunk_checkpoint``), so a
resumed run copies exactly the chunks it planned the first time.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

import psycopg
from psycopg import sql

from tasks.bulk_sources import (
    TableInfo,
    file_row_count,
    file_rows_since,
    row_count,
    source_kind,
    sqlite_connect,
    sqlite_has_rowid,
    sqlite_rowid_span,
    sqlite_rows_since,
)
from tasks.db import connection, one_row

Method = Literal["key", "ctid", "rowid", "ordinal"]

ALL_ROWS = sql.SQL("true")

DEFAULT_CHUNK_ROWS = 250_000
"""Rows per chunk by default. Each chunk is a Prefect task with its own connections and
checkpoint (~50 ms of overhead); on a 2-core machine 250k-row chunks keep that under 5% of
a chunk's copy time while a retry still redoes only about a second of work."""


@dataclass(frozen=True)
class Chunk:
    """Rows ``lo <= bound < hi`` (None = unbounded) and, incrementally, ``cursor_lo < cursor <= cursor_hi``.

    A first incremental pass (``cursor_lo`` None) also takes the rows whose cursor is NULL: they
    were never copied, and no comparison would ever select them. Later passes cannot tell whether
    such a row changed, so they leave it."""

    index: int
    method: Method
    lo: tuple[str, ...] | None
    hi: tuple[str, ...] | None
    est_rows: int = 0
    cursor_lo: str | None = None
    cursor_hi: str | None = None

    @property
    def chunk_id(self) -> str:
        """Stable identity of the chunk's bounds: part of the checkpoint and the Prefect cache key."""
        window = f" cursor({self.cursor_lo},{self.cursor_hi}]" if self.cursor_hi is not None else ""
        return f"{self.method}[{_fmt(self.lo)},{_fmt(self.hi)}){window}"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Chunk:
        lo, hi = data.get("lo"), data.get("hi")
        return cls(
            **{
                **data,
                "lo": tuple(lo) if lo is not None else None,
                "hi": tuple(hi) if hi is not None else None,
            }
        )

    def pg_filter(self, key: Sequence[str], cursor: str | None = None) -> tuple[sql.Composable, list[str]]:
        """WHERE clause and parameters selecting this chunk's rows in PostgreSQL."""
        parts: list[sql.Composable] = []
        params: list[str] = []
        column: sql.Composable = sql.SQL("ctid")
        if self.method == "key":
            column = sql.SQL("({})").format(sql.SQL(", ").join(sql.Identifier(k) for k in key))
        for bound, op in ((self.lo, ">="), (self.hi, "<")):
            if bound is not None:
                marks = sql.SQL(", ").join(sql.Placeholder() for _ in bound)
                parts.append(sql.SQL("{} {} ({})").format(column, sql.SQL(op), marks))
                params.extend(bound)
        if cursor is not None and self.cursor_hi is not None:
            moved = sql.Identifier(cursor)
            if self.cursor_lo is not None:
                parts.append(sql.SQL("{} > {}").format(moved, sql.Placeholder()))
                params.append(self.cursor_lo)
                parts.append(sql.SQL("{} <= {}").format(moved, sql.Placeholder()))
            else:
                parts.append(sql.SQL("({c} <= {} OR {c} IS NULL)").format(sql.Placeholder(), c=moved))
            params.append(self.cursor_hi)
        return (sql.SQL(" AND ").join(parts) if parts else sql.SQL("true")), params


def _fmt(bound: tuple[str, ...] | None) -> str:
    return "" if bound is None else json.dumps(list(bound), ensure_ascii=False)[1:-1]


def ranges(bounds: Sequence[tuple[str, ...]], method: Method, est_rows: int) -> list[Chunk]:
    """Chunks between consecutive lower bounds; the first and last are open-ended."""
    edges: list[tuple[str, ...] | None] = [None, *bounds, None]
    return [Chunk(i, method, edges[i], edges[i + 1], est_rows) for i in range(len(edges) - 1)]


def with_cursor(chunks: list[Chunk], cursor_lo: str | None, cursor_hi: str | None) -> list[Chunk]:
    return [replace(c, cursor_lo=cursor_lo, cursor_hi=cursor_hi) for c in chunks]


def plan_by_key(
    conn: psycopg.Connection,
    table: sql.Composable,
    key: Sequence[str],
    chunk_rows: int,
    where: sql.Composable = ALL_ROWS,
    params: Sequence[str] = (),
) -> list[Chunk]:
    """Key-range chunks of about ``chunk_rows`` rows: one ordered pass over the key (an index scan)."""
    cols = sql.SQL(", ").join(sql.Identifier(k) for k in key)
    as_text = sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier(k)) for k in key)
    query = sql.SQL(
        "SELECT {as_text} FROM (SELECT {cols}, row_number() OVER (ORDER BY {cols}) AS fy_rn "
        "FROM {table} WHERE {where}) s WHERE fy_rn %% {n} = 1 AND fy_rn > 1 ORDER BY fy_rn"
    ).format(as_text=as_text, cols=cols, table=table, where=where, n=sql.Literal(chunk_rows))
    bounds = [tuple(row) for row in conn.execute(query, list(params)).fetchall()]
    return ranges(bounds, "key", chunk_rows)


def plan_by_ctid(conn: psycopg.Connection, table: sql.Composable, chunk_rows: int) -> list[Chunk]:
    """Block-range chunks for a table without a key; block counts come from the relation size."""
    pages, tuples = one_row(
        conn,
        sql.SQL(
            "SELECT pg_relation_size({t}::regclass) / current_setting('block_size')::int, "
            "(SELECT reltuples FROM pg_class WHERE oid = {t}::regclass)"
        ).format(t=sql.Literal(table.as_string(conn))),
    )
    if tuples is None or tuples <= 0:
        tuples = one_row(conn, sql.SQL("SELECT count(*) FROM {}").format(table))[0]
    per_page = max(tuples / pages, 1.0) if pages else 1.0
    step = max(int(chunk_rows / per_page), 1)
    bounds = [(f"({block},0)",) for block in range(step, int(pages), step)]
    return ranges(bounds, "ctid", chunk_rows)


def plan_by_ordinal(total_rows: int, chunk_rows: int, method: Method, start: int = 0) -> list[Chunk]:
    """Integer ranges ``[start, start + total_rows)`` cut every ``chunk_rows`` (SQLite rowid, file rows)."""
    bounds = [(str(b),) for b in range(start + chunk_rows, start + total_rows, chunk_rows)]
    return ranges(bounds, method, chunk_rows)


def plan_sqlite(
    source_url: str, info: TableInfo, chunk_rows: int, cursor: str | None = None, cursor_lo: str | None = None
) -> list[Chunk]:
    """Rowid ranges of a SQLite table; a ``WITHOUT ROWID`` table is one chunk. With ``cursor``,
    ranges of about ``chunk_rows`` of the rows past ``cursor_lo`` (none when there are none).

    Such a table has no rowid, and ranges of its key would not be safe: bounds travel as text,
    while SQLite orders one column's values by storage class (integers, text and blobs may share
    a key column), so text bounds could skip or repeat rows. One chunk still streams in batches,
    so memory stays bounded; only parallelism and the granularity of a retry are lost.
    """
    with sqlite_connect(source_url) as conn:
        if cursor is not None:
            cursor_hi, past, bounds = sqlite_rows_since(conn, info, cursor, cursor_lo, chunk_rows)
            chunks = ranges([(str(b),) for b in bounds], "rowid", min(past, chunk_rows))
            return with_cursor(chunks, cursor_lo, cursor_hi) if past else []
        if not sqlite_has_rowid(conn, info):
            return ranges([], "rowid", row_count(source_url, info))
        low, high = sqlite_rowid_span(conn, info)
    return plan_by_ordinal(high - low, chunk_rows, "rowid", low)


def plan_file(info: TableInfo, chunk_rows: int, cursor: str | None = None, cursor_lo: str | None = None) -> list[Chunk]:
    """Row-ordinal ranges of a file; with ``cursor``, the same ranges over a file that has rows
    past ``cursor_lo`` (each chunk keeps only those), else none."""
    if cursor is None:
        return plan_by_ordinal(file_row_count(info), chunk_rows, "ordinal")
    cursor_hi, past, rows = file_rows_since(info, cursor, cursor_lo)
    return with_cursor(plan_by_ordinal(rows, chunk_rows, "ordinal"), cursor_lo, cursor_hi) if past else []


def plan_table(
    source_url: str,
    info: TableInfo,
    chunk_rows: int,
    cursor: str | None = None,
    cursor_lo: str | None = None,
) -> list[Chunk]:
    """The chunks of one source table; with ``cursor``, only rows past ``cursor_lo`` (incremental)."""
    kind = source_kind(source_url)
    if kind == "sqlite":
        return plan_sqlite(source_url, info, chunk_rows, cursor, cursor_lo)
    if kind == "files":
        return plan_file(info, chunk_rows, cursor, cursor_lo)
    with connection(source_url) as conn:
        if cursor is None:
            if info.key:
                return plan_by_key(conn, info.ident, info.key, chunk_rows)
            return plan_by_ctid(conn, info.ident, chunk_rows)
        window = (
            sql.SQL("{} > %s").format(sql.Identifier(cursor)) if cursor_lo is not None else sql.SQL("true")
        )
        params = [cursor_lo] if cursor_lo is not None else []
        cursor_hi = one_row(
            conn, sql.SQL("SELECT max({})::text FROM {}").format(sql.Identifier(cursor), info.ident)
        )[0]
        # A first pass copies every row, also when no row has a cursor yet (cursor_hi None:
        # the chunks then have no cursor window, and the next pass is a first pass again).
        if cursor_lo is not None and (
            cursor_hi is None
            or not one_row(
                conn, sql.SQL("SELECT EXISTS (SELECT 1 FROM {} WHERE {})").format(info.ident, window), params
            )[0]
        ):
            return []
        chunks = plan_by_key(conn, info.ident, info.key, chunk_rows, window, params)
    return with_cursor(chunks, cursor_lo, cursor_hi)
