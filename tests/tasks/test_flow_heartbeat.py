"""A sync flow call returns without waiting out its heartbeat thread's one-second sleep."""

from __future__ import annotations

import threading

from prefect import flow

import flows  # noqa: F401  (installs flowyard's heartbeat context, as every flow module does)


def _heartbeat_threads() -> list[threading.Thread]:
    """Prefect's heartbeat thread runs ``heartbeat_loop`` through a copied contextvars context."""
    return [
        thread
        for thread in threading.enumerate()
        if any(getattr(arg, "__name__", "") == "heartbeat_loop" for arg in getattr(thread, "_args", ()))
    ]


def test_flow_returns_before_its_heartbeat_thread_wakes(prefect_api):
    seen: list[threading.Thread] = []

    @flow(name="heartbeat-no-wait")
    def short_flow() -> int:
        seen.extend(_heartbeat_threads())
        return 7

    assert short_flow() == 7
    # The thread was running during the flow (heartbeats stay on), and the flow body ended long
    # before its first one-second sleep did: Prefect's own sync engine joins it here, so it would
    # be dead already; flowyard's leaves it to notice the stop event by itself.
    assert len(seen) == 1
    heartbeat = seen[0]
    assert heartbeat.is_alive()
    heartbeat.join(timeout=5)
    assert not heartbeat.is_alive()
