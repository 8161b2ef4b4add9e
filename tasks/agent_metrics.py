"""Per-agent-type metrics (seed 001's ``Agent.metrics``).

Task counts come from the tasks' final status in ``flowyard.agent_tasks``: a task that
crashed once and then completed is one completed task, not one failure and one success.
``tasks_completed`` counts tasks ``completed`` (or waiting in ``review``: the agent's part is
done), ``tasks_failed`` tasks ``failed``, and the error rate is failed / (completed + failed)
tasks. Execution time comes from the attempts in ``flowyard.agent_runs``: ``attempts`` counts
finished attempts that completed, failed or timed out, the total sums their seconds and the
average is per such attempt. Interrupted attempts (graceful shutdown, or a dead worker's once
the next run recovered them) are counted apart (``interrupted``) and left out of the times.
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
    attempts: int
    interrupted: int
    total_execution_seconds: float
    average_execution_seconds: float
    error_rate: float
    last_execution_at: datetime | None


def agent_metrics(url: str) -> list[AgentTypeMetrics]:
    with connection(url) as conn:
        rows = conn.execute(
            """
            WITH tasks AS (
                SELECT agent_type,
                       count(*) FILTER (WHERE status IN ('completed', 'review')) AS completed,
                       count(*) FILTER (WHERE status = 'failed') AS failed
                  FROM flowyard.agent_tasks
                 GROUP BY agent_type
            ), runs AS (
                SELECT agent_type,
                       count(*) FILTER (WHERE outcome <> 'interrupted') AS attempts,
                       count(*) FILTER (WHERE outcome = 'interrupted') AS interrupted,
                       sum(seconds) FILTER (WHERE outcome <> 'interrupted') AS total,
                       avg(seconds) FILTER (WHERE outcome <> 'interrupted') AS average,
                       max(finished_at) AS last
                  FROM flowyard.agent_runs
                 WHERE outcome IS NOT NULL
                 GROUP BY agent_type
            )
            SELECT agent_type, coalesce(t.completed, 0), coalesce(t.failed, 0), coalesce(r.attempts, 0),
                   coalesce(r.interrupted, 0), coalesce(r.total, 0), coalesce(r.average, 0), r.last
              FROM tasks t FULL JOIN runs r USING (agent_type)
             WHERE t.completed + t.failed > 0 OR r.agent_type IS NOT NULL
             ORDER BY agent_type
            """
        ).fetchall()
    return [
        AgentTypeMetrics(
            agent_type=r[0],
            tasks_completed=r[1],
            tasks_failed=r[2],
            attempts=r[3],
            interrupted=r[4],
            total_execution_seconds=round(float(r[5]), 3),
            average_execution_seconds=round(float(r[6]), 3),
            error_rate=round(r[2] / (r[1] + r[2]), 4) if r[1] + r[2] else 0.0,
            last_execution_at=r[7],
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
        description="Agent metrics per agent type: tasks completed and failed, attempts, execution time, "
        "error rate (failed / finished tasks)",
    )
