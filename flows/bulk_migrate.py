"""``bulk-migrate``: copy tables into PostgreSQL in parallel chunks, exactly once, verified.

DAG: open the run (lock, run key) → create target tables and persist chunk plans → copy
chunks in parallel (one Prefect task each, cached by run key + table + bounds) → per table:
indexes, keys, sequences → foreign keys (NOT VALID, VALIDATE) → validate (count, checksum,
sample) → integrity checks → artifacts. ``mode="seed"`` loads every table with upserts in
one transaction instead. See docs/bulk_migrate.md.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from typing import Any

from prefect import get_run_logger, task
from prefect.runtime import flow_run
from prefect.tasks import exponential_backoff

from tasks.advisory_lock import advisory_lock
from tasks.bulk_progress import Progress, TableStat, publish_table_artifact
from tasks.bulk_sources import source_kind
from tasks.bulk_tables import (
    TablePlan,
    create_targets,
    draft_plans,
    finish_foreign_keys,
    finish_table,
    plan_tables,
    refuse_copies_onto_sources,
    table_specs,
    with_target_types,
)
from tasks.chunk_checkpoint import (
    ChunkCheckpoint,
    RunHandle,
    committed_chunks,
    failure_recorded,
    fingerprint,
    finish_run,
    open_run,
    run_lock_name,
)
from tasks.chunk_load import ChunkJob, Mode, load_chunk, target_session
from tasks.chunk_plan import DEFAULT_CHUNK_ROWS
from tasks.column_mapping import parse_mapping
from tasks.copy_validation import CHECKS, RESTART, TableValidation, validate_table
from tasks.db import connection, mask_url, refuse_read_only
from tasks.errors import UserError, first_line
from tasks.flow_parameters import checked_flow
from tasks.integrity import foreign_key_orphans, invalid_indexes, missing_indexes, missing_key
from tasks.retry_policy import retry_transient
from tasks.seed_load import load_seed
from tasks.settings import get_settings
from tasks.state import state_url
from tasks.task_runners import build_task_runner, check_task_runner, submit_bounded

SEED_CHUNK_ROWS = 2**62
# What a failed validation's line ends with: the copied rows stay, and nothing said how to check
# them again or how to take their checksums afresh.
REVALIDATE = f"run the same copy again to validate it anew, or with {RESTART}"


@dataclass
class BulkReport:
    """What the run did; the flow's return value (and the place to hang post-steps on)."""

    run_key: str
    resumed: bool
    tables: list[dict[str, Any]] = field(default_factory=list)
    integrity: dict[str, list[str]] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return sum(t["rows"] for t in self.tables)


# --- tasks ----------------------------------------------------------------------------------------


@task(name="open-bulk-run")
def open_bulk_run(target_url: str, config_hash: str, mode: str, restart: bool) -> RunHandle:
    with connection(target_url) as conn:
        refuse_read_only(conn, target_url, "nothing was copied")
        return open_run(conn, config_hash, mode, restart)


@task(name="prepare-tables")
def prepare_tables(
    source_url: str,
    target_url: str,
    run: RunHandle,
    lineage: str,
    tables: list[str] | None,
    mapping: dict[str, Any] | None,
    mode: str,
    chunk_rows: int,
    target_schema: str,
    cursor_column: str | None,
) -> list[TablePlan]:
    specs = table_specs(source_url, tables, parse_mapping(mapping), target_schema, mode, cursor_column)
    refuse_copies_onto_sources(source_url, target_url, specs)
    specs = with_target_types(target_url, specs)
    drafts = draft_plans(source_url, target_url, run.run_key, lineage, specs, chunk_rows)
    create_targets(source_url, target_url, specs)
    plans = plan_tables(source_url, target_url, run.run_key, mode, specs, drafts)
    logger = get_run_logger()
    for spec in specs:
        for columns, why in (
            (
                spec.retyped,
                "the existing target holds them in other types than the source; copied as text "
                "that the target's types parse",
            ),
            (
                spec.generated_values,
                "generated in the source, kept as plain columns of its values: the mapping "
                "renames, casts or drops a column their expression reads, or casts or reads them itself",
            ),
        ):
            if columns:
                logger.warning("%s: %s: %s", spec.target_label, ", ".join(columns), why)
    for plan in plans:
        logger.info(
            "%s → %s: %d chunks (%s), %d already committed",
            plan.spec.source.qualified,
            plan.spec.target_label,
            len(plan.chunks),
            plan.chunks[0].method if plan.chunks else "none",
            len(plan.committed),
        )
    return plans


