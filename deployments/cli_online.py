"""``flowyard online``: zero-downtime schema changes (plan, start, complete, rollback, status)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

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
def status() -> None:
    """Which migration is in which phase, and how far each backfill has got."""
    from tasks.online_state import list_migrations
    from tasks.state import state_url

    rows = list_migrations(state_url())
    if not rows:
        typer.echo("no online migrations yet")
    for row in rows:
        typer.echo(
            f"{row.name:<24} {row.phase:<12} {row.target} schema={row.schema_name} "
            f"version=search_path {row.version_schema}  ({row.updated_at:%Y-%m-%d %H:%M:%S})"
        )
        for table, rows_done, done in row.backfill:
            typer.echo(f"    backfill {table}: {rows_done} rows{' (done)' if done else ''}")


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


def _contract_or_rollback(action: Literal["complete", "rollback"]) -> Callable[..., None]:
    """complete and rollback take the same options: one command body serves both."""

    def command(
        database_url: str | None = DATABASE_URL,
        schema: str = SCHEMA,
        lock_timeout_ms: int = LOCK_TIMEOUT_MS,
        statement_timeout_ms: int = STATEMENT_TIMEOUT_MS,
        retry_deadline_seconds: float = RETRY_DEADLINE_SECONDS,
    ) -> None:
        _run(
            action=action,
            database_url=database_url,
            schema=schema,
            lock_timeout_ms=lock_timeout_ms,
            statement_timeout_ms=statement_timeout_ms,
            retry_deadline_seconds=retry_deadline_seconds,
        )

    return command


app.command(
    "complete",
    help="Contract: switch to the final names, drop triggers, shadow columns and the old version's views.",
)(_contract_or_rollback("complete"))
app.command("rollback", help="Undo everything start did, leaving schema and data as before.")(
    _contract_or_rollback("rollback")
)
