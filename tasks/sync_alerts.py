"""The seed's sync monitoring alerts (seed 002 §8.1): queue size, failure rate, offline duration.

Each alert is logged as a warning and emitted as a Prefect event
(``flowyard.sync.<kind>`` on resource ``flowyard.sync-device.<device id>``), so an
automation can notify someone without flowyard knowing about the channel.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime

from prefect.events import emit_event

from tasks.sync_batches import DeviceReport
from tasks.sync_state import AlertThresholds


@dataclass(frozen=True)
class Alert:
    kind: str
    device_id: str
    value: float
    threshold: float
    message: str


def evaluate(
    device_id: str,
    report: DeviceReport | None,
    offline_since: datetime | None,
    thresholds: AlertThresholds,
    now: datetime,
) -> list[Alert]:
    """Alerts for one device after a run (``report`` is None when the store was unusable).

    Offline means no successful sync for longer than the threshold, counted from
    ``offline_since``: the last successful sync or, for a device that never had one, when it
    was configured or first seen (None: first seen in this run). A successful run
    (:attr:`DeviceReport.succeeded`) is never offline.
    """
    alerts = []
    if report is not None and report.pending_after > thresholds.queue_threshold:
        alerts.append(
            Alert(
                "queue-threshold",
                device_id,
                report.pending_after,
                thresholds.queue_threshold,
                f"device {device_id}: {report.pending_after} events still queued "
                f"(threshold {thresholds.queue_threshold})",
            )
        )
    attempted = (report.uploaded + report.duplicates + report.failed) if report else 0
    if report is not None and attempted and report.failed / attempted > thresholds.failure_rate:
        rate = report.failed / attempted
        alerts.append(
            Alert(
                "failure-rate",
                device_id,
                rate,
                thresholds.failure_rate,
                f"device {device_id}: {rate:.0%} of this run's events failed "
                f"(threshold {thresholds.failure_rate:.0%}): {report.error}",
            )
        )
    succeeded_now = report is not None and report.succeeded
    offline = None if offline_since is None else (now - offline_since).total_seconds()
    if not succeeded_now and offline is not None and offline > thresholds.offline_seconds:
        alerts.append(
            Alert(
                "offline",
                device_id,
                offline,
                thresholds.offline_seconds,
                f"device {device_id}: no successful sync for {offline / 60:.0f} min "
                f"(threshold {thresholds.offline_seconds / 60:.0f} min)",
            )
        )
    return alerts


def emit(alerts: list[Alert], logger: logging.Logger | logging.LoggerAdapter) -> None:
    for alert in alerts:
        logger.warning("sync alert %s: %s", alert.kind, alert.message)
        emit_event(
            event=f"flowyard.sync.{alert.kind}",
            resource={"prefect.resource.id": f"flowyard.sync-device.{alert.device_id}"},
            payload={"value": alert.value, "threshold": alert.threshold, "message": alert.message},
        )
