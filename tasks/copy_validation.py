"""Verify a copied table: row counts, per-chunk checksums, and a sample compared row by row.

- PG→PG unchanged: every chunk's checksum is computed in the source and in the target over
  the same key range and compared, so a mismatch names the chunk bounds. Tables without a
  key (``ctid`` chunks) compare whole-table checksums, as physical positions differ.
- Mapped, SQLite and file sources: each chunk's *sent* checksum was taken in the target's
  staging table (target types) in the chunk's transaction; here the target's rows are
  checksummed per key range where the target keeps the source key, else as a whole table
  against the sum of the chunks' sent checksums.
- Sample: one random chunk is re-read from the source through the mapping into a staging
  table, and up to ``sample_rows`` of its rows are compared with the target's rows by key
  (or by row text when there is no key).
- An incremental pass past a saved cursor answers for its cursor window only (``TablePlan.window``):
  deletes are not copied, so rows before the window may be gone from the source for good. Counts
  and checksums compare the source's and the target's rows with a cursor in the window, per
  chunk where the target keeps the key; the sampled chunk lies in the window anyway.
"""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import psycopg
from psycopg import sql

from tasks.bulk_sources import row_count, source_kind
from tasks.bulk_tables import TablePlan
from tasks.chunk_checkpoint import ChunkCheckpoint
from tasks.chunk_load import STAGE, ChunkJob, create_stage, fill_stage, target_session
from tasks.chunk_plan import Chunk
from tasks.db import connection, one_row
from tasks.table_checksum import ALL_ROWS, EMPTY, Checksum, checksum, row_hash, row_texts

CHECKS = ("count", "checksum", "sample")
RESTART = "restart=True (--restart) to copy and checksum the tables afresh"
"""The remedy for checksums validation cannot compare: a restart takes them anew as it copies."""


@dataclass
class TableValidation:
    table: str
    results: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    source_rows: int | None = None
    """Source rows counted by the checksum step when it scanned the source (else counted anew)."""
    target_rows: int | None = None
    """Target rows counted by the checksum step's whole-table scan."""

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def summary(self) -> str:
        return ", ".join(f"{k}: {v}" for k, v in self.results.items()) or "not validated"


def validate_table(
    plan: TablePlan,
    job: ChunkJob,
    committed: dict[str, ChunkCheckpoint],
    checks: list[str],
    sample_rows: int = 100,
) -> TableValidation:
    """Run the requested checks for one table; problems name the chunk bounds that differ."""
    result = TableValidation(plan.spec.source.qualified)
    with target_session(job.target_url) as target:
        if "checksum" in checks:
            _check_checksums(plan, job, committed, target, result)
        if "count" in checks:
            _check_count(plan, job, committed, target, result)
        if "sample" in checks:
            _check_sample(plan, job, committed, target, result, sample_rows)
    return result


def _side_checksums(
    url: str, table: sql.Composable, columns: list[str], ranges: list[tuple[sql.Composable, list[str]]]
) -> list[Checksum]:
    """Checksums of ``ranges`` of one table, on its own connection (source and target run at once)."""
    with connection(url, utc=True) as conn:
        return [checksum(conn, table, columns, where, params) for where, params in ranges]


def _rows_in_scope(plan: TablePlan, job: ChunkJob, chunk: Chunk | None = None) -> tuple[sql.Composable, list[str]]:
    """Where-clause selecting the target's rows of ``chunk`` (the source's too, for an identical
    copy: same columns), or with no chunk all the rows the load answers for: the whole table, or
    an incremental pass's cursor window."""
    scope = chunk or plan.window
    if scope is None:
        return ALL_ROWS, []
    return scope.pg_filter(job.target.key, job.target_cursor if plan.window else None)


def _whole(plan: TablePlan) -> str:
    """How a problem names all the rows a load answers for."""
    window = plan.window
    return "whole table" if window is None else f"rows with cursor in ({window.cursor_lo}, {window.cursor_hi}]"


def _window_unknown(plan: TablePlan, job: ChunkJob) -> bool:
    """An incremental pass whose window the target cannot show (the mapping changes the cursor column)."""
    return plan.window is not None and job.target_cursor is None


