"""Versioned Alembic migrations as Prefect flows: deploy (or dry-run), status and rollback.

deploy / rollback, each step a task:

    lock ─▶ preflight ─▶ [dry run: SQL plan, stop] ─▶ backup ─▶ adopt checksums
         ─▶ upgrade/downgrade, one task per revision ─▶ validate
         on any failure after the backup: restore from it, then fail the run

Every run publishes table artifacts (revisions with durations, row counts before/after)
and a markdown summary, whatever its outcome.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import psycopg
from prefect import Task, task
from prefect.cache_policies import NO_CACHE

from quality.gate import quality_gate
from tasks import alembic_deploy, migration_report, revision_checksums
from tasks.advisory_lock import advisory_lock, lock_holder
from tasks.alembic_deploy import MigrationStatus, Revision, RevisionRun
from tasks.db import connect, database_name, mask_url, resolve_url
from tasks.errors import MAX_WAIT_SECONDS, ConnectionUnavailable, UserError, check_range
from tasks.flow_parameters import checked_flow
from tasks.migration_preflight import Preflight, run_preflight
from tasks.migration_report import MigrationReport
from tasks.migration_validation import require_valid, validate
from tasks.pg_backup import backup_database, interrupted_restore, maintenance_url, restore_database
from tasks.settings import get_settings
from tasks.task_runners import thread_pool

DEFAULT_MIGRATIONS_DIR = "migrations"
P = ParamSpec("P")
R = TypeVar("R")


class MigrationFailed(UserError):
    """A revision or the validation failed; the message says whether the database was restored."""


def _not_user_error(_task: Any, _run: Any, state: Any) -> bool:
    """Retry transient failures only: a UserError will fail the same way again."""
    try:
        state.result()
    except UserError:
        return False
    except Exception:  # anything else may be transient
        return True
    return False


def _task(fn: Callable[P, R], **options: Any) -> Task[P, R]:
    """``fn`` as an uncached task: every step must really run against the database.

    Written ``task(**options)(fn)``, the form Prefect's overloads type: ``task(fn, **options)``
    matches none of them, so type checkers saw every step returning a coroutine.
    """
    return task(cache_policy=NO_CACHE, **options)(fn)


preflight_task = _task(
    run_preflight, name="preflight", retries=2, retry_delay_seconds=2, retry_condition_fn=_not_user_error
)
plan_task = _task(alembic_deploy.offline_plan, name="sql-plan")
backup_task = _task(
    backup_database, name="backup", retries=1, retry_delay_seconds=2, retry_condition_fn=_not_user_error
)
adopt_task = _task(revision_checksums.adopt, name="adopt-checksums")
upgrade_task = _task(alembic_deploy.upgrade_revision, name="upgrade")
downgrade_task = _task(alembic_deploy.downgrade_revision, name="downgrade")
validate_task = _task(validate, name="validate")
restore_task = _task(restore_database, name="restore")
status_task = _task(alembic_deploy.migration_status, name="status")
publish_task = _task(migration_report.publish, name="publish-report")


@dataclass(frozen=True)
class RunOptions:
    url: str
    migrations_dir: str
    target: str
    backup_dir: Path | None
    """None: no backup (and so no restore)."""
    restore_on_failure: bool
    validation_queries: list[str]
    lock_timeout: float
    max_active_connections: int


def _lock_name(url: str) -> str:
    return f"flowyard.deploy:{database_name(url)}"


def deploy_lock(url: str, timeout: float) -> AbstractContextManager[psycopg.Connection]:
    """One deploy or rollback at a time per database.

    The lock lives in the maintenance database, not the target: a restore rebuilds the
    target database, which would end a lock session held inside it and let a waiting run in.
    """
    return advisory_lock(maintenance_url(url), _lock_name(url), timeout)


def refuse_interrupted_restore(conn: psycopg.Connection, url: str) -> None:
    """A one-line UserError saying how to finish it when a killed run's restore of the database was
    cut off: the database may be half restored, and a run or a status would take it as it is."""
    note = interrupted_restore(conn, database_name(url))
    if note:
        raise UserError(f"{note}; nothing was changed")


def _shared_catalogs(url: str) -> psycopg.Connection:
    """A connection to read the server's shared catalogs from (a cut-off restore's note, the deploy
    lock) for a status: to the database itself, which a status needs anyway, not the maintenance
    database, which a role may not connect to (REVOKE CONNECT ON DATABASE postgres FROM PUBLIC) and
    a status otherwise needs nothing from; there only when the database is missing, as a restore
    cut off between renaming it aside and recreating it leaves it."""
    try:
        return connect(url)
    except ConnectionUnavailable as missing:
        if missing.timed_out:  # no server answered: the maintenance database would wait as long
            raise
        try:
            return connect(maintenance_url(url))
        except ConnectionUnavailable:
            raise missing from None


def _options(
    database_url: str | None,
    migrations_dir: str,
    target: str,
    backup: bool,
    backup_dir: str | None,
    restore_on_failure: bool,
    validation_queries: list[str] | None,
    lock_timeout: float,
    max_active_connections: int,
) -> RunOptions:
    alembic_deploy.check_migrations_dir(migrations_dir)
    check_range(lock_timeout, "lock_timeout", 0, MAX_WAIT_SECONDS)
    if any(not query.strip() for query in validation_queries or []):
        raise UserError(
            "a validation query is empty; give SQL returning one truthy value, e.g. SELECT count(*) > 0 FROM accounts"
        )
    backups = Path(backup_dir) if backup_dir else get_settings().home_dir / "backups"
    return RunOptions(
        resolve_url(database_url),
        str(Path(migrations_dir).resolve()),
        target,
        backups if backup else None,
        restore_on_failure,
        list(validation_queries or []),
        lock_timeout,
        max_active_connections,
    )


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {text[0] if text else ''}"


def _step(step: Any, opts: RunOptions, revision: Revision) -> RevisionRun:
    """One upgrade/downgrade task, named after its revision in the UI."""
    name = f"{step.name} {revision.revision}"
    try:
        return step.with_options(task_run_name=name)(opts.url, opts.migrations_dir, revision)
    except Exception as exc:
        raise MigrationFailed(f"{name} failed: {_one_line(exc)}") from exc


def _protected(
    report: MigrationReport, opts: RunOptions, preflight: Preflight, revisions: Sequence[Revision], step: Any
) -> None:
    """Backup, change, validate; on any failure after the backup restore it and fail."""
    report.backup = backup_task(opts.url, opts.backup_dir) if opts.backup_dir else None
    try:
        report.adopted = adopt_task(opts.url, preflight.status.applied_files)
        for revision in revisions:
            report.revisions.append(_step(step, opts, revision))
        report.validation = validate_task(opts.url, opts.validation_queries, preflight.integrity)
        require_valid(report.validation)
    except Exception as exc:
        report.error = _one_line(exc)
        if report.backup is None or not opts.restore_on_failure:
            why = "no backup was taken" if report.backup is None else "restore_on_failure is off"
            raise MigrationFailed(f"{report.error}; the database was NOT restored ({why})") from exc
        try:
            report.restore = restore_task(opts.url, report.backup)
        except Exception as restore_exc:
            raise MigrationFailed(
                f"{report.error}; restoring {report.backup.path} failed too: {_one_line(restore_exc)}"
            ) from exc
        restored = report.restore
        print(
            f"restored {database_name(opts.url)} from {restored.backup_path}: {len(restored.row_counts)} tables, "
            f"{sum(restored.row_counts.values())} rows, {restored.terminated_connections} sessions terminated"
        )
        raise MigrationFailed(
            f"{report.error}; restored {database_name(opts.url)} from {report.backup.path}"
        ) from exc


def _run(
    action: str, opts: RunOptions, select: Callable[[MigrationStatus], Sequence[Revision]] | None, step: Any
) -> MigrationReport:
    """Lock, preflight, then a dry-run plan (``select`` None) or the protected change; always publish."""
    report = MigrationReport(action, mask_url(opts.url), opts.migrations_dir)
    try:
        with deploy_lock(opts.url, opts.lock_timeout) as lock:
            refuse_interrupted_restore(lock, opts.url)
            report.preflight = preflight = preflight_task(
                opts.url,
                opts.migrations_dir,
                opts.target,
                None if select is None else opts.backup_dir,
                opts.max_active_connections,
                writes=select is not None,
            )
            if select is None:
                report.plan = plan_task(opts.url, opts.migrations_dir, preflight.status)
                print(report.plan)
            else:
                _protected(report, opts, preflight, select(preflight.status), step)
        report.outcome = "completed"
    except BaseException as exc:
        report.outcome = "failed, restored from backup" if report.restore else "failed"
        report.error = report.error or _one_line(exc)
        raise
    finally:
        publish_task(report)
    return report


@checked_flow(name="deploy-migrations", task_runner=thread_pool(2), log_prints=True)
def deploy_migrations(
    database_url: str | None = None,
    migrations_dir: str = DEFAULT_MIGRATIONS_DIR,
    target: str = "head",
    dry_run: bool = False,
    backup: bool = True,
    restore_on_failure: bool = True,
    validation_queries: list[str] | None = None,
    lock_timeout: float = 60.0,
    backup_dir: str | None = None,
    max_active_connections: int = 50,
    quality_suite: str | None = None,
    quality_gate_mode: str = "fail",
) -> MigrationReport:
    """Apply a project's Alembic migrations up to ``target`` with preflight, lock, backup, validation
    and restore on failure. ``dry_run`` only prints the SQL plan. ``database_url`` None: flowyard's
    database; ``backup_dir`` None: ``<FLOWYARD_HOME>/backups``. ``quality_suite`` (optional, see
    docs/quality.md): data-quality suites checked after the deploy, failing or warning per
    ``quality_gate_mode``."""
    opts = _options(
        database_url,
        migrations_dir,
        target,
        backup,
        backup_dir,
        restore_on_failure,
        validation_queries,
        lock_timeout,
        max_active_connections,
    )
    if dry_run:
        return _run("dry-run", opts, None, None)
    report = _run("deploy", opts, lambda status: status.pending, upgrade_task)
    if quality_suite:
        quality_gate(opts.url, quality_suite, mode=quality_gate_mode)
    return report


@checked_flow(name="migration-rollback", task_runner=thread_pool(2), log_prints=True)
def migration_rollback(
    steps: int | None = None,
    to: str | None = None,
    database_url: str | None = None,
    migrations_dir: str = DEFAULT_MIGRATIONS_DIR,
    backup: bool = True,
    restore_on_failure: bool = True,
    validation_queries: list[str] | None = None,
    lock_timeout: float = 60.0,
    backup_dir: str | None = None,
    max_active_connections: int = 50,
) -> MigrationReport:
    """Undo the ``steps`` (default 1) most recent revisions, or every one applied after revision
    ``to`` (``base``: all), by Alembic downgrades protected like a deploy. Prefer ``to`` where a
    run may be killed: run again, it stops at the same revision."""
    opts = _options(
        database_url,
        migrations_dir,
        "heads",
        backup,
        backup_dir,
        restore_on_failure,
        validation_queries,
        lock_timeout,
        max_active_connections,
    )
    return _run("rollback", opts, partial(alembic_deploy.rollback_revisions, steps=steps, to=to), downgrade_task)


@checked_flow(name="migration-status", task_runner=thread_pool(1))
def migration_status(
    database_url: str | None = None, migrations_dir: str = DEFAULT_MIGRATIONS_DIR, target: str = "head"
) -> MigrationStatus:
    """Applied, pending and head revisions of the database, as a markdown artifact too."""
    from prefect.artifacts import create_markdown_artifact

    url = resolve_url(database_url)
    alembic_deploy.check_migrations_dir(migrations_dir)
    with _shared_catalogs(url) as conn:
        if lock_holder(conn, _lock_name(url)) is None:  # else a run holds it: its restore is not cut off
            refuse_interrupted_restore(conn, url)
    status = status_task(url, migrations_dir, target)
    create_markdown_artifact(
        migration_report.status_markdown(mask_url(url), status),
        key=migration_report.artifact_key("migrations-status", url),
    )
    return status
