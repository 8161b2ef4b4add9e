"""Execute one phase of an online migration plan: step by step, resumable, every lock bounded.

Each step runs through :mod:`tasks.ddl_retry` (short lock_timeout, retried with backoff), its
completion is recorded in the flowyard state, and a step whose ``only_if`` guard says it already
happened is skipped, so a crashed phase resumes exactly where it stopped. Concurrent index
builds first drop an invalid leftover of an earlier failed attempt, then build it again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import psycopg
from psycopg import sql

from tasks.backfill import BackfillOptions, BackfillResult, backfill
from tasks.db import connect, connection, one_row
from tasks.ddl_retry import (
    CancelledByRequest,
    LockPolicy,
    OwnStatementTimeout,
    execute_with_lock_retry,
    with_lock_retry,
)
from tasks.errors import (
    INT64_MAX,
    MAX_WAIT_SECONDS,
    PG_MAX_MILLISECONDS,
    UserError,
    check_range,
    first_line,
    option_and_parameter,
)
from tasks.online_plan import SHADOW_PREFIX, Phase, Step, sync_trigger_name
from tasks.online_state import (
    BackfillCheckpoints,
    MigrationRecord,
    StoredCheckpoint,
    set_phase,
    set_steps_done,
)

log = logging.getLogger(__name__)

PHASE_STATES: dict[Phase, tuple[str, str]] = {
    "start": ("starting", "expanded"),
    "complete": ("completing", "completed"),
    "rollback": ("rolling_back", "rolled_back"),
}
ALLOWED_FROM: dict[Phase, tuple[str, ...]] = {
    "start": ("starting", "expanded"),
    "complete": ("expanded", "completing"),
    "rollback": ("starting", "expanded", "rolling_back"),
}
USER_FIXABLE = (
    psycopg.errors.DataError,  # class 22: a value the up/down expression or the new type cannot take
    psycopg.errors.IntegrityError,  # class 23: existing rows break a new constraint or unique index
    psycopg.errors.ProgrammingError,  # class 42 and kin: SQL in the migration, privileges
    psycopg.errors.NotSupportedError,
    psycopg.errors.QueryCanceled,  # a statement_timeout (maybe OwnStatementTimeout), or CancelledByRequest
)
"""Errors the same step would raise again on a retry: the user has to change something first."""
AFTER_FIX: dict[Phase, str] = {
    "start": "fix the data (or the timeout) and run start again to resume from this step, "
    "or roll back (`flowyard online rollback`), fix the migration file and start again",
    "complete": "fix it and run complete again to resume from this step",
    "rollback": "fix it and run rollback again to resume from this step",
}


def after_fix(phase: Phase, exc: Exception, step: Step, options: RunOptions) -> str:
    """What to do after a step failed: a refused privilege is fixed by a grant, not in the data; a
    statement another session cancelled by running the phase again (it was no timeout, so neither the
    data nor a limit needs a change); a backfill batch cancelled by its statement_timeout by smaller
    batches, or by a longer batch limit when a single row's ``up`` outlasts it (no batch size helps
    then; ``--statement-timeout-ms`` is the short DDL's); a raw_sql step cancelled by a limit its own
    SQL set by changing the migration file, since start resumes the persisted plan, which would
    only time out again."""
    if isinstance(exc, psycopg.errors.InsufficientPrivilege):
        return (
            f"connect as the tables' owner (or grant the role in the URL that privilege) and run {phase} "
            "again to resume from this step"
        )
    if isinstance(exc, CancelledByRequest):
        return f"another session cancelled it (pg_cancel_backend); run {phase} again to resume from this step"
    if isinstance(exc, OwnStatementTimeout):
        fired = f"a statement_timeout its own SQL sets cancelled it, not {option_and_parameter('statement_timeout_ms')}"
        if phase != "start":
            return f"{fired}; {AFTER_FIX[phase]}"
        return f"{fired}; roll back (`flowyard online rollback`), raise or remove that limit in the migration file and start again"
    if step.kind == "backfill" and isinstance(exc, psycopg.errors.QueryCanceled):
        return (
            f"a backfill batch may run {options.backfill.policy.statement_timeout_ms / 1000:g} s; run start again "
            f"with a smaller {option_and_parameter('batch_size')}, or with a longer "
            f"{option_and_parameter('batch_timeout_seconds')} if a single row takes that long, to resume from "
            "this step, or roll back (`flowyard online rollback`)"
        )
    return AFTER_FIX[phase]


@dataclass(frozen=True)
class RunOptions:
    policy: LockPolicy = LockPolicy()
    long_statement_timeout_ms: int = 0
    """statement_timeout of a step that reads a whole table (VALIDATE, a concurrent index build):
    none, as in pg_restore, since it lasts as long as its data. A fixed cap (it was an hour) that no
    option changed cancelled such a step on a big table at every resume, dropping and rebuilding its
    invalid index each time; ``lock_timeout`` still bounds every wait for a lock."""
    backfill: BackfillOptions = BackfillOptions()
    force: bool = False
    """Roll back even where a broken sync left new-version writes in shadow columns only
    (:func:`refuse_lossy_rollback`), dropping them."""


def run_options(
    *,
    batch_size: int,
    batch_delay_seconds: float,
    max_rows_per_second: float | None,
    lock_timeout_ms: int,
    statement_timeout_ms: int,
    retry_deadline_seconds: float,
    batch_timeout_seconds: float,
    force: bool = False,
) -> RunOptions:
    """The flow's parameters as run options; a value out of range is the user's one-line error,
    naming the ``flowyard online`` option and the flow parameter (:func:`option_and_parameter`).

    Checked here, before planning and before anything is recorded: a lock_timeout of 0 would
    otherwise surface as a lint finding on a generated statement, a batch size of 0 as a
    backfill that never moves, and a timeout PostgreSQL does not take (over 2^31-1 ms) as start
    failing its first step with the migration already begun.
    """
    check_range(batch_size, option_and_parameter("batch_size"), 1, INT64_MAX)
    check_range(lock_timeout_ms, option_and_parameter("lock_timeout_ms"), 1, PG_MAX_MILLISECONDS)
    check_range(statement_timeout_ms, option_and_parameter("statement_timeout_ms"), 1, PG_MAX_MILLISECONDS)
    check_range(batch_delay_seconds, option_and_parameter("batch_delay_seconds"), 0, MAX_WAIT_SECONDS)
    check_range(retry_deadline_seconds, option_and_parameter("retry_deadline_seconds"), 0, MAX_WAIT_SECONDS)
    # from 1 ms: a smaller value rounds to 0 ms, which PostgreSQL reads as no limit at all
    check_range(batch_timeout_seconds, option_and_parameter("batch_timeout_seconds"), 0.001, PG_MAX_MILLISECONDS / 1000)
    if max_rows_per_second is not None and not max_rows_per_second > 0:  # not `<= 0`: nan passes that
        raise UserError(
            f"{option_and_parameter('max_rows_per_second')} {max_rows_per_second} is out of range; "
            "give a number greater than 0"
        )
    policy = LockPolicy(lock_timeout_ms, statement_timeout_ms, retry_deadline_seconds)
    return RunOptions(
        policy=policy,
        backfill=BackfillOptions(
            batch_size,
            batch_delay_seconds,
            max_rows_per_second,
            replace(policy, statement_timeout_ms=round(batch_timeout_seconds * 1000)),
        ),
        force=force,
    )


@dataclass
class PhaseReport:
    phase: Phase
    steps_run: int = 0
    steps_skipped: int = 0
    lock_timeouts: int = 0
    backfills: list[BackfillResult] = field(default_factory=list)


def _policy(options: RunOptions, step: Step) -> LockPolicy:
    if not step.long_running:
        return options.policy
    return replace(options.policy, statement_timeout_ms=options.long_statement_timeout_ms)


def _build_index(conn: psycopg.Connection, schema: str, name: str, statement: str) -> None:
    """CREATE INDEX CONCURRENTLY, first dropping an invalid leftover of a failed attempt; no-op if valid."""
    row = conn.execute(
        "SELECT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
        "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relname = %s",
        (schema, name),
    ).fetchone()
    if row is not None and row[0]:
        return
    if row is not None:
        log.warning(
            "dropping invalid index %s.%s left by an earlier attempt, then rebuilding it", schema, name
        )
        conn.execute(sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(sql.Identifier(schema, name)))
    conn.execute(statement)


def run_phase(
    target_url: str,
    state: str,
    record: MigrationRecord,
    phase: Phase,
    options: RunOptions,
    on_progress: Callable[[str, StoredCheckpoint], None] | None = None,
) -> PhaseReport:
    """Run ``phase`` of the recorded plan from its first unfinished step; move the migration's phase."""
    if record.phase not in ALLOWED_FROM[phase]:
        raise UserError(
            f"migration {record.name!r} is {record.phase}; cannot {phase} it now "
            f"(allowed from: {', '.join(ALLOWED_FROM[phase])})"
        )
    running, finished = PHASE_STATES[phase]
    steps = record.plan.steps(phase)
    report = PhaseReport(phase)
    checkpoints = BackfillCheckpoints(state, record.id)
    conn = connect(target_url, autocommit=True)
    try:
        if phase == "complete":
            refuse_broken_sync(conn, record, contracted_tables(conn, record))
        elif phase == "rollback" and not options.force:
            refuse_lossy_rollback(conn, record)
        set_phase(state, record.id, running)
        for n in range(record.steps_done(phase), len(steps)):
            step = steps[n]
            if step.only_if and not one_row(conn, step.only_if)[0]:
                report.steps_skipped += 1
            else:
                try:
                    _run_step(conn, record, step, options, report, checkpoints, on_progress)
                except USER_FIXABLE as exc:
                    raise UserError(
                        f"{record.name}: {phase} step {n + 1} ({step.title}) failed: {first_line(exc)}; "
                        + after_fix(phase, exc, step, options)
                    ) from exc
                report.steps_run += 1
            set_steps_done(state, record.id, phase, n + 1)
    finally:
        conn.close()
    set_phase(state, record.id, finished)
    return report


