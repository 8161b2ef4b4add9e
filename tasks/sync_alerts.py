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
                f"device {device_id}: {report.failed} of this run's {attempted} events failed "
                f"({_share(rate, thresholds.failure_rate)}, threshold {_percent(thresholds.failure_rate)}): "
                f"{report.error}",
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
                f"device {device_id}: no successful sync for {_offline(offline, thresholds.offline_seconds)} "
                f"(threshold {_duration(thresholds.offline_seconds)})",
            )
        )
    return alerts


def _share(rate: float, threshold: float) -> str:
    """A failure rate in whole percents, unless that reads as its threshold: rounded, a rate just
    over it printed "10% … failed (threshold 10%)", as if the alert fired at the threshold."""
    whole = f"{rate:.0%}"
    return f"{rate * 100:.6g}%" if whole == _percent(threshold) else whole


def _percent(rate: float) -> str:
    """A configured rate as given (0.125 is "12.5%", not the "12%" of a whole-percent format)."""
    return f"{rate * 100:.6g}%"


def _offline(seconds: float, threshold: float) -> str:
    """An offline duration in whole minutes (whole seconds under a minute), unless that reads as
    its threshold, as a duration just over it did ("60 min (threshold 60 min)")."""
    whole = f"{seconds:.0f} s" if seconds < 60 else f"{seconds / 60:.0f} min"
    return _duration(seconds) if whole == _duration(threshold) else whole


def _duration(seconds: float) -> str:
    """A configured duration as given: in whole minutes, a threshold under 30 s read "0 min"."""
    return f"{seconds:.6g} s" if seconds < 60 else f"{seconds / 60:.6g} min"


def emit(alerts: list[Alert], logger: logging.Logger | logging.LoggerAdapter) -> None:
    for alert in alerts:
        logger.warning("sync alert %s: %s", alert.kind, alert.message)
        emit_event(
            event=f"flowyard.sync.{alert.kind}",
            resource={"prefect.resource.id": f"flowyard.sync-device.{alert.device_id}"},
            payload={"value": alert.value, "threshold": alert.threshold, "message": alert.message},
        )
