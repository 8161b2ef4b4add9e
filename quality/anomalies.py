"""Anomalies (seed 2.5.3 ``detectAnomalies`` and ``analyzeQualityTrends``), computed in PostgreSQL.

- IQR outliers per numeric column: outside ``[q1 - 1.5·IQR, q3 + 1.5·IQR]``, quartiles
  from the profile; high severity when more than 10% of the values are outliers.
- Pattern violations per string column: each value is reduced to a shape (letter runs →
  ``a``, digit runs → ``9``); when one shape dominates, values of another shape are flagged.
- Trend breaks: each suite's score against its previous runs' scores.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from statistics import fmean
from typing import Any, Literal

import psycopg
from psycopg import sql

from quality.history import ScorePoint
from quality.profiling import TableProfile
from quality.runner import SuiteResult
from quality.sql_rules import TableSource, bound
from tasks.db import one_row

OUTLIER_HIGH_SHARE = 0.1
DOMINANT_SHARE = 0.8
TREND_TOLERANCE = 0.01
TREND_BREAK_DROP = 5.0
Direction = Literal["up", "down", "stable"]


@dataclass
class Anomaly:
    suite: str
    field: str
    type: Literal["outlier", "pattern_violation", "trend_break"]
    severity: Literal["high", "medium"]
    count: int
    # dataclasses.field, spelt out: the ``field`` attribute above shadows the bare name here.
    sample: list[Any] = dataclasses.field(default_factory=list)
    threshold: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclass(frozen=True)
class Trend:
    suite: str
    score: float
    previous: float | None
    change: float | None
    direction: Direction
    baseline: float | None
    """Mean of the previous runs' scores the break check compares against."""


def iqr_outliers(
    conn: psycopg.Connection, suite: str, source: TableSource, profile: TableProfile, sample_size: int = 10
) -> list[Anomaly]:
    anomalies = []
    for column in profile.columns:
        q1, q3 = column.stats.get("p25"), column.stats.get("p75")
        if column.kind != "number" or q1 is None or q3 is None:
            continue
        lower, upper = q1 - 1.5 * (q3 - q1), q3 + 1.5 * (q3 - q1)
        outside = sql.SQL("b.{col} < %(lower)s OR b.{col} > %(upper)s").format(
            col=sql.Identifier(column.name)
        )
        query = sql.SQL("SELECT count(*) FILTER (WHERE {outside}), count(b.{col}) FROM {rel} AS b").format(
            outside=outside, col=sql.Identifier(column.name), rel=source.relation()
        )
        bounds = {"lower": lower, "upper": upper}
        count, non_null = one_row(conn, bound(query), bounds)
        if not count:
            continue
        sample_query = sql.SQL("SELECT b.{col} FROM {rel} AS b WHERE {outside} LIMIT %(limit)s").format(
            col=sql.Identifier(column.name), rel=source.relation(), outside=outside
        )
        sample = [_number(r[0]) for r in conn.execute(bound(sample_query), {**bounds, "limit": sample_size})]
        severity: Literal["high", "medium"] = "high" if count / non_null > OUTLIER_HIGH_SHARE else "medium"
        anomalies.append(Anomaly(suite, column.name, "outlier", severity, count, sample, bounds))
    return anomalies


def _number(value: Any) -> float | int:
    return value if isinstance(value, int | float) else float(value)


def _shape(column: str) -> sql.Composable:
    """A value's shape: runs of digits become '9', runs of letters 'a' (other characters stay)."""
    return sql.SQL("regexp_replace(regexp_replace(b.{}, '[0-9]+', '9', 'g'), '[A-Za-z]+', 'a', 'g')").format(
        sql.Identifier(column)
    )


def pattern_violations(
    conn: psycopg.Connection, suite: str, source: TableSource, profile: TableProfile, sample_size: int = 10
) -> list[Anomaly]:
    anomalies = []
    for column in profile.columns:
        non_null = profile.row_count - column.null_count
        if column.kind != "string" or non_null == 0:
            continue
        dominant = conn.execute(
            sql.SQL(
                "SELECT {shape}, count(*) FROM {rel} AS b WHERE b.{col} IS NOT NULL GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT 1"
            ).format(shape=_shape(column.name), rel=source.relation(), col=sql.Identifier(column.name))
        ).fetchone()
        if dominant is None:  # the values were deleted after the profile counted them
            continue
        shape, matching = dominant
        if matching == non_null or matching / non_null < DOMINANT_SHARE:
            continue
        sample = conn.execute(
            bound(
                sql.SQL(
                    "SELECT b.{col} FROM {rel} AS b WHERE b.{col} IS NOT NULL AND {shape} <> %s LIMIT %s"
                ).format(col=sql.Identifier(column.name), rel=source.relation(), shape=_shape(column.name))
            ),
            (shape, sample_size),
        ).fetchall()
        anomalies.append(
            Anomaly(
                suite,
                column.name,
                "pattern_violation",
                "medium",
                non_null - matching,
                [r[0] for r in sample],
                {"dominant_pattern": shape, "dominant_share": matching / non_null},
            )
        )
    return anomalies


def detect_anomalies(
    conn: psycopg.Connection, suite: str, source: TableSource, profile: TableProfile
) -> list[Anomaly]:
    return iqr_outliers(conn, suite, source, profile) + pattern_violations(conn, suite, source, profile)


def trends(
    results: list[SuiteResult], history: dict[str, list[ScorePoint]]
) -> tuple[list[Trend], list[Anomaly]]:
    """This run against the previous runs: change, direction, and trend-break anomalies.

    ``history`` must hold only *previous* runs. A break is a score more than
    ``TREND_BREAK_DROP`` points below the mean of those runs.
    """
    out: list[Trend] = []
    breaks: list[Anomaly] = []
    for result in results:
        previous_scores = [p.score for p in history.get(result.suite, [])]
        previous = previous_scores[-1] if previous_scores else None
        change = result.score - previous if previous is not None else None
        direction: Direction = "stable"
        if change is not None and abs(change) > TREND_TOLERANCE:
            direction = "up" if change > 0 else "down"
        baseline = fmean(previous_scores) if previous_scores else None
        out.append(Trend(result.suite, result.score, previous, change, direction, baseline))
        if baseline is not None and baseline - result.score > TREND_BREAK_DROP:
            breaks.append(
                Anomaly(
                    result.suite,
                    "score",
                    "trend_break",
                    "high",
                    len(result.violations),
                    [round(result.score, 2)],
                    {"baseline": baseline, "drop": baseline - result.score},
                )
            )
    return out, breaks