SYNC_STATE = """
SELECT w.tbl, w.col, t.tgenabled IS NOT NULL, coalesce(t.tgenabled IN ('O', 'A'), false),
       w.col IS NULL OR a.attnum IS NOT NULL
FROM unnest(%(tables)s::text[], %(columns)s::text[]) AS w (tbl, col)
LEFT JOIN pg_trigger t ON t.tgrelid = to_regclass(format('%%I.%%I', %(schema)s::text, w.tbl)) AND t.tgname = %(trigger)s
LEFT JOIN pg_attribute a ON a.attrelid = to_regclass(format('%%I.%%I', %(schema)s::text, w.tbl))
    AND a.attname = w.col AND a.attnum > 0 AND NOT a.attisdropped
"""
"""Per backfilled table and column start filled: is the sync trigger there, does it fire for
applications (``O``rigin or ``A``lways; ``D``isabled and ``R``eplica-only do not), is the column there."""


def contracted_tables(conn: psycopg.Connection, record: MigrationRecord) -> set[str]:
    """The tables whose sync trigger complete already dropped, swapping in their columns, which its
    check of the syncs passes over: none before complete began. A resumed complete (after a failed
    step, e.g. a contract that could not take its lock, or a crash) passes over those of its
    finished steps only: a trigger a DBA dropped or disabled meanwhile on a table still to contract
    would otherwise lose that table's old-version writes since, as on a first run.

    The step complete stopped at may have committed just before a crash, unrecorded: it counts as
    done when its guard (its shadow column is gone) says so, or when it has none (a table given only
    new columns), where the check could not tell the step's own drop of the trigger from a DBA's.
    A plan persisted before steps named their table passes over every table, as resumes did."""
    if record.phase == "expanded":
        return set()
    steps, done = record.plan.complete, record.steps_done("complete")
    if not any(step.contracts for step in steps):
        return {step.backfill.table for step in record.plan.start if step.backfill is not None}
    contracted = {step.contracts for step in steps[:done] if step.contracts}
    stopped = steps[done] if done < len(steps) else None
    if stopped is not None and stopped.contracts and (stopped.only_if is None or not one_row(conn, stopped.only_if)[0]):
        contracted.add(stopped.contracts)
    return contracted


