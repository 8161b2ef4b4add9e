"""``flowyard online``: zero-downtime schema changes (plan, start, complete, rollback, status)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from tasks.settings import get_settings

app = typer.Typer(help="Online (expand/contract) schema changes under live traffic.", no_args_is_help=True)

DATABASE_URL = typer.Option(
    None, "--database-url", help="Target PostgreSQL URL (default: FLOWYARD_DATABASE_URL or embedded)."
)
SCHEMA = typer.Option("public", "--schema", help="Schema the migration changes.")
MIGRATION_FILE = typer.Argument(..., help="Migration file (.yaml/.json).")


@app.command()
def plan(
    migration_file: Path = MIGRATION_FILE,
    database_url: str | None = DATABASE_URL,
    schema: str = SCHEMA,
    lock_timeout_ms: int = typer.Option(200, help="lock_timeout the statements will run with (linted)."),
) -> None:
    """Print every statement, phase by phase, after validation and lint. Runs nothing."""
    from tasks.db import resolve_url
    from tasks.online_migration import lint_plan, prepare_plan
    from tasks.online_plan import format_plan
    from tasks.state import state_url

    built = prepare_plan(resolve_url(database_url), state_url(), str(migration_file), schema)
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

    prepare_flow_run(get_settings())
    from flows.online_migrate import online_migrate

    result = online_migrate(**{k: v for k, v in parameters.items() if v is not None})
    typer.echo(
        f"{result['migration']}: {result['phase']} (new version: search_path={result['version_schema']})"
    )


@app.command()
def start(
    migration_file: Path = MIGRATION_FILE,
    database_url: str | None = DATABASE_URL,
    schema: str = SCHEMA,
    batch_size: int = typer.Option(5000, help="Rows per backfill batch."),
    max_rows_per_second: float | None = typer.Option(None, help="Backfill rate limit."),
) -> None:
    """Expand: add shadow columns, triggers and the new version's views; backfill. Resumes a crashed start."""
    _run(
        action="start",
        migration_file=str(migration_file.resolve()),
        database_url=database_url,
        schema=schema,
        batch_size=batch_size,
        max_rows_per_second=max_rows_per_second,
    )


@app.command()
def complete(database_url: str | None = DATABASE_URL, schema: str = SCHEMA) -> None:
    """Contract: switch to the final names, drop triggers, shadow columns and the old version's views."""
    _run(action="complete", database_url=database_url, schema=schema)


@app.command()
def rollback(database_url: str | None = DATABASE_URL, schema: str = SCHEMA) -> None:
    """Undo everything start did, leaving schema and data as before."""
    _run(action="rollback", database_url=database_url, schema=schema)
