"""Cancellation requests for flow runs that no runner supervises.

A run of a served deployment is cancelled by its runner: it sees the run go ``CANCELLING``
in the Prefect API and sends the flow process SIGTERM, which the flow handles. A flow called
in-process (``flowyard queue run`` in a terminal, a script) has no runner, so cancelling it
from the UI or API would change its state and nothing else. A long-running flow asks
:class:`CancelWatch` from its wait loop instead.
"""

from __future__ import annotations

import time

import httpx
from prefect import get_client
from prefect.context import FlowRunContext


class CancelWatch:
    """Whether the current flow run is ``CANCELLING`` in the Prefect API, asked at most once
    per ``interval`` seconds (one GET on the flow run's own client).

    Inert outside a flow run and for deployment runs: their runner or worker delivers the
    cancellation as SIGTERM, and a second stop path would race it."""

    def __init__(self, interval: float = 1.0) -> None:
        context = FlowRunContext.get()
        run = context.flow_run if context is not None else None
        self._flow_run_id = run.id if run is not None and run.deployment_id is None else None
        self._interval = interval
        self._next_check = time.monotonic()

    def requested(self) -> bool:
        if self._flow_run_id is None or time.monotonic() < self._next_check:
            return False
        self._next_check = time.monotonic() + self._interval
        try:
            with get_client(sync_client=True) as client:
                state = client.read_flow_run(self._flow_run_id).state
        except httpx.HTTPError:
            return False  # an API blip must not stop the agents; the next check asks again
        return state is not None and state.is_cancelling()
