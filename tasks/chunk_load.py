"""Load one chunk into the target exactly once: its rows and its checkpoint in one transaction.

Two ways in:

- *direct*, for full loads: an identical PG→PG table pipes binary COPY straight into the
  target table, the raw-speed path. The chunk's source checksum is taken in the same
  REPEATABLE READ snapshot as its COPY OUT (index range scan over just-read, hot buffers), so
  validation compares it with the target without scanning the source again. A mapped PG
  table whose key the target keeps unchanged (and orders the same way: no collation) COPYs
  its mapped batches straight into the target too, and checksums the chunk's key range there,
  in the same transaction: the target was emptied when the run opened, so that range holds
  exactly the rows just sent. This skips the staging table's second write of every row;
- *staged*: everything else (other mappings, SQLite and file sources, incremental upserts,
  and the diagnosis of a direct load that hit bad rows) COPYs the chunk into a temporary
  staging table with the target's column types, checksums it there (what was *sent*), then
  inserts or upserts it into the target.

Upserts need a unique index on the key (built before the load, see ``bulk_tables``); a chunk
that repeats a key value fails naming those values. A constraint violation or bad value is
permanent. The staged insert then bisects the chunk into halves that load and halves that
fail, down to the offending rows, so the error names their keys (the first ``report_rows``) —
or, with ``quarantine``, moves them into ``flowyard.bulk_quarantine`` and loads the rest. A row
a foreign key rejected is tried again once the rest of the chunk has loaded, since the bisection
may have tried it before a row of its own table it references (see ``_insert_all``).
With ``quarantine``, a source value the stage's types reject (text in a SQLite INTEGER column,
a file value a numeric column cannot parse) stages the chunk as text instead, and the insert
casts it row by row, so those rows are quarantined the same way.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal, NamedTuple

import psycopg
import pyarrow as pa
from psycopg import sql

from tasks.bulk_sources import TableInfo, UnfitValue, pg_chunk_query, pg_describe, read_chunk, source_kind
from tasks.chunk_checkpoint import ChunkCheckpoint, committed_chunks, record_chunk
from tasks.chunk_plan import Chunk
from tasks.column_mapping import TableMapping, apply_mapping
from tasks.copy_pipe import pipe_binary, write_batches
from tasks.db import connection, one_row
from tasks.errors import UserError
from tasks.integrity import has_unique_key
from tasks.pg_arrow_types import base_type
from tasks.schema_copy import duplicate_keys, key_text
from tasks.table_checksum import ALL_ROWS, Checksum, checksum

Mode = Literal["full", "incremental", "seed"]
PERMANENT = (psycopg.errors.IntegrityError, psycopg.errors.DataError)
STAGE = sql.Identifier("fy_stage")
# Key types whose order is the same in every PostgreSQL database (no collation), so a chunk's
# bounds, taken in the source, select the same rows in the target.
COLLATION_FREE_KEY_TYPES = frozenset(
    {
        "smallint",
        "integer",
        "bigint",
        "numeric",
        "date",
        "uuid",
        "timestamp without time zone",
        "timestamp with time zone",
    }
)


class ChunkRejected(UserError):
    """Rows of a chunk violate the target's constraints; the message names their keys.
    ``constraint``: the one the first of them violates, when PostgreSQL names it, and ``keys``
    the rows', so seed mode can tell a foreign key it could not order. Defaulted, for unpickling."""

    def __init__(self, message: str, constraint: str | None = None, keys: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.constraint = constraint
        self.keys = tuple(keys)


class BadRow(NamedTuple):
    """A stage row the target rejected: its ordinal, PostgreSQL's reason, the constraint violated,
    and whether that was a foreign key (which rows of the chunk loaded later may satisfy)."""

    ordinal: int
    reason: str
    constraint: str | None
    foreign_key: bool

    @classmethod
    def of(cls, ordinal: int, exc: psycopg.Error) -> BadRow:
        return cls(
            ordinal,
            exc.diag.message_primary or str(exc),
            exc.diag.constraint_name,
            isinstance(exc, psycopg.errors.ForeignKeyViolation),
        )


@dataclass(frozen=True)
class StagedInsert:
    """The chunk's INSERT (or upsert) into the target of stage rows chosen by ordinal: a range
    ``[low, high)`` or a list. Each runs in a savepoint, so a rejected one undoes only itself."""

    target: psycopg.Connection
    by_range: sql.Composed
    by_list: sql.Composed

    def rows(self, low: int, high: int) -> psycopg.Error | None:
        """Insert the rows ``[low, high)``; the error that rejected them, or None."""
        return self._run(self.by_range, (low, high))

    def listed(self, ordinals: list[int]) -> psycopg.Error | None:
        """Insert the rows ``ordinals`` in one statement; the error that rejected them, or None."""
        return self._run(self.by_list, (ordinals,))

    def _run(self, statement: sql.Composed, params: tuple[object, ...]) -> psycopg.Error | None:
        try:
            with self.target.transaction():
                self.target.execute(statement, params)
        except PERMANENT as exc:
            return exc
        return None


@dataclass(frozen=True)
class ChunkJob:
    """Everything one chunk task needs; plain data, so it travels to thread or Dask workers."""

    run_key: str
    source_url: str
    target_url: str
    source: TableInfo
    target: TableInfo
    target_schema: str
    chunk: Chunk
    mapping: TableMapping | None
    mode: Mode
    cursor: str | None = None
    quarantine: bool = False
    report_rows: int = 10
    retyped: tuple[str, ...] = ()
    """Columns an existing target table holds in other types than the source (see ``TableSpec``)."""

    @property
    def identical(self) -> bool:
        """Same columns and types both sides: the binary COPY pipe applies."""
        return (
            source_kind(self.source_url) == "postgres"
            and (self.mapping is None or not self.mapping.transforms)
            and not self.retyped
        )

    @property
    def direct(self) -> bool:
        """Whether a full load may go straight into the target table (see the module docstring);
        never into columns of other types, whose text a value may not parse in."""
        if self.mode != "full" or source_kind(self.source_url) != "postgres" or self.retyped:
            return False
        return self.identical or (self.chunk.method == "key" and self._target_keeps_key)

    @property
    def _target_keeps_key(self) -> bool:
        """The target's key is the source key, renamed at most, with its values and their order unchanged."""
        mapping = self.mapping
        renamed = tuple(mapping.rename.get(k, k) for k in self.source.key) if mapping else self.source.key
        cast = set(mapping.cast) if mapping else set()
        types = {c.name: base_type(c.pg_type) for c in self.source.columns}
        return (
            bool(self.source.key)
            and self.target.key == renamed
            and not cast.intersection(renamed)
            and all(types.get(k) in COLLATION_FREE_KEY_TYPES for k in self.source.key)
        )

    @property
    def target_ident(self) -> sql.Identifier:
        return sql.Identifier(self.target_schema, self.target.name)

    @property
    def cursor_in_target(self) -> str | None:
        """The cursor column's name in the target (renamed by the mapping at most)."""
        if self.cursor is None or self.mapping is None:
            return self.cursor
        return self.mapping.rename.get(self.cursor, self.cursor)

    @property
    def target_cursor(self) -> str | None:
        """The target column holding the source's cursor values (not cast, computed, dropped or
        retyped), in which validation finds an incremental pass's window; None if there is none."""
        name, mapping = self.cursor_in_target, self.mapping
        changed = mapping is not None and (name in mapping.cast or name in mapping.compute)
        fit = name in self.columns and self.cursor not in self.retyped and not changed
        return name if fit else None

    @property
    def columns(self) -> list[str]:
        return self.target.copy_columns

    @property
    def ordinal(self) -> str:
        """The stage's row-ordinal column: ``fy_ord``, lengthened until no copied column has that name."""
        name = "fy_ord"
        while name in self.columns:
            name += "_"
        return name

    @property
    def describe(self) -> str:
        return f"{self.source.qualified} {self.chunk.chunk_id}"


def load_chunk(job: ChunkJob, flow_run_id: str | None = None) -> ChunkCheckpoint:
    """Copy the chunk unless its checkpoint is already committed; return the checkpoint."""
    with target_session(job.target_url) as target:
        return load_chunk_in(target, job, flow_run_id)


@contextmanager
def target_session(url: str) -> Iterator[psycopg.Connection]:
    """A :func:`~tasks.db.connection` (in UTC) to a copy's target for loading or checking chunks.

    Its transactions wait, idle, while the source is read on a session of its own (a chunk's
    sorted read and checksum, a seed's tables one by one, a validation's source count or sample):
    a DBA's ``idle_in_transaction_session_timeout`` ended them there ("terminating connection due
    to idle-in-transaction timeout"), and every retry of the chunk failed alike; it is lifted for
    this session. The staging table is temporary: with the default 8 MB of temp buffers a
    250k-row stage spills to disk and is read back by the checksum and the insert."""
    with connection(url, utc=True) as target:
        with target.transaction():  # committed alone: the caller opens (and commits) its own transactions
            target.execute(
                "SELECT set_config('temp_buffers', '128MB', false),"
                " set_config('idle_in_transaction_session_timeout', '0', false)"
            )
        yield target


def load_chunk_in(target: psycopg.Connection, job: ChunkJob, flow_run_id: str | None) -> ChunkCheckpoint:
    """Load the chunk and record its checkpoint in ``target``'s open transaction (the caller commits)."""
    started = time.monotonic()
    done = committed_chunks(target, job.run_key, job.source.qualified, job.chunk.chunk_id)
    if done:
        return done[job.chunk.chunk_id]
    result = _load_direct(job, target) if job.direct else None
    if result is None:
        result = _load_staged(job, target)
    rows_read, rows_written, quarantined, digest, cursor_max = result
    checkpoint = ChunkCheckpoint(
        job.run_key,
        job.source.qualified,
        job.chunk.chunk_id,
        rows_read,
        rows_written,
        quarantined,
        digest,
        cursor_max,
        round(time.monotonic() - started, 3),
    )
    record_chunk(target, checkpoint, flow_run_id)
    return checkpoint


_Loaded = tuple[int, int, int, int | None, str | None]


def _pipe_from_source(
    job: ChunkJob, target: psycopg.Connection, into: sql.Composable, *, with_checksum: bool = False
) -> tuple[int, Checksum | None]:
    """Pipe the chunk into ``into``; return the rows copied and, if asked, the source checksum
    of exactly the rows sent (same snapshot as the COPY OUT)."""
    query, params = pg_chunk_query(job.source, job.chunk, job.cursor)
    with connection(job.source_url, utc=True) as source:
        source.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        rows = pipe_binary(source, query, target, into, job.columns, params)
        if not with_checksum:
            return rows, None
        where, where_params = job.chunk.pg_filter(job.source.key, job.cursor)
        return rows, checksum(source, job.source.ident, job.columns, where, where_params)


def _load_direct(job: ChunkJob, target: psycopg.Connection) -> _Loaded | None:
    """Copy straight into the target; None (nothing loaded) when the chunk holds rows the target rejects."""
    try:
        with target.transaction():
            if job.identical:
                rows, sent = _pipe_from_source(job, target, job.target_ident, with_checksum=True)
                return rows, rows, 0, sent.digest if sent else None, None
            rows_read = fill_stage(job, target, into=job.target_ident)
            landed = checksum(target, job.target_ident, job.columns, *job.chunk.pg_filter(job.target.key))
    except PERMANENT:
        return None
    return rows_read, landed.rows, 0, landed.digest, None


def create_stage(job: ChunkJob, target: psycopg.Connection, as_text: bool = False) -> None:
    """A temporary table with the target's column types (or every column ``text``), no
    constraints, and a row ordinal."""
    target.execute(sql.SQL("DROP TABLE IF EXISTS pg_temp.{}").format(STAGE))
    if as_text:
        columns = sql.SQL(", ").join(sql.SQL("{} text").format(sql.Identifier(c)) for c in job.columns)
        target.execute(sql.SQL("CREATE TEMP TABLE {} ({}) ON COMMIT DROP").format(STAGE, columns))
    else:
        cols = sql.SQL(", ").join(sql.Identifier(c) for c in job.columns)
        target.execute(
            sql.SQL("CREATE TEMP TABLE {} ON COMMIT DROP AS SELECT {} FROM {} WITH NO DATA").format(
                STAGE, cols, job.target_ident
            )
        )
    target.execute(
        sql.SQL("ALTER TABLE {} ADD COLUMN {} bigint GENERATED ALWAYS AS IDENTITY").format(
            STAGE, sql.Identifier(job.ordinal)
        )
    )


def fill_stage(
    job: ChunkJob, target: psycopg.Connection, as_text: bool = False, into: sql.Composable = STAGE
) -> int:
    """COPY the chunk, mapped, into the stage (or ``into``); returns the rows read from the
    source. ``as_text`` reads every column the mapping does not compute from as text (for a
    text stage); so does a retyped table, whose source text the stage's types then parse."""
    if job.identical and not as_text:
        return _pipe_from_source(job, target, into)[0]
    read = 0
    columns = job.source.copy_columns
    as_is = as_text or bool(job.retyped)
    untouched = job.mapping.untouched(columns) if job.mapping else (set(columns) if as_is else set())

    def mapped() -> Iterator[pa.RecordBatch]:
        nonlocal read
        for batch in read_chunk(job.source_url, job.source, job.chunk, job.cursor, untouched):
            read += batch.num_rows
            yield apply_mapping(batch, job.mapping)

    write_batches(target, into, mapped())
    return read


def _stage_rows(job: ChunkJob, types: dict[str, str] | None) -> sql.Composable:
    """The stage as rows of the target's types: the stage itself, or a text stage cast column by
    column (a simple subquery, so a filter on the ordinal runs before any cast)."""
    if types is None:
        return STAGE
    casts = sql.SQL(", ").join(
        sql.SQL("{}::{} AS {}").format(sql.Identifier(c), sql.SQL(types[c]), sql.Identifier(c))
        for c in job.columns
    )
    return sql.SQL("(SELECT {}, {} FROM {}) AS fy_typed").format(
        casts, sql.Identifier(job.ordinal), STAGE
    )


def _staged_insert(job: ChunkJob, target: psycopg.Connection, rows: sql.Composable) -> StagedInsert:
    """INSERT (or upsert by key) stage ``rows`` into the target, by ordinal range or list."""
    cols = sql.SQL(", ").join(sql.Identifier(c) for c in job.columns)
    head = sql.SQL("INSERT INTO {} ({}) OVERRIDING SYSTEM VALUE SELECT {} FROM {} WHERE").format(
        job.target_ident, cols, cols, rows
    )
    tail: sql.Composable = sql.SQL("")
    if job.mode != "full":
        if not has_unique_key(target, job.target_ident, job.target.key):
            keys = ", ".join(job.target.key)
            raise UserError(
                f"{job.target_schema}.{job.target.name} has no unique index on its key ({keys}), which "
                f"{job.mode} mode upserts by; add a primary key or unique constraint on ({keys}) to it, "
                "or set the mapping's `key` to the columns of its unique key"
            )
        others = [c for c in job.columns if c not in job.target.key]
        action: sql.Composable = sql.SQL("DO NOTHING")
        if others:
            action = sql.SQL("DO UPDATE SET {}").format(
                sql.SQL(", ").join(sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(c)) for c in others)
            )
        tail = sql.SQL(" ON CONFLICT ({}) {}").format(
            sql.SQL(", ").join(sql.Identifier(k) for k in job.target.key), action
        )
    ordinal = sql.Identifier(job.ordinal)
    return StagedInsert(
        target,
        sql.SQL("{} {} >= %s AND {} < %s{}").format(head, ordinal, ordinal, tail),
        sql.SQL("{} {} = ANY(%s){}").format(head, ordinal, tail),
    )


