"""``flowyard online``: zero-downtime schema changes (plan, start, complete, rollback, status)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from deployments.cli_options import command_group, finite
from tasks.settings import get_settings

app = command_group("Online (expand/contract) schema changes under live traffic.")

DATABASE_URL = typer.Option(
    None, "--database-url", help="Target PostgreSQL URL (default: FLOWYARD_DATABASE_URL or embedded)."
)
SCHEMA = typer.Option("public", "--schema", help="Schema the migration changes.")
MIGRATION_FILE = typer.Argument(..., help="Migration file (.yaml/.json).")
LOCK_TIMEOUT_MS = typer.Option(200, help="lock_timeout of every DDL statement; on timeout it is retried.")
STATEMENT_TIMEOUT_MS = typer.Option(10_000, help="statement_timeout of every short DDL statement.")
RETRY_DEADLINE_SECONDS = typer.Option(
    300.0,
    help="Give up retrying a statement that keeps hitting the lock timeout after this long.",
    callback=finite(),
)


@app.command()
def plan(
    migration_file: Path = MIGRATION_FILE,
    database_url: str | None = DATABASE_URL,
    schema: str = SCHEMA,
    lock_timeout_ms: int = LOCK_TIMEOUT_MS,
) -> None:
    """Print every statement, phase by phase, after validation and lint. Runs nothing."""
    from tasks.db import DATABASE_URL_OPTION, resolve_url
    from tasks.online_migration import lint_plan, prepare_plan
    from tasks.online_plan import format_plan
    from tasks.state import state_url

    built = prepare_plan(resolve_url(database_url, parameter=DATABASE_URL_OPTION), state_url(), str(migration_file), schema)
    report = lint_plan(built, lock_timeout_ms)
    typer.echo(format_plan(built))
    for warning in report.warnings:
        typer.echo(f"-- lint warning: {warning}")


@app.command()
def status(
    database_url: str | None = typer.Option(
        None,
        "--database-url",
        help="Target PostgreSQL URL of the migrations: also check each table's sync trigger there, as complete does.",
    ),
) -> None:
    """Which migration is in which phase, and how far each backfill has got; with `--database-url`,
    also whether a process still runs each phase under way, and whether each table's sync trigger
    still carries old-version writes to the new columns."""
    from tasks.db import DATABASE_URL_OPTION, resolve_url
    from tasks.online_phases import ALLOWED_FROM, PHASE_STATES
    from tasks.online_state import list_migrations
    from tasks.state import state_url

    target = None if database_url is None else resolve_url(database_url, parameter=DATABASE_URL_OPTION)
    state = state_url()
    rows = list_migrations(state)
    running = {under_way: phase for phase, (under_way, _) in PHASE_STATES.items()}
    if not rows:
        typer.echo("no online migrations yet")
    for row in rows:
        typer.echo(
            f"{row.name:<24} {row.phase:<12} {row.target} schema={row.schema_name} "
            f"version=search_path {row.version_schema}  ({row.updated_at:%Y-%m-%d %H:%M:%S})"
        )
        for table, rows_done, done in row.backfill:
            typer.echo(f"    backfill {table}: {rows_done} rows{' (done)' if done else ''}")
        if target is not None and row.phase in running:
            typer.echo(f"    {_run_line(target, row.target, row.schema_name, running[row.phase])}")
        if target is not None and row.phase in ALLOWED_FROM["complete"]:
            for line in _sync_lines(target, state, row.target, row.schema_name):
                typer.echo(f"    {line}")
    if target is None and any(row.phase in running for row in rows):
        typer.echo("(give --database-url to also see whether a process still runs each phase under way)")
    if target is None and any(row.phase in ALLOWED_FROM["complete"] for row in rows):
        typer.echo("(give --database-url to also check each table's sync trigger, as complete does)")


def _run_line(target_url: str, target: str, schema: str, phase: str) -> str:
    """Whether a process still runs the ``phase`` under way on ``target``'s ``schema``. A run killed
    mid-phase (SIGKILL, a lost host) leaves it recorded as running, as a live run is, but its lock
    went with its session; without this, status showed a dead phase as under way for good."""
    from tasks.advisory_lock import lock_holder
    from tasks.db import connection
    from tasks.online_state import lock_name, target_key

    given = target_key(target_url)
    if given != target:
        return f"run not checked: --database-url names {given}, not {target}"
    with connection(target_url) as conn:
        holder = lock_holder(conn, lock_name(schema))
    if holder is not None:
        return f"{phase} is running (pid {holder[0]} holds its lock)"
    command = f"flowyard online {phase}{' FILE' if phase == 'start' else ''}"
    if schema != "public":
        command += f" --schema {schema}"
    resume = {
        "start": f"run `{command}` with the same file again to resume it, or roll it back",
        "complete": f"run `{command}` again to finish it (it can no longer roll back)",
        "rollback": f"run `{command}` again to finish it",
    }[phase]
    return f"{phase} stopped before it finished (no process holds its lock: it failed or was killed); {resume}"


def _sync_lines(target_url: str, state: str, target: str, schema: str) -> list[str]:
    """Per table of the unfinished migration on ``target``'s ``schema``: its sync healthy, or broken
    with what complete would say to do; none checked when ``target_url`` is another database."""
    from tasks.online_phases import sync_health
    from tasks.online_state import active_migration, target_key

    given = target_key(target_url)
    if given != target:
        return [f"syncs not checked: --database-url names {given}, not {target}"]
    record = active_migration(state, target, schema)
    if record is None:  # finished since the list was read
        return []
    return [
        f"sync {name}: healthy" if broken is None else f"sync {name}: broken: {broken}"
        for name, broken in sync_health(target_url, record).items()
    ]


def _run(**parameters: Any) -> None:
    from deployments.runtime import prepare_flow_run
    from tasks.db import check_given_url
    from tasks.online_spec import load_spec

    if "migration_file" in parameters:
        load_spec(parameters["migration_file"])  # a bad file: one line, before any server starts
    check_given_url(parameters["database_url"])
    prepare_flow_run(get_settings())
    from flows.online_migrate import online_migrate

    result = online_migrate(**{k: v for k, v in parameters.items() if v is not None})
    version = f" (new version: search_path={result['version_schema']})" if result["phase"] == "expanded" else ""
    typer.echo(f"{result['migration']}: {result['phase']}{version}")


@app.command()
def start(
    migration_file: Path = MIGRATION_FILE,
    database_url: str | None = DATABASE_URL,
    schema: str = SCHEMA,
    batch_size: int = typer.Option(5000, help="Rows per backfill batch."),
    batch_timeout_seconds: float = typer.Option(
        60.0,
        help="statement_timeout of each backfill batch; raise it when a single row's `up` takes longer.",
        callback=finite(),
    ),
    batch_delay_seconds: float = typer.Option(
        0.0, help="Pause between backfill batches.", callback=finite()
    ),
    max_rows_per_second: float | None = typer.Option(
        None, help="Backfill rate limit.", callback=finite("rows per second")
    ),
    lock_timeout_ms: int = LOCK_TIMEOUT_MS,
    statement_timeout_ms: int = STATEMENT_TIMEOUT_MS,
    retry_deadline_seconds: float = RETRY_DEADLINE_SECONDS,
) -> None:
    """Expand: add shadow columns, triggers and the new version's views; backfill. Resumes a crashed start."""
    _run(
        action="start",
        migration_file=str(migration_file.resolve()),
        database_url=database_url,
        schema=schema,
        batch_size=batch_size,
        batch_timeout_seconds=batch_timeout_seconds,
        batch_delay_seconds=batch_delay_seconds,
        max_rows_per_second=max_rows_per_second,
        lock_timeout_ms=lock_timeout_ms,
        statement_timeout_ms=statement_timeout_ms,
        retry_deadline_seconds=retry_deadline_seconds,
    )


@app.command()
def complete(
    database_url: str | None = DATABASE_URL,
    schema: str = SCHEMA,
    lock_timeout_ms: int = LOCK_TIMEOUT_MS,
    statement_timeout_ms: int = STATEMENT_TIMEOUT_MS,
    retry_deadline_seconds: float = RETRY_DEADLINE_SECONDS,
) -> None:
    """Contract: switch to the final names, drop triggers, shadow columns and the old version's views."""
    _run(**locals(), action="complete")


@app.command()
def rollback(
    database_url: str | None = DATABASE_URL,
    schema: str = SCHEMA,
    lock_timeout_ms: int = LOCK_TIMEOUT_MS,
    statement_timeout_ms: int = STATEMENT_TIMEOUT_MS,
    retry_deadline_seconds: float = RETRY_DEADLINE_SECONDS,
    force: bool = typer.Option(
        False,
        "--force",
        help="Roll back even where a sync trigger is gone or disabled, dropping the new-version writes since "
        "that only the new columns hold.",
    ),
) -> None:
    """Undo everything start did, leaving schema and data as before."""
    _run(**locals(), action="rollback")