def _sync_state(conn: psycopg.Connection, record: MigrationRecord, contracted: set[str]) -> list[tuple[Any, ...]]:
    """The :data:`SYNC_STATE` rows of each backfilled table not yet ``contracted`` and of each
    column a drop's ``down`` fills (:attr:`Plan.down_filled`): one catalog query."""
    plan = record.plan
    pairs: list[tuple[str, str | None]] = []
    for target in (step.backfill for step in plan.start if step.backfill is not None):
        if target.table not in contracted:
            pairs += [(target.table, column) for column in target.columns] or [(target.table, None)]
    pairs += [(t, column) for t, columns in plan.down_filled.items() if t not in contracted for column in columns]
    if not pairs:
        return []
    return conn.execute(
        SYNC_STATE,
        {
            "tables": [t for t, _ in pairs],
            "columns": [c for _, c in pairs],
            "schema": plan.schema_name,
            "trigger": sync_trigger_name(plan.migration),
        },
    ).fetchall()


def sync_problems(conn: psycopg.Connection, record: MigrationRecord, contracted: set[str]) -> dict[str, str | None]:
    """Each backfilled table of the migration not yet ``contracted`` (schema-qualified) and what
    breaks its sync, None when nothing does: its sync trigger is gone or disabled, or a column start
    filled is gone (dropped, renamed). For complete's refusal and for ``flowyard online status``.
    A column a drop's ``down`` fills is rollback's concern only (:func:`rollback_losses`): complete
    drops it, and what the new version's writes left in it with it."""
    plan = record.plan
    trigger = sync_trigger_name(plan.migration)
    problems: dict[str, str | None] = {}
    for table, column, exists, fires, has_column in _sync_state(conn, record, contracted):
        if column in plan.down_filled.get(table, ()):
            continue
        name = f"{plan.schema_name}.{table}"
        problem = None
        if not has_column:
            problem = f"column {name}.{column}, which start added and filled, is gone (dropped or renamed)"
        elif not exists:
            problem = f"sync trigger {trigger} on {name} is gone, so old-version writes since did not reach its new columns"
        elif not fires:
            problem = (
                f"sync trigger {trigger} on {name} is disabled, so old-version writes since did not reach its new columns"
            )
        if problems.get(name) is None:
            problems[name] = problem
    return problems


