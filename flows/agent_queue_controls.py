"""The ``flowyard queue`` controls as flows, so the UI, a REST trigger or an automation can use them:
``agent-task-create``, ``agent-task-list``, ``agent-task-cancel``, ``agent-task-retry``,
``agent-task-submit`` and ``agent-task-approve``.
``queue run`` is the ``run-agent-queue`` flow itself. Each one is a thin wrapper around the same
``tasks.agent_queue`` functions the CLI calls and returns the tasks as JSON; the list is also
published as a table artifact. ``""`` for a filter whose default is None (``status``,
``blocked_by``, ``payload``) is that default, and a value of the wrong type (``""`` or ``null`` for
a task id) fails the run in one line (:mod:`tasks.flow_parameters`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from prefect.artifacts import create_table_artifact
from pydantic_core import to_jsonable_python

from tasks import agent_queue as queue
from tasks.agent_dirs import check_new_workdir
from tasks.flow_parameters import checked_flow
from tasks.state import state_url


@checked_flow(name="agent-task-create", blank_is_default=("blocked_by", "payload", "output_dir", "logs_dir"))
def agent_task_create(
    title: str,
    agent_type: str = "reference",
    priority: str = "medium",
    task_type: str = "task",
    description: str = "",
    blocked_by: list[int] | None = None,
    payload: dict[str, Any] | None = None,
    workdir: str = "",
    requires_review: bool = False,
    draft: bool = False,
    database_url: str | None = None,
    output_dir: str | None = None,
    logs_dir: str | None = None,
) -> dict[str, Any]:
    """Add a task to the queue (``pending``, or ``draft``); returns it as stored.

    ``workdir`` is checked against ``output_dir`` and ``logs_dir``: give those of the
    ``run-agent-queue`` runs that will run the task when they are not the defaults.

    ``priority`` and ``task_type`` are plain strings, checked by ``NewTask.from_input``: a bad
    value then fails the run with one line naming the choices, not Prefect's validation dump."""
    new = queue.NewTask.from_input(
        title,
        agent_type,
        priority,
        task_type,
        description=description,
        blocked_by=tuple(blocked_by or ()),
        payload=payload or {},
        workdir=workdir,
        requires_review=requires_review,
        draft=draft,
    )
    check_new_workdir(workdir, output_dir, logs_dir)
    url = state_url(database_url)
    return _as_json(queue.get_task(url, queue.create_task(url, new)))


@checked_flow(name="agent-task-list", blank_is_default=("status",))
def agent_task_list(status: str | None = None, database_url: str | None = None) -> list[dict[str, Any]]:
    """The queue (or the tasks in one status), oldest first, with the ``agent-tasks`` table artifact.
    An empty ``status`` (the UI's form, the field left blank) lists every task, as None does."""
    tasks = queue.list_tasks(state_url(database_url), status)
    create_table_artifact(
        [_table_row(t) for t in tasks], key="agent-tasks", description=f"Agent tasks ({status or 'all'})"
    )
    return [_as_json(t) for t in tasks]


@checked_flow(name="agent-task-cancel")
def agent_task_cancel(task_id: int, database_url: str | None = None) -> dict[str, Any]:
    """Cancel a task; a running agent is stopped gracefully within a heartbeat."""
    return _changed(queue.cancel_task, task_id, database_url)


@checked_flow(name="agent-task-retry")
def agent_task_retry(task_id: int, database_url: str | None = None) -> dict[str, Any]:
    """Queue a failed or cancelled task again (a task cancelled as a draft is a draft again); it
    resumes from its last checkpoint."""
    return _changed(queue.retry_task, task_id, database_url)


@checked_flow(name="agent-task-submit")
def agent_task_submit(task_id: int, database_url: str | None = None) -> dict[str, Any]:
    """Release a draft into the queue. Without it a draft made with ``agent-task-create``
    (``draft``), or cancelled as one and retried, could be released from the CLI only."""
    return _changed(queue.submit_task, task_id, database_url)


@checked_flow(name="agent-task-approve")
def agent_task_approve(task_id: int, database_url: str | None = None) -> dict[str, Any]:
    """Accept a task waiting in review as completed, which makes its dependents ready. Without it a
    task made with ``agent-task-create`` (``requires_review``) stayed in review, its dependents
    waiting, until someone ran ``flowyard queue approve``; cancelling is how a result is rejected."""
    return _changed(queue.approve_task, task_id, database_url)


def _changed(change: Callable[[str, int], str], task_id: int, database_url: str | None) -> dict[str, Any]:
    """One status change of the queue (cancel, retry, submit, approve), then the task as it now is:
    the four control flows differ only in the change, each keeping its own signature for its
    deployment's parameter schema."""
    url = state_url(database_url)
    change(url, task_id)
    return _as_json(queue.get_task(url, task_id))


def _as_json(task: queue.AgentTask) -> dict[str, Any]:
    """A task as the flow's result: timestamps as ISO strings, dependencies as a list."""
    value: dict[str, Any] = to_jsonable_python(asdict(task))
    return value


def _table_row(task: queue.AgentTask) -> dict[str, Any]:
    """The columns ``flowyard queue list`` shows, for the artifact."""
    return {
        "id": task.id,
        "status": task.status,
        "priority": task.priority,
        "agent_type": task.agent_type,
        "attempts": task.attempts,
        "checkpoint": task.checkpoint_label,
        "after": ",".join(map(str, task.blocked_by)),
        "title": task.title,
        "note": task.note,
    }