def _load_staged(job: ChunkJob, target: psycopg.Connection) -> _Loaded:
    """Stage the chunk with the target's types; with ``quarantine``, a value those types reject
    makes it stage every value as text instead, so the insert casts row by row and only the rows
    holding such values go to quarantine."""
    types: dict[str, str] | None = None
    try:
        with target.transaction():  # a savepoint: a rejected value undoes only the stage
            create_stage(job, target)
            rows_read = fill_stage(job, target)
    except (psycopg.errors.DataError, UnfitValue) as exc:
        if not job.quarantine:
            raise ChunkRejected(str(exc) if isinstance(exc, UnfitValue) else _unloadable(job, exc)) from None
        existing = pg_describe(target, job.target_schema, job.target.name)  # it may predate this copy
        types = {c.name: c.pg_type for c in existing.columns}
        create_stage(job, target, as_text=True)
        rows_read = fill_stage(job, target, as_text=True)
    rows = _stage_rows(job, types)
    sent = checksum(target, STAGE, job.columns) if types is None else None
    staged = sent.rows if sent else one_row(target, sql.SQL("SELECT count(*) FROM {}").format(STAGE))[0]
    insert = _staged_insert(job, target, rows)
    try:
        bad = _insert_all(insert, staged, 2**62 if job.quarantine else job.report_rows)
    except psycopg.errors.CardinalityViolation:  # an upsert met one key twice in the chunk
        repeated = duplicate_keys(target, STAGE, job.target.key, job.report_rows)
        raise ChunkRejected(
            f"chunk {job.describe} repeats key values of {job.target_schema}.{job.target.name} "
            f"({', '.join(job.target.key)}): {repeated}; dedupe the source or drop the repeated rows "
            "with a mapping filter"
        ) from None
    if bad and not job.quarantine:
        keys = _bad_keys(job, target, [b.ordinal for b in bad])
        raise ChunkRejected(_rejection(job, bad, keys), bad[0].constraint, keys)
    if bad:
        _quarantine(job, target, bad)
    kept = sql.SQL("{} <> ALL(%s)").format(sql.Identifier(job.ordinal))
    bad_ords = [sorted(b.ordinal for b in bad)]
    cursor_max = None
    if cursor_col := job.cursor_in_target:
        # Past every staged row, quarantined ones included, so the next pass does not read them again;
        # from a text stage, past the rows that cast (a quarantined row may hold no valid cursor).
        cursor_max = one_row(
            target,
            sql.SQL("SELECT max({})::text FROM {} WHERE {}").format(
                sql.Identifier(cursor_col), rows, ALL_ROWS if types is None else kept
            ),
            [] if types is None else bad_ords,
        )[0]
    if sent is None or bad:
        loaded = checksum(target, rows, job.columns, kept, bad_ords)
        return rows_read, loaded.rows, len(bad), loaded.digest, cursor_max
    return rows_read, sent.rows, 0, sent.digest, cursor_max


