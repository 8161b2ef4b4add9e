"""A long transaction holding a lock makes the DDL retry with a short lock_timeout instead of stalling writers."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tasks.db import connect
from tasks.ddl_retry import LockPolicy, LockRetryDeadline, backoff_seconds, execute_with_lock_retry
from tasks.embedded_pg import EmbeddedPostgres

HOLD_SECONDS = 4.0


class Writer(threading.Thread):
    """Inserts as fast as it can and records when each insert started and ended, and any failure."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url, self.stop, self.spans, self.errors = url, threading.Event(), [], []

    def run(self) -> None:
        with connect(self.url, autocommit=True) as conn:
            n = 1_000_000
            while not self.stop.is_set():
                n += 1
                started = time.monotonic()
                try:
                    conn.execute("INSERT INTO items (id, v) VALUES (%s, 1)", (n,))
                except Exception as exc:  # noqa: BLE001 - any failed write is what we count
                    self.errors.append(exc)
                self.spans.append((started, time.monotonic()))


@dataclass
class Scenario:
    """What the writer did while a DDL met a long transaction, and the instants that tell whether
    it was stalled: when the DDL was first seen waiting for its lock, and when the long
    transaction ended (its lock released)."""

    writer: Writer
    lock_timeouts: int
    ddl_waited: float
    released: float

    def writes_past_the_waiting_ddl(self) -> int:
        """Inserts begun after the DDL queued for its lock and done before the holder let it go:
        an insert queues behind a waiting DDL, so there are none unless the DDL gave way."""
        return sum(self.ddl_waited < began and ended < self.released for began, ended in self.writer.spans)


def _scenario(url: str, policy: LockPolicy) -> Scenario:
    with connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE items (id bigint PRIMARY KEY, v int)")
    writer = Writer(url)
    writer.start()
    holder = connect(url)
    holder.execute("SELECT count(*) FROM items")  # a long transaction holding ACCESS SHARE
    released: list[float] = []

    def release() -> None:
        released.append(time.monotonic())  # before the commit: whatever ended by now passed no DDL
        holder.commit()

    waited: list[float] = []

    def watch(pid: int) -> None:
        with connect(url, autocommit=True) as conn:
            while not released and not waited:
                if conn.execute(_WAITING_FOR_A_LOCK, (pid,)).fetchone():
                    waited.append(time.monotonic())
                time.sleep(0.005)

    release_timer = threading.Timer(HOLD_SECONDS, release)
    release_timer.start()
    time.sleep(0.3)
    try:
        with connect(url, autocommit=True) as ddl:
            watcher = threading.Thread(target=watch, args=(ddl.info.backend_pid,), daemon=True)
            watcher.start()
            stats = execute_with_lock_retry(ddl, ["ALTER TABLE items ADD COLUMN w int"], policy)
    finally:
        release_timer.join()
        holder.close()
        time.sleep(0.3)
        writer.stop.set()
        writer.join()
    watcher.join()
    assert waited, "the DDL was seen waiting for its lock"
    return Scenario(writer, stats.lock_timeouts, waited[0], released[0])


_WAITING_FOR_A_LOCK = "SELECT 1 FROM pg_stat_activity WHERE pid = %s AND wait_event_type = 'Lock'"


def test_ddl_retries_instead_of_stalling_writers(fresh_db: str) -> None:
    scenario = _scenario(fresh_db, LockPolicy(lock_timeout_ms=200, deadline_seconds=60))
    assert scenario.lock_timeouts >= 1
    assert scenario.writer.errors == []
    # Queued behind the waiting DDL for at most one lock_timeout at a time, never for the whole hold.
    assert scenario.writes_past_the_waiting_ddl() > 0


def test_without_lock_timeout_writers_queue_behind_the_ddl(fresh_db: str) -> None:
    """The contrast: a DDL with no lock_timeout stalls every writer until the long transaction ends."""
    scenario = _scenario(fresh_db, LockPolicy(lock_timeout_ms=0, deadline_seconds=60))
    assert scenario.lock_timeouts == 0
    assert scenario.writes_past_the_waiting_ddl() == 0


