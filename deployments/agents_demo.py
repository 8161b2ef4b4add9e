"""The agent-queue demo: a small dependent task graph for the reference agent.

``plan → (backend, frontend) → integrate``, with a crash in ``backend`` that the retry
resumes from its checkpoint, so one demo run shows DAG order, retries and resumption.
"""

from __future__ import annotations

from typing import Any

from tasks import agent_queue as queue
from tasks.state import state_url


def agent_queue_demo_parameters(demo_url: str) -> dict[str, Any]:
    """Enqueue the demo graph in the demo database; the run drains it with two agents."""
    url = state_url(demo_url)

    def add(title: str, payload: dict[str, Any], *after: int, priority: queue.Priority = "medium") -> int:
        task = queue.NewTask(
            title=title,
            agent_type="reference",
            priority=priority,
            payload={"steps": 3, "sleep": 0.2, **payload},
            blocked_by=after,
        )
        return queue.create_task(url, task)

    plan = add("plan the feature", {}, priority="high")
    backend = add("build the backend", {"crash_after": 2, "garbage": True}, plan)
    frontend = add("build the frontend", {}, plan)
    add("integrate and report", {"artifact": True}, backend, frontend, priority="critical")
    return {"database_url": demo_url, "max_agents": 2}
