"""One device's sync against a real central PostgreSQL: faults lose nothing, re-sends dedupe."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg
import pytest

from tasks import central_store, device_store
from tasks.device_store import Identity
from tasks.embedded_pg import free_port
from tasks.privacy_filter import PrivacyPolicy
from tasks.sample_devices import make_store
from tasks.sync_batches import SyncOptions, adapt_batch_size, classify, sync_device

IDENTITY = Identity("dev-a", "alice", "proj")


@pytest.fixture()
def central(fresh_db: str) -> str:
    central_store.ensure_schema(fresh_db)
    return fresh_db


def _central_counts(url: str) -> tuple[int, int]:
    with psycopg.connect(url) as conn:
        return conn.execute("SELECT count(*), count(DISTINCT sync_id) FROM devflow.events").fetchone()


def _local(store: Path) -> device_store.StoreCounts:
    with device_store.open_store(store) as conn:
        return device_store.counts(conn)


def test_sync_uploads_filtered_events_in_batches(central: str, tmp_path: Path) -> None:
    store = make_store(tmp_path / "dev.db", 1234)
    report = sync_device(store, IDENTITY, SyncOptions(central, batch_size=500, policy=PrivacyPolicy()))
    assert (report.pending_before, report.uploaded, report.duplicates, report.failed) == (1234, 1234, 0, 0)
    assert report.pending_after == 0 and report.last_local_id == 1234 and report.error is None
    assert report.lag_seconds is not None and report.lag_seconds > 86_400  # oldest event is days old
    assert _central_counts(central) == (1234, 1234)
    assert _local(store).synced == 1234
    with psycopg.connect(central) as conn:
        keys = conn.execute("SELECT DISTINCT jsonb_object_keys(event_data) FROM devflow.events").fetchall()
        identity = conn.execute(
            "SELECT DISTINCT device_id, user_id, project_id FROM devflow.events"
        ).fetchall()
    # Privacy: code and file paths never left the device; only allowlisted metadata did.
    assert {k for (k,) in keys} <= set(PrivacyPolicy().allowlist)
    assert {"action", "language", "status"} <= {k for (k,) in keys}
    assert identity == [("dev-a", "alice", "proj")]


def test_store_with_nothing_pending(central: str, tmp_path: Path) -> None:
    store = make_store(tmp_path / "empty.db", 0)
    report = sync_device(store, IDENTITY, SyncOptions(central))
    assert (report.pending_before, report.uploaded, report.batches, report.pending_after) == (0, 0, 0, 0)
    assert report.error is None and report.lag_seconds is None
    again = sync_device(make_store(tmp_path / "done.db", 50), IDENTITY, SyncOptions(central))
    assert again.uploaded == 50
    assert sync_device(tmp_path / "done.db", IDENTITY, SyncOptions(central)).pending_before == 0


def test_central_unreachable_loses_nothing_and_syncs_later(central: str, tmp_path: Path) -> None:
    store = make_store(tmp_path / "dev.db", 300)
    dead = f"postgresql://postgres@127.0.0.1:{free_port()}/nowhere"
    options = SyncOptions(dead, batch_size=100, upload_attempts=2, reconnect_backoff_seconds=0.01)
    report = sync_device(store, IDENTITY, options)
    assert report.uploaded == 0 and report.failed == 100
    assert "cannot connect" in report.error and "\n" not in report.error
    assert report.final_batch_size == adapt_batch_size(100, "poor") == 10
    counts = _local(store)
    assert (counts.pending, counts.failed, counts.synced) == (200, 100, 0)
    with device_store.open_store(store) as conn:
        attempts = conn.execute(
            "SELECT DISTINCT sync_attempts, last_sync_error FROM events WHERE sync_status='failed'"
        ).fetchall()
    assert attempts == [(1, report.error)]
    # Central is back: the pending events go now; the failed ones after their backoff (or forced).
    later = sync_device(store, IDENTITY, SyncOptions(central, batch_size=100))
    assert (later.uploaded, later.pending_after) == (200, 100)
    forced = sync_device(store, IDENTITY, SyncOptions(central, force=True))
    assert (forced.uploaded, forced.duplicates, forced.pending_after) == (100, 0, 0)
    assert _central_counts(central) == (300, 300)


def test_a_refused_event_is_isolated_and_the_rest_sync(central: str, tmp_path: Path) -> None:
    store = make_store(tmp_path / "dev.db", 100, identity=IDENTITY)
    with device_store.open_store(store) as conn:
        conn.execute("UPDATE events SET sync_id = 'not-a-uuid' WHERE id = 37")
    report = sync_device(store, IDENTITY, SyncOptions(central, batch_size=40))
    assert (report.uploaded, report.failed) == (99, 1)
    assert "invalid input syntax for type uuid" in report.error
    with device_store.open_store(store) as conn:
        failed = conn.execute("SELECT id, sync_attempts FROM events WHERE sync_status = 'failed'").fetchall()
    assert failed == [(37, 1)]
    assert _central_counts(central) == (99, 99)


def test_terminated_connections_lose_nothing(central: str, tmp_path: Path) -> None:
    store = make_store(tmp_path / "dev.db", 20_000)
    stop = threading.Event()
    kills = []

    def killer() -> None:
        with psycopg.connect(central, autocommit=True) as conn:
            while not stop.is_set():
                killed = conn.execute(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE application_name = 'flowyard-sync' AND pid <> pg_backend_pid()"
                ).fetchone()[0]
                kills.append(killed)
                time.sleep(0.05)

    thread = threading.Thread(target=killer)
    thread.start()
    try:
        # One attempt per batch, so a cut connection marks the batch failed instead of reconnecting.
        options = SyncOptions(central, batch_size=200, upload_attempts=1, reconnect_backoff_seconds=0.01)
        reports = [sync_device(store, IDENTITY, options) for _ in range(5)]
    finally:
        stop.set()
        thread.join()
    assert sum(kills) > 0
    assert any(r.error for r in reports), "the killer never hit an upload"
    assert _local(store).failed > 0
    # Everything synced locally is in central; nothing central is unknown locally; no duplicates.
    with device_store.open_store(store) as conn:
        synced = {r[0] for r in conn.execute("SELECT sync_id FROM events WHERE sync_status = 'synced'")}
        everything = {r[0] for r in conn.execute("SELECT sync_id FROM events")}
    with psycopg.connect(central) as conn:
        central_ids = {str(r[0]) for r in conn.execute("SELECT sync_id FROM devflow.events")}
    assert synced <= central_ids <= everything
    final = sync_device(store, IDENTITY, SyncOptions(central, force=True))
    assert final.error is None and final.pending_after == 0
    assert _central_counts(central) == (20_000, 20_000)


WRITER = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], timeout=30, isolation_level=None)
for i in range(int(sys.argv[2])):
    conn.execute("INSERT INTO events (timestamp, event_type, event_data) VALUES (?, 'file_edit', '{}')",
                 (int(time.time() * 1000),))
    time.sleep(0.001)
"""


