"""Critical violations alert once per change: a real HTTP receiver and the real Prefect event stream."""

from __future__ import annotations

import json
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from quality.alerts import EVENT, AlertConfig, dispatch_alerts
from quality.runner import RuleResult, SuiteResult
from tests.serve_support import stored_events

pytestmark = pytest.mark.usefixtures("prefect_api")


class Receiver:
    """A local webhook endpoint that records every JSON body; ``fail`` makes it answer 500, ``hold``
    never answer (``holding`` is set once a request waits there, until ``let_go``)."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []
        self.fail = self.hold = False
        self.holding, self.let_go = threading.Event(), threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if receiver.hold:
                    receiver.holding.set()
                    receiver.let_go.wait()
                    return
                if receiver.fail:
                    self.send_response(500)
                else:
                    receiver.bodies.append(body)
                    self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"


@pytest.fixture()
def receiver():
    r = Receiver()
    yield r
    r.server.shutdown()


def _result(suite: str, bad_ids: int, bad_types: int = 0, email_errors: int = 3) -> SuiteResult:
    def rule(name: str, severity: str, count: int) -> RuleResult:
        return RuleResult(name, "not_null", severity, "id", count == 0, count, count, [None] * min(count, 3))

    rules = [
        rule("not_null_id", "critical", bad_ids),
        rule("valid_type", "critical", bad_types),
        rule("valid_email", "high", email_errors),
    ]
    return SuiteResult(suite, "public.t", None, 100, 90.0, rules)


def test_alert_fires_once_per_new_critical_violation(state_db, receiver):
    suite = f"alerts-{uuid.uuid4().hex[:8]}"
    config = AlertConfig(webhook_url=receiver.url)

    first = dispatch_alerts(state_db, [_result(suite, bad_ids=2)], config)
    assert [(a.rule, a.unexpected_count, a.webhook_status) for a in first] == [("not_null_id", 2, 204)]
    assert [(b["rule"], b["unexpected_count"], b["event"]) for b in receiver.bodies] == [
        ("not_null_id", 2, EVENT)
    ]

    # Same violation on the next runs: nothing is re-sent. The high-severity email rule never alerts.
    for _ in range(2):
        assert dispatch_alerts(state_db, [_result(suite, bad_ids=2)], config) == []
    # A different sample of the same rows (scan order is not fixed) is still the same violation.
    resampled = _result(suite, bad_ids=2)
    resampled.rules[0].sample = ["x", "y"]
    assert dispatch_alerts(state_db, [resampled], config) == []
    assert len(receiver.bodies) == 1

    # It changes (more rows) and a second critical rule starts failing: one alert each.
    changed = dispatch_alerts(state_db, [_result(suite, bad_ids=5, bad_types=1)], config)
    assert sorted(a.rule for a in changed) == ["not_null_id", "valid_type"]
    assert len(receiver.bodies) == 3

    # Resolved, then back with the very same count: it is a new violation again.
    assert dispatch_alerts(state_db, [_result(suite, bad_ids=0, bad_types=1)], config) == []
    again = dispatch_alerts(state_db, [_result(suite, bad_ids=5, bad_types=1)], config)
    assert [a.rule for a in again] == ["not_null_id"]
    assert len(receiver.bodies) == 4

    # The Prefect server received the events too (automations can match them).
    resource_id = f"flowyard.quality.{suite}.not_null_id"
    from prefect.settings import PREFECT_API_URL

    event_filter = {"event": {"name": [EVENT]}, "resource": {"id": [resource_id]}}
    assert len(stored_events(PREFECT_API_URL.value(), event_filter, expected=3)) == 3


def test_failed_webhook_is_retried_next_run(state_db, receiver):
    suite = f"alerts-{uuid.uuid4().hex[:8]}"
    config = AlertConfig(webhook_url=receiver.url, emit_event=False)
    receiver.fail = True
    assert dispatch_alerts(state_db, [_result(suite, bad_ids=1)], config) == []
    receiver.fail = False
    assert [a.rule for a in dispatch_alerts(state_db, [_result(suite, bad_ids=1)], config)] == ["not_null_id"]
    assert dispatch_alerts(state_db, [_result(suite, bad_ids=1)], config) == []
    assert len(receiver.bodies) == 1


def test_alerts_can_be_disabled_or_retargeted(state_db, receiver):
    suite = f"alerts-{uuid.uuid4().hex[:8]}"
    assert (
        dispatch_alerts(
            state_db, [_result(suite, bad_ids=1)], AlertConfig(enabled=False, webhook_url=receiver.url)
        )
        == []
    )
    high = AlertConfig(severities=["high"], webhook_url=receiver.url, emit_event=False)
    assert [a.rule for a in dispatch_alerts(state_db, [_result(suite, bad_ids=1)], high)] == ["valid_email"]
    assert [b["rule"] for b in receiver.bodies] == ["valid_email"]