def _insert_all(insert: StagedInsert, staged: int, limit: int) -> list[BadRow]:
    """Insert the ``staged`` rows; return those the target rejects: all of them, or at least the
    first ``limit`` when that many are (the bisection stops there, which bounds its cost).

    Ranges that insert stay inserted; a failing one is split in halves until single rejected rows
    remain: one pass plus log(n) statements per rejected row. A row tried alone may lack a row of
    its own table that sits in a later half (its manager further on in the chunk): PostgreSQL
    checks a foreign key at the end of each statement, so the whole chunk in one statement would
    have taken it. So no row is judged before the rest of the chunk has been tried: when ``limit``
    stops the bisection, the ranges not tried yet are inserted whole (those without a rejected
    row load); then the rows a foreign key rejected are tried again (``_retry_references``), and
    if fewer than ``limit`` rows are left rejected the bisection goes on. Only a row whose missing
    row sits in an untried range that holds a rejected row too can still be named at ``limit``.
    """
    todo = [(1, staged + 1)]  # a stack: the next range last
    rejected: list[BadRow] = []
    while True:
        while todo and len(rejected) < limit:
            low, high = todo.pop()
            if (exc := insert.rows(low, high)) is None:
                continue
            if high - low == 1:
                rejected.append(BadRow.of(low, exc))
            else:
                middle = (low + high) // 2
                todo += [(middle, high), (low, middle)]
        todo = [(low, high) for low, high in todo if insert.rows(low, high) is not None]
        rejected = _retry_references(insert, rejected)
        if not todo or len(rejected) >= limit:
            return rejected


