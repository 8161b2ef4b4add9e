"""Score history in ``flowyard.quality_scores``: what trends compare against and the chart draws.

One row per suite per run. Reads take the newest ``limit`` runs per suite, returned
oldest first so callers can plot or diff them directly.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from psycopg.types.json import Jsonb

from quality.runner import SuiteResult
from tasks.db import connection


@dataclass(frozen=True)
class ScorePoint:
    run_id: str
    checked_at: dt.datetime
    score: float
    violations: int


def record_scores(state: str, run_id: str, results: list[SuiteResult]) -> None:
    """Append this run's score per suite."""
    with connection(state) as conn:
        for r in results:
            conn.execute(
                """
                INSERT INTO flowyard.quality_scores
                    (run_id, suite, table_name, score, row_count, violations, details)
                VALUES (%s, %s, %s, %s, %s, %s, %s)
                """,
                (
                    run_id,
                    r.suite,
                    r.target,
                    r.score,
                    r.row_count,
                    len(r.violations),
                    Jsonb({v.rule: v.unexpected_count for v in r.violations} | {"window": r.window}),
                ),
            )


def score_history(state: str, suites: list[str], limit: int = 20) -> dict[str, list[ScorePoint]]:
    """The last ``limit`` recorded scores per suite, oldest first."""
    with connection(state) as conn:
        rows = conn.execute(
            """
            SELECT suite, run_id, checked_at, score, violations FROM (
                SELECT *, row_number() OVER (PARTITION BY suite ORDER BY checked_at DESC, id DESC) AS rn
                FROM flowyard.quality_scores WHERE suite = ANY(%s)
            ) AS s WHERE rn <= %s ORDER BY suite, checked_at, id
            """,
            (suites, limit),
        ).fetchall()
    history: dict[str, list[ScorePoint]] = {name: [] for name in suites}
    for suite, run_id, checked_at, score, violations in rows:
        history[suite].append(ScorePoint(run_id, checked_at, score, violations))
    return history
