"""A sync flow call returns without waiting out its heartbeat thread's one-second sleep."""

from __future__ import annotations

import threading

from prefect import flow

import flows  # noqa: F401  (installs flowyard's heartbeat context, as every flow module does)
from tests.process_support import GUARD_SECONDS


def _heartbeat_threads() -> list[threading.Thread]:
    """Prefect's heartbeat thread runs ``heartbeat_loop`` through a copied contextvars context."""
    return [
        thread
        for thread in threading.enumerate()
        if any(getattr(arg, "__name__", "") == "heartbeat_loop" for arg in getattr(thread, "_args", ()))
    ]


RUNS = 3
"""Flow calls made: a call returns between two of the thread's one-second ticks, so it can, rarely,
return just as a tick lets the thread see the stop event and end; not on every one of three calls."""


def test_flow_returns_before_its_heartbeat_thread_wakes(prefect_api):
    seen: list[threading.Thread] = []

    @flow(name="heartbeat-no-wait")
    def short_flow() -> int:
        seen.extend(t for t in _heartbeat_threads() if t not in seen)  # this run's: earlier ones may live on
        return 7

    alive_at_return = []
    for _ in range(RUNS):
        assert short_flow() == 7
        alive_at_return.append(seen[-1].is_alive())
    # Each run's thread was running during the flow (heartbeats stay on). Prefect's own sync engine
    # joins it before the call returns, so it would be dead at every return; flowyard's leaves it
    # to notice the stop event by itself at its next tick.
    assert len(seen) == RUNS
    assert any(alive_at_return), alive_at_return
    for heartbeat in seen:
        heartbeat.join(timeout=GUARD_SECONDS)
        assert not heartbeat.is_alive()