def _retry_references(insert: StagedInsert, rejected: list[BadRow]) -> list[BadRow]:
    """Insert again the rejected rows a foreign key rejected, in rounds until one inserts none;
    return the rows still rejected.

    A round tries them all in one statement first (rows that reference each other, a cycle, load
    only together), then one by one from the last: the row one of them lacked mostly sat further
    on in the chunk, and may itself have been rejected for want of a row further on still. A round
    costs one statement per row and loads at least one, or is the last.
    """
    while waiting := [r for r in rejected if r.foreign_key]:
        if insert.listed([r.ordinal for r in waiting]) is None:
            return [r for r in rejected if not r.foreign_key]
        loaded = {r.ordinal for r in reversed(waiting) if insert.rows(r.ordinal, r.ordinal + 1) is None}
        if not loaded:
            return rejected
        rejected = [r for r in rejected if r.ordinal not in loaded]
    return rejected


def _bad_keys(job: ChunkJob, target: psycopg.Connection, ords: Sequence[int]) -> list[str]:
    if not job.target.key:
        return [f"row #{o} of the chunk" for o in ords]
    rows = target.execute(
        sql.SQL("SELECT {} FROM {} WHERE {} = ANY(%s) ORDER BY {}").format(
            key_text(job.target.key), STAGE, sql.Identifier(job.ordinal), sql.Identifier(job.ordinal)
        ),
        (list(ords),),
    ).fetchall()
    return [r[0] for r in rows]


