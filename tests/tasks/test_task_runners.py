"""The in-flight limit of task submission, on a real Prefect thread pool with more workers than it."""

from __future__ import annotations

import threading

import pytest
from prefect import flow, task
from prefect.task_runners import ThreadPoolTaskRunner

from tasks.task_runners import submit_bounded

pytestmark = pytest.mark.usefixtures("prefect_api")


def test_submit_bounded_keeps_the_limit_in_flight_and_every_slot_busy():
    """Never more than ``limit`` tasks run although the pool has eight workers, and the first
    ``limit`` run together: the cap bounds the runner, it does not serialise it."""
    limit, total = 3, 10
    lock = threading.Lock()
    running = [0]
    peak = [0]
    all_started = threading.Event()

    @task
    def hold(index: int) -> bool:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
            if running[0] == limit:
                all_started.set()
        # The first `limit` tasks wait for each other; the bound only stops a regression from
        # hanging the suite (ten minutes: far beyond any scheduling delay), not a timing assertion.
        together = all_started.wait(timeout=600) if index < limit else True
        with lock:
            running[0] -= 1
        return together

    @flow
    def drive() -> list[tuple[int, bool]]:
        with ThreadPoolTaskRunner(max_workers=8) as runner:
            finished = submit_bounded(runner, hold, [{"index": i} for i in range(total)], limit)
            return [(index, future.result()) for index, future in finished]

    results = drive()
    assert sorted(index for index, _ in results) == list(range(total))
    assert all(together for _, together in results)
    assert peak[0] == limit
