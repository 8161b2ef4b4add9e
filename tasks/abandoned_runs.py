"""Flow runs whose process is gone, marked Crashed in Prefect by the run that found out.

A worker killed with SIGKILL (or lost with its host) never reports an end, so its ``queue run``
flow run stays Running in the UI and the API until flowyard's zombie-flow automation marks it,
one window after its last heartbeat (``tasks.prefect_runtime.keep_zombie_automation``; none on a
Prefect server flowyard did not start). The next run's recovery, which hands that worker's tasks
back, knows the worker is gone, and says so there at once, naming the worker.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from uuid import UUID

import httpx
from prefect import get_client
from prefect.client.schemas.objects import StateType
from prefect.exceptions import ObjectNotFound
from prefect.states import Crashed

_UNFINISHED = (StateType.RUNNING, StateType.CANCELLING)
"""What a dead process leaves its flow run in; any other state was set by someone else."""


def crash_flow_runs(flow_run_ids: Collection[UUID], message: str) -> list[UUID]:
    """Set each run still Running or Cancelling to Crashed with ``message``; returns those set.

    Best effort, run by run: the tasks are already handed back, so an unreachable API or a run
    deleted meanwhile is a warning, not a failed recovery. No runs, no client (a worker that
    never ran in a flow run, as a script's, has none)."""
    crashed: list[UUID] = []
    if not flow_run_ids:
        return crashed
    with get_client(sync_client=True) as client:
        for run_id in flow_run_ids:
            try:
                state = client.read_flow_run(run_id).state
                if state is None or state.type not in _UNFINISHED:
                    continue
                client.set_flow_run_state(run_id, Crashed(message=message), force=True)
            except (ObjectNotFound, httpx.HTTPError) as exc:
                logging.getLogger("flowyard.agents").warning("flow run %s not marked Crashed: %s", run_id, exc)
                continue
            crashed.append(run_id)
    return crashed
