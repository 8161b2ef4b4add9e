"""The ``flowyard sync`` controls as flows, so the UI, a REST trigger or an automation can use them:
``sync-status``, ``sync-history`` and ``sync-configure`` (which also enables/disables devices).
``sync trigger`` is the ``sync-devices`` flow itself. Each one is a thin wrapper around the same
``tasks.sync_state`` / ``tasks.sync_setup`` functions the CLI calls; status and history publish
their answer as a table artifact.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from prefect.artifacts import create_table_artifact

from tasks import sync_state
from tasks.flow_parameters import checked_flow
from tasks.state import state_url
from tasks.sync_setup import SetupChange, apply_setup, new_store


@checked_flow(name="sync-status")
def sync_status(state_database_url: str | None = None) -> list[dict[str, str]]:
    """Per device flowyard knows (configured, or only named by runs' store paths): enabled, queued
    events (read live from the store), last success/error. The artifact's description names each
    central whose last schema step warned (``sync status``'s ``schema:`` lines): without them, one
    watching the UI alone saw a clean status while, say, deleted projects stayed in the stores."""
    state = state_url(state_database_url, parameter="state_database_url")
    rows = sync_state.status_rows(state)
    warnings = [f"central schema {warning}" for warning in sync_state.schema_warnings(state)]
    create_table_artifact(rows, key="sync-status", description="; ".join(["Devices", *warnings]))
    return rows


@checked_flow(name="sync-history")
def sync_history(
    limit: int = 20, since: datetime | None = None, state_database_url: str | None = None
) -> list[dict[str, Any]]:
    """The latest per-device sync results, newest first; times in UTC, and a ``since`` without a
    zone is UTC. A value the run never learned (the pending count of a device whose store did
    not open) shows as ``-`` in the artifact, as in ``flowyard sync history``."""
    state = state_url(state_database_url, parameter="state_database_url")
    rows = [r.as_dict() for r in sync_state.history(state, limit=limit, since=since)]
    create_table_artifact(
        [{k: "-" if v is None else str(v) for k, v in row.items()} for row in rows],
        key="sync-history",
        description="Sync history",
    )
    return rows


@checked_flow(name="sync-configure")
def sync_configure(
    enabled: bool | None = None,
    central_url: str | None = None,
    batch_size: int | None = None,
    download_updates: bool | None = None,
    allow: list[str] | None = None,
    privacy_mode: str | None = None,
    hash_key: str | None = None,
    queue_threshold: int | None = None,
    failure_rate: float | None = None,
    offline_seconds: int | None = None,
    add_store: str | None = None,
    device_id: str | None = None,
    user_id: str | None = None,
    project_id: str | None = None,
    remove_store: str | None = None,
    enable_devices: list[str] | None = None,
    disable_devices: list[str] | None = None,
    state_database_url: str | None = None,
) -> dict[str, Any]:
    """Everything ``flowyard sync configure`` does (None keeps the current value), plus switching
    devices on or off; every device id is checked before anything is saved.

    ``allow`` replaces the privacy allowlist (``[]``: no field of ``event_data`` is kept as it is).
    ``central_url="default"`` goes back to the default central (database ``devflow_central`` on
    flowyard's server).
    ``hash_key`` and ``central_url`` are kept with the run's parameters on the Prefect server; the
    returned configuration leaves both out.
    """
    result = apply_setup(
        state_database_url,
        SetupChange(
            enabled=enabled,
            central_url=central_url,
            batch_size=batch_size,
            download_updates=download_updates,
            allow=allow,
            privacy_mode=privacy_mode,
            hash_key=hash_key,
            queue_threshold=queue_threshold,
            failure_rate=failure_rate,
            offline_seconds=offline_seconds,
            add_store=new_store(add_store, device_id, user_id, project_id),
            remove_store=remove_store,
            enable_devices=tuple(enable_devices or ()),
            disable_devices=tuple(disable_devices or ()),
        ),
    )
    return result.config.model_dump(mode="json", exclude={"central_url": True, "privacy": {"hash_key"}})