def test_sync_while_the_app_keeps_writing(central: str, tmp_path: Path) -> None:
    """A real concurrent writer (the local app, unaware of sync columns) appends during syncs."""
    store = make_store(tmp_path / "dev.db", 2000, identity=IDENTITY)
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(store), "1500"])
    reports = []
    while writer.poll() is None:
        reports.append(sync_device(store, IDENTITY, SyncOptions(central, batch_size=300)))
    assert writer.returncode == 0
    reports.append(sync_device(store, IDENTITY, SyncOptions(central, batch_size=300)))
    assert len(reports) > 1 and all(r.error is None for r in reports)
    assert sum(r.uploaded for r in reports) == 3500
    assert _central_counts(central) == (3500, 3500)
    with psycopg.connect(central) as conn:
        assert (
            conn.execute("SELECT count(*) FROM devflow.events WHERE device_id <> 'dev-a'").fetchone()[0] == 0
        )


def test_batch_size_adapts_to_measured_quality() -> None:
    assert classify(1000, 0.01, failed=False) == "excellent"
    assert classify(1000, 0.1, failed=False) == "good"
    assert classify(1000, 0.5, failed=False) == "fair"
    assert classify(1000, 5.0, failed=False) == "poor"
    assert classify(1000, 0.01, failed=True) == "poor"
    # Seed §6.2's 1000/500/100/50 ladder, scaled to the configured size.
    assert [adapt_batch_size(1000, q) for q in ("excellent", "good", "fair", "poor")] == [1000, 500, 100, 50]
    assert adapt_batch_size(100, "poor") == 10


