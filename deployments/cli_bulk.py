"""``flowyard bulk``: copy tables into PostgreSQL with the bulk-migrate flow, with a progress bar.

The flow runs in-process against flowyard's Prefect server (started if needed); a thread
polls the target's checkpoint table and draws the progress bar from committed chunks.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

from deployments.cli_options import command_group
from tasks.db import connection, mask_url, one_row, resolve_url
from tasks.errors import UserError, parse_problem, read_user_file

app = command_group("Bulk copies: PostgreSQL, SQLite or static files into PostgreSQL.")

Target = Annotated[
    str | None, typer.Option("--target", help="Target PostgreSQL URL (default: flowyard's database).")
]
TARGET_OPTION = "--target (target_url)"
"""How an empty ``--target`` is named (:func:`tasks.db.resolve_url`): as typed, and as the parameter
of the ``bulk-migrate`` flow that ``copy`` runs."""


def load_mapping(path: Path | None) -> dict[str, Any] | None:
    """A mapping file (JSON or YAML) as a dict, with a one-line error when it cannot be read."""
    if path is None:
        return None
    text = read_user_file(path, "mapping file", "pass a JSON or YAML mapping file")
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise UserError(f"cannot read mapping file {path}: {parse_problem(exc)}") from None
    if not isinstance(data, dict):
        raise UserError(f"mapping file {path} must hold an object keyed by source table")
    return data


def _progress_bar(target_url: str, stop: threading.Event) -> None:
    """Draw committed chunks of the newest run on the target until ``stop`` is set."""
    from tasks.chunk_checkpoint import latest_run_progress

    shown = None
    bar = None
    with connection(target_url, autocommit=True) as conn:
        while not stop.wait(0.5):
            try:
                progress = latest_run_progress(conn)
            except Exception:  # noqa: BLE001 - schema not migrated yet: keep polling
                continue
            if progress is None or progress.chunks_planned == 0:
                continue
            if bar is None:
                bar = typer.progressbar(length=progress.chunks_planned, label="chunks", file=None)
                bar.__enter__()
            bar.update(progress.chunks_done - (shown or 0))
            shown = progress.chunks_done
            bar.label = f"{progress.rows_done:,} rows"
    if bar is not None:
        bar.__exit__(None, None, None)


@app.command()
def copy(
    source: Annotated[
        str, typer.Argument(help="postgresql://..., sqlite:///file.db, or a directory of files.")
    ],
    target: Target = None,
    table: Annotated[
        list[str] | None, typer.Option("--table", help="Table to copy; repeatable (default: all).")
    ] = None,
    mapping: Annotated[
        Path | None, typer.Option(help="Mapping file (JSON or YAML), see docs/bulk_migrate.md.")
    ] = None,
    mode: Annotated[str, typer.Option(help="full | incremental | seed")] = "full",
    chunk_rows: Annotated[
        int | None, typer.Option(help="Rows per chunk (default: the flow's).")
    ] = None,
    parallelism: Annotated[
        int | None, typer.Option(help="Chunks copied at once (default FLOWYARD_MAX_WORKERS).")
    ] = None,
    validate: Annotated[
        str, typer.Option(help="Checks, comma-separated: count,checksum,sample (or 'none').")
    ] = "count,checksum,sample",
    quarantine: Annotated[
        bool, typer.Option("--quarantine", help="Keep rows the target rejects aside and load the rest.")
    ] = False,
    restart: Annotated[
        bool, typer.Option("--restart", help="Start over instead of resuming the previous run.")
    ] = False,
    cursor_column: Annotated[
        str | None, typer.Option(help="Incremental cursor column (default: the key).")
    ] = None,
    task_runner: Annotated[str, typer.Option(help="threads | dask")] = "threads",
    dask_address: Annotated[
        str | None, typer.Option(help="Dask scheduler for --task-runner dask (default: a local cluster).")
    ] = None,
    target_schema: Annotated[
        str, typer.Option(help="Schema for SQLite and file tables (PostgreSQL tables keep theirs).")
    ] = "public",
    sample_rows: Annotated[int, typer.Option(help="Rows compared one by one by the sample check.")] = 100,
) -> None:
    """Copy tables exactly once with checkpoints; resumes where a crashed run stopped."""
    from deployments.runtime import prepare_flow_run
    from tasks.bulk_sources import source_kind
    from tasks.column_mapping import parse_mapping
    from tasks.settings import get_settings
    from tasks.state import state_url

    spec = load_mapping(mapping)
    checks = [] if validate == "none" else [c.strip() for c in validate.split(",") if c.strip()]
    source_kind(source)  # a typo in the source, the mapping or the target: one line, before any server starts
    parse_mapping(spec)
    # the target before the Prefect server: a typo in it, or a target that refuses connections,
    # is its one line, with no server started for nothing
    target_url = state_url(target, parameter=TARGET_OPTION)
    prepare_flow_run(get_settings())
    from flows.bulk_migrate import bulk_migrate
    from tasks.chunk_plan import DEFAULT_CHUNK_ROWS

    stop = threading.Event()
    drawer = threading.Thread(target=_progress_bar, args=(target_url, stop), daemon=True)
    drawer.start()
    try:
        report = bulk_migrate(
            source_url=source,
            target_url=target_url,
            tables=table or None,
            mapping=spec,
            mode=mode,
            parallelism=parallelism,
            validate=checks,
            quarantine=quarantine,
            restart=restart,
            cursor_column=cursor_column,
            task_runner=task_runner,
            dask_address=dask_address,
            target_schema=target_schema,
            sample_rows=sample_rows,
            chunk_rows=DEFAULT_CHUNK_ROWS if chunk_rows is None else chunk_rows,
        )
    finally:
        stop.set()
        drawer.join(timeout=5)
    typer.echo(f"\nrun {report['run_key']} into {mask_url(target_url)}")
    for row in report["tables"]:
        typer.echo(
            f"  {row['table']}: {row['rows']:,} rows, {row['chunks']} chunks, {row['rows/s']:,} rows/s — {row['validation']}"
        )


@app.command()
def status(target: Target = None) -> None:
    """Show the newest bulk run on the target: whether it runs, ended or failed (and why),
    chunks committed of planned, rows."""
    from tasks.advisory_lock import lock_holder
    from tasks.chunk_checkpoint import latest_run_progress, run_lock_name
    from tasks.state import state_url

    url = resolve_url(target, parameter=TARGET_OPTION)
    with connection(url) as conn:  # a look must not create flowyard's schema in someone's database
        recorded = one_row(conn, "SELECT to_regclass('flowyard.bulk_runs') IS NOT NULL")[0]
    progress = None
    if recorded:
        with connection(state_url(url)) as conn:
            progress = latest_run_progress(conn)
            alive = progress is not None and lock_holder(conn, run_lock_name(progress.config_hash)) is not None
    if progress is None:
        typer.echo("no bulk runs on this target")
        return
    state = progress.status
    if progress.status == "failed":
        state = f"failed: {progress.error}; run the same copy again to resume"
    elif progress.status == "running" and not alive:
        state = "stopped before it finished (no process holds its lock); run the same copy again to resume"
    typer.echo(
        f"run {progress.run_key} ({state}): {progress.chunks_done}/{progress.chunks_planned} chunks, "
        f"{progress.rows_done:,} rows"
    )