def chunk_cache_key(context: Any, parameters: dict[str, Any]) -> str:  # noqa: ANN401 - Prefect hook
    """Run key + table + chunk bounds (hashed: the key becomes a result file name)."""
    job: ChunkJob = parameters["job"]
    identity = f"{job.run_key}|{job.source.qualified}|{job.chunk.chunk_id}"
    return "bulk-chunk-" + hashlib.sha256(identity.encode()).hexdigest()


@task(
    name="copy-chunk",
    task_run_name="copy {job.source.name} #{job.chunk.index}",
    retries=5,
    retry_delay_seconds=exponential_backoff(backoff_factor=0.5),
    retry_jitter_factor=0.5,
    retry_condition_fn=retry_transient,
    persist_result=True,
    cache_key_fn=chunk_cache_key,
)
def copy_chunk(job: ChunkJob) -> ChunkCheckpoint:
    checkpoint = load_chunk(job, str(flow_run.id) if flow_run.id else None)
    rate = checkpoint.rows_written / checkpoint.seconds if checkpoint.seconds else 0
    get_run_logger().info(
        "%s: %d rows read, %d written, %d quarantined in %.2fs (%.0f rows/s)",
        job.describe,
        checkpoint.rows_read,
        checkpoint.rows_written,
        checkpoint.quarantined,
        checkpoint.seconds,
        rate,
    )
    return checkpoint


@task(name="seed-tables")
def seed_tables(jobs: list[ChunkJob]) -> list[ChunkCheckpoint]:
    """Seed 004: every table upserted in ONE transaction, so reference data changes all or nothing
    (parents before children: see tasks/seed_load.py)."""
    with target_session(jobs[0].target_url) as target:
        return load_seed(target, jobs, str(flow_run.id) if flow_run.id else None)


@task(name="finish-table", task_run_name="finish {plan.spec.target.name}")
def finish_table_task(
    source_url: str, target_url: str, run_key: str, lineage: str, plan: TablePlan
) -> list[str]:
    return finish_table(source_url, target_url, run_key, lineage, plan)


@task(name="add-foreign-keys")
def add_foreign_keys_task(source_url: str, target_url: str, plans: list[TablePlan]) -> list[str]:
    return finish_foreign_keys(source_url, target_url, [p.spec for p in plans])


@task(name="validate-table", task_run_name="validate {plan.spec.target.name}")
def validate_table_task(
    plan: TablePlan, job: ChunkJob, checks: list[str], sample_rows: int
) -> TableValidation:
    with connection(job.target_url) as conn:
        committed = committed_chunks(conn, job.run_key, plan.spec.source.qualified)
    result = validate_table(plan, job, committed, checks, sample_rows)
    get_run_logger().info("%s: %s", plan.spec.target_label, result.summary)
    return result


@task(name="check-integrity")
def check_integrity_task(source_url: str, target_url: str, plans: list[TablePlan]) -> dict[str, list[str]]:
    """Seed 004's post-load checks on the copied tables, each with the problems it found: foreign-key
    orphans, indexes left invalid, and indexes present (an identical copy has every index and key
    constraint of its source table, any other its declared key). Row counts were compared by
    validation; NOT NULL is not scanned for, since PostgreSQL checks it on every row the load writes."""
    specs = [p.spec for p in plans]
    copied = {s.target_label for s in specs}
    schemas = sorted({s.target_schema for s in specs})
    with connection(target_url) as conn:
        present = [
            p
            for s in specs
            if not s.identical
            for p in missing_key(conn, s.target_schema, s.target.name, s.target.key)
        ]
        if identical := [s for s in specs if s.identical]:
            with connection(source_url) as source:
                present += [
                    p
                    for s in identical
                    for p in missing_indexes(source, s.source.ident, conn, s.target_schema, s.target.name)
                ]
        checks = {
            "fk_orphans": foreign_key_orphans(conn, schemas),
            "invalid_indexes": invalid_indexes(conn, schemas),
            "indexes_present": present,
        }
    return {
        check: [f"{p.check} {p.table}: {p.detail} ({p.count})" for p in problems if p.table in copied]
        for check, problems in checks.items()
    }


# --- the flow -------------------------------------------------------------------------------------


def chunk_jobs(
    plan: TablePlan,
    run_key: str,
    source_url: str,
    target_url: str,
    mode: Mode,
    quarantine: bool,
    report_rows: int,
) -> list[ChunkJob]:
    spec = plan.spec
    return [
        ChunkJob(
            run_key,
            source_url,
            target_url,
            spec.source,
            spec.target,
            spec.target_schema,
            chunk,
            spec.mapping,
            mode,
            spec.cursor,
            quarantine,
            report_rows,
            spec.retyped,
        )
        for chunk in plan.chunks
    ]


