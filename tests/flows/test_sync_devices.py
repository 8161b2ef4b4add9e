"""The sync-devices flow end to end on a real Prefect server, real SQLite files and real PostgreSQL."""

from __future__ import annotations

import logging
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import psycopg
import pytest

from tasks import central_store, device_store, sync_state
from tasks.device_store import Identity
from tasks.errors import UserError
from tasks.sample_devices import make_store
from tasks.sync_batches import PAUSE_AFTER_UPLOAD_ENV
from tests.conftest import ROOT, flow_run_artifacts, run_cli

pytestmark = pytest.mark.usefixtures("prefect_api")


def _central_counts(url: str) -> tuple[int, int]:
    with psycopg.connect(url) as conn:
        return conn.execute("SELECT count(*), count(DISTINCT sync_id) FROM devflow.events").fetchone()


def _synced(store: Path) -> int:
    with device_store.open_store(store) as conn:
        return device_store.counts(conn).synced


def test_sigkill_between_upload_and_local_mark_then_rerun_keeps_one_copy(
    fresh_db: str, state_db: str, tmp_path: Path
) -> None:
    store = make_store(tmp_path / "crashy.db", 1000, seed=1)
    marker = tmp_path / "uploaded"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "deployments.cli",
            "sync",
            "trigger",
            "--store",
            str(store),
            "--central-url",
            fresh_db,
            "--batch-size",
            "300",
        ],
        cwd=ROOT,
        env={**os.environ, PAUSE_AFTER_UPLOAD_ENV: str(marker)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        while not marker.exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            time.sleep(0.1)
        # The first batch is committed centrally and not yet marked locally: kill it right there.
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert _central_counts(fresh_db) == (300, 300)
    assert _synced(store) == 0

    from flows.sync_devices import sync_devices

    result = sync_devices(stores=[str(store)], central_url=fresh_db, batch_size=300)
    outcome = result["devices"]["crashy"]
    assert (outcome["uploaded"], outcome["duplicates"], outcome["pending_after"]) == (700, 300, 0)
    assert _central_counts(fresh_db) == (1000, 1000)
    assert _synced(store) == 1000


def test_corrupt_and_locked_stores_fail_alone_while_others_sync(
    fresh_db: str, state_db: str, tmp_path: Path
) -> None:
    from flows.sync_devices import sync_devices

    good = [make_store(tmp_path / f"good{n}.db", 400, seed=n) for n in range(2)]
    corrupt = tmp_path / "corrupt.db"
    corrupt.write_bytes(b"\x00garbage, not a database" * 200)
    locked = make_store(tmp_path / "locked.db", 50)
    holder = sqlite3.connect(locked, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(UserError) as info:
            sync_devices(stores=[str(p) for p in [*good, corrupt, locked]], central_url=fresh_db)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    message = str(info.value)
    assert message.startswith("2 of 4 devices did not sync fully")
    assert "corrupt: device store" in message and "is corrupt" in message
    assert "locked: device store" in message and "is locked by another process" in message
    assert _central_counts(fresh_db) == (800, 800)
    assert [_synced(p) for p in good] == [400, 400]
    history = {row.device_id: row for row in sync_state.history(state_db, limit=10)}
    assert history["good0"].uploaded == 400 and history["good0"].error is None
    assert "is corrupt" in history["corrupt"].error and "is locked" in history["locked"].error
    # The locked device's events were untouched and sync once the lock is gone.
    sync_devices(stores=[str(locked)], central_url=fresh_db)
    assert _central_counts(fresh_db) == (850, 850)


def test_a_malformed_central_url_is_refused_before_any_event_is_touched(
    state_db: str, tmp_path: Path
) -> None:
    from flows.sync_devices import sync_devices

    store = make_store(tmp_path / "typo.db", 30, identity=Identity("typo", "dana", "proj"))
    with pytest.raises(UserError, match="^not a PostgreSQL URL: 'garbage'"):
        sync_devices(stores=[str(store)], central_url="garbage")
    with device_store.open_store(store) as conn:
        counts = device_store.counts(conn)
        attempts = conn.execute("SELECT max(sync_attempts) FROM events").fetchone()[0]
    assert (counts.pending, counts.failed, counts.synced, attempts) == (30, 0, 0, 0)


def test_default_run_uses_configured_devices_and_records_state(
    fresh_db: str, state_db: str, tmp_path: Path
) -> None:

    from flows.sync_devices import sync_devices

    on = make_store(tmp_path / "on.db", 120)
    off = make_store(tmp_path / "off.db", 80)
    saved = sync_state.load_config(state_db)
    sync_state.save_config(
        state_db,
        saved.model_copy(update={"central_url": fresh_db, "download_updates": True, "batch_size": 50}),
    )
    sync_state.register_device(state_db, on, Identity("cfg-on", "bob", "proj-cfg"))
    sync_state.register_device(state_db, off, Identity("cfg-off", "carol", "proj-cfg"))
    sync_state.set_enabled(state_db, "cfg-off", False)
    try:
        state = sync_devices(return_state=True)
        result = state.result()
        assert set(result["devices"]) == {"cfg-on"}
        assert result["devices"]["cfg-on"]["uploaded"] == 120
        cursor = result["devices"]["cfg-on"]["download_cursor"]
        assert cursor > 0
        devices = {d.device_id: d for d in sync_state.list_devices(state_db, registered_only=True)}
        assert devices["cfg-on"].last_local_id == 120 and devices["cfg-on"].download_cursor == cursor
        assert devices["cfg-on"].pending == 0 and devices["cfg-on"].last_success_at is not None
        assert devices["cfg-off"].last_attempt_at is None
        with device_store.open_store(on) as conn:
            remote = conn.execute("SELECT project_id, device_id FROM remote_project_status").fetchall()
            stamped = conn.execute("SELECT DISTINCT user_id, project_id FROM events").fetchall()
        assert remote == [("proj-cfg", "cfg-on")] and stamped == [("bob", "proj-cfg")]

        forced = sync_devices(force=True)
        assert forced["devices"]["cfg-off"]["uploaded"] == 80
        assert forced["devices"]["cfg-on"]["uploaded"] == 0

        mine = flow_run_artifacts(state)
        table = next(a for a in mine if a.type == "table")
        assert "cfg-on" in str(table.data) and "duplicates skipped" in str(table.data)
        progress = next(a for a in mine if a.type == "progress")
        assert progress.data == 100.0
    finally:
        sync_state.remove_device(state_db, "cfg-on")
        sync_state.remove_device(state_db, "cfg-off")
        sync_state.save_config(state_db, saved)


def _events_for(api: str, resource_id: str) -> set[str]:
    """Event names the Prefect server has stored for a resource (events arrive asynchronously)."""
    body = {"filter": {"resource": {"id": [resource_id]}}, "limit": 50}
    for _ in range(100):
        events = httpx.post(f"{api}/events/filter", json=body, timeout=10).json()["events"]
        if events:
            return {e["event"] for e in events}
        time.sleep(0.2)
    return set()


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_alerts_are_logged_and_emitted(
    fresh_db: str, state_db: str, prefect_api: str, tmp_path: Path
) -> None:
    from flows.sync_devices import sync_devices

    saved = sync_state.load_config(state_db)
    alerts = saved.alerts.model_copy(update={"queue_threshold": 10})
    sync_state.save_config(state_db, saved.model_copy(update={"alerts": alerts}))
    store = make_store(tmp_path / "alerty.db", 100)
    dead = "postgresql://postgres@127.0.0.1:1/nowhere"
    collect = _Collect()
    logging.getLogger("prefect.flow_runs").addHandler(collect)
    try:
        with pytest.raises(UserError, match="alerty: upload to"):
            sync_devices(stores=[str(store)], central_url=dead, batch_size=40)
    finally:
        logging.getLogger("prefect.flow_runs").removeHandler(collect)
        sync_state.save_config(state_db, saved)
    warnings = [m for m in collect.messages if "sync alert" in m]
    assert any("queue-threshold" in w and "100 events still queued" in w for w in warnings)
    assert any("failure-rate" in w for w in warnings)
    assert "flowyard.sync.queue-threshold" in _events_for(prefect_api, "flowyard.sync-device.alerty")
    central_store.ensure_schema(fresh_db)
    sync_devices(stores=[str(store)], central_url=fresh_db, force=True)
    assert _central_counts(fresh_db) == (100, 100)


def _app_writes_with_own_sync_ids(store: Path, count: int) -> None:
    """A v2-aware app that sets ``sync_id`` itself (the trigger fills only the identity)."""
    with device_store.open_store(store) as conn, device_store.write_transaction(conn):
        conn.executemany(
            "INSERT INTO events (timestamp, event_type, event_data, sync_id) VALUES (?, 'build', '{}', ?)",
            ((device_store.now_ms() - n, str(uuid.uuid4())) for n in range(count)),
        )


def test_downgrade_and_re_upgrade_never_duplicates_centrally(
    fresh_db: str, state_db: str, tmp_path: Path
) -> None:
    """``migrate down --to=v1`` drops every sync id; the re-upgrade gives the same events new
    ones. The next sync must report them as duplicates and keep one central copy each."""
    from flows.sync_devices import sync_devices

    store = make_store(tmp_path / "roundtrip.db", 500, seed=4)
    first = sync_devices(stores=[str(store)], central_url=fresh_db, batch_size=200)["devices"]["roundtrip"]
    assert first["uploaded"] == 500
    _app_writes_with_own_sync_ids(store, 20)
    assert sync_devices(stores=[str(store)], central_url=fresh_db)["devices"]["roundtrip"]["uploaded"] == 20

    down = run_cli("sync", "migrate", "down", "--to=v1", str(store))
    assert down.returncode == 0 and "520 events kept" in down.stdout, down.stderr
    with device_store.open_store(store) as conn:
        device_store.insert_events(conn, [(device_store.now_ms(), "commit", {"action": "save"})] * 30)

    again = sync_devices(stores=[str(store)], central_url=fresh_db, batch_size=200)["devices"]["roundtrip"]
    counts = (again["uploaded"], again["duplicates"], again["failed"], again["pending_after"])
    assert counts == (30, 520, 0, 0)
    assert _synced(store) == 550
    with psycopg.connect(fresh_db) as conn:
        copies = conn.execute(
            "SELECT count(*), count(DISTINCT (device_id, local_id, occurred_at, event_type)) FROM devflow.events"
        ).fetchone()
        rollup = conn.execute("SELECT sum(events) FROM devflow.rollup_daily").fetchone()[0]
    assert copies == (550, 550) and rollup == 550
    history = sync_state.history(state_db, limit=1)[0]
    assert (history.device_id, history.uploaded, history.duplicates) == ("roundtrip", 30, 520)


def test_a_configured_device_that_never_synced_raises_the_offline_alert(
    state_db: str, tmp_path: Path
) -> None:
    """No successful sync ever: the offline clock runs from when the device was configured."""
    from flows.sync_devices import sync_devices

    saved = sync_state.load_config(state_db)
    dead = "postgresql://postgres@127.0.0.1:1/nowhere"
    sync_state.save_config(state_db, saved.model_copy(update={"central_url": dead}))
    sync_state.register_device(
        state_db, make_store(tmp_path / "n.db", 10), Identity("never-synced", "u", "p")
    )
    with psycopg.connect(state_db) as conn:
        conn.execute(
            "UPDATE flowyard.sync_devices SET created_at = now() - interval '2 hours' "
            "WHERE device_id = 'never-synced'"
        )
    collect = _Collect()
    logging.getLogger("prefect.flow_runs").addHandler(collect)
    try:
        with pytest.raises(UserError, match="never-synced: upload to"):
            sync_devices()
    finally:
        logging.getLogger("prefect.flow_runs").removeHandler(collect)
        sync_state.remove_device(state_db, "never-synced")
        sync_state.save_config(state_db, saved)
    offline = [m for m in collect.messages if "sync alert offline" in m]
    assert offline == [
        "sync alert offline: device never-synced: no successful sync for 120 min (threshold 60 min)"
    ]
