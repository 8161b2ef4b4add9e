"""Advisory locks serialize runs across real connections and time out with a clear message."""

from __future__ import annotations

import threading
import time

import pytest

from tasks.advisory_lock import LockTimeout, advisory_lock


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
