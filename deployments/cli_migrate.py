"""``flowyard migrate``: versioned Alembic deploys with backup, validation and restore.

Each command checks its input first (URL, migrations directory), so a typo costs no
server start, then points Prefect at flowyard's server and runs the flow in-process;
the run shows up in the Prefect UI like a deployment run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, TypedDict

import typer

from deployments.cli_options import command_group, finite
from tasks.alembic_deploy import check_migrations_dir, check_rollback_choice
from tasks.db import DATABASE_URL_OPTION, resolve_url
from tasks.errors import MAX_WAIT_SECONDS, check_range

app = command_group("Versioned migrations: deploy, status, rollback.")

DatabaseUrl = Annotated[
    str | None,
    typer.Option(
        "--database-url", "-d", help="Target PostgreSQL URL (default: FLOWYARD_DATABASE_URL or embedded)."
    ),
]
MigrationsDir = Annotated[
    Path, typer.Option("--migrations-dir", "-m", help="Alembic script directory (env.py + versions/).")
]
Validate = Annotated[
    list[str] | None,
    typer.Option("--validate", help="SQL returning one truthy value after the run; repeatable."),
]
NoBackup = Annotated[bool, typer.Option("--no-backup", help="Skip the pg_dump backup (and so any restore).")]
NoRestore = Annotated[bool, typer.Option("--no-restore", help="Keep the failed state instead of restoring.")]
LockTimeout = Annotated[
    float, typer.Option(help="Seconds to wait for another deploy on the same database.", callback=finite())
]
BackupDir = Annotated[Path | None, typer.Option(help="Where backups go (default: <FLOWYARD_HOME>/backups).")]


def _prepare(database_url: str | None, migrations_dir: Path, lock_timeout: float | None = None) -> str | None:
    """Validate the input, then start/attach to flowyard's Prefect server."""
    from deployments.runtime import prepare_flow_run
    from tasks.settings import get_settings

    url = resolve_url(database_url, parameter=DATABASE_URL_OPTION) if database_url is not None else None
    check_migrations_dir(migrations_dir)
    if lock_timeout is not None:
        check_range(lock_timeout, "--lock-timeout", 0, MAX_WAIT_SECONDS)
    prepare_flow_run(get_settings())
    return url


class _Protection(TypedDict):
    backup: bool
    restore_on_failure: bool
    validation_queries: list[str]
    lock_timeout: float
    backup_dir: str | None


def _protection(
    no_backup: bool,
    no_restore: bool,
    validate: list[str] | None,
    lock_timeout: float,
    backup_dir: Path | None,
) -> _Protection:
    """The flow parameters deploy and rollback share, from their CLI options."""
    return {
        "backup": not no_backup,
        "restore_on_failure": not no_restore,
        "validation_queries": validate or [],
        "lock_timeout": lock_timeout,
        "backup_dir": str(backup_dir) if backup_dir else None,
    }


@app.command()
def deploy(
    database_url: DatabaseUrl = None,
    migrations_dir: MigrationsDir = Path("migrations"),
    target: Annotated[str, typer.Option(help="Revision to upgrade to.")] = "head",
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the SQL plan; change nothing.")] = False,
    no_backup: NoBackup = False,
    no_restore: NoRestore = False,
    validate: Validate = None,
    lock_timeout: LockTimeout = 60.0,
    backup_dir: BackupDir = None,
) -> None:
    """Apply pending migrations: preflight, lock, backup, upgrade, validate; restore on failure."""
    url = _prepare(database_url, migrations_dir, lock_timeout)
    from flows.deploy_migrations import deploy_migrations

    report = deploy_migrations(
        database_url=url,
        migrations_dir=str(migrations_dir),
        target=target,
        dry_run=dry_run,
        **_protection(no_backup, no_restore, validate, lock_timeout, backup_dir),
    )
    typer.echo(report.markdown())


@app.command()
def status(
    database_url: DatabaseUrl = None,
    migrations_dir: MigrationsDir = Path("migrations"),
    target: Annotated[str, typer.Option(help="Revision pending revisions are counted up to.")] = "head",
) -> None:
    """Show applied, pending and head revisions."""
    url = _prepare(database_url, migrations_dir)
    from flows.deploy_migrations import migration_status
    from tasks.db import mask_url
    from tasks.migration_report import status_markdown

    typer.echo(
        status_markdown(mask_url(resolve_url(url)), migration_status(url, str(migrations_dir), target))
    )


@app.command()
def rollback(
    steps: Annotated[
        int | None, typer.Option(help="How many of the newest revisions to undo (default 1).", show_default=False)
    ] = None,
    to: Annotated[
        str | None,
        typer.Option(
            "--to",
            metavar="REV",
            help="Undo every revision applied after REV (base: all). Safe to re-run after an interrupted rollback.",
        ),
    ] = None,
    database_url: DatabaseUrl = None,
    migrations_dir: MigrationsDir = Path("migrations"),
    no_backup: NoBackup = False,
    no_restore: NoRestore = False,
    validate: Validate = None,
    lock_timeout: LockTimeout = 60.0,
    backup_dir: BackupDir = None,
) -> None:
    """Undo the last N revisions, or those after REV, with the same lock, backup, validation and restore as a deploy."""
    check_rollback_choice(steps, to)
    url = _prepare(database_url, migrations_dir, lock_timeout)
    from flows.deploy_migrations import migration_rollback

    report = migration_rollback(
        steps=steps,
        to=to,
        database_url=url,
        migrations_dir=str(migrations_dir),
        **_protection(no_backup, no_restore, validate, lock_timeout, backup_dir),
    )
    typer.echo(report.markdown())