def run_chunks(
    jobs: list[ChunkJob], runner_kind: str, parallelism: int, dask_address: str | None, progress: Progress
) -> list[ChunkCheckpoint]:
    """Copy the chunks, at most ``parallelism`` in flight whatever the runner (each holds a source
    and a target connection); report progress as they finish; fail after all settle."""
    logger = get_run_logger()
    done: list[ChunkCheckpoint] = []
    failures: dict[int, str] = {}
    with build_task_runner(runner_kind, parallelism, dask_address) as runner:
        finished = submit_bounded(runner, copy_chunk, [{"job": job} for job in jobs], parallelism)
        for index, future in finished:
            future.wait()
            state = future.state
            if not state.is_completed():
                error = state.result(raise_on_failure=False) or state.message or state.name
                failures[index] = first_line(str(error))
                continue
            checkpoint = future.result()
            done.append(checkpoint)
            logger.info("progress: %s", progress.advance(checkpoint.rows_written, state.name != "Cached"))
    if failures:
        first, *others = sorted(failures)
        also = f" Also failed: {', '.join(jobs[i].describe for i in others)}." if others else ""
        raise UserError(
            f"{len(failures)} of {len(jobs)} chunks failed (committed chunks resume on rerun): "
            f"{failures[first]}{also}"
        )
    return done


def check_parameters(
    mode: str,
    validate: list[str],
    source_url: str,
    mapping: dict[str, Any] | None,
    *,
    chunk_rows: int,
    report_rows: int,
    sample_rows: int,
    lock_timeout_seconds: float,
) -> Mode:
    """Refuse a bad call in one line before any run is recorded or any target table emptied."""
    match mode:  # not `in`: a match narrows the str to chunk_load.Mode for type checkers
        case "full" | "incremental" | "seed":
            checked: Mode = mode
        case _:
            raise UserError(f"unknown mode {mode!r}; use 'full', 'incremental' or 'seed'")
    if unknown := [c for c in validate if c not in CHECKS]:
        raise UserError(f"unknown validation checks {unknown}; choose from {list(CHECKS)}")
    _at_least("chunk_rows", chunk_rows, 1)
    # report_rows also ends the bisection of a rejected chunk: at 0 it stopped before inserting
    # anything while the chunk's checkpoint recorded every row as written.
    _at_least("report_rows", report_rows, 1)
    _at_least("sample_rows", sample_rows, 0)  # a negative LIMIT failed only after the copy committed
    _at_least("lock_timeout_seconds", lock_timeout_seconds, 0)
    source_kind(source_url)  # a missing file or an unknown kind of source
    parse_mapping(mapping)
    return checked


def _at_least(name: str, value: float, least: int) -> None:
    if value < least:
        raise UserError(f"{name} must be at least {least}, got {value:g}")


def copy_tables(
    jobs: list[ChunkJob],
    mode: Mode,
    runner_kind: str,
    parallelism: int,
    dask_address: str | None,
    progress: Progress,
) -> list[ChunkCheckpoint]:
    """Seed mode upserts everything in one transaction; the others copy chunks in parallel."""
    if mode != "seed":
        return run_chunks(jobs, runner_kind, parallelism, dask_address, progress)
    checkpoints = seed_tables(jobs) if jobs else []
    for c in checkpoints:
        progress.advance(c.rows_written, True)
    return checkpoints


def in_load_order(plans: list[TablePlan], checkpoints: list[ChunkCheckpoint]) -> list[TablePlan]:
    """The plans in the order their checkpoints came (a seed's load order, parents first: see
    tasks/seed_load.py), so the run's report lists them so; a table with none stays last."""
    loaded = list(dict.fromkeys(c.table for c in checkpoints))
    return sorted(
        plans, key=lambda p: loaded.index(name) if (name := p.spec.source.qualified) in loaded else len(loaded)
    )


def validate_tables(
    plans: list[TablePlan],
    jobs: dict[str, list[ChunkJob]],
    checkpoints: list[ChunkCheckpoint],
    checks: list[str],
    sample_rows: int,
) -> tuple[list[TableStat], list[str]]:
    """Validate each copied table (one Prefect task each); its row of the run's table artifact,
    and the problems found."""
    stats: list[TableStat] = []
    problems: list[str] = []
    for plan in plans:
        name = plan.spec.source.qualified
        validation = TableValidation(name)
        if checks and jobs[name]:
            validation = validate_table_task(plan, jobs[name][0], checks, sample_rows)
        problems += validation.problems
        mine = [c for c in checkpoints if c.table == name]
        stats.append(
            TableStat(
                plan.spec.target_label,
                sum(c.rows_written for c in mine),
                len(plan.chunks),
                sum(c.seconds for c in mine),
                validation.summary,
            )
        )
    return stats, problems


