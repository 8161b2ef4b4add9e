"""Per-agent-type metrics (seed 001's ``Agent.metrics``), computed from ``flowyard.agent_runs``.

Each attempt is one run: ``completed`` counts successful attempts, ``failed`` counts failed
and timed-out ones, execution time sums finished attempts, and the error rate is
failed / (completed + failed). Interrupted attempts (graceful shutdown) count in neither.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime

from prefect.artifacts import create_table_artifact

from tasks.db import connection


@dataclass(frozen=True)
class AgentTypeMetrics:
    agent_type: str
    tasks_completed: int
    tasks_failed: int
    interrupted: int
    total_execution_seconds: float
    average_execution_seconds: float
    error_rate: float
    last_execution_at: datetime | None


def agent_metrics(url: str) -> list[AgentTypeMetrics]:
    with connection(url) as conn:
        rows = conn.execute(
            """
            SELECT agent_type,
                   count(*) FILTER (WHERE outcome = 'completed'),
                   count(*) FILTER (WHERE outcome IN ('failed', 'timeout')),
                   count(*) FILTER (WHERE outcome = 'interrupted'),
                   coalesce(sum(seconds) FILTER (WHERE outcome <> 'interrupted'), 0),
                   coalesce(avg(seconds) FILTER (WHERE outcome <> 'interrupted'), 0),
                   max(finished_at)
              FROM flowyard.agent_runs
             WHERE outcome IS NOT NULL
             GROUP BY agent_type ORDER BY agent_type
            """
        ).fetchall()
    return [
        AgentTypeMetrics(
            agent_type=r[0],
            tasks_completed=r[1],
            tasks_failed=r[2],
            interrupted=r[3],
            total_execution_seconds=round(float(r[4]), 3),
            average_execution_seconds=round(float(r[5]), 3),
            error_rate=round(r[2] / (r[1] + r[2]), 4) if r[1] + r[2] else 0.0,
            last_execution_at=r[6],
        )
        for r in rows
    ]


def metrics_table(metrics: list[AgentTypeMetrics]) -> list[dict[str, object]]:
    """Rows for a Prefect table artifact or the CLI (timestamps as ISO text)."""
    return [
        {**asdict(m), "last_execution_at": m.last_execution_at.isoformat() if m.last_execution_at else ""}
        for m in metrics
    ]


def publish_metrics(metrics: list[AgentTypeMetrics]) -> None:
    """Show the metrics as the ``agent-metrics`` table artifact (a new version per call)."""
    create_table_artifact(
        table=metrics_table(metrics),
        key="agent-metrics",
        description="Agent metrics per agent type: completed, failed, execution time, error rate",
    )
