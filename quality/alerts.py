"""Alerts for severe violations: a Prefect event plus an optional webhook, sent once per change.

Each alerting violation gets a fingerprint (suite, window, rule, unexpected count, error). The
fingerprint is claimed in ``flowyard.quality_alerts`` with one upsert that only succeeds
when it differs from the stored one, so an unchanged violation is not re-sent on every
hourly run and two concurrent runs cannot both send it. The claim commits only once the alert
is out: a failed webhook rolls it back, and so does a run killed while sending, so the next run
sends it (at worst twice, never not at all). When a rule passes again its row is removed, so a
recurrence alerts again. Prefect automations can match the ``flowyard.quality.violation`` event.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import httpx
import psycopg
from prefect.events import emit_event
from prefect.logging import get_logger
from psycopg.types.json import Jsonb
from pydantic import BaseModel, Field

from quality.runner import RuleResult, SuiteResult
from quality.suite_spec import Severity
from tasks.db import connection

EVENT = "flowyard.quality.violation"
logger = get_logger("flowyard.quality.alerts")


def _critical_only() -> list[Severity]:
    return ["critical"]


def _default_webhook() -> str | None:
    return os.environ.get("FLOWYARD_QUALITY_WEBHOOK_URL") or None


class AlertConfig(BaseModel):
    """Which violations alert and where to. The webhook defaults to ``FLOWYARD_QUALITY_WEBHOOK_URL``."""

    enabled: bool = True
    severities: list[Severity] = Field(default_factory=_critical_only)
    emit_event: bool = True
    webhook_url: str | None = Field(default_factory=_default_webhook)
    timeout_seconds: float = 10.0


@dataclass(frozen=True)
class SentAlert:
    suite: str
    rule: str
    unexpected_count: int
    event_id: str | None
    webhook_status: int | None


def fingerprint(result: SuiteResult, rule: RuleResult) -> str:
    """What makes a violation 'the same': not the sample, whose rows PostgreSQL may return in any order."""
    data = [result.suite, result.window, rule.rule, rule.unexpected_count, rule.error]
    return hashlib.sha256(json.dumps(data, default=str).encode()).hexdigest()


def _payload(result: SuiteResult, rule: RuleResult) -> dict[str, object]:
    return {
        "suite": result.suite,
        "target": result.target,
        "window": result.window,
        "rule": rule.rule,
        "severity": rule.severity,
        "unexpected_count": rule.unexpected_count,
        "unexpected_percent": rule.unexpected_percent,
        "sample": rule.sample,
        "error": rule.error,
        "score": result.score,
    }


def _claim(conn: psycopg.Connection, result: SuiteResult, rule: RuleResult, print_: str) -> bool:
    """Store the new fingerprint in ``conn``'s open transaction; true only if it was absent or
    different (i.e. this run must send). A concurrent run's claim of the same rule waits for this
    transaction, then finds the fingerprint stored (sent) or absent again (not sent)."""
    row = conn.execute(
        """
        INSERT INTO flowyard.quality_alerts (suite, rule, fingerprint, details) VALUES (%s, %s, %s, %s)
        ON CONFLICT (suite, rule) DO UPDATE
            SET fingerprint = EXCLUDED.fingerprint, details = EXCLUDED.details, sent_at = now()
            WHERE quality_alerts.fingerprint <> EXCLUDED.fingerprint
        RETURNING 1
        """,
        (result.suite, rule.rule, print_, Jsonb(_payload(result, rule))),
    ).fetchone()
    return row is not None


def _forget_resolved(state: str, result: SuiteResult, active: list[str]) -> None:
    with connection(state) as conn:
        conn.execute(
            "DELETE FROM flowyard.quality_alerts WHERE suite = %s AND NOT (rule = ANY(%s))",
            (result.suite, active),
        )


def _send(config: AlertConfig, result: SuiteResult, rule: RuleResult) -> SentAlert:
    payload = _payload(result, rule)
    event_id = None
    if config.emit_event:
        event = emit_event(
            event=EVENT,
            resource={
                "prefect.resource.id": f"flowyard.quality.{result.suite}.{rule.rule}",
                "prefect.resource.name": f"{result.suite}.{rule.rule}",
                "flowyard.severity": rule.severity,
            },
            payload=payload,
        )
        event_id = str(event.id) if event else None
    status = None
    if config.webhook_url:
        response = httpx.post(
            config.webhook_url, json={"event": EVENT, **payload}, timeout=config.timeout_seconds
        )
        response.raise_for_status()
        status = response.status_code
    return SentAlert(result.suite, rule.rule, rule.unexpected_count, event_id, status)


def dispatch_alerts(state: str, results: list[SuiteResult], config: AlertConfig) -> list[SentAlert]:
    """Send an alert for each new or changed violation at an alerting severity; forget resolved ones."""
    if not config.enabled:
        return []
    sent = []
    for result in results:
        alerting = [r for r in result.violations if r.severity in config.severities]
        for rule in alerting:
            # One transaction per alert, committed after the send: a claim committed first was
            # lost with a run killed before its webhook answered (the next runs saw it as sent).
            with connection(state) as conn:
                # The transaction idles while the webhook answers: a DBA's shorter
                # idle_in_transaction_session_timeout ended it there, losing the delivered alert's
                # claim (the run failed on it, and every later run sent the alert again). Lifted for
                # this transaction only: the webhook's timeout bounds it, and a killed run's idle
                # session ends at once (the server reads its socket while idle).
                conn.execute("SELECT set_config('idle_in_transaction_session_timeout', '0', true)")
                if not _claim(conn, result, rule, fingerprint(result, rule)):
                    continue
                try:
                    sent.append(_send(config, result, rule))
                except httpx.HTTPError as exc:
                    conn.rollback()  # not delivered: the next run claims and sends it again
                    logger.warning(
                        "quality alert for %s.%s not delivered (%s); retried next run",
                        result.suite,
                        rule.rule,
                        exc,
                    )
        _forget_resolved(state, result, [r.rule for r in alerting])
    return sent
