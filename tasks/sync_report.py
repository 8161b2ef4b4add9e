"""What the ``sync-devices`` flow does with each device's result: record it in the flowyard
schema, check the alerts, and shape the table-artifact row and the run's returned state."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from tasks import sync_alerts, sync_state
from tasks.sync_batches import DeviceReport
from tasks.sync_state import SyncConfig, SyncTarget


@dataclass(frozen=True)
class DeviceOutcome:
    device_id: str
    error: str | None
    row: dict[str, Any]
    """The device's row of the run's table artifact."""
    state: dict[str, Any]
    """The device's part of the flow's returned state (cursors and counts)."""


def settle_device(
    state_url: str,
    flow_run_id: UUID | None,
    target: SyncTarget,
    result: DeviceReport | BaseException,
    offline_since: datetime | None,
    config: SyncConfig,
    logger: logging.Logger | logging.LoggerAdapter,
) -> DeviceOutcome:
    """Record one device's result (a report, or the exception its task failed with) and alert.

    ``offline_since`` is :attr:`sync_state.Device.offline_since`; None for a device first seen now.
    """
    report = result if isinstance(result, DeviceReport) else None
    if report:
        error = report.error
        sync_state.record_device_run(state_url, flow_run_id, report)
    else:
        error = str(result)
        sync_state.record_device_error(state_url, flow_run_id, target.device_id, target.store, error)
    alerts = sync_alerts.evaluate(target.device_id, report, offline_since, config.alerts, datetime.now(UTC))
    sync_alerts.emit(alerts, logger)
    return DeviceOutcome(target.device_id, error, _table_row(target, report, error), _state(report, error))


def _table_row(target: SyncTarget, report: DeviceReport | None, error: str | None) -> dict[str, Any]:
    lag = report.lag_seconds if report else None
    return {
        "device": target.device_id,
        "pending before": report.pending_before if report else None,
        "uploaded": report.uploaded if report else 0,
        "duplicates skipped": report.duplicates if report else 0,
        "failed": report.failed if report else None,
        "lag": "-" if lag is None else f"{lag:.0f}s",
        "error": error or "",
    }


def _state(report: DeviceReport | None, error: str | None) -> dict[str, Any]:
    if report is None:
        return {"error": error}
    return {
        "last_local_id": report.last_local_id,
        "download_cursor": report.download_cursor,
        "uploaded": report.uploaded,
        "duplicates": report.duplicates,
        "failed": report.failed,
        "pending_after": report.pending_after,
        "error": error,
    }