def _check_count(
    plan: TablePlan,
    job: ChunkJob,
    committed: dict[str, ChunkCheckpoint],
    target: psycopg.Connection,
    result: TableValidation,
) -> None:
    """Target rows against the source (or the rows written, after a filter or quarantine), over
    all the rows the load answers for (see ``_rows_in_scope``).

    Reuses the row counts of the checksum step when it ran (no second scan).
    """
    if _window_unknown(plan, job):
        result.results["count"] = f"not comparable (the mapping changes cursor column {job.cursor})"
        return
    target_rows = result.target_rows
    if target_rows is None:
        where, params = _rows_in_scope(plan, job)
        query = sql.SQL("SELECT count(*) FROM {} WHERE {}").format(job.target_ident, where)
        target_rows = one_row(target, query, params)[0]

    def source_rows() -> int:
        if result.source_rows is not None:
            return result.source_rows
        return row_count(job.source_url, job.source, plan.window, job.cursor)

    filtered = job.mapping is not None and bool(job.mapping.filter)
    quarantined = sum(c.quarantined for c in committed.values())
    # A full load and an incremental window hold exactly the rows this load wrote.
    bounded = job.mode == "full" or plan.window is not None
    if bounded and (filtered or quarantined):
        expected, what = sum(c.rows_written for c in committed.values()), "rows written"
    elif not filtered:  # rows quarantined (a seed's, a first incremental pass's) are not in the target
        expected, what = source_rows() - quarantined, f"source less {quarantined} quarantined" if quarantined else "source"
    else:
        result.results["count"] = f"{target_rows} (not comparable: filtered {job.mode} load)"
        return
    if expected != target_rows:
        result.problems.append(f"count: target has {target_rows} rows, {what} {expected}")
        result.results["count"] = f"MISMATCH {target_rows}/{expected}"
    else:
        result.results["count"] = f"ok ({target_rows})"


def _target_key_chunks(plan: TablePlan, job: ChunkJob) -> bool:
    """Whether chunk bounds can be applied to the target (its key is the source key, renamed)."""
    return bool(plan.chunks) and plan.chunks[0].method == "key" and len(job.target.key) == len(job.source.key)


def _check_checksums(
    plan: TablePlan,
    job: ChunkJob,
    committed: dict[str, ChunkCheckpoint],
    target: psycopg.Connection,
    result: TableValidation,
) -> None:
    """Compare the chunks' sent checksums with the target (one scan), or rescan both sides.

    Every chunk of a full load carries its sent checksum (source snapshot or staging table),
    so one whole-table scan of the target settles the common case; only on a mismatch are
    the target's chunks checksummed one by one, to name the bounds that differ. An incremental
    pass past a saved cursor does the same over its window: the target rows it upserted.
    """
    if _window_unknown(plan, job):
        result.results["checksum"] = f"skipped (the mapping changes cursor column {job.cursor}: see sample)"
        return
    sent = {
        c.chunk_id: Checksum(c.rows_written, c.sent_checksum)
        for c in committed.values()
        if c.sent_checksum is not None
    }
    bounded = job.mode == "full" or plan.window is not None
    if bounded and len(sent) == len(plan.chunks):
        _compare_with_sent(plan, job, sent, target, result)
    elif job.identical:
        _compare_both_sides(plan, job, committed, result)
    elif bounded:  # each chunk of these loads saves its checksum: the missing ones an older flowyard took
        result.results["checksum"] = (
            f"skipped ({len(plan.chunks) - len(sent)}/{len(plan.chunks)} chunks' checksums were saved by an "
            f"older flowyard, and the source of a copy {_source_unlike_target(job)} cannot be checksummed as the target "
            f"holds it: rerun with {RESTART}; see sample)"
        )
    else:
        result.results["checksum"] = f"skipped ({job.mode} load {_source_unlike_target(job)}: see sample)"


def _source_unlike_target(job: ChunkJob) -> str:
    """Why the source of a copy that is not identical cannot be checksummed like its target: a
    file's rows are not PostgreSQL's, and a mapping or retyping changes them on the way."""
    kind = source_kind(job.source_url)
    if kind == "postgres":
        return "with a mapping or retyped columns"
    return "from a SQLite file" if kind == "sqlite" else "from files"


def _compare_with_sent(
    plan: TablePlan,
    job: ChunkJob,
    sent: dict[str, Checksum],
    target: psycopg.Connection,
    result: TableValidation,
) -> None:
    columns = job.columns
    got = checksum(target, job.target_ident, columns, *_rows_in_scope(plan, job))
    result.target_rows = got.rows
    differing: list[str] = []
    if got != sum(sent.values(), EMPTY):
        differing = [_whole(plan)]
        if _target_key_chunks(plan, job):
            differing = [
                c.chunk_id
                for c in plan.chunks
                if sent[c.chunk_id] != checksum(target, job.target_ident, columns, *_rows_in_scope(plan, job, c))
            ]
    _report_checksum(result, differing, len(plan.chunks) if _target_key_chunks(plan, job) else 1)


