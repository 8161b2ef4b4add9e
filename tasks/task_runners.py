"""Task runners by name, so a flow can move from threads to a Dask cluster by configuration alone."""

from __future__ import annotations

from typing import Any, Literal, cast

from prefect.futures import PrefectFuture
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from tasks.errors import UserError

RunnerKind = Literal["threads", "dask"]


def thread_pool(max_workers: int) -> TaskRunner[PrefectFuture[Any]]:
    """A thread pool for ``@flow(task_runner=...)``.

    Prefect types that parameter as the invariant ``TaskRunner[PrefectFuture[Any]]``, which no
    concrete runner matches (Prefect casts its own default the same way), so the cast is made
    once here instead of an ignore on every flow.
    """
    return cast("TaskRunner[PrefectFuture[Any]]", ThreadPoolTaskRunner(max_workers=max_workers))


def build_task_runner(kind: str, max_workers: int, dask_address: str | None = None) -> TaskRunner:
    """``threads``: a bounded thread pool. ``dask``: prefect-dask, on ``dask_address`` or a local
    cluster of one process with ``max_workers`` threads."""
    if kind == "threads":
        return ThreadPoolTaskRunner(max_workers=max_workers)
    if kind == "dask":
        from prefect_dask import DaskTaskRunner

        if dask_address:
            return DaskTaskRunner(address=dask_address)
        return DaskTaskRunner(
            cluster_kwargs={"n_workers": 1, "threads_per_worker": max_workers, "processes": False}
        )
    raise UserError(f"unknown task runner {kind!r}; use 'threads' or 'dask'")