@checked_flow(name="bulk-migrate")
def bulk_migrate(
    source_url: str,
    target_url: str | None = None,
    tables: list[str] | None = None,
    mapping: dict[str, Any] | None = None,
    mode: str = "full",
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    parallelism: int | None = None,
    validate: list[str] = ["count", "checksum", "sample"],  # noqa: B006 - Prefect parameter default
    quarantine: bool = False,
    restart: bool = False,
    target_schema: str = "public",
    cursor_column: str | None = None,
    task_runner: str = "threads",
    dask_address: str | None = None,
    sample_rows: int = 100,
    report_rows: int = 10,
    lock_timeout_seconds: float = 30.0,
    quality_suite: str | None = None,
    quality_gate_mode: str = "fail",
) -> dict[str, Any]:
    """Copy ``tables`` (None = all) from ``source_url`` (PostgreSQL, SQLite file or a directory of
    JSON/JSONL/CSV/Parquet files) into ``target_url`` (PostgreSQL; default: flowyard's database).
    ``quality_suite`` (optional, see docs/quality.md): data-quality suites checked on the target
    after the copy, failing or warning per ``quality_gate_mode``."""
    load_mode = check_parameters(
        mode,
        validate,
        source_url,
        mapping,
        chunk_rows=chunk_rows,
        report_rows=report_rows,
        sample_rows=sample_rows,
        lock_timeout_seconds=lock_timeout_seconds,
    )
    parallelism = get_settings().max_workers if parallelism is None else parallelism
    check_task_runner(task_runner, parallelism)  # before the run empties any target table
    logger = get_run_logger()
    target = state_url(target_url, parameter="target_url")
    config = {
        "source": source_url,
        "target": target,
        "tables": tables,
        "mapping": mapping,
        "mode": mode,
        "chunk_rows": chunk_rows,
        "schema": target_schema,
        "cursor": cursor_column,
    }
    lineage = fingerprint({k: config[k] for k in ("source", "target", "mapping", "schema", "cursor")})
    config_hash = fingerprint(config)

    with advisory_lock(target, run_lock_name(config_hash), lock_timeout_seconds):
        run = open_bulk_run(target, config_hash, mode, restart)
        with failure_recorded(target, run.run_key):
            logger.info(
                "run %s (%s) %s → %s",
                run.run_key,
                "resumed" if run.resumed else "new",
                mask_url(source_url),
                mask_url(target),
            )
            plans = prepare_tables(
                source_url,
                target,
                run,
                lineage,
                tables,
                mapping,
                mode,
                SEED_CHUNK_ROWS if mode == "seed" else chunk_rows,
                target_schema,
                cursor_column,
            )
            jobs = {
                p.spec.source.qualified: chunk_jobs(
                    p, run.run_key, source_url, target, load_mode, quarantine, report_rows
                )
                for p in plans
            }
            progress = Progress(sum(p.est_rows for p in plans), sum(len(j) for j in jobs.values()))
            progress.start(run.run_key)
            all_jobs = [j for table_jobs in jobs.values() for j in table_jobs]
            checkpoints = copy_tables(all_jobs, load_mode, task_runner, parallelism, dask_address, progress)

            for plan in plans:
                finish_table_task(source_url, target, run.run_key, lineage, plan)
            add_foreign_keys_task(source_url, target, plans)

            if load_mode == "seed":
                plans = in_load_order(plans, checkpoints)
            stats, failures = validate_tables(plans, jobs, checkpoints, validate, sample_rows)
            report = BulkReport(run.run_key, run.resumed, [stat.row() for stat in stats])
            report.integrity = check_integrity_task(source_url, target, plans)
            failures += [problem for found in report.integrity.values() for problem in found]
            publish_table_artifact(run.run_key, stats)
            problem = f"validation failed: {'; '.join(failures)}; {REVALIDATE}" if failures else None
            with connection(target) as conn:
                finish_run(conn, run.run_key, asdict(report), error=problem)
    if problem:
        raise UserError(problem)
    logger.info("bulk copy %s done: %s rows in %d tables", run.run_key, f"{report.rows:,}", len(plans))
    if quality_suite:
        # Imported here: the quality stack (Great Expectations) costs ~200 MB of RSS and seconds
        # of import time that a copy without a quality gate should not carry.
        from quality.gate import quality_gate

        quality_gate(target, quality_suite, mode=quality_gate_mode, schema=target_schema)
    return asdict(report)