def _unloadable(job: ChunkJob, exc: psycopg.errors.DataError) -> str:
    """Why the chunk could not even be staged: a source value its target column's type cannot take
    (text from SQLite or a file, or a target table that already existed with other types).

    PostgreSQL's COPY context names the row and column; the staging table's name means nothing to
    the user, so only those are kept.
    """
    where = re.search(r"line (\d+), column (.+?):", exc.diag.context or "")
    at = f" (row {where[1]} of the chunk, column {where[2]})" if where else ""
    return (
        f"chunk {job.describe} holds a value the target column cannot take: {exc.diag.message_primary}"
        f"{at}; fix the source value, or cast or filter it in the mapping, or alter the column of "
        f"{job.target_schema}.{job.target.name}"
    )


def _rejection(job: ChunkJob, bad: list[BadRow], keys: list[str]) -> str:
    more = "at least " if len(bad) >= job.report_rows else ""
    return (
        f"chunk {job.describe} rejected: {more}{len(bad)} rows violate the target ({bad[0].reason}); "
        f"offending rows: {'; '.join(keys)}. Fix those source rows, or rerun with quarantine=True "
        "to load the rest and keep these in flowyard.bulk_quarantine"
    )


def _quarantine(job: ChunkJob, target: psycopg.Connection, bad: list[BadRow]) -> None:
    quarantine_rows(
        job, target, STAGE, job.ordinal, "bigint", [b.ordinal for b in bad], [b.reason for b in bad]
    )


def quarantine_rows(
    job: ChunkJob,
    target: psycopg.Connection,
    rows: sql.Composable,
    row_id: str,
    id_type: str,
    ids: Sequence[object],
    errors: Sequence[str],
) -> None:
    """Record the rows of ``rows`` whose column ``row_id`` (of SQL type ``id_type``, left out of the
    record) is one of ``ids`` in ``flowyard.bulk_quarantine`` as the chunk's, each with its error:
    the one shape of a quarantined row, whether a statement or a seed's deferred key rejected it."""
    target.execute(
        sql.SQL(
            "INSERT INTO flowyard.bulk_quarantine (run_key, source_table, chunk_id, row_data, error) "
            "SELECT %s, %s, %s, to_jsonb(s) - {id_name}, b.err FROM {rows} s "
            "JOIN unnest(%s::{id_type}[], %s::text[]) AS b(id, err) ON s.{id} = b.id"
        ).format(
            id_name=sql.Literal(row_id), rows=rows, id_type=sql.SQL(id_type), id=sql.Identifier(row_id)
        ),
        (job.run_key, job.source.qualified, job.chunk.chunk_id, list(ids), list(errors)),
    )
