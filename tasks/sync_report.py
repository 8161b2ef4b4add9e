"""What the ``sync-devices`` flow does with each device's result: record it in the flowyard
schema, check the alerts, and shape the table-artifact row and the run's returned state."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from tasks import sync_alerts, sync_state
from tasks.errors import UserError, first_line
from tasks.sync_batches import DeviceReport
from tasks.sync_state import RunCounts, SyncConfig, SyncTarget


class SyncIncomplete(UserError):
    """Some devices did not sync fully. Raised by the flow so the run ends Failed with a
    one-line message (and a direct Python call raises, as for any failed flow), while
    ``result`` keeps every device's cursors and outcome: Prefect persists the exception as the
    failed run's result, so the devices that did sync are not lost from the run's state."""

    def __init__(self, message: str, result: dict[str, Any]) -> None:
        super().__init__(message)
        self.result = result

    def __reduce__(self) -> tuple[type[SyncIncomplete], tuple[str, dict[str, Any]]]:
        return (type(self), (str(self), self.result))  # the result survives persistence


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
    An exception is reduced to its first line: a PostgreSQL or SQLite message can carry
    DETAIL/CONTEXT lines that would break the table row, the history and the run's message.
    """
    report = result if isinstance(result, DeviceReport) else None
    if isinstance(result, DeviceReport):
        error = result.error
        sync_state.record_device_run(state_url, flow_run_id, result, known=target.known)
    else:
        error = first_line(result)
        sync_state.record_device_error(state_url, flow_run_id, target, error)
    alerts = sync_alerts.evaluate(target.device_id, report, offline_since, config.alerts, datetime.now(UTC))
    sync_alerts.emit(alerts, logger)
    return DeviceOutcome(target.device_id, error, _table_row(target, report, error), _state(report, error))


def _table_row(target: SyncTarget, report: DeviceReport | None, error: str | None) -> dict[str, Any]:
    """The device's row of the run's table artifact, with the numbers its history row records."""
    counts = RunCounts.of(report)
    lag = counts.lag_seconds
    return {
        "device": target.device_id,
        "pending before": counts.pending_before,
        "uploaded": counts.uploaded,
        "duplicates skipped": counts.duplicates,
        "failed": counts.failed,
        "lag": "-" if lag is None else f"{lag:.0f}s",
        "error": error or "",
    }


def _state(report: DeviceReport | None, error: str | None) -> dict[str, Any]:
    if report is None:
        return {"error": error}
    return {
        "last_local_id": report.last_local_id,
        "download_cursor": report.download_cursor,
        # the central the cursor counts in, not always the run's: a run that could not download
        # (its central unreachable) reports the cursor it started from, perhaps another central's
        "download_central": None if report.download_central is None else str(report.download_central),
        "uploaded": report.uploaded,
        "duplicates": report.duplicates,
        "failed": report.failed,
        "pending_after": report.pending_after,
        "waiting_after": report.waiting_after,
        "error": error,
    }
