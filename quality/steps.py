"""The quality-check flow's Prefect tasks: each wraps one concept module of ``quality/``.

Tasks take the shared :class:`~quality.runner.GxSession` directly, so they opt out of
Prefect's input-hash caching (``NO_CACHE``); a quality check must always look again.
"""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from quality import alerts, anomalies, dashboard, history
from quality.anomalies import Anomaly, Trend
from quality.profiling import TableProfile, profile_table
from quality.runner import GxSession, SuiteResult, check_file, check_table
from quality.sql_rules import TableSource, TimeWindow
from quality.suite_spec import Suite
from tasks.db import connection


@task(name="check-table", cache_policy=NO_CACHE, task_run_name="check-{suite.name}")
def check_table_task(
    session: GxSession, url: str, suite: Suite, schema: str, window: TimeWindow | None, sample_size: int
) -> SuiteResult:
    return check_table(session, url, suite, schema, window, sample_size)


@task(name="check-file", cache_policy=NO_CACHE, task_run_name="check-{suite.name}-file")
def check_file_task(session: GxSession, suite: Suite, path: str, sample_size: int) -> SuiteResult:
    return check_file(session, suite, path, sample_size)


@task(name="profile-table", cache_policy=NO_CACHE, task_run_name="profile-{suite.name}")
def profile_task(
    url: str, suite: Suite, schema: str, window: TimeWindow | None
) -> tuple[TableProfile, list[Anomaly]]:
    """Profile a table and look for outliers and pattern breaks in it (one connection, all SQL)."""
    source = TableSource.for_suite(suite, schema, window)
    with connection(url) as conn:
        profile = profile_table(conn, source)
        return profile, anomalies.detect_anomalies(conn, suite.name, source, profile)


@task(name="score-trends", cache_policy=NO_CACHE)
def trends_task(
    state: str, run_id: str, results: list[SuiteResult], history_runs: int
) -> tuple[list[Trend], list[Anomaly], dict[str, list[history.ScorePoint]]]:
    """Compare with previous runs, then record this run; returns the history including this run."""
    names = [r.suite for r in results]
    previous = history.score_history(state, names, history_runs)
    trends, breaks = anomalies.trends(results, previous)
    history.record_scores(state, run_id, results)
    return trends, breaks, history.score_history(state, names, history_runs)


@task(name="send-alerts", cache_policy=NO_CACHE)
def alerts_task(state: str, results: list[SuiteResult], config: alerts.AlertConfig) -> list[alerts.SentAlert]:
    return alerts.dispatch_alerts(state, results, config)


@task(name="publish-dashboard", cache_policy=NO_CACHE)
def dashboard_task(
    session: GxSession,
    report: dashboard.QualityReport,
    score_history: dict[str, list[history.ScorePoint]],
    output_dir: Path,
) -> dict[str, str]:
    files = dashboard.publish(report, score_history, output_dir)
    docs = session.build_docs()
    return {**files, "data_docs": str(docs)} if docs else files