def _compare_both_sides(
    plan: TablePlan, job: ChunkJob, committed: dict[str, ChunkCheckpoint], result: TableValidation
) -> None:
    """Identical tables without sent checksums for every chunk (a first incremental pass, seed
    loads, chunks committed by an older version): checksum source and target over the same ranges."""
    columns = job.columns
    bounded = job.mode == "full" or plan.window is not None  # whose chunks all save their checksums
    per_chunk = bounded and _target_key_chunks(plan, job)
    if any(c.quarantined for c in committed.values()) and not per_chunk:
        older = f"; checksums saved by an older flowyard: rerun with {RESTART}" if bounded else ""
        result.results["checksum"] = (
            f"skipped (rows quarantined: the whole table's source and target differ by them{older})"
        )
        return
    scopes: list[Chunk | None] = list(plan.chunks) if per_chunk else [None]
    ranges = [_rows_in_scope(plan, job, c) for c in scopes]
    with ThreadPoolExecutor(max_workers=2) as pool:
        source_sums = pool.submit(_side_checksums, job.source_url, job.source.ident, columns, ranges)
        target_sums = pool.submit(_side_checksums, job.target_url, job.target_ident, columns, ranges)
        got_source, got_target = source_sums.result(), target_sums.result()
    ids = [c.chunk_id for c in plan.chunks] if per_chunk else [_whole(plan)]
    differing, unsaved = [], []
    for chunk_id, expected, got in zip(ids, got_source, got_target, strict=True):
        sent = committed.get(chunk_id)
        if sent is not None and sent.quarantined:
            # The source's range holds the quarantined rows too: only the checksum saved of the
            # rows loaded stands for the target's, and one an older flowyard saved is gone.
            if sent.sent_checksum is None:
                unsaved.append(chunk_id)
                continue
            expected = Checksum(sent.rows_written, sent.sent_checksum)
        if expected != got:
            differing.append(chunk_id)
    result.source_rows = sum(got_source, EMPTY).rows
    result.target_rows = sum(got_target, EMPTY).rows
    _report_checksum(result, differing, len(ids) - len(unsaved))
    if unsaved:
        plural = "s" if len(unsaved) != 1 else ""
        result.results["checksum"] += (
            f"; {len(unsaved)} chunk{plural} with quarantined rows not compared (checksum{plural} saved by an "
            f"older flowyard): rerun with {RESTART}"
        )


def _report_checksum(result: TableValidation, differing: list[str], total: int) -> None:
    if differing:
        result.problems.append(f"checksum differs in {result.table} chunks: {'; '.join(differing)}")
        result.results["checksum"] = f"MISMATCH in {len(differing)}/{total} chunks"
    else:
        result.results["checksum"] = f"ok ({total} chunk{'s' if total != 1 else ''})"


def _check_sample(
    plan: TablePlan,
    job: ChunkJob,
    committed: dict[str, ChunkCheckpoint],
    target: psycopg.Connection,
    result: TableValidation,
    sample_rows: int,
) -> None:
    clean = [c for c in plan.chunks if not (committed.get(c.chunk_id) and committed[c.chunk_id].quarantined)]
    if not clean:
        result.results["sample"] = "skipped (no chunk without quarantined rows)"
        return
    chunk = random.choice(clean)  # noqa: S311 - sampling, not security
    columns = job.columns
    key = list(job.target.key)
    row_text = sql.SQL("ROW({})::text").format(sql.SQL(", ").join(sql.Identifier(c) for c in columns))
    key_text = [sql.SQL("{}::text").format(sql.Identifier(k)) for k in key]
    with target.transaction(force_rollback=True):
        probe = replace(job, chunk=chunk)
        create_stage(probe, target)
        fill_stage(probe, target)
        sampled = target.execute(
            sql.SQL("SELECT {} FROM {} ORDER BY random() LIMIT {}").format(
                sql.SQL(", ").join([*key_text, row_text]), STAGE, sql.Literal(sample_rows)
            )
        ).fetchall()
    expected = [(tuple(r[:-1]), r[-1]) for r in sampled]
    texts = [text for _, text in expected]
    if key:
        found = row_texts(target, job.target_ident, columns, key, [k for k, _ in expected])
        missing = [text for k, text in expected if found.get(k) != text]
    else:
        present = {
            r[0]
            for r in target.execute(
                sql.SQL(
                    "SELECT {} FROM {} WHERE {} = ANY(SELECT hashtextextended(t, 0) FROM unnest(%s::text[]) t)"
                ).format(row_text, job.target_ident, row_hash(columns)),
                (texts,),
            ).fetchall()
        }
        missing = [t for t in texts if t not in present]
    if missing:
        result.problems.append(
            f"sample of chunk {chunk.chunk_id}: {len(missing)}/{len(expected)} source rows differ in the target, "
            f"e.g. {missing[0][:200]}"
        )
        result.results["sample"] = f"MISMATCH {len(missing)}/{len(expected)} rows"
    else:
        result.results["sample"] = f"ok ({len(expected)} rows)"