@dataclass(frozen=True)
class RollbackLoss:
    """Writes through the new version that rollback would lose on a table whose sync trigger is
    gone or disabled (:func:`rollback_losses`)."""

    trigger: str
    """How the trigger is broken: gone or disabled."""
    lost: str
    """Where those writes went, and what rollback does there."""
    keep: str
    """What the user does first to keep them."""


def rollback_losses(conn: psycopg.Connection, record: MigrationRecord) -> dict[str, RollbackLoss]:
    """Per table (schema-qualified) whose sync trigger is gone or disabled under an expanded
    migration, the writes through the new version since then that rollback would lose: on an
    altered column they reached only its shadow, never the old column through ``down``, and
    rollback drops the shadow; on a column the migration drops they left it NULL where its ``down``
    fills it, and rollback keeps it so. Every such column of the table is named: one left out
    was lost silently under the ``force`` the line asks for once the others are kept. Which rows
    they were the catalog cannot say, and the old-version writes since are only in the old
    columns, so neither side holds every write. Only an expanded migration is checked: mid-start
    the trigger may not exist yet, and a resumed rollback may have dropped it itself."""
    if record.phase != "expanded":
        return {}
    plan = record.plan
    broken: dict[str, tuple[str, list[str], list[str]]] = {}
    for table, column, exists, fires, has_column in _sync_state(conn, record, set()):
        if (exists and fires) or not has_column:
            continue
        name = f"{plan.schema_name}.{table}"
        _, shadows, dropped = broken.setdefault(name, ("disabled" if exists else "gone", [], []))
        if column in plan.down_filled.get(table, ()):
            dropped.append(f"{name}.{column}")
        elif (column or "").startswith(SHADOW_PREFIX):
            shadows.append(f"{name}.{column}")
    writes = f"writes through the new version (search_path={plan.version_schema}) since then"
    return {
        name: _rollback_loss(writes, state, shadows, dropped)
        for name, (state, shadows, dropped) in broken.items()
        if shadows or dropped
    }


def _rollback_loss(writes: str, trigger: str, shadows: list[str], dropped: list[str]) -> RollbackLoss:
    """The :class:`RollbackLoss` of a table's ``writes`` that reached only its ``shadows`` and
    left its ``dropped`` columns NULL (either list may be empty, not both)."""
    lost, keep = [], []
    if shadows:
        lost.append(f"reached only {', '.join(shadows)}, which rollback drops")
        keep.append(f"copy the ones to keep to the old column{'s' if len(shadows) > 1 else ''}")
    if dropped:
        lost.append(
            f"left {', '.join(dropped)}, which that version drops and rollback keeps, NULL where its `down` fills it"
        )
        keep.append(f"set {'it' if len(dropped) == 1 else 'each'} from its `down` on the rows the new version wrote")
    return RollbackLoss(trigger, f"{writes} {', and '.join(lost)}", " and ".join(keep))


