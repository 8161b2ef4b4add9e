"""A real ``python -m deployments.serve`` serving run-agent-queue, and one run of it; what the
real Prefect server stored."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import ROOT
from tests.process_support import GUARD_SECONDS

AGENT_QUEUE_DEPLOYMENT = "run-agent-queue-test"


def serve_only_agent_queue(tmp_path: Path) -> Path:
    """A ``prefect.yaml`` declaring run-agent-queue alone, without a schedule."""
    spec = tmp_path / "prefect.yaml"
    spec.write_text(
        textwrap.dedent(
            f"""
            deployments:
              - name: {AGENT_QUEUE_DEPLOYMENT}
                entrypoint: flows/run_agent_queue.py:run_agent_queue
                parameters: {{}}
            """
        )
    )
    return spec


@contextmanager
def served_agent_queue_run(
    tmp_path: Path, api: str, parameters: dict[str, Any], env: dict[str, str] | None = None
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """Start the deployment server (its own session, its output in ``serve.log``), create one
    run-agent-queue run with ``parameters`` once it serves; yield the server and the run's id.
    A server still running at the end gets SIGTERM, as ``flowyard down`` sends it."""
    from deployments.trigger import create_flow_run

    with (tmp_path / "serve.log").open("wb") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "deployments.serve", str(serve_only_agent_queue(tmp_path))],
            cwd=ROOT,
            env={**os.environ, "PREFECT_RUNNER_POLL_FREQUENCY": "1", **(env or {})},
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                run_id = create_flow_run(api, "run-agent-queue", AGENT_QUEUE_DEPLOYMENT, parameters)
                break
            except Exception:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise
                time.sleep(0.5)
        yield server, run_id
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
        server.wait(timeout=120)


def stored_events(api: str, event_filter: dict[str, Any], expected: int = 1) -> list[dict[str, Any]]:
    """The events the Prefect server at ``api`` stored that match ``event_filter``, read once
    there are ``expected`` of them (or after :data:`GUARD_SECONDS`: the caller's assertion then
    shows what did arrive).

    This process's event worker is drained first; the server then persists what it received in
    batches, flushed every 5 s by default, so an emitted event is readable only seconds later,
    more on a loaded machine."""
    from prefect.events.worker import EventsWorker

    EventsWorker.drain_all()
    body = {"filter": event_filter, "limit": 50}
    deadline = time.monotonic() + GUARD_SECONDS
    while True:
        response = httpx.post(f"{api}/events/filter", json=body, timeout=60)
        response.raise_for_status()
        events: list[dict[str, Any]] = response.json()["events"]
        if len(events) >= expected or time.monotonic() > deadline:
            return events
        time.sleep(0.2)
