"""Agent metrics against a real state database: tasks by final status, time by attempt."""

from __future__ import annotations

from tasks import agent_queue as queue
from tasks.agent_metrics import agent_metrics, metrics_table
from tasks.db import connection
from tasks.state import state_url


def _attempt(url: str, task_id: int, worker: str, outcome: queue.Outcome, seconds: float) -> None:
    """One finished attempt of a claimed task that took ``seconds``."""
    run = queue.start_attempt(url, task_id, worker, None)
    queue.finish_attempt(url, run.run_id, worker, outcome, result={} if outcome == "completed" else None)
    with connection(url) as conn:
        conn.execute("UPDATE flowyard.agent_runs SET seconds = %s WHERE id = %s", (seconds, run.run_id))


def test_tasks_count_by_final_status_and_time_by_attempt(fresh_db: str) -> None:
    url = state_url(fresh_db)
    worker = queue.new_worker_id()
    resumed, doomed, stopped, idle = (
        queue.create_task(url, queue.NewTask(title=title, agent_type="coder"))
        for title in ("resumed", "doomed", "stopped", "idle")
    )
    reviewed = queue.create_task(
        url, queue.NewTask(title="reviewed", agent_type="writer", requires_review=True)
    )
    queue.create_task(url, queue.NewTask(title="never run", agent_type="unused"))
    queue.cancel_task(url, idle)
    assert len(queue.claim_ready(url, worker, 10, {"coder", "writer"})) == 4
    _attempt(url, resumed, worker, "failed", 2.0)  # crashed once, then resumed to completion
    _attempt(url, resumed, worker, "completed", 3.0)
    _attempt(url, doomed, worker, "timeout", 5.0)
    queue.fail_task(url, doomed, worker, "gave up after the last retry")
    _attempt(url, stopped, worker, "interrupted", 100.0)
    _attempt(url, reviewed, worker, "completed", 1.5)
    assert queue.get_task(url, reviewed).status == "review"

    metrics = {m.agent_type: m for m in agent_metrics(url)}
    assert set(metrics) == {"coder", "writer"}, "a type with no finished task nor attempt has no row"
    coder = metrics["coder"]
    assert (coder.tasks_completed, coder.tasks_failed, coder.error_rate) == (1, 1, 0.5)
    assert (coder.attempts, coder.interrupted) == (3, 1)
    assert (coder.total_execution_seconds, coder.average_execution_seconds) == (10.0, round(10.0 / 3, 3))
    writer = metrics["writer"]
    assert (writer.tasks_completed, writer.tasks_failed, writer.error_rate, writer.attempts) == (1, 0, 0.0, 1)
    row = next(r for r in metrics_table(list(metrics.values())) if r["agent_type"] == "coder")
    assert row["tasks_failed"] == 1 and row["attempts"] == 3 and isinstance(row["last_execution_at"], str)
