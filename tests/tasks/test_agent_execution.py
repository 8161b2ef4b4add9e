"""A fleet's graceful shutdown, against the real queue in PostgreSQL."""

from __future__ import annotations

import threading
from pathlib import Path

from tasks import agent_queue as queue
from tasks.agent_execution import AgentSetup, Fleet, _finish
from tasks.agent_process import (
    DEFAULT_TEMPLATES,
    REFERENCE_TEMPLATE,
    AgentJob,
    AgentLimits,
    AgentOutcome,
    AgentProcess,
)
from tasks.state import state_url


def test_a_shutdown_reports_back_in_the_queue_only_the_tasks_that_are(fresh_db: str, tmp_path: Path) -> None:
    """Every attempt the fleet held was reported "back in the queue" (the Cancelled state's message,
    the log), also one whose agent had finished as the stop came and whose task was completed."""
    url = state_url(fresh_db)
    limits = AgentLimits(grace_seconds=0.0)
    setup = AgentSetup(url, queue.new_worker_id(), tmp_path, tmp_path / "logs", DEFAULT_TEMPLATES, limits)
    finished, stopped = (
        queue.create_task(url, queue.NewTask(title=title, agent_type="reference")) for title in ("finished", "stopped")
    )
    queue.claim_ready(url, setup.worker, 2)
    runs = {t: queue.start_attempt(url, t, setup.worker, None).run_id for t in (finished, stopped)}
    fleet = Fleet(setup)
    try:
        for task_id in runs:
            job = AgentJob(task_id, 1, "t", "task", "", {}, None, tmp_path / f"task-{task_id}", setup.worker)
            fleet.add(task_id, AgentProcess(job, REFERENCE_TEMPLATE, on_message=lambda s, m: None, limits=limits))
        result: list[list[int]] = []
        shutdown = threading.Thread(target=lambda: result.append(fleet.shutdown("graceful_shutdown: test")))
        shutdown.start()
        # As the stop reaches them, one attempt's agent has just completed, the other is interrupted:
        # each attempt's own bookkeeping settles its task, as run_agent does.
        queue.finish_attempt(url, runs[finished], setup.worker, "completed", result={})
        interrupted = AgentOutcome("interrupted", None, error="graceful_shutdown: test")
        _finish(setup, stopped, 1, runs[stopped], interrupted, final=False)
        for task_id in runs:
            fleet.remove(task_id)
        shutdown.join(60)
    finally:
        fleet.reaper.close()
    assert result == [[stopped]]
    assert (queue.get_task(url, finished).status, queue.get_task(url, stopped).status) == ("completed", "pending")


def test_a_claimed_task_holds_its_agent_slot_until_freed_and_freeing_wakes_the_loop(
    fresh_db: str, tmp_path: Path
) -> None:
    """The flow claims only into free slots. A slot is freed twice for most tasks (by the attempt
    that needs it no more, then by its task run's end): the second must not free another."""
    url = state_url(fresh_db)
    setup = AgentSetup(url, queue.new_worker_id(), tmp_path, tmp_path / "logs", DEFAULT_TEMPLATES)
    for title in ("one", "two"):
        queue.create_task(url, queue.NewTask(title=title, agent_type="reference"))
    fleet = Fleet(setup)
    try:
        one, two = queue.claim_ready(url, setup.worker, 2)
        fleet.claimed(one)
        fleet.claimed(two)
        assert fleet.busy_slots() == 2
        woke = threading.Event()

        def wait() -> None:
            fleet.wait_for_slot(timeout=600)
            woke.set()

        waiter = threading.Thread(target=wait)
        waiter.start()
        fleet.free_slot(one.id)
        waiter.join(600)
        assert woke.is_set() and fleet.busy_slots() == 1
        fleet.free_slot(one.id)
        assert fleet.busy_slots() == 1
        fleet.free_slot(two.id)
        assert fleet.busy_slots() == 0
    finally:
        fleet.reaper.close()