def test_deadline_gives_a_one_line_user_error(fresh_db: str) -> None:
    with connect(fresh_db, autocommit=True) as conn:
        conn.execute("CREATE TABLE items (id bigint PRIMARY KEY)")
    holder = connect(fresh_db)
    holder.execute("SELECT count(*) FROM items")
    try:
        with connect(fresh_db, autocommit=True) as ddl, pytest.raises(LockRetryDeadline) as info:
            execute_with_lock_retry(
                ddl, ["DROP TABLE items"], LockPolicy(lock_timeout_ms=50, deadline_seconds=0.5)
            )
    finally:
        holder.close()
    assert "pg_blocking_pids" in str(info.value) and "\n" not in str(info.value)


def test_backoff_grows_exponentially_with_jitter_and_a_cap() -> None:
    policy = LockPolicy(base_backoff_seconds=0.1, max_backoff_seconds=1.0)
    assert 0.05 <= backoff_seconds(0, policy) < 0.15
    assert 0.2 <= backoff_seconds(2, policy) < 0.6
    assert backoff_seconds(20, policy) < 1.5


@pytest.fixture()
def eager_autovacuum(pg: EmbeddedPostgres) -> Iterator[None]:
    """Autovacuum wakes every second (server-wide, for this test only)."""
    with connect(pg.url(), autocommit=True) as conn:
        conn.execute("ALTER SYSTEM SET autovacuum_naptime = '1s'")
        conn.execute("SELECT pg_reload_conf()")
    yield
    with connect(pg.url(), autocommit=True) as conn:
        conn.execute("ALTER SYSTEM RESET autovacuum_naptime")
        conn.execute("SELECT pg_reload_conf()")


def _crawling_autovacuum(url: str) -> int:
    """A real autovacuum worker holding ``items`` for minutes (cost limit 1); returns its pid."""
    with connect(url, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE items (id bigint PRIMARY KEY, pad text) WITH (autovacuum_vacuum_threshold = 0, "
            "autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_cost_delay = 20, autovacuum_vacuum_cost_limit = 1)"
        )
        conn.execute("INSERT INTO items SELECT g, repeat('x', 100) FROM generate_series(1, 60000) g")
        conn.execute("DELETE FROM items WHERE id % 2 = 0")
        for _ in range(600):
            row = conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE backend_type = 'autovacuum worker' "
                "AND datname = current_database() AND query LIKE %s",
                ("%items%",),
            ).fetchone()
            if row:
                return int(row[0])
            time.sleep(0.1)
    pytest.fail("autovacuum never started on the table")


def test_a_blocking_autovacuum_yields_to_the_ddl_before_its_lock_timeout(
    fresh_db: str, eager_autovacuum: None
) -> None:
    vacuum_pid = _crawling_autovacuum(fresh_db)
    with connect(fresh_db, autocommit=True) as ddl:
        stats = execute_with_lock_retry(
            ddl, ["ALTER TABLE items ADD COLUMN w int"], LockPolicy(lock_timeout_ms=200, deadline_seconds=10)
        )
        still_vacuuming = ddl.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = %s AND query LIKE %s", (vacuum_pid, "%items%")
        ).fetchone()[0]
    assert stats.lock_timeouts <= 1  # PostgreSQL cancelled autovacuum at our 50 ms deadlock_timeout
    assert still_vacuuming == 0


def test_without_a_lower_deadlock_timeout_autovacuum_keeps_the_lock(
    fresh_db: str, eager_autovacuum: None
) -> None:
    """The contrast: at the server's 1 s deadlock_timeout the 200 ms DDL attempts never outlast autovacuum."""
    _crawling_autovacuum(fresh_db)
    with connect(fresh_db, autocommit=True) as ddl, pytest.raises(LockRetryDeadline):
        execute_with_lock_retry(
            ddl,
            ["ALTER TABLE items ADD COLUMN w int"],
            LockPolicy(lock_timeout_ms=200, deadline_seconds=3, deadlock_timeout_ms=None),
        )
