"""Seed §8.1 alerts: thresholds decide, and a successful run is never "offline"."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

from tasks.sync_alerts import evaluate
from tasks.sync_batches import DeviceReport
from tasks.sync_state import AlertThresholds

NOW = datetime(2026, 11, 22, 12, tzinfo=UTC)
OK = DeviceReport("d", "u", "p", "/s.db", 50, 50, 0, 0, 0, 0, 1.0, 50, 1, 5000, None)
LIMITS = AlertThresholds(queue_threshold=100, failure_rate=0.1, offline_seconds=3600)


def _kinds(report: DeviceReport | None, last_success: datetime | None) -> list[str]:
    return [a.kind for a in evaluate("d", report, last_success, LIMITS, NOW)]


def test_healthy_run_raises_nothing() -> None:
    assert _kinds(OK, NOW - timedelta(days=3)) == []


def test_queue_failure_rate_and_offline() -> None:
    failing = replace(OK, uploaded=80, failed=20, pending_after=101, error="upload failed")
    assert _kinds(failing, NOW - timedelta(seconds=3601)) == ["queue-threshold", "failure-rate", "offline"]
    assert _kinds(replace(failing, failed=8), NOW - timedelta(seconds=3599)) == ["queue-threshold"]
    assert _kinds(None, NOW - timedelta(hours=2)) == ["offline"]
    assert _kinds(None, None) == []


def test_alert_messages_do_not_round_a_crossed_threshold_to_it() -> None:
    """A rate or a duration just over its threshold was printed rounded to it ("10% of this run's
    events failed (threshold 10%)", "60 min (threshold 60 min)"), as if the alerts fired at the
    threshold, and an offline threshold under 30 s read "threshold 0 min"."""
    failing = replace(OK, uploaded=899, failed=101, error="upload failed")
    messages = {a.kind: a.message for a in evaluate("d", failing, NOW - timedelta(seconds=3610), LIMITS, NOW)}
    assert messages["failure-rate"] == (
        "device d: 101 of this run's 1000 events failed (10.1%, threshold 10%): upload failed"
    )
    assert messages["offline"] == "device d: no successful sync for 60.1667 min (threshold 60 min)"
    short = AlertThresholds(queue_threshold=100, failure_rate=0.075, offline_seconds=20)
    messages = {a.kind: a.message for a in evaluate("d", failing, NOW - timedelta(hours=2), short, NOW)}
    assert "(10%, threshold 7.5%)" in messages["failure-rate"]
    assert messages["offline"] == "device d: no successful sync for 120 min (threshold 20 s)"
