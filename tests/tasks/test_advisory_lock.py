"""Advisory locks serialize runs across real connections and time out with a clear message."""

from __future__ import annotations

import threading
import time

import pytest
from psycopg import sql

from tasks.advisory_lock import LockTimeout, advisory_lock
from tasks.db import connect
from tests.conftest import Role, Server


def test_second_holder_waits_then_times_out(fresh_db):
    with advisory_lock(fresh_db, "deploy", timeout_seconds=1):
        started = time.monotonic()
        with pytest.raises(LockTimeout, match="'deploy' on .* is held by pid"):
            with advisory_lock(fresh_db, "deploy", timeout_seconds=0.5):
                pass
        assert time.monotonic() - started >= 0.5
        with advisory_lock(fresh_db, "other-name", timeout_seconds=0.1):
            pass


def test_waiter_gets_the_lock_when_released(fresh_db):
    order: list[str] = []
    released = threading.Event()

    def holder() -> None:
        with advisory_lock(fresh_db, "deploy"):
            order.append("first")
            released.wait(5)
            order.append("first-done")

    thread = threading.Thread(target=holder)
    thread.start()
    while not order:
        time.sleep(0.01)
    threading.Timer(0.3, released.set).start()
    with advisory_lock(fresh_db, "deploy", timeout_seconds=10):
        order.append("second")
    thread.join()
    assert order == ["first", "first-done", "second"]


def test_a_lock_outlives_a_roles_idle_session_timeout(limited_role: Role, fresh_db: str, pg: Server) -> None:
    """A DBA's idle_session_timeout ended the idle session holding the lock: a second run got in."""
    with connect(pg.url(), autocommit=True) as conn:
        conn.execute(sql.SQL("ALTER ROLE {} SET idle_session_timeout = 50").format(sql.Identifier(limited_role.name)))
    with advisory_lock(limited_role.url(fresh_db), "deploy"):
        time.sleep(0.5)  # idle, as while a deploy's steps run on other sessions
        with pytest.raises(LockTimeout):
            with advisory_lock(fresh_db, "deploy", timeout_seconds=0.1):
                pass
