"""Task runners by name, so a flow can move from threads to a Dask cluster by configuration alone."""

from __future__ import annotations

import itertools
import queue
from collections.abc import Iterator, Sequence
from typing import Any, Literal, TypeVar, cast

from prefect import Task
from prefect.futures import PrefectFuture
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from tasks.errors import UserError

RunnerKind = Literal["threads", "dask"]
R = TypeVar("R")


def thread_pool(max_workers: int) -> TaskRunner[PrefectFuture[Any]]:
    """A thread pool for ``@flow(task_runner=...)``.

    Prefect types that parameter as the invariant ``TaskRunner[PrefectFuture[Any]]``, which no
    concrete runner matches (Prefect casts its own default the same way), so the cast is made
    once here instead of an ignore on every flow.
    """
    return cast("TaskRunner[PrefectFuture[Any]]", ThreadPoolTaskRunner(max_workers=max_workers))


def check_task_runner(kind: str, max_workers: int) -> None:
    """Refuse an unknown runner or a pool of fewer than one worker as a one-line user error.

    Flows call it with their other parameter checks, before they change anything: the runner
    itself is built later, once the work is planned.
    """
    if kind not in ("threads", "dask"):
        raise UserError(f"unknown task runner {kind!r}; use 'threads' or 'dask'")
    if max_workers < 1:
        raise UserError(
            f"parallelism must be at least 1, got {max_workers}; leave it unset for FLOWYARD_MAX_WORKERS"
        )


def build_task_runner(kind: str, max_workers: int, dask_address: str | None = None) -> TaskRunner:
    """``threads``: a bounded thread pool. ``dask``: prefect-dask, on ``dask_address`` or a local
    cluster of one process with ``max_workers`` threads."""
    check_task_runner(kind, max_workers)
    if kind == "threads":
        return ThreadPoolTaskRunner(max_workers=max_workers)
    from prefect_dask import DaskTaskRunner

    if dask_address:
        return DaskTaskRunner(address=dask_address)
    return DaskTaskRunner(
        cluster_kwargs={"n_workers": 1, "threads_per_worker": max_workers, "processes": False}
    )


def submit_bounded(
    runner: TaskRunner[Any], task: Task[..., R], parameters: Sequence[dict[str, Any]], limit: int
) -> Iterator[tuple[int, PrefectFuture[R]]]:
    """Submit ``task`` once per parameter set, never more than ``limit`` unfinished at once; yield
    ``(index, future)`` as each finishes, in the order they finish.

    A thread pool bounds itself, but a Dask cluster runs as many tasks as it has threads, and
    each bulk chunk holds a source and a target connection: submitting every chunk at once
    would let the cluster's size, not ``parallelism``, decide how many connections are open.
    The next task is submitted before the finished one is handed back, so the runner never
    idles while the caller reads a result.
    """
    finished: queue.SimpleQueue[tuple[int, PrefectFuture[R]]] = queue.SimpleQueue()
    waiting = iter(enumerate(parameters))

    def submit(index: int, params: dict[str, Any]) -> None:
        future = runner.submit(task, params)
        future.add_done_callback(lambda done: finished.put((index, done)))

    running = 0
    for index, params in itertools.islice(waiting, limit):
        submit(index, params)
        running += 1
    while running:
        done = finished.get()
        running -= 1
        for index, params in itertools.islice(waiting, 1):
            submit(index, params)
            running += 1
        yield done
