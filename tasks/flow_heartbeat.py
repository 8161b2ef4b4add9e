"""Flow-run heartbeats that do not hold up the end of a sync flow.

Prefect 3.8 and 3.9 emit a flow run's heartbeats from a daemon thread that sleeps in
one-second steps, and the *sync* flow engine joins that thread after the flow function
has returned and the run is already Completed. Every sync flow call therefore ends on the
next whole second after its start: measured 0.6–0.9 s of waiting per run on the agent queue
and a 1.0 s step in bulk-copy times (docs/benchmarks.md). The *async* engine enters the same
context manager with ``join_on_exit=False``: the stop event is set, and the thread notices it
within a second and returns without emitting again.

flowyard gives its sync flows the async engine's behaviour instead of turning heartbeats off,
because Prefect's zombie-flow automations key on those heartbeat events.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from prefect import flow_engine

_prefect_send_heartbeats = flow_engine._send_heartbeats


@contextmanager
def _send_heartbeats_without_join(engine: Any, join_on_exit: bool = True) -> Iterator[None]:
    """Prefect's heartbeat context, never waiting for the thread's current one-second sleep."""
    with _prefect_send_heartbeats(engine, join_on_exit=False):
        yield


def end_flows_without_heartbeat_wait() -> None:
    """Install the non-joining heartbeat context for every flow run in this process (idempotent).

    The engine looks ``_send_heartbeats`` up in its module at each run, so runs started after
    this call, in-process or in a deployment's flow-run process, get it."""
    flow_engine._send_heartbeats = _send_heartbeats_without_join
