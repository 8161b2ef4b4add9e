"""Prefect tasks of the online-migrate flow: prepare (validate, plan, lint), run a phase, decide.

The flow reads like the DAG; the work is here. Each phase runs under an advisory lock on the
target schema, and the persisted state (:mod:`tasks.online_state`) carries the plan between
phases, so complete/rollback work from another run, another process or the CLI.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Literal
from uuid import UUID

import psycopg
from prefect import task
from prefect.artifacts import update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext
from prefect.input import RunInput
from psycopg import sql

from tasks.advisory_lock import advisory_lock
from tasks.db import connection, refuse_read_only
from tasks.ddl_lint import Finding, LintContext, lint_statements, split_statements
from tasks.errors import UserError, first_line
from tasks.online_catalog import snapshot
from tasks.online_phases import PhaseReport, RunOptions, run_phase
from tasks.online_plan import PHASES, Phase, Plan, build_plan
from tasks.online_spec import load_spec
from tasks.online_state import (
    StoredCheckpoint,
    active_migration,
    another_migration_runs,
    begin_migration,
    current_version_schema,
    lock_name,
    target_key,
)
from tasks.prefect_artifacts import new_progress_artifact

log = logging.getLogger(__name__)
Decision = Literal["complete", "rollback"]


class OnlineDecision(RunInput):
    """What the operator answers when the flow pauses after expand."""

    action: Decision


@dataclass(frozen=True)
class LintReport:
    warnings: list[str]


def lint_plan(plan: Plan, lock_timeout_ms: int) -> LintReport:
    """Lint every statement the flow will run, in phase order, with the runner's lock_timeout.

    A finding in a raw_sql operation refuses the migration unless the operation says
    ``unsafe: true`` (then it is a warning); a finding in a generated statement is a planner bug.
    """
    context = LintContext()
    warnings: list[str] = []
    for phase in PHASES:
        context.expand_phase = phase == "start"
        for step in plan.steps(phase):
            context.lock_timeout_set = lock_timeout_ms > 0
            statements = [s for text in step.statements for s in split_statements(text)]
            for finding in lint_statements(statements, context):
                _judge(step.raw_sql_index, step.unsafe, phase, finding, warnings)
    return LintReport(warnings)


def _judge(raw_index: int | None, unsafe: bool, phase: Phase, finding: Finding, warnings: list[str]) -> None:
    if raw_index is None:
        raise UserError(f"{phase} phase: generated statement fails the lint: {finding}")
    field = "up" if phase == "start" else "down"
    if not unsafe:
        raise UserError(
            f"operation {raw_index} (raw_sql): field '{field}': {finding}; fix it, or mark the operation unsafe: true"
        )
    warnings.append(f"operation {raw_index} (raw_sql, unsafe): {finding}")


def prepare_plan(target_url: str, state: str, migration_file: str, schema: str) -> Plan:
    """The plan to run: the persisted one when this migration is already under way, else a new one."""
    spec = load_spec(migration_file)
    target = target_key(target_url)
    active = active_migration(state, target, schema)
    if active is not None:  # resume it, or refuse before planning against its half-built schema
        if active.name == spec.name:
            return active.plan
        raise another_migration_runs(active, target)
    with connection(target_url) as conn:
        plan = build_plan(spec, snapshot(conn, schema), current_version_schema(state, target, schema))
        check_expressions(conn, plan)
    return plan


NOT_YET_CREATED = (
    psycopg.errors.UndefinedObject,
    psycopg.errors.UndefinedFunction,
    psycopg.errors.UndefinedTable,
    psycopg.errors.UndefinedColumn,
    psycopg.errors.InvalidSchemaName,
)
"""What a check fails with when it names something a raw_sql operation has yet to create."""


def check_expressions(conn: psycopg.Connection, plan: Plan) -> None:
    """Run the plan's read-only checks of the user's SQL; the first that fails is the user's error.

    Each runs with the schema as ``search_path``, as the trigger functions do, in its own
    read-only transaction, so a check can neither write nor leave the connection aborted.
    """
    for check in plan.checks:
        try:
            with conn.transaction():
                conn.execute("SET LOCAL transaction_read_only = on")
                conn.execute(sql.SQL("SET LOCAL search_path = {}").format(sql.Identifier(plan.schema_name)))
                conn.execute(check.query)
        except psycopg.Error as exc:
            if check.after_raw_sql and isinstance(exc, NOT_YET_CREATED):
                continue  # an earlier raw_sql may create it; start checks it again right after that runs
            raise UserError(f"{check.where}: {first_line(exc)}; fix the migration file") from None


@task(name="plan-online-migration", cache_policy=NO_CACHE)
def plan_online_migration(
    target_url: str, state: str, migration_file: str, schema: str, lock_timeout_ms: int
) -> Plan:
    """Validate the file, plan every statement and lint them all, before anything runs."""
    plan = prepare_plan(target_url, state, migration_file, schema)
    for warning in lint_plan(plan, lock_timeout_ms).warnings:
        log.warning("lint: %s", warning)
    return plan


class _Progress:
    """Backfill progress as a Prefect progress artifact, updated at most once per second."""

    def __init__(self, migration: str) -> None:
        self.migration = migration
        self.artifact_id: UUID | None = None
        self.last = 0.0

    def __call__(self, table: str, checkpoint: StoredCheckpoint) -> None:
        if TaskRunContext.get() is None or (time.monotonic() - self.last < 1.0 and not checkpoint.done):
            return
        self.last = time.monotonic()
        upper, last = _leading_number(checkpoint.upper_key), _leading_number(checkpoint.last_key)
        percent = 100.0 if checkpoint.done else min(100.0 * last / upper, 100.0) if upper else 0.0
        if self.artifact_id is None:
            self.artifact_id = new_progress_artifact(
                percent, description=f"backfill of {table} for online migration {self.migration}"
            )
        else:
            update_progress_artifact(self.artifact_id, percent)


def _leading_number(key: list[str] | None) -> int:
    """The first key column as a number (the progress estimate), 0 when it is not an integer."""
    return int(key[0]) if key and key[0].isdigit() else 0


def run_online_phase(
    target_url: str, state: str, plan: Plan, phase: Phase, options: RunOptions, flow_run_id: str | None = None
) -> PhaseReport:
    """Run one phase under the schema's advisory lock; start records (or resumes) the migration first.

    A server that takes no writes (a standby, a DBA's ``default_transaction_read_only`` on the role
    or the database) is refused first, in one line, from the lock's session, which meets the same
    settings: its first step failed with PostgreSQL's words after start had recorded the migration
    (or complete and rollback had moved its phase), and ``online status`` showed it under way."""
    target = target_key(target_url)
    with advisory_lock(target_url, lock_name(plan.schema_name), timeout_seconds=10) as lock:
        refuse_read_only(lock, target_url, f"{phase} of {plan.migration} was not begun (nothing changed or recorded)")
        if phase == "start":
            record = begin_migration(state, target, plan, flow_run_id)
        else:
            active = active_migration(state, target, plan.schema_name)
            if active is None or active.name != plan.migration:
                raise UserError(
                    f"no unfinished migration {plan.migration!r} on {target} schema {plan.schema_name}; "
                    "see `flowyard online status`"
                )
            record = active
        report = run_phase(target_url, state, record, phase, options, _Progress(plan.migration))
    log.info(
        "%s %s: %d steps run, %d skipped (already done), %d lock timeouts retried",
        plan.migration,
        phase,
        report.steps_run,
        report.steps_skipped,
        report.lock_timeouts,
    )
    for result in report.backfills:
        log.info(
            "backfill %s: %d rows in %.1fs (%.0f rows/s)",
            result.table,
            result.rows,
            result.seconds,
            result.rows_per_second,
        )
    return report


@task(name="online-phase", cache_policy=NO_CACHE)
def online_phase(
    target_url: str, state: str, plan: Plan, phase: Phase, options: RunOptions, flow_run_id: str | None = None
) -> PhaseReport:
    return run_online_phase(target_url, state, plan, phase, options, flow_run_id)


@task(name="online-plan-of-active-migration", cache_policy=NO_CACHE)
def active_plan(target_url: str, state: str, schema: str) -> Plan:
    """The persisted plan of the unfinished migration on ``schema`` (for complete/rollback runs)."""
    record = active_migration(state, target_key(target_url), schema)
    if record is None:
        raise UserError(f"no unfinished online migration on schema {schema!r}; see `flowyard online status`")
    return record.plan


HEALTH_QUERY_TIMEOUT_MS = 30_000
"""A health query still running after this is a failed check (so it rolls back), not a hung flow."""


@task(name="online-health-gate", cache_policy=NO_CACHE)
def health_gate(target_url: str, query: str, checks: int, interval_seconds: float) -> Decision:
    """Run the user's health query ``checks`` times (read-only); all true → complete, else rollback."""
    for n in range(checks):
        try:
            with connection(target_url) as conn:
                conn.execute("SET TRANSACTION READ ONLY")
                conn.execute("SELECT set_config('statement_timeout', %s, true)", [f"{HEALTH_QUERY_TIMEOUT_MS}ms"])
                row = conn.execute(query).fetchone()
        except Exception as exc:  # noqa: BLE001 - any failure of the user's query means unhealthy
            log.warning("health query failed (%s): rolling back", first_line(exc))
            return "rollback"
        if not row or row[0] is not True:
            log.warning(
                "health check %d/%d returned %r: rolling back", n + 1, checks, row[0] if row else None
            )
            return "rollback"
        if n + 1 < checks:
            time.sleep(interval_seconds)
    return "complete"