def sync_remedy(record: MigrationRecord, name: str, loss: RollbackLoss | None) -> str:
    """How to mend table ``name``'s broken sync: before complete began, roll back, as the old columns
    hold every old-version write, saying first what of the new version's writes it would lose
    (``loss``), since rollback then refuses until ``force``; once complete began it cannot roll back,
    so put the sync back and refill the table."""
    if record.phase == "expanded":
        held = "the old columns hold every old-version write"
        if loss is not None:
            held += (
                f", but {loss.lost}, so it refuses until you {loss.keep} and give {option_and_parameter('force')}"
            )
        return f"roll back (`flowyard online rollback`: {held}) and run start again, which re-creates it and backfills every row"
    return (
        "put it back (enable the trigger, re-create it as `flowyard online plan` prints it, or rename the column "
        f"back), rewrite every row of {name} as the old version (set each row's key to itself, with the old "
        "search_path), which refills its new columns, then run complete again"
    )


def broken_syncs(conn: psycopg.Connection, record: MigrationRecord, contracted: set[str]) -> dict[str, str | None]:
    """Each table :func:`sync_problems` checks, with what breaks its sync and the remedy, None when
    nothing does; what rollback would lose is read only when a sync is broken."""
    problems = sync_problems(conn, record, contracted)
    losses = rollback_losses(conn, record) if any(problems.values()) else {}
    return {
        name: None if problem is None else f"{problem}; {sync_remedy(record, name, losses.get(name))}"
        for name, problem in problems.items()
    }


def refuse_broken_sync(conn: psycopg.Connection, record: MigrationRecord, contracted: set[str]) -> None:
    """Refuse complete, before it changes or records anything more, when the sync of a table not
    yet ``contracted`` is broken (:func:`sync_problems`): complete dropped the trigger "IF EXISTS"
    and swapped in columns that had missed every old-version write since, or skipped a table whose
    shadow column it could not find, silently either way."""
    for broken in broken_syncs(conn, record, contracted).values():
        if broken is None:
            continue
        if record.phase == "expanded":
            raise UserError(f"{record.plan.migration}: cannot complete, nothing was changed: {broken}")
        raise UserError(
            f"{record.plan.migration}: cannot go on with complete, which began and can no longer roll back; "
            f"nothing more was changed: {broken}"
        )


def refuse_lossy_rollback(conn: psycopg.Connection, record: MigrationRecord) -> None:
    """Refuse rollback, changing nothing, where it would silently lose writes through the new
    version (:func:`rollback_losses`), naming every table in one line (a table left out lost its
    writes under the ``force`` given once the named ones were kept): the user keeps what matters,
    then gives ``force``."""
    plan = record.plan
    trigger = sync_trigger_name(plan.migration)
    losses = "; ".join(
        f"sync trigger {trigger} on {name} is {loss.trigger}, so {loss.lost}; {loss.keep}"
        for name, loss in rollback_losses(conn, record).items()
    )
    if losses:
        raise UserError(
            f"{plan.migration}: cannot roll back, nothing was changed: {losses}, then run rollback again with "
            f"{option_and_parameter('force')}"
        )


def sync_health(target_url: str, record: MigrationRecord) -> dict[str, str | None]:
    """What :func:`broken_syncs` finds for the tables complete would check now (a resumed one
    passes over those it contracted), read on ``target_url``: for ``flowyard online status``."""
    with connection(target_url) as conn:
        return broken_syncs(conn, record, contracted_tables(conn, record))


def _run_step(
    conn: psycopg.Connection,
    record: MigrationRecord,
    step: Step,
    options: RunOptions,
    report: PhaseReport,
    checkpoints: BackfillCheckpoints,
    on_progress: Callable[[str, StoredCheckpoint], None] | None,
) -> None:
    policy = _policy(options, step)
    started = time.monotonic()
    if step.kind == "backfill" and step.backfill is not None:
        target = step.backfill
        result = backfill(
            conn,
            target,
            checkpoints,
            options.backfill,
            lambda cp: on_progress(target.table, cp) if on_progress else None,
        )
        report.backfills.append(result)
    elif step.kind == "concurrent" and step.index:
        name, statement = step.index, step.statements[0]
        _, stats = with_lock_retry(
            conn,
            lambda c: _build_index(c, record.schema_name, name, statement),
            policy,
            transactional=False,
            what=step.title,
        )
        report.lock_timeouts += stats.lock_timeouts
    elif step.kind == "concurrent":
        stats = execute_with_lock_retry(conn, step.statements, policy, transactional=False, what=step.title)
        report.lock_timeouts += stats.lock_timeouts
    else:
        stats = execute_with_lock_retry(conn, step.statements, policy, what=step.title)
        report.lock_timeouts += stats.lock_timeouts
    log.info("%s: %s (%.2fs)", record.name, step.title, time.monotonic() - started)
