"""``quality-check``: run data-quality suites, score, profile, spot anomalies and trends, alert, report.

    resolve suites ─▶ check each table (GX in PostgreSQL) / file (GX on pandas), bounded workers
                   ─▶ profile + anomalies per table (SQL)
                   ─▶ trends vs previous runs (flowyard.quality_scores), record this run
                   ─▶ recommendations ─▶ alerts (event + webhook, once per change)
                   ─▶ dashboard artifacts, score chart, GX Data Docs

The flow reports, it does not fail on bad data; use :func:`quality.gate.quality_gate`
for a pass/fail step inside another flow.
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any, Literal

from prefect.runtime import flow_run

from quality.alerts import AlertConfig
from quality.dashboard import QualityReport
from quality.recommendations import recommend
from quality.runner import DEFAULT_SAMPLE, GxSession
from quality.scoring import overall_score
from quality.sql_rules import TimeWindow
from quality.steps import (
    alerts_task,
    check_file_task,
    check_table_task,
    dashboard_task,
    profile_task,
    trends_task,
)
from quality.suite_spec import resolve_suites
from quality.suites import present_entity_suites
from tasks.db import connection, refuse_read_only, resolve_url
from tasks.errors import make_user_dir
from tasks.flow_parameters import checked_flow
from tasks.settings import get_settings
from tasks.state import state_url
from tasks.task_runners import thread_pool


@checked_flow(name="quality-check", task_runner=thread_pool(get_settings().max_workers))
def quality_check(
    database_url: str | None = None,
    suites: list[str] | None = None,
    table_schema: str = "public",
    files: dict[str, str] | None = None,
    window: Literal["day", "hour"] | None = None,
    window_start: dt.datetime | None = None,
    profile: bool = True,
    alerts: AlertConfig | None = None,
    output_dir: str | None = None,
    sample_size: int = DEFAULT_SAMPLE,
    history_runs: int = 20,
    state_database_url: str | None = None,
) -> dict[str, Any]:
    """Check tables (``suites``: entity names, YAML paths or module:attr; default: those of the four
    entities whose table exists in ``table_schema``)
    and files (``files``: suite reference → CSV/Parquet/JSON path). ``window`` checks one daily or
    hourly batch on each suite's timestamp column, the one holding ``window_start`` (default now)."""
    url = resolve_url(database_url)
    state = state_url(state_database_url, parameter="state_database_url")
    # The run writes its scores and alert fingerprints there only after every check and profile:
    # under a DBA's default_transaction_read_only that was a driver traceback at the end of the run.
    with connection(state) as conn:
        refuse_read_only(conn, state, "nothing was checked or recorded")
    table_suites = resolve_suites(suites) if suites is not None else present_entity_suites(url, table_schema)
    file_suites = [(suite, path) for ref, path in (files or {}).items() for suite in resolve_suites([ref])]
    time_window = TimeWindow.containing(window, window_start or dt.datetime.now(dt.UTC)) if window else None
    out = make_user_dir(output_dir or get_settings().home_dir / "quality", "output directory")
    session = GxSession(docs_dir=out / "data_docs")

    checks = [
        check_table_task.submit(session, url, s, table_schema, time_window, sample_size) for s in table_suites
    ]
    checks += [check_file_task.submit(session, s, path, sample_size) for s, path in file_suites]
    profiles = {
        s.name: profile_task.submit(url, s, table_schema, time_window) for s in table_suites if profile
    }
    results = [c.result() for c in checks]
    profiled = {name: p.result() for name, p in profiles.items()}

    run_id = str(flow_run.id or uuid.uuid4())
    trends, breaks, score_history = trends_task(state, run_id, results, history_runs)
    found = [a for _, table_anomalies in profiled.values() for a in table_anomalies] + breaks
    report = QualityReport(
        overall_score=overall_score(r.score for r in results),
        results=results,
        trends=trends,
        anomalies=found,
        recommendations=recommend(results, found),
        profiles={name: table_profile for name, (table_profile, _) in profiled.items()},
    )
    sent = alerts_task(state, results, alerts or AlertConfig())
    files_written = dashboard_task(session, report, score_history, out)
    return {
        "overall_score": report.overall_score,
        "suites": {
            r.suite: {
                "score": r.score,
                "rows": r.row_count,
                "success": r.success,
                "violations": len(r.violations),
            }
            for r in results
        },
        "trends": {t.suite: t.direction for t in trends},
        "anomalies": len(found),
        "recommendations": len(report.recommendations),
        "alerts_sent": len(sent),
        **files_written,
    }