def test_a_slow_central_shrinks_the_next_batches(central: str, tmp_path: Path) -> None:
    """A server that needs >= 2 ms per event (a real per-row delay in PostgreSQL) is 'poor': the
    batches after the first one drop to 5% of the configured size (seed §6.2)."""
    with psycopg.connect(central, autocommit=True) as conn:
        conn.execute(
            "CREATE FUNCTION devflow.slow() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN PERFORM pg_sleep(0.002); RETURN NEW; END $$"
        )
        conn.execute(
            "CREATE TRIGGER slow BEFORE INSERT ON devflow.event_keys FOR EACH ROW EXECUTE FUNCTION devflow.slow()"
        )
    store = make_store(tmp_path / "dev.db", 1100)
    report = sync_device(store, IDENTITY, SyncOptions(central, batch_size=1000))
    # 1000 events at the configured size, then the remaining 100 in batches of 50.
    assert (report.uploaded, report.batches, report.final_batch_size) == (1100, 3, 50)
    assert _central_counts(central) == (1100, 1100)


def test_a_recreated_store_reusing_local_ids_is_not_taken_for_duplicates(
    central: str, tmp_path: Path
) -> None:
    """Wiped and recreated under the same device id, a store numbers its events from 1 again;
    those are other events (other times), so the origin key must let every one of them in."""
    path = tmp_path / "dev.db"
    make_store(path, 300, seed=1, end_ms=device_store.now_ms() - 86_400_000)
    assert sync_device(path, IDENTITY, SyncOptions(central)).uploaded == 300
    path.unlink()
    make_store(path, 300, seed=1)  # same device id, local ids 1..300 again, same event types
    report = sync_device(path, IDENTITY, SyncOptions(central))
    assert (report.uploaded, report.duplicates, report.pending_after) == (300, 0, 0)
    with psycopg.connect(central) as conn:
        per_id = conn.execute(
            "SELECT min(n), max(n) FROM (SELECT count(*) AS n FROM devflow.events GROUP BY local_id) c"
        ).fetchone()
    assert _central_counts(central) == (600, 600) and per_id == (2, 2)


def test_a_slow_local_mark_does_not_shrink_the_next_batch(central: str, tmp_path: Path) -> None:
    """Only the upload measures the link: a local mark that waits 3 s for the app's write lock
    (a real second SQLite connection holding ``BEGIN IMMEDIATE``) is not a poor network.

    Counted into the first batch's time, that wait is 3 ms per event: 'poor', and the second
    batch would hold 50 events. Measured on the upload alone, the second batch holds at least
    100 ('fair' or better) unless uploading 1000 events to the local PostgreSQL took over a
    second. Each batch is one central transaction, so the rows' ``xmin`` gives the batch sizes.
    """
    store = make_store(tmp_path / "dev.db", 2000, identity=IDENTITY)
    locked = threading.Event()

    def hold_write_lock() -> None:
        with device_store.open_store(store) as app, device_store.write_transaction(app):
            locked.set()
            time.sleep(3)

    holder = threading.Thread(target=hold_write_lock)
    holder.start()
    locked.wait()
    started = time.monotonic()
    report = sync_device(store, IDENTITY, SyncOptions(central, batch_size=1000))
    holder.join()
    assert time.monotonic() - started >= 2.5  # the first mark really waited for the lock
    assert (report.uploaded, report.error) == (2000, None)
    with psycopg.connect(central) as conn:
        sizes = [
            n
            for (n,) in conn.execute(
                "SELECT count(*) FROM devflow.events GROUP BY xmin::text ORDER BY min(local_id)"
            )
        ]
    assert sum(sizes) == 2000 and sizes[0] == 1000
    assert sizes[1] >= adapt_batch_size(1000, "fair"), sizes
