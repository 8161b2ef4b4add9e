"""Critical violations alert once per change: a real HTTP receiver and the real Prefect event stream."""

from __future__ import annotations

import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import psycopg
import pytest
from psycopg import sql

from quality.alerts import EVENT, AlertConfig, dispatch_alerts
from quality.runner import RuleResult, SuiteResult
from tasks.db import database_name
from tests.process_support import GUARD_SECONDS
from tests.serve_support import stored_events

pytestmark = pytest.mark.usefixtures("prefect_api")


class Receiver:
    """A local webhook endpoint that records every JSON body; ``fail`` makes it answer 500, ``hold``
    never answer (``holding`` is set once a request waits there, until ``let_go``), or answer
    only once let go with ``answer_after_hold`` too (a slow webhook)."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []
        self.fail = self.hold = self.answer_after_hold = False
        self.holding, self.let_go = threading.Event(), threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if receiver.hold:
                    receiver.holding.set()
                    receiver.let_go.wait()
                    if not receiver.answer_after_hold:
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



def test_an_alert_outlives_an_idle_in_transaction_timeout_while_its_webhook_answers(state_db, receiver):
    """The claim's transaction stays open, idle, until the webhook answers: a DBA's shorter
    idle_in_transaction_session_timeout ended it there, so the delivered alert's claim was lost
    with the session (the run failed on it) and every later run sent the alert again."""
    suite = f"alerts-{uuid.uuid4().hex[:8]}"
    config = AlertConfig(webhook_url=receiver.url, emit_event=False)
    receiver.hold = receiver.answer_after_hold = True
    outcome: list[object] = []

    def dispatch() -> None:
        try:
            outcome.append([a.rule for a in dispatch_alerts(state_db, [_result(suite, bad_ids=1)], config)])
        except Exception as exc:  # noqa: BLE001 - the test reports it
            outcome.append(exc)

    timeout = sql.SQL("ALTER DATABASE {} SET idle_in_transaction_session_timeout = {}")
    with psycopg.connect(state_db, autocommit=True) as admin:
        database = sql.Identifier(database_name(state_db))
        admin.execute(timeout.format(database, sql.Literal(50)))
        try:
            sender = threading.Thread(target=dispatch)
            sender.start()
            assert receiver.holding.wait(GUARD_SECONDS), "the alert never reached the webhook"
            time.sleep(0.5)  # the claim's transaction idles past the timeout meanwhile
            receiver.let_go.set()
            sender.join()
        finally:
            admin.execute(sql.SQL("ALTER DATABASE {} RESET idle_in_transaction_session_timeout").format(database))
    assert outcome == [["not_null_id"]]
    receiver.hold = False
    assert dispatch_alerts(state_db, [_result(suite, bad_ids=1)], config) == []
    assert len(receiver.bodies) == 1
