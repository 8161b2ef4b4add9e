"""online-migrate: a zero-downtime schema change as expand → pause for a decision → contract (or rollback).

Start (expand) adds shadow columns, sync triggers, a versioned view schema, backfills in
keyset batches and builds constraints/indexes without blocking writes. The flow then pauses
with a Prefect pause-with-input: an operator resumes it with ``complete`` or ``rollback``
(UI or API), or a health query decides, or ``auto_complete`` goes straight on. ``action``
runs a single phase instead (what ``flowyard online start|complete|rollback`` do).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from prefect import get_run_logger
from prefect.flow_runs import pause_flow_run
from prefect.runtime import flow_run

from tasks.db import resolve_url
from tasks.flow_parameters import checked_flow
from tasks.online_migration import (
    OnlineDecision,
    active_plan,
    health_gate,
    online_phase,
    plan_online_migration,
)
from tasks.online_phases import run_options
from tasks.state import state_url
from tasks.task_runners import thread_pool

DEMO_MIGRATION = str(
    Path(__file__).resolve().parent.parent
    / "deployments"
    / "demo_assets"
    / "online"
    / "add_order_status.yaml"
)


@checked_flow(name="online-migrate", task_runner=thread_pool(2))
def online_migrate(
    database_url: str | None = None,
    migration_file: str = DEMO_MIGRATION,
    schema: str = "public",
    action: Literal["run", "start", "complete", "rollback"] = "run",
    auto_complete: bool = False,
    health_query: str | None = None,
    health_checks: int = 3,
    health_interval_seconds: float = 5.0,
    pause_timeout_seconds: int = 86_400,
    batch_size: int = 5000,
    batch_timeout_seconds: float = 60.0,
    batch_delay_seconds: float = 0.0,
    max_rows_per_second: float | None = None,
    lock_timeout_ms: int = 200,
    statement_timeout_ms: int = 10_000,
    retry_deadline_seconds: float = 300.0,
    force: bool = False,
) -> dict[str, Any]:
    """Run an online migration; ``action`` = run (all phases), start, complete or rollback; ``force``
    rolls back even where a broken sync trigger left new-version writes in columns rollback drops."""
    logger = get_run_logger()
    target, state = resolve_url(database_url), state_url()
    options = run_options(
        batch_size=batch_size,
        batch_delay_seconds=batch_delay_seconds,
        max_rows_per_second=max_rows_per_second,
        lock_timeout_ms=lock_timeout_ms,
        statement_timeout_ms=statement_timeout_ms,
        retry_deadline_seconds=retry_deadline_seconds,
        batch_timeout_seconds=batch_timeout_seconds,
        force=force,
    )
    if action in ("run", "start"):
        plan = plan_online_migration(target, state, migration_file, schema, lock_timeout_ms)
        online_phase(target, state, plan, "start", options, str(flow_run.id) if flow_run.id else None)
        logger.info(
            "expanded: the new version is search_path=%s; the old one keeps working", plan.version_schema
        )
        if action == "start":
            return {"migration": plan.migration, "phase": "expanded", "version_schema": plan.version_schema}
    else:
        plan = active_plan(target, state, schema)
    if action in ("complete", "rollback"):
        decision = action
    elif health_query:
        decision = health_gate(target, health_query, health_checks, health_interval_seconds)
    elif auto_complete:
        decision = "complete"
    else:
        logger.info("paused: resume this run with action=complete or action=rollback")
        decision = pause_flow_run(
            wait_for_input=OnlineDecision, timeout=pause_timeout_seconds, poll_interval=5
        ).action
    online_phase(target, state, plan, decision, options)
    phase = "completed" if decision == "complete" else "rolled_back"
    logger.info("%s %s", plan.migration, phase)
    return {"migration": plan.migration, "phase": phase, "version_schema": plan.version_schema}
