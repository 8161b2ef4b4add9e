"""``quality_gate``: a Prefect task other flows call after a migration or sync.

It runs the given suites against the database the flow just changed. In ``fail`` mode a
failing suite raises :class:`QualityGateFailed`, which fails the calling flow; in
``warn`` mode it logs a warning and the flow carries on. Either way the results are
returned so the caller can record them.
"""

from __future__ import annotations

# The gate is imported on its own (a script, a notebook, a user's flow module), not through a
# flow, and Prefect fixes its API URL when first imported: ``flows`` points it at flowyard's
# server first, or a call outside flowyard's flows started Prefect's ephemeral SQLite server
# ("database is locked" under concurrent task runs).
import flows  # noqa: F401

# isort: split
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from quality.runner import SuiteResult, run_suites
from quality.suite_spec import resolve_suites
from tasks.db import resolve_url
from tasks.errors import UserError
from tasks.settings import get_settings


class QualityGateFailed(UserError):
    """The data did not pass the gate's suites."""


def _summary(failed: list[SuiteResult]) -> str:
    parts = []
    for result in failed:
        rules = ", ".join(f"{v.rule} ({v.error or f'{v.unexpected_count} rows'})" for v in result.violations)
        parts.append(f"{result.suite}: {rules}")
    return "; ".join(parts)


@task(name="quality-gate", cache_policy=NO_CACHE)
def quality_gate(
    database_url: str | None,
    suites: str | list[str],
    mode: str = "fail",
    schema: str = "public",
) -> list[SuiteResult]:
    """Check ``suites`` (built-in names, YAML paths or module:attr; a string may list several,
    comma-separated) and fail or warn when one fails.

    ``mode`` is a plain str, checked here: the calling flows pass their own parameter through.
    """
    if mode not in ("fail", "warn"):
        raise UserError(f"quality gate mode must be 'fail' or 'warn', not {mode!r}")
    refs = [s.strip() for s in suites.split(",")] if isinstance(suites, str) else suites
    results = run_suites(
        resolve_url(database_url), resolve_suites(refs), schema=schema, max_workers=get_settings().max_workers
    )
    failed = [r for r in results if not r.success]
    if failed:
        message = f"quality gate failed: {_summary(failed)}"
        if mode == "fail":
            raise QualityGateFailed(message)
        get_run_logger().warning(message)
    return results
