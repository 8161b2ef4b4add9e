"""Prefect progress artifacts from flowyard's flows and tasks, which are all synchronous."""

from __future__ import annotations

from uuid import UUID

from prefect.artifacts import create_progress_artifact, update_progress_artifact


def new_progress_artifact(progress: float, description: str) -> UUID:
    """Create a progress artifact and return its id, for ``update_progress_artifact``.

    Prefect types the result ``UUID | Coroutine``: inside an async flow or task the call goes
    to its async variant. flowyard calls it from sync code only, so the id is checked once here
    rather than narrowed at every caller.
    """
    artifact_id = create_progress_artifact(progress, description=description)
    if not isinstance(artifact_id, UUID):
        raise TypeError("create_progress_artifact dispatched to its async variant from a sync caller")
    return artifact_id


def show_whole_percent(artifact_id: UUID, done: int, total: int, shown: int) -> int:
    """Move the artifact to ``done`` of ``total`` in whole percents, and return the percent it
    shows: it is updated only when that grows, so a run over many items makes at most 100 API
    calls. One call per item made a sync of 500 devices wait 7 s on the Prefect server."""
    percent = 100 * done // total if total else 100
    if percent > shown:
        update_progress_artifact(artifact_id, float(percent))
    return max(percent, shown)
