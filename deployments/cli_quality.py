"""``flowyard quality``: run the quality-check flow, profile a table, validate a suite file."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from deployments.cli_options import command_group

app = command_group("Data quality: suites, scores, profiles, anomalies, trends.")

DatabaseUrl = Annotated[
    str | None,
    typer.Option(
        "--database-url", help="PostgreSQL URL to check (default: FLOWYARD_DATABASE_URL or embedded)"
    ),
]


@app.command()
def check(
    suite: Annotated[
        list[str] | None,
        typer.Option("--suite", "-s", help="entity name, suite YAML or module:attr (repeatable)"),
    ] = None,
    file: Annotated[
        list[str] | None,
        typer.Option("--file", "-f", help="SUITE=PATH: check a CSV/Parquet/JSON file (repeatable)"),
    ] = None,
    database_url: DatabaseUrl = None,
    schema: Annotated[str, typer.Option(help="schema of the suites' tables")] = "public",
    window: Annotated[
        str | None, typer.Option(help="check one 'day' or 'hour' batch (the current one)")
    ] = None,
    output_dir: Annotated[
        str | None, typer.Option(help="where the chart, dashboard and Data Docs go")
    ] = None,
    no_profile: Annotated[bool, typer.Option("--no-profile", help="skip profiling and anomalies")] = False,
) -> None:
    """Run the quality-check flow (reported to flowyard's Prefect server) and print the scores."""
    from deployments.runtime import prepare_flow_run
    from quality.data_files import check_data_file
    from quality.suite_spec import resolve_suites
    from tasks.db import check_given_url
    from tasks.errors import UserError
    from tasks.settings import get_settings

    files = {}
    for item in file or []:
        ref, sep, path = item.partition("=")
        if not sep:
            raise UserError(f"--file {item!r} must be SUITE=PATH, e.g. users=./users.csv")
        check_data_file(path)  # one line before any server starts, not a failed run
        files[ref] = path
    match window:  # not `in`: a match narrows the str to the flow's Literal for type checkers
        case None | "day" | "hour":
            pass
        case _:
            raise UserError(f"--window must be 'day' or 'hour', not {window!r}")
    check_given_url(database_url)
    prepare_flow_run(get_settings())
    # Resolved once here so a bad suite is one line, not a failed run (after prepare_flow_run:
    # loading suites imports Prefect, which must already point at flowyard's server).
    resolve_suites(suite or [])
    for ref in files:
        resolve_suites([ref])
    from flows.quality_check import quality_check

    summary = quality_check(
        database_url=database_url,
        suites=suite or (None if not files else []),
        table_schema=schema,
        files=files or None,
        window=window,
        output_dir=output_dir,
        profile=not no_profile,
    )
    typer.echo(f"overall score: {summary['overall_score']:.2f}")
    for name, s in summary["suites"].items():
        trend = summary["trends"].get(name, "stable")
        typer.echo(
            f"  {name:<16} {s['score']:7.2f}  rows {s['rows']:>9}  violations {s['violations']:>3}  {trend}"
        )
    typer.echo(
        f"dashboard: {summary['dashboard']}  chart: {summary['chart']}  data docs: {summary.get('data_docs')}"
    )


@app.command()
def profile(
    table: Annotated[str, typer.Argument(help="table or schema.table")],
    database_url: DatabaseUrl = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the profile as JSON")] = False,
) -> None:
    """Profile a table's columns in SQL: type, nulls, distinct values and per-type statistics."""
    from quality.profiling import profile_table
    from quality.sql_rules import TableSource
    from tasks.db import DATABASE_URL_OPTION, connection, resolve_url

    schema, _, name = table.rpartition(".")
    with connection(resolve_url(database_url, parameter=DATABASE_URL_OPTION)) as conn:
        source = TableSource(schema or "public", name)
        result = profile_table(conn, source)
    if as_json:
        typer.echo(json.dumps(result.to_dict(), default=str, indent=2))
        return
    typer.echo(f"{result.target}: {result.row_count} rows")
    for c in result.columns:
        stats = ", ".join(f"{k}={v}" for k, v in c.stats.items() if k != "top_values")
        top = ", ".join(f"{_shown(t['value'])} {t['count']}" for t in c.stats.get("top_values", []))
        typer.echo(
            f"  {c.name:<20} {c.type:<26} nulls {c.null_count:>8}  distinct {c.distinct_count:>8}  {stats}"
            + (f"  top: {top}" if top else "")
        )


def _shown(value: object, width: int = 30) -> str:
    """A top value on the profile's one line per column: quoted and escaped (a newline in it would
    break the line), cut to ``width`` characters."""
    text = repr(value)
    return text if len(text) <= width else text[: width - 1] + "…"


@app.command("validate-suite")
def validate_suite(
    ref: Annotated[str, typer.Argument(help="suite YAML file, built-in entity name or module:attr")],
) -> None:
    """Check a suite definition without running it."""
    from quality.suite_spec import resolve_suites

    for s in resolve_suites([ref]):
        typer.echo(f"{s.name}: {len(s.rules)} rules on {s.table}")
