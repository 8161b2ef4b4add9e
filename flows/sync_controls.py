"""The ``flowyard sync`` controls as flows, so the UI, a REST trigger or an automation can use them:
``sync-status``, ``sync-history`` and ``sync-configure`` (which also enables/disables devices).
``sync trigger`` is the ``sync-devices`` flow itself. Each one is a thin wrapper around the same
``tasks.sync_state`` functions the CLI calls, and publishes its answer as a table artifact.
"""

from __future__ import annotations

from dataclasses import asdict
from datetime import datetime
from typing import Any

from prefect import flow
from prefect.artifacts import create_table_artifact

from tasks import sync_state
from tasks.state import state_url


@flow(name="sync-status")
def sync_status(state_database_url: str | None = None) -> list[dict[str, str]]:
    """Per configured device: enabled, queued events (read live from the store), last success/error."""
    rows = sync_state.status_rows(state_url(state_database_url))
    create_table_artifact(rows, key="sync-status", description="Configured devices")
    return rows


@flow(name="sync-history")
def sync_history(
    limit: int = 20, since: datetime | None = None, state_database_url: str | None = None
) -> list[dict[str, Any]]:
    """The latest per-device sync results, newest first."""
    rows = [asdict(r) for r in sync_state.history(state_url(state_database_url), limit=limit, since=since)]
    create_table_artifact(
        [{k: str(v) for k, v in row.items()} for row in rows], key="sync-history", description="Sync history"
    )
    return rows


@flow(name="sync-configure")
def sync_configure(
    enabled: bool | None = None,
    central_url: str | None = None,
    batch_size: int | None = None,
    download_updates: bool | None = None,
    enable_devices: list[str] | None = None,
    disable_devices: list[str] | None = None,
    state_database_url: str | None = None,
) -> dict[str, Any]:
    """Change settings (None keeps the current value) and switch devices on or off."""
    state = state_url(state_database_url)
    config = sync_state.update_config(
        state,
        {
            "enabled": enabled,
            "central_url": central_url,
            "batch_size": batch_size,
            "download_updates": download_updates,
        },
    )
    for device in enable_devices or []:
        sync_state.set_enabled(state, device, True)
    for device in disable_devices or []:
        sync_state.set_enabled(state, device, False)
    return config.model_dump(mode="json", exclude={"central_url": True, "privacy": {"hash_key"}})
