"""The sync-devices flow end to end on a real Prefect server, real SQLite files and real PostgreSQL."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import orjson
import psycopg
import pytest
from psycopg import sql

from tasks import central_store, device_store, sync_state
from tasks.db import database_name, mask_url, one_row
from tasks.device_store import Identity
from tasks.embedded_pg import free_port
from tasks.errors import UserError
from tasks.sample_devices import make_store
from tasks.sync_batches import PAUSE_AFTER_UPLOAD_ENV, SyncOptions, sync_device
from tasks.sync_report import SyncIncomplete
from tests.conftest import ROOT, Role, Server, flow_run_artifacts, run_cli, scratch_database
from tests.fs_support import fill_up, immutable, small_tmpfs
from tests.process_support import until_its_sessions_end
from tests.serve_support import stored_events
from tests.sync_support import central_of_a_dba_without_a_tombstone_trigger, synced_events

pytestmark = pytest.mark.usefixtures("prefect_api")

T = TypeVar("T")


def _central_counts(url: str) -> tuple[int, int]:
    with psycopg.connect(url) as conn:
        return conn.execute("SELECT count(*), count(DISTINCT sync_id) FROM devflow.events").fetchone()


def _persisted_result(flow_state: Any) -> Any:
    """A run's result as stored by the server (not the in-process copy), failed runs included."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        stored = client.read_flow_run(flow_state.state_details.flow_run_id).state
    persisted = stored.result(raise_on_failure=False)
    return persisted.result if isinstance(persisted, SyncIncomplete) else persisted


def _central_consistent(url: str) -> None:
    """What a crash at any instant must leave in central: one copy and one key per event, rollups
    equal to counts recomputed from the events, and each project's snapshot the newest of its
    ``project_status`` events (last write wins by time, device id, local id, sync id)."""
    with psycopg.connect(url) as conn:
        copies = conn.execute(
            "SELECT count(*), count(DISTINCT sync_id), (SELECT count(*) FROM devflow.event_keys) FROM devflow.events"
        ).fetchone()
        assert copies is not None and copies[0] == copies[1] == copies[2], copies
        for table, unit in (("rollup_hourly", "hour"), ("rollup_daily", "day")):
            rollup = sql.Identifier(central_store.SCHEMA, table)
            drift = conn.execute(
                sql.SQL(
                    """
                    SELECT count(*) FROM (
                        SELECT bucket, project_id, user_id, event_type, events FROM {}
                        EXCEPT ALL
                        SELECT date_trunc(%s, occurred_at), project_id, user_id, event_type, count(*)
                        FROM devflow.events GROUP BY 1, 2, 3, 4
                    ) d
                    """
                ).format(rollup),
                (unit,),
            ).fetchone()
            total = conn.execute(sql.SQL("SELECT coalesce(sum(events), 0) FROM {}").format(rollup)).fetchone()
            assert drift == (0,) and total == (copies[0],), (table, drift, total)
        snapshots = conn.execute(
            "SELECT project_id, sync_id FROM devflow.project_status ORDER BY 1"
        ).fetchall()
        newest = conn.execute(
            """
            SELECT DISTINCT ON (project_id) project_id, sync_id FROM devflow.events WHERE event_type = %s
            ORDER BY project_id, occurred_at DESC, device_id DESC, local_id DESC, sync_id DESC
            """,
            (central_store.STATUS_EVENT,),
        ).fetchall()
    assert snapshots == newest


def _local_sync_ids(store: Path, status: str) -> set[uuid.UUID]:
    with device_store.open_store(store) as conn:
        rows = conn.execute("SELECT sync_id FROM events WHERE sync_status = ?", (status,)).fetchall()
    return {uuid.UUID(sync_id) for (sync_id,) in rows}


def _central_sync_ids(url: str) -> set[uuid.UUID]:
    with psycopg.connect(url) as conn:
        return {sync_id for (sync_id,) in conn.execute("SELECT sync_id FROM devflow.events")}


def _start_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """The real ``flowyard`` CLI in its own process group, to be SIGKILLed mid-way by :func:`_kill`."""
    return subprocess.Popen(
        [sys.executable, "-m", "deployments.cli", *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


def _kill_when(proc: subprocess.Popen[bytes], condition: Callable[[], bool]) -> None:
    """SIGKILL the process (and its group) as soon as ``condition`` holds; fails if it ends first."""
    try:
        while not condition():
            assert proc.poll() is None, f"ended before the kill point: {proc.stderr.read().decode()}"  # type: ignore[union-attr]
            time.sleep(0.002)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _start_sync(
    store: Path, central: str, batch_size: int, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    args = ("--store", str(store), "--central-url", central, "--batch-size", str(batch_size))
    return _start_cli("sync", "trigger", *args, env=env)


def _central_holds(conn: psycopg.Connection, events: int) -> Callable[[], bool]:
    """Whether central holds ``events`` events, read on one autocommit connection (the poll is tight)."""
    return lambda: one_row(conn, "SELECT count(*) FROM devflow.events")[0] >= events


def test_sigkill_between_upload_and_local_mark_then_rerun_keeps_one_copy(
    fresh_db: str, state_db: str, tmp_path: Path
) -> None:
    store = make_store(tmp_path / "crashy.db", 1000, seed=1)
    marker = tmp_path / "uploaded"
    proc = _start_sync(store, fresh_db, 300, env={PAUSE_AFTER_UPLOAD_ENV: str(marker)})
    # The first batch is committed centrally and not yet marked locally: kill it right there.
    _kill_when(proc, marker.exists)
    assert _central_counts(fresh_db) == (300, 300)
    assert synced_events(store) == 0
    _central_consistent(fresh_db)

    from flows.sync_devices import sync_devices

    result = sync_devices(stores=[str(store)], central_url=fresh_db, batch_size=300)
    outcome = result["devices"]["crashy"]
    assert (outcome["uploaded"], outcome["duplicates"], outcome["pending_after"]) == (700, 300, 0)
    assert _central_counts(fresh_db) == (1000, 1000)
    assert synced_events(store) == 1000
    _central_consistent(fresh_db)


def test_sigkill_at_several_points_of_a_sync_then_rerun_leaves_everything_consistent(
    fresh_db: str, state_db: str, tmp_path: Path
) -> None:
    """Killed wherever it happens to be once central holds more events (mid-COPY, between the
    commit and the local mark, mid-mark), a sync never leaves a locally synced event missing
    centrally, nor a duplicate, a rollup off its events or a stale snapshot; the re-run ends it."""
    from flows.sync_devices import sync_devices

    total = 600
    store = make_store(tmp_path / "killed.db", total, seed=6)
    central_store.ensure_schema(fresh_db)
    with psycopg.connect(fresh_db, autocommit=True) as poll:
        for threshold in (1, 150, 300):
            _kill_when(_start_sync(store, fresh_db, 20), _central_holds(poll, threshold))
            until_its_sessions_end(fresh_db)  # its last batch's COMMIT may still land
            assert _central_counts(fresh_db)[0] < total, "the sync ended before the kill"
            assert _local_sync_ids(store, "synced") <= _central_sync_ids(fresh_db)
            _central_consistent(fresh_db)

    outcome = sync_devices(stores=[str(store)], central_url=fresh_db, batch_size=20)["devices"]["killed"]
    assert (outcome["failed"], outcome["pending_after"]) == (0, 0)
    assert _local_sync_ids(store, "synced") == _central_sync_ids(fresh_db)
    assert _central_counts(fresh_db) == (total, total)
    _central_consistent(fresh_db)


def test_a_full_disk_fails_its_device_alone_and_the_run_after_freeing_space_syncs_it(
    fresh_db: str, state_db: str, tmp_path: Path
) -> None:
    """A device store whose disk is full: that device gets one line naming its store, the full disk
    and the fix (SQLite's bare "database or disk is full" named no fix), the other device syncs,
    and once there is room the next run syncs every event, central holding one copy of each."""
    from flows.sync_devices import sync_devices

    good = make_store(tmp_path / "good.db", 400)
    with small_tmpfs(tmp_path / "disk", "8m") as disk:
        full = make_store(disk / "full.db", 400, seed=1)
        filler = fill_up(disk)
        stores = [str(good), str(full)]
        run = sync_devices(stores=stores, central_url=fresh_db, return_state=True)
        error = (
            f"device store {full} cannot be written: its disk is full (database or disk is full); free space on "
            "that disk and sync again — its events stay pending, and central keeps one copy of any it already holds"
        )
        assert run.is_failed()
        assert str(run.result(raise_on_failure=False)) == f"1 of 2 devices did not sync fully: full: {error}"
        history = {row.device_id: row for row in sync_state.history(state_db, limit=10)}
        assert (history["good"].uploaded, history["good"].error, history["full"].error) == (400, None, error)
        filler.unlink()
        assert sync_devices(stores=stores, central_url=fresh_db)["devices"]["full"]["uploaded"] == 400
        assert synced_events(full) == 400
    assert _central_counts(fresh_db) == (800, 800)


def test_corrupt_and_locked_stores_fail_alone_while_others_sync(
    fresh_db: str, state_db: str, tmp_path: Path
) -> None:
    from flows.sync_devices import sync_devices

    good = [make_store(tmp_path / f"good{n}.db", 400, seed=n) for n in range(2)]
    corrupt = tmp_path / "corrupt.db"
    corrupt.write_bytes(b"SQLite format 3\x00" + b"\x00garbage, not a database" * 200)  # its pages are gone
    locked = make_store(tmp_path / "locked.db", 50)
    holder = sqlite3.connect(locked, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        run = sync_devices(
            stores=[str(p) for p in [*good, corrupt, locked]], central_url=fresh_db, return_state=True
        )
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert run.is_failed()
    error = run.result(raise_on_failure=False)
    assert isinstance(error, SyncIncomplete)
    message = str(error)
    assert message.startswith("2 of 4 devices did not sync fully") and "\n" not in message
    assert message in run.message
    assert "corrupt: device store" in message and "is corrupt" in message
    assert "locked: device store" in message and "is locked by another process" in message
    assert _central_counts(fresh_db) == (800, 800)
    assert [synced_events(p) for p in good] == [400, 400]
    history = {row.device_id: row for row in sync_state.history(state_db, limit=10)}
    assert history["good0"].uploaded == 400 and history["good0"].error is None
    assert "is corrupt" in history["corrupt"].error and "is locked" in history["locked"].error
    assert history["corrupt"].error.endswith("`flowyard sync configure --remove-store corrupt`")
    # What a store that could not be read held is unknown, not 0 (nothing to send).
    assert [history[d].pending_before for d in ("good0", "corrupt", "locked")] == [400, None, None]
    # The failed run still persisted every device's cursors and outcome, as read back from the server.
    persisted = _persisted_result(run)["devices"]
    assert persisted["good0"] == {
        "last_local_id": 400, "download_cursor": None, "download_central": None, "uploaded": 400, "duplicates": 0,
        "failed": 0, "pending_after": 0, "waiting_after": 0, "error": None,
    }  # fmt: skip
    assert persisted["good1"]["uploaded"] == 400 and persisted["good1"]["last_local_id"] == 400
    assert "is corrupt" in persisted["corrupt"]["error"] and "is locked" in persisted["locked"]["error"]
    # The locked device's events were untouched and sync once the lock is gone.
    sync_devices(stores=[str(locked)], central_url=fresh_db)
    assert _central_counts(fresh_db) == (850, 850)


def _central_copies(url: str, device_id: str) -> list[uuid.UUID]:
    """Every copy central holds of the device's events, duplicates included."""
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT sync_id FROM devflow.events WHERE device_id = %s", (device_id,)).fetchall()
    return [sync_id for (sync_id,) in rows]


@pytest.mark.parametrize("upgraded", [True, False], ids=["v2-pending", "v1-to-upgrade"])
@pytest.mark.parametrize("blocked", ["file", "directory"])
def test_a_store_that_cannot_be_written_fails_alone_in_one_line_and_syncs_once_writable(
    fresh_db: str, state_db: str, tmp_path: Path, upgraded: bool, blocked: str
) -> None:
    """A store flowyard may not write (the file, or its directory, where SQLite creates its
    journal) fails its device with what is wrong and the fix, while the other device syncs, and
    nothing leaves it: a v1 store fails at its upgrade; a v2 one at the store check before any
    upload (without it, it sent its first batch and failed only when marking it synced, so every
    run sent that batch again). Made writable, the next run syncs every event once."""
    from flows.sync_devices import sync_devices

    case = f"{blocked}-{'v2' if upgraded else 'v1'}"  # device ids are the stems, unique in the state database
    rw_id, ro_id = f"rw-{case}", f"ro-{case}"
    other = make_store(tmp_path / f"{rw_id}.db", 40, seed=1)
    (tmp_path / "ro").mkdir()
    identity = Identity(ro_id, "u", "p") if upgraded else None
    ro = make_store(tmp_path / "ro" / f"{ro_id}.db", 30, seed=2, identity=identity)
    reason = (
        "attempt to write a readonly database"
        if blocked == "file"
        else "unable to open database file: its directory cannot be written, so SQLite cannot create its journal there"
    )
    expected = (
        f"device store {ro} cannot be written ({reason}); give the user flowyard runs as write access to the "
        "file and its directory — its events stay pending"
    )
    with immutable(ro if blocked == "file" else ro.parent):
        run = sync_devices(stores=[str(other), str(ro)], central_url=fresh_db, return_state=True)
    assert run.is_failed()
    error = run.result(raise_on_failure=False)
    assert isinstance(error, SyncIncomplete)
    assert str(error) == f"1 of 2 devices did not sync fully: {ro_id}: {expected}"
    assert error.result["devices"][ro_id] == {"error": expected}
    assert error.result["devices"][rw_id]["uploaded"] == 40 and synced_events(other) == 40
    table = next(a for a in flow_run_artifacts(run) if a.type == "table")
    assert {row["device"]: row["error"] for row in json.loads(table.data)} == {rw_id: "", ro_id: expected}
    assert sorted(_central_copies(fresh_db, rw_id)) == sorted(_local_sync_ids(other, "synced"))
    # nothing left the store (without the store check, a v2 one sent its first batch here)
    assert _central_copies(fresh_db, ro_id) == []
    with device_store.open_store(ro) as conn:
        version = device_store.schema_version(conn)
        left = device_store.counts(conn) if upgraded else None
    if left is not None:
        assert (version, left.pending, left.failed, synced_events(ro)) == (device_store.V2, 30, 0, 0)
    else:  # the upgrade was rolled back: the store is v1 as it was
        assert version == device_store.V1

    again = sync_devices(stores=[str(other), str(ro)], central_url=fresh_db)
    assert again["devices"][ro_id]["error"] is None and again["devices"][ro_id]["pending_after"] == 0
    for store, device in ((other, rw_id), (ro, ro_id)):
        assert sorted(_central_copies(fresh_db, device)) == sorted(_local_sync_ids(store, "synced"))
    assert [synced_events(p) for p in (other, ro)] == [40, 30]
    assert _central_counts(fresh_db) == (70, 70)


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
    assert (counts.pending, counts.failed, synced_events(store), attempts) == (30, 0, 0, 0)


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
        assert result["skipped"].startswith("disabled devices not synced: cfg-off ")
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
        [row] = json.loads(table.data)
        assert set(row) == {
            "device", "pending before", "uploaded", "duplicates skipped", "failed", "lag", "error"
        }  # fmt: skip
        assert row["lag"].endswith("s") and row["lag"] != "-"
        del row["lag"]
        assert row == {
            "device": "cfg-on", "pending before": 120, "uploaded": 120, "duplicates skipped": 0,
            "failed": 0, "error": "",
        }  # fmt: skip
        progress = next(a for a in mine if a.type == "progress")
        assert progress.data == 100.0
    finally:
        sync_state.remove_device(state_db, "cfg-on")
        sync_state.remove_device(state_db, "cfg-off")
        sync_state.save_config(state_db, saved)


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
        run = sync_devices(stores=[str(store)], central_url=dead, batch_size=40, return_state=True)
        assert run.is_failed() and "alerty: upload to" in run.message
    finally:
        logging.getLogger("prefect.flow_runs").removeHandler(collect)
        sync_state.save_config(state_db, saved)
    warnings = [m for m in collect.messages if "sync alert" in m]
    assert any("queue-threshold" in w and "100 events still queued" in w for w in warnings)
    assert any("failure-rate" in w for w in warnings)
    event_filter = {"event": {"name": ["flowyard.sync.queue-threshold"]}, "resource": {"id": ["flowyard.sync-device.alerty"]}}
    assert stored_events(prefect_api, event_filter), "the queue-threshold alert reached the Prefect server"
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
    assert synced_events(store) == 550
    with psycopg.connect(fresh_db) as conn:
        copies = conn.execute(
            "SELECT count(*), count(DISTINCT (device_id, local_id, occurred_at, event_type)) FROM devflow.events"
        ).fetchone()
        rollup = conn.execute("SELECT sum(events) FROM devflow.rollup_daily").fetchone()[0]
    assert copies == (550, 550) and rollup == 550
    history = sync_state.history(state_db, limit=1)[0]
    assert (history.device_id, history.uploaded, history.duplicates) == ("roundtrip", 30, 520)


def _rewriting(store: Path) -> Callable[[], bool]:
    """Whether a writer is deep in a transaction that rewrites the store: its rollback journal,
    which exists from the transaction's first change to its commit, holds half the file already."""
    journal = store.with_name(store.name + "-journal")
    half = store.stat().st_size // 2

    def deep() -> bool:
        try:
            return journal.stat().st_size >= half
        except FileNotFoundError:
            return False

    return deep


def _part_upgraded(store: Path) -> Callable[[], bool]:
    """Whether an upgrade of the store has committed its first chunk of events (and not its end)."""

    def part() -> bool:
        with device_store.open_store(store) as conn:
            try:
                done = conn.execute("SELECT done_through FROM sync_upgrade_progress").fetchone()[0]
                return bool(done != device_store.BEFORE_FIRST_ID)
            except sqlite3.OperationalError:  # no such table: not begun, or finished
                return False

    return part


def test_sigkill_mid_upgrade_or_downgrade_leaves_the_store_as_it_was_and_the_rerun_completes(
    fresh_db: str, state_db: str, tmp_path: Path
) -> None:
    """`migrate down` changes the store in one transaction, `migrate up` in committed steps:
    killed while rewriting 100,000 events (the upgrade: once part of them have their sync ids),
    the store reopens at its old version with every event (and, for the downgrade, every sync
    id and status), and the same command then completes."""
    store = make_store(tmp_path / "halfway.db", 100_000, seed=9)
    ids = ("--device-id", "halfway", "--user-id", "u", "--project-id", "p")
    _kill_when(_start_cli("sync", "migrate", "up", str(store), *ids), _part_upgraded(store))
    with device_store.open_store(store) as conn:
        assert device_store.schema_version(conn) == device_store.V1
        assert conn.execute("SELECT count(*) FROM events").fetchone() == (100_000,)
    up = run_cli("sync", "migrate", "up", str(store), *ids)
    assert up.returncode == 0 and "upgraded to v2" in up.stdout, up.stderr
    with device_store.open_store(store) as conn:
        conn.execute("UPDATE events SET sync_status = 'synced' WHERE id % 2 = 0")
        before = conn.execute("SELECT id, sync_id, sync_status FROM events ORDER BY id").fetchall()
    assert len({sync_id for _, sync_id, _ in before}) == 100_000

    _kill_when(_start_cli("sync", "migrate", "down", "--to=v1", str(store)), _rewriting(store))
    with device_store.open_store(store) as conn:
        assert device_store.schema_version(conn) == device_store.V2
        assert conn.execute("SELECT id, sync_id, sync_status FROM events ORDER BY id").fetchall() == before
    down = run_cli("sync", "migrate", "down", "--to=v1", str(store))
    assert down.returncode == 0 and "downgraded to v1, 100000 events kept" in down.stdout, down.stderr


@contextmanager
def _offline_for_two_hours(
    state_db: str, store: Path, device_id: str, central: str = "postgresql://postgres@127.0.0.1:1/nowhere"
) -> Iterator[_Collect]:
    """A device configured two hours ago, syncing into ``central`` (by default one that cannot be
    reached); yields the run log's collector. The offline threshold is the default hour, so every
    run that is no successful sync raises the alert."""
    saved = sync_state.load_config(state_db)
    sync_state.save_config(state_db, saved.model_copy(update={"central_url": central}))
    sync_state.register_device(state_db, store, Identity(device_id, "u", "p"))
    with psycopg.connect(state_db) as conn:
        conn.execute(
            "UPDATE flowyard.sync_devices SET created_at = now() - interval '2 hours' WHERE device_id = %s",
            (device_id,),
        )
    collect = _Collect()
    logging.getLogger("prefect.flow_runs").addHandler(collect)
    try:
        yield collect
    finally:
        logging.getLogger("prefect.flow_runs").removeHandler(collect)
        sync_state.remove_device(state_db, device_id)
        sync_state.save_config(state_db, saved)


def test_a_configured_device_that_never_synced_raises_the_offline_alert(
    state_db: str, tmp_path: Path
) -> None:
    """No successful sync ever: the offline clock runs from when the device was configured."""
    from flows.sync_devices import sync_devices

    with _offline_for_two_hours(state_db, make_store(tmp_path / "n.db", 10), "never-synced") as collect:
        run = sync_devices(return_state=True)
        assert run.is_failed() and "never-synced: upload to" in run.message
    offline = [m for m in collect.messages if "sync alert offline" in m]
    assert offline == [
        "sync alert offline: device never-synced: no successful sync for 120 min (threshold 60 min)"
    ]


def test_a_run_that_only_finds_events_waiting_out_their_backoff_is_no_successful_sync(
    state_db: str, tmp_path: Path
) -> None:
    """Central down for good: after the first failed run every queued event waits out its backoff
    (8 min after the 5th attempt, longer than the schedule's 5), so the next run reads nothing to
    send. That run never reached central: it must not count as a successful sync, or each such
    run resets the offline clock and the offline alert never fires however long central is down."""
    from flows.sync_devices import sync_devices

    store = make_store(tmp_path / "w.db", 10)
    with _offline_for_two_hours(state_db, store, "waiting") as collect:
        assert sync_devices(return_state=True).is_failed()
        with sqlite3.connect(store) as conn:
            conn.execute("UPDATE events SET next_retry_at = next_retry_at + 3600000")
        second = sync_devices()
        device = {d.device_id: d for d in sync_state.list_devices(state_db)}["waiting"]
    assert second["devices"]["waiting"]["uploaded"] == 0
    assert second["devices"]["waiting"]["waiting_after"] == 10
    assert device.last_success_at is None
    offline = [m for m in collect.messages if "sync alert offline" in m]
    assert len(offline) == 2 and all("device waiting: no successful sync for 120 min" in m for m in offline)


def test_a_device_whose_only_event_central_refuses_is_not_offline(
    state_db: str, fresh_db: str, tmp_path: Path
) -> None:
    """Central answers every run but refuses the device's one event for its data (a text time).
    That is contact with central, so only the failure-rate alert speaks: counted as no successful
    sync, the refusal and every run that then found the event waiting out its backoff (nothing to
    send) left the offline clock running, and the offline alert fired although central was up."""
    from flows.sync_devices import sync_devices

    store = make_store(tmp_path / "r.db", 1)
    with sqlite3.connect(store) as conn:
        conn.execute("UPDATE events SET timestamp = 'soon'")
    with _offline_for_two_hours(state_db, store, "refused", fresh_db) as collect:
        first = sync_devices(return_state=True)
        assert first.is_failed() and "refused: upload to" in first.message
        with psycopg.connect(state_db) as conn:  # hours later, the event still waiting out its backoff
            conn.execute(
                "UPDATE flowyard.sync_devices SET last_success_at = now() - interval '2 hours' "
                "WHERE device_id = 'refused'"
            )
        second = sync_devices()["devices"]["refused"]
        device = {d.device_id: d for d in sync_state.list_devices(state_db)}["refused"]
    assert (second["uploaded"], second["failed"], second["waiting_after"], second["error"]) == (0, 0, 1, None)
    assert device.last_success_at is not None
    assert device.last_success_at > device.created_at + timedelta(hours=1)  # the second run's success
    alerts = [m.split(":")[0] for m in collect.messages if m.startswith("sync alert")]
    assert alerts == ["sync alert failure-rate"]


def test_hash_mode_sends_only_keyed_hashes_of_fields_outside_the_allowlist(
    fresh_db: str, state_db: str, tmp_path: Path
) -> None:
    from flows.sync_devices import sync_devices

    allowlist, key = ("action", "duration_ms"), "test-key"
    store = make_store(tmp_path / "hashed.db", 120, seed=7, identity=Identity("hashed", "u", "p"))
    with device_store.open_store(store) as conn:
        raw = {
            local_id: orjson.loads(data)
            for local_id, data in conn.execute("SELECT id, event_data FROM events")
        }
    saved = sync_state.load_config(state_db)
    sync_state.update_config(state_db, {}, privacy={"allowlist": allowlist, "mode": "hash", "hash_key": key})
    try:
        result = sync_devices(stores=[str(store)], central_url=fresh_db)
    finally:
        sync_state.save_config(state_db, saved)
    assert result["devices"]["hashed"]["uploaded"] == 120
    with psycopg.connect(fresh_db) as conn:
        central = dict(conn.execute("SELECT local_id, event_data FROM devflow.events").fetchall())
    assert central.keys() == raw.keys()
    for local_id, original in raw.items():
        expected = {
            (field, value) if field in allowlist else (_keyed_hash(field, key), _keyed_hash(value, key))
            for field, value in original.items()
        }
        assert central[local_id] == dict(expected)
    stored = json.dumps(list(central.values()))
    private = {f for data in raw.values() for f in data if f not in allowlist} | {
        v for data in raw.values() for f, v in data.items() if f not in allowlist and isinstance(v, str)
    }
    assert private and not [value for value in private if value in stored]


def _keyed_hash(value: object, key: str) -> str:
    """The documented hashed form of a field's name or value: HMAC-SHA256 of its canonical JSON."""
    digest = hmac.new(key.encode(), orjson.dumps(value, option=orjson.OPT_SORT_KEYS), hashlib.sha256)
    return "hmac-sha256:" + digest.hexdigest()


def _write_status(store: Path, timestamp_ms: int, status: str) -> None:
    with device_store.open_store(store) as conn:
        device_store.insert_events(conn, [(timestamp_ms, "project_status", {"status": status})])


def test_skewed_device_clocks_converge_on_the_newest_status_snapshot(
    fresh_db: str, state_db: str, tmp_path: Path
) -> None:
    """Last write wins by the device's event time (ties: the greater device id), whatever the
    arrival order; a third device downloading the snapshots never sees the value move back."""
    from flows.sync_devices import sync_devices

    central_store.ensure_schema(fresh_db)
    options = SyncOptions(central_url=fresh_db)
    now, hour = device_store.now_ms(), 3_600_000
    ahead, behind, reader = (
        make_store(tmp_path / f"{name}.db", 0, identity=Identity(name, "u", "skewed"))
        for name in ("skew-ahead", "skew-behind", "skew-reader")
    )

    def upload(store: Path) -> None:
        report = sync_device(store, Identity(store.stem, "u", "skewed"), options)
        assert (report.uploaded, report.error) == (1, None)

    def download() -> tuple[list[tuple[str, str, str]], int]:
        devices = sync_devices(stores=[str(reader)], central_url=fresh_db, download_updates=True)["devices"]
        with device_store.open_store(reader) as conn:
            rows = conn.execute("SELECT project_id, status, device_id FROM remote_project_status").fetchall()
        return rows, devices["skew-reader"]["download_cursor"]

    _write_status(ahead, now + hour, "green")  # this machine's clock runs an hour fast
    upload(ahead)
    first, cursor = download()
    assert first == [("skewed", '{"status": "green"}', "skew-ahead")]

    _write_status(behind, now - hour, "red")  # written later, stamped earlier: the older snapshot
    upload(behind)
    assert download() == (first, cursor)  # central kept the newer one, so nothing new to download

    _write_status(behind, now + hour, "yellow")  # same event time: the greater device id wins
    upload(behind)
    rows, later = download()
    assert rows == [("skewed", '{"status": "yellow"}', "skew-behind")] and later > cursor


def _downloaded(store: Path) -> list[tuple[str, str, str, str, int]]:
    with device_store.open_store(store) as conn:
        return conn.execute("SELECT * FROM remote_project_status ORDER BY project_id").fetchall()


def test_a_downgraded_and_re_upgraded_store_downloads_the_snapshots_again(
    fresh_db: str, state_db: str, tmp_path: Path
) -> None:
    """`migrate down --to=v1` drops the downloaded snapshots with the rest of the sync metadata,
    but the device's download cursor in flowyard's state still said they were applied: every
    later run downloaded only newer changes, and a project that did not change again stayed
    missing from the store for good."""
    from flows.sync_devices import sync_devices

    store = make_store(tmp_path / "puller.db", 120, seed=3, identity=Identity("puller", "u", "web"))
    def sync() -> dict[str, Any]:
        run = sync_devices(stores=[str(store)], central_url=fresh_db, download_updates=True)
        return run["devices"]["puller"]

    first = sync()
    snapshots = _downloaded(store)
    assert first["download_cursor"] > 0 and [row[0] for row in snapshots] == ["web"]

    assert run_cli("sync", "migrate", "down", "--to=v1", str(store)).returncode == 0
    ids = ("--device-id", "puller", "--user-id", "u", "--project-id", "web")
    up = run_cli("sync", "migrate", "up", str(store), *ids)
    assert up.returncode == 0, up.stderr
    again = sync()
    assert (again["uploaded"], again["duplicates"], again["error"]) == (0, 120, None)
    assert _downloaded(store) == snapshots
    assert again["download_cursor"] == first["download_cursor"]


def test_a_central_restored_from_a_backup_is_downloaded_anew(fresh_db: str, tmp_path: Path) -> None:
    """A restored central keeps its identity but restarts its change sequence below the device's
    cursor: the first change after the restore got a seq the device had passed, so it never
    reached the store, which also kept a project central no longer had."""
    central_store.ensure_schema(fresh_db)
    identity = Identity("restore-reader", "u", "reader")
    reader = make_store(tmp_path / "reader.db", 0, identity=identity)
    _publish(fresh_db, tmp_path, "alpha", "green")
    with psycopg.connect(fresh_db) as conn:
        backup = one_row(conn, "SELECT last_value FROM devflow.change_seq")[0]
    _publish(fresh_db, tmp_path, "beta", "green")
    first = sync_device(reader, identity, SyncOptions(central_url=fresh_db), 0, None)
    assert [row[0] for row in _downloaded(reader)] == ["alpha", "beta"]

    with psycopg.connect(fresh_db, autocommit=True) as conn:  # the backup taken before beta, restored
        conn.execute("DELETE FROM devflow.project_status WHERE seq > %s", (backup,))
        conn.execute("DELETE FROM devflow.project_deletions WHERE seq > %s", (backup,))  # a backup has no tombstone of it
        conn.execute("SELECT setval('devflow.change_seq', %s)", (backup,))
    _publish(fresh_db, tmp_path, "gamma", "green")
    again = sync_device(
        reader, identity, SyncOptions(central_url=fresh_db), first.download_cursor, first.download_central
    )
    assert again.error is None
    assert [row[0] for row in _downloaded(reader)] == ["alpha", "gamma"]


@pytest.fixture()
def other_central(pg: Server) -> Iterator[str]:
    """A second central database on the session server; dropped after the test."""
    with scratch_database(pg) as url:
        yield url


def _publish(central: str, directory: Path, project: str, status: str) -> None:
    """A device of ``project`` uploads a status snapshot of it to ``central``."""
    identity = Identity(f"pub-{project}", "u", project)
    store = make_store(directory / f"{identity.device_id}-{uuid.uuid4().hex[:6]}.db", 0, identity=identity)
    _write_status(store, device_store.now_ms(), status)
    report = sync_device(store, identity, SyncOptions(central_url=central))
    assert (report.uploaded, report.error) == (1, None)


def _publish_in_two_centrals(ahead: str, behind: str, tmp_path: Path) -> None:
    """Project "shared" green in ``ahead``, whose change sequence is a million ahead, and red in
    ``behind``, plus a project of each central's own."""
    central_store.ensure_schema(ahead)
    with psycopg.connect(ahead, autocommit=True) as conn:
        conn.execute("SELECT setval('devflow.change_seq', 1000000)")
    _publish(ahead, tmp_path, "shared", "green")
    _publish(ahead, tmp_path, "only-ahead", "green")
    _publish(behind, tmp_path, "shared", "red")
    _publish(behind, tmp_path, "only-behind", "red")


def test_a_store_synced_into_another_central_gets_all_of_its_snapshots_and_none_of_the_old(
    fresh_db: str, other_central: str, state_db: str, tmp_path: Path
) -> None:
    """Each central numbers its snapshot changes with its own sequence, but the device's download
    cursor (and the store's newest snapshot) was kept as if there were one: after a run into a
    central far ahead, a run into another (`--central-url`) skipped every one of its snapshots
    up to that cursor, and the store kept the first central's statuses."""
    from flows.sync_devices import sync_devices

    ahead, behind = fresh_db, other_central
    _publish_in_two_centrals(ahead, behind, tmp_path)
    reader = make_store(tmp_path / "switcher.db", 0, identity=Identity("switcher", "u", "shared"))

    def download(central: str) -> tuple[list[tuple[str, str]], int]:
        run = sync_devices(stores=[str(reader)], central_url=central, download_updates=True)
        cursor = run["devices"]["switcher"]["download_cursor"]
        [device] = [d for d in sync_state.list_devices(state_db) if d.device_id == "switcher"]
        assert device.download_cursor == cursor
        # the run's result names the central its cursor counts in
        with psycopg.connect(central) as conn:
            (central_id,) = one_row(conn, "SELECT central_id::text FROM devflow.central_identity")
        assert run["devices"]["switcher"]["download_central"] == str(device.download_central) == central_id
        with device_store.open_store(reader) as conn:
            rows = conn.execute("SELECT project_id, status FROM remote_project_status ORDER BY 1").fetchall()
        return rows, cursor

    green, red = '{"status": "green"}', '{"status": "red"}'
    try:
        rows, cursor_ahead = download(ahead)
        assert rows == [("only-ahead", green), ("shared", green)] and cursor_ahead > 1_000_000
        rows, cursor_behind = download(behind)
        assert rows == [("only-behind", red), ("shared", red)] and 0 < cursor_behind < 1_000_000

        with device_store.open_store(reader) as conn:  # only a download from 0 would rewrite it
            conn.execute("UPDATE remote_project_status SET status = 'kept' WHERE project_id = 'shared'")
        assert download(behind) == ([("only-behind", red), ("shared", "kept")], cursor_behind)

        assert download(ahead) == ([("only-ahead", green), ("shared", green)], cursor_ahead)
    finally:
        sync_state.remove_device(state_db, "switcher")


def test_a_switch_whose_cursor_was_never_recorded_does_not_mix_two_centrals_snapshots(
    fresh_db: str, other_central: str, tmp_path: Path
) -> None:
    """A run into central B after A replaced the store's snapshots with B's, but recording its
    cursor failed (the state database down): flowyard still held A's cursor, and the store's
    newest seq (B's) was taken for a position in A. The next run into A downloaded only A's
    changes after it, on top of B's snapshots: the store kept B's projects among A's."""
    ahead, behind = fresh_db, other_central
    _publish_in_two_centrals(ahead, behind, tmp_path)
    identity = Identity("switcher", "u", "shared")
    reader = make_store(tmp_path / "switcher.db", 0, identity=identity)

    def snapshots() -> list[tuple[str, str]]:
        with device_store.open_store(reader) as conn:
            return conn.execute("SELECT project_id, status FROM remote_project_status ORDER BY 1").fetchall()

    green, red = '{"status": "green"}', '{"status": "red"}'
    first = sync_device(reader, identity, SyncOptions(ahead), download_since=0)
    assert snapshots() == [("only-ahead", green), ("shared", green)] and first.download_cursor
    switched = sync_device(
        reader, identity, SyncOptions(behind), first.download_cursor, first.download_central
    )
    assert snapshots() == [("only-behind", red), ("shared", red)] and switched.error is None
    state_down = f"postgresql://postgres@127.0.0.1:{free_port()}/flowyard"
    with pytest.raises((psycopg.Error, UserError)):
        sync_state.record_device_run(state_down, None, switched)
    # flowyard still holds the cursor in `ahead` of the first run
    back = sync_device(reader, identity, SyncOptions(ahead), first.download_cursor, first.download_central)
    assert (back.download_cursor, back.download_central, back.error) == (
        first.download_cursor, first.download_central, None
    )
    assert snapshots() == [("only-ahead", green), ("shared", green)]


def test_re_upgrade_by_the_cli_keeps_the_configured_device_and_one_central_copy(
    fresh_db: str, state_db: str, tmp_path: Path
) -> None:
    """`sync migrate up STORE` used to stamp the file name as the device id. A configured device's
    store, downgraded and re-upgraded that way, was then synced as another device: every event
    went to central a second time, under user 'unknown'."""
    from flows.sync_devices import sync_devices

    store = make_store(tmp_path / "devflow.db", 60, seed=8)
    added = run_cli("sync", "configure", "--add-store", str(store), "--device-id", "laptop-1",
                    "--user-id", "alice", "--project-id", "web")  # fmt: skip
    assert added.returncode == 0, added.stderr
    try:
        assert sync_devices(stores=[str(store)], central_url=fresh_db)["devices"]["laptop-1"]["uploaded"] == 60
        assert run_cli("sync", "migrate", "down", "--to=v1", str(store)).returncode == 0
        up = run_cli("sync", "migrate", "up", str(store))
        assert up.returncode == 0 and "upgraded to v2 as device 'laptop-1'" in up.stdout, up.stderr

        again = sync_devices(stores=[str(store)], central_url=fresh_db)["devices"]["laptop-1"]
        assert (again["uploaded"], again["duplicates"]) == (0, 60)
        with psycopg.connect(fresh_db) as conn:
            rows = conn.execute(
                "SELECT device_id, user_id, project_id, count(*) FROM devflow.events GROUP BY 1, 2, 3"
            ).fetchall()
        assert rows == [("laptop-1", "alice", "web", 60)]
    finally:
        sync_state.remove_device(state_db, "laptop-1")


def test_an_upgraded_store_keeps_its_recorded_ids_when_registered(state_db: str, tmp_path: Path) -> None:
    """Registering an upgraded store under other ids used to be accepted and then ignored: its
    events went to central under the recorded ids, and the configured device never synced."""
    store = make_store(tmp_path / "devflow.db", 5)
    assert run_cli("sync", "migrate", "up", str(store), "--device-id", "desk-7").returncode == 0
    refused = run_cli("sync", "configure", "--add-store", str(store), "--device-id", "laptop-1", "--user-id", "al")
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert (
        f"device store {store} was upgraded as device 'desk-7' (user 'unknown', project 'default') and its "
        "events carry those ids; leave out --device-id 'laptop-1', --user-id 'al' to keep them"
    ) in refused.stderr
    assert "desk-7" not in {d.device_id for d in sync_state.list_devices(state_db)}
    added = run_cli("sync", "configure", "--add-store", str(store))
    try:
        assert added.returncode == 0 and "added device desk-7" in added.stdout, added.stderr
    finally:
        sync_state.remove_device(state_db, "desk-7")


def test_a_store_registered_under_another_id_than_its_own_is_refused(
    fresh_db: str, state_db: str, tmp_path: Path
) -> None:
    """Stores registered by older versions may disagree with the id recorded in them; syncing
    such a store used to upload under the recorded id while the run reported the registered one.
    The command the error gives is quoted for the shell (it split a spaced id or path in two)."""
    from flows.sync_devices import sync_devices

    (tmp_path / "dev home").mkdir()
    store = make_store(tmp_path / "dev home" / "devflow.db", 10, identity=Identity("devflow", "unknown", "default"))
    sync_state.register_device(state_db, store, Identity("al's laptop", "alice", "web"))
    try:
        state = sync_devices(stores=[str(store)], central_url=fresh_db, return_state=True)
        assert state.is_failed()
        report = _persisted_result(state)["devices"]["al's laptop"]
        assert report["error"] == (
            f"device store {store.resolve()} was upgraded as device 'devflow', but flowyard has it as "
            "\"al's laptop\"; register it under its own id: `flowyard sync configure --remove-store "
            f"'al'\"'\"'s laptop' --add-store '{store.resolve()}'`"
        )
        assert _central_counts(fresh_db) == (0, 0)
    finally:
        sync_state.remove_device(state_db, "al's laptop")


def test_two_stores_upgraded_under_one_device_id_are_refused(fresh_db: str, tmp_path: Path) -> None:
    """Two `devflow.db` stores upgraded under the same id were merged into one device: one lock,
    one state row, one result entry (the other store's counts lost) and one origin key."""
    from flows.sync_devices import sync_devices

    shared = Identity("devflow", "unknown", "default")
    stores = []
    for home in ("alice", "bob"):
        (tmp_path / home).mkdir()
        stores.append(make_store(tmp_path / home / "devflow.db", 10, identity=shared))
    with pytest.raises(UserError) as err:
        sync_devices(stores=[str(s) for s in stores], central_url=fresh_db)
    assert str(err.value).startswith(
        f"device stores {stores[0].resolve()} and {stores[1].resolve()} are both device 'devflow'; central "
        "cannot tell their events apart."
    )
    with psycopg.connect(fresh_db) as conn:  # refused before central was touched
        assert conn.execute("SELECT to_regclass('devflow.events')").fetchone() == (None,)


def test_a_copy_of_a_devices_store_named_alone_is_refused(fresh_db: str, state_db: str, tmp_path: Path) -> None:
    """A developer copies their store (and with it the device id it records) elsewhere and syncs
    the copy by its path. Named with the original, or added by `configure`, it was refused; named
    alone, it synced as that device, and central then kept two different events under each later
    local id of the device, one from either store, for good. Refused before central is touched;
    a store that moved (nothing left at the device's path) still syncs as the device."""
    from flows.sync_devices import sync_devices

    identity = Identity("cloned", "alice", "proj")
    original = make_store(tmp_path / "devflow.db", 10, identity=identity)
    sync_state.register_device(state_db, original, identity)
    try:
        (tmp_path / "new-laptop").mkdir()
        copy = tmp_path / "new-laptop" / "devflow.db"
        shutil.copyfile(original, copy)
        with pytest.raises(UserError) as err:
            sync_devices(stores=[str(copy)], central_url=fresh_db)
        assert str(err.value).startswith(
            f"device stores {original} and {copy} are both device 'cloned'; central cannot tell their events apart."
        )
        with psycopg.connect(fresh_db) as conn:
            assert conn.execute("SELECT to_regclass('devflow.events')").fetchone() == (None,)
        original.unlink()  # the store moved to the new laptop: the device's, synced as it
        moved = sync_devices(stores=[str(copy)], central_url=fresh_db)
        assert moved["devices"]["cloned"]["uploaded"] == 10
    finally:
        sync_state.remove_device(state_db, "cloned")


def test_two_paths_of_one_store_file_are_refused_before_any_device_syncs(
    fresh_db: str, state_db: str, tmp_path: Path
) -> None:
    """A hard link is a second path of the same file that resolving cannot merge: the run made
    two devices of it, and the one that ran second failed as "upgraded as device ...". A symlink
    or a relative spelling of one path stays one device; an empty entry in the list is its own
    one line, not "a directory"."""
    from flows.sync_devices import sync_devices

    store = make_store(tmp_path / "linked.db", 10)
    os.link(store, tmp_path / "hard.db")
    (tmp_path / "soft.db").symlink_to(store)
    with pytest.raises(UserError) as err:
        sync_devices(stores=[str(store), str(tmp_path / "soft.db"), str(tmp_path / "hard.db")], central_url=fresh_db)
    assert str(err.value) == (
        f"device stores {store.resolve()} and {(tmp_path / 'hard.db').resolve()} are one file (hard links); "
        "name it once: as two devices, both would sync its events"
    )
    with pytest.raises(UserError, match="^device store path '' is empty; give the path of the device's SQLite file"):
        sync_devices(stores=[str(store), ""], central_url=fresh_db)
    with device_store.open_store(store) as conn:
        assert device_store.schema_version(conn) == device_store.V1
    with psycopg.connect(fresh_db) as conn:  # refused before central was touched
        assert conn.execute("SELECT to_regclass('devflow.events')").fetchone() == (None,)
    result = sync_devices(stores=[str(store), str(tmp_path / "soft.db")], central_url=fresh_db)
    assert list(result["devices"]) == ["linked"] and result["devices"]["linked"]["uploaded"] == 10
    sync_state.remove_device(state_db, "linked")


def _blocked_by(holder: int, watcher: psycopg.Connection) -> int | None:
    """The pid of a session waiting on a lock the session with pid ``holder`` holds, if one is."""
    row = watcher.execute(
        "SELECT pid FROM pg_stat_activity WHERE %s = ANY(pg_blocking_pids(pid))", (holder,)
    ).fetchone()
    return row[0] if row else None


def _until(probe: Callable[[], T], *running: subprocess.Popen[bytes]) -> T:
    """Wait until ``probe`` returns a true value and return it; fails if one of the ``running``
    processes ends first."""
    while not (value := probe()):
        for proc in running:
            assert proc.poll() is None, f"ended too early: {proc.stderr.read().decode()}"  # type: ignore[union-attr]
        time.sleep(0.01)
    return value


def test_sigkill_mid_configure_applies_nothing_and_the_rerun_applies_everything(
    state_db: str, tmp_path: Path
) -> None:
    """`sync configure` saves the settings, adds a store and removes a device in one transaction:
    killed while it waits on a row lock at the removal (after the settings and the new device
    were written), central keeps the configuration and device list it had; the same command
    then applies all of it."""
    held = make_store(tmp_path / "held.db", 3)
    added = make_store(tmp_path / "added.db", 3)
    sync_state.register_device(state_db, held, Identity("configure-held", "u", "p"))
    before = sync_state.load_config(state_db)
    args = ("sync", "configure", "--batch-size", "4242", "--queue-threshold", "17",
            "--add-store", str(added), "--device-id", "configure-added", "--remove-store", "configure-held")  # fmt: skip
    devices = lambda: {d.device_id for d in sync_state.list_devices(state_db)}  # noqa: E731
    try:
        with psycopg.connect(state_db) as holder, psycopg.connect(state_db, autocommit=True) as watcher:
            holder.execute("SELECT 1 FROM flowyard.sync_devices WHERE device_id = 'configure-held' FOR UPDATE")
            _kill_when(_start_cli(*args), lambda: _blocked_by(holder.info.backend_pid, watcher) is not None)
            waiting = _blocked_by(holder.info.backend_pid, watcher)  # the killed client's session waits on
            holder.rollback()  # now it goes on, finds its client gone and rolls back
            _until(lambda: not watcher.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (waiting,)).fetchone())
        assert sync_state.load_config(state_db) == before
        assert "configure-held" in devices() and "configure-added" not in devices()
        again = run_cli(*args)
        assert again.returncode == 0, again.stderr
        config = sync_state.load_config(state_db)
        assert (config.batch_size, config.alerts.queue_threshold) == (4242, 17)
        assert "configure-held" not in devices() and "configure-added" in devices()
    finally:
        for device in {"configure-held", "configure-added"} & devices():
            sync_state.remove_device(state_db, device)
        sync_state.save_config(state_db, before)


def test_concurrent_configures_both_apply(state_db: str, tmp_path: Path) -> None:
    """Two `sync configure` calls at once: the second waits for the first's transaction and
    merges into what it saved, instead of overwriting it with the settings it read before
    (each call reads, merges and saves the whole configuration)."""
    held = make_store(tmp_path / "held.db", 3)
    sync_state.register_device(state_db, held, Identity("configure-held", "u", "p"))
    before = sync_state.load_config(state_db)
    try:
        with psycopg.connect(state_db) as holder, psycopg.connect(state_db, autocommit=True) as watcher:
            holder.execute("SELECT 1 FROM flowyard.sync_devices WHERE device_id = 'configure-held' FOR UPDATE")
            first = _start_cli("sync", "configure", "--batch-size", "4343", "--remove-store", "configure-held")
            # the first call has read and saved the settings, uncommitted, when it waits at the removal
            waiting = _until(lambda: _blocked_by(holder.info.backend_pid, watcher), first)
            second = _start_cli("sync", "configure", "--queue-threshold", "23")
            _until(lambda: _blocked_by(waiting, watcher), first, second)
            holder.rollback()
            assert (first.wait(), second.wait()) == (0, 0), (first.stderr.read(), second.stderr.read())  # type: ignore[union-attr]
        config = sync_state.load_config(state_db)
        assert (config.batch_size, config.alerts.queue_threshold) == (4343, 23)
        assert "configure-held" not in {d.device_id for d in sync_state.list_devices(state_db)}
    finally:
        if "configure-held" in {d.device_id for d in sync_state.list_devices(state_db)}:
            sync_state.remove_device(state_db, "configure-held")
        sync_state.save_config(state_db, before)


def test_an_explicit_empty_store_list_is_refused(state_db: str, tmp_path: Path) -> None:
    """``stores=[]`` (a templated parameter that rendered empty) used to sync every configured
    device, as if stores had been left out."""
    from flows.sync_devices import sync_devices

    store = make_store(tmp_path / "not-now.db", 10)
    sync_state.register_device(state_db, store, Identity("not-now", "u", "p"))
    try:
        with pytest.raises(UserError) as info:
            sync_devices(stores=[], central_url="postgresql://nowhere.invalid/central")
    finally:
        sync_state.remove_device(state_db, "not-now")
    assert str(info.value) == (
        "stores=[] names no store; omit stores (or pass null) to sync the configured devices"
    )
    with device_store.open_store(store) as conn:
        assert device_store.schema_version(conn) == device_store.V1  # never touched


def test_an_empty_central_or_state_url_is_refused_alike_and_touches_no_store(state_db: str, tmp_path: Path) -> None:
    """An empty ``central_url`` (a template that rendered empty) silently synced into the configured
    central while an empty ``state_database_url`` was refused as "not a PostgreSQL URL: ''": both
    are refused now, as every flowyard database URL is, in the same words."""
    from flows.sync_controls import sync_configure, sync_history, sync_status
    from flows.sync_devices import sync_devices

    store = make_store(tmp_path / "empty-url.db", 4)
    sync_state.register_device(state_db, store, Identity("empty-url", "u", "p"))
    central = (
        "--central-url (central_url) is empty; give a postgresql:// URL, or leave it out to keep the configured "
        "central, or give 'default' to go back to the default (database devflow_central on flowyard's server)"
    )
    state = (
        "state_database_url is empty; give a postgresql:// URL, or leave it out for flowyard's state database "
        "(FLOWYARD_DATABASE_URL, else the embedded server)"
    )
    try:
        for run, expected in (
            (lambda: sync_devices(stores=[str(store)], central_url=""), central),
            (lambda: sync_devices(stores=[str(store)], state_database_url=""), state),
            (lambda: sync_status(state_database_url=""), state),
            (lambda: sync_history(state_database_url=""), state),
            (lambda: sync_configure(batch_size=5, state_database_url=""), state),
        ):
            with pytest.raises(UserError) as info:
                run()
            assert str(info.value) == expected
    finally:
        sync_state.remove_device(state_db, "empty-url")
    with device_store.open_store(store) as conn:
        assert device_store.schema_version(conn) == device_store.V1  # never touched


def test_a_known_device_whose_store_is_gone_fails_alone_while_the_others_sync(
    fresh_db: str, state_db: str, tmp_path: Path
) -> None:
    """A missing store of a device flowyard knows is that device's error, as for a corrupt or
    locked one: it was refused up front, so no device named with it synced or was recorded."""
    from flows.sync_devices import sync_devices

    gone = make_store(tmp_path / "gone.db", 20)
    kept = make_store(tmp_path / "kept.db", 30)
    sync_state.register_device(state_db, gone, Identity("gone", "u", "p"))
    sync_state.register_device(state_db, kept, Identity("kept", "u", "p"))
    gone.unlink()
    try:
        run = sync_devices(stores=[str(gone), str(kept)], central_url=fresh_db, return_state=True)
        assert run.is_failed()
        error = run.result(raise_on_failure=False)
        assert isinstance(error, SyncIncomplete)
        missing = f"cannot read device store {gone}: no such file; give the path of the device's SQLite file"
        assert str(error) == f"1 of 2 devices did not sync fully: gone: {missing}"
        assert error.result["devices"]["gone"] == {"error": missing}
        assert error.result["devices"]["kept"]["uploaded"] == 30 and synced_events(kept) == 30
        history = {row.device_id: row for row in sync_state.history(state_db, limit=10)}
        assert (history["gone"].error, history["gone"].pending_before) == (missing, None)
        assert history["kept"].uploaded == 30 and history["kept"].error is None
    finally:
        sync_state.remove_device(state_db, "gone")
        sync_state.remove_device(state_db, "kept")


@pytest.mark.parametrize("stop", ["disable", "remove", "remove, forced"])
def test_a_device_disabled_or_removed_while_its_task_waits_is_skipped_and_its_store_left_alone(
    fresh_db: str, state_db: str, tmp_path: Path, stop: str
) -> None:
    """`sync disable` stops a device at once, also for a run that resolved it before: its task,
    queued behind the device lock, re-reads the flag under the lock and leaves the store as it is
    (here v1, as after `migrate down`), reported as skipped like a device disabled at the start.
    `configure --remove-store` too, forced or not: the task synced the removed device's store,
    upgrading it again, and sent its events to central."""
    from concurrent.futures import ThreadPoolExecutor

    from flows.sync_devices import sync_devices
    from tasks.advisory_lock import advisory_lock

    store = make_store(tmp_path / "mid-run.db", 25)
    sync_state.register_device(state_db, store, Identity("mid-run", "u", "p"))
    lock = "flowyard-sync-device:mid-run"
    try:
        with ThreadPoolExecutor(1) as pool, psycopg.connect(state_db, autocommit=True) as watch:
            with advisory_lock(state_db, lock):
                run = pool.submit(sync_devices, stores=[str(store)], central_url=fresh_db, force=stop.endswith("forced"))
                waiting = "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s"
                while one_row(watch, waiting, (f"flowyard lock {lock}",))[0] < 2:  # the task waits for it
                    assert not run.done(), run.result()
                    time.sleep(0.01)
                if stop == "disable":
                    sync_state.set_enabled(state_db, "mid-run", False)
                else:
                    sync_state.remove_device(state_db, "mid-run")
            result = run.result()
        assert result["devices"] == {}
        assert result["skipped"].startswith(
            "disabled devices not synced: mid-run " if stop == "disable" else "devices removed during the run, not synced: mid-run"
        )
        with device_store.open_store(store) as conn:
            assert device_store.schema_version(conn) == device_store.V1
        assert _central_counts(fresh_db) == (0, 0)
        assert "mid-run" not in {row.device_id for row in sync_state.history(state_db, limit=1000)}
        assert ("mid-run" in {d.device_id for d in sync_state.list_devices(state_db)}) == (stop == "disable")
    finally:
        if "mid-run" in {d.device_id for d in sync_state.list_devices(state_db)}:
            sync_state.remove_device(state_db, "mid-run")


def test_a_device_another_run_is_syncing_is_left_to_it_without_an_error(
    fresh_db: str, state_db: str, tmp_path: Path
) -> None:
    """A second run over a device whose lock another run holds for the whole wait (a manual
    trigger while the schedule syncs a big backlog) leaves the device to that run: skipped, said
    so, no failed run, no error history row, and the device's status is not overwritten. It used
    to end Failed with the lock's "raise the lock timeout" (no setting raises it), and its error
    could land after the other run had recorded its success."""
    from flows.sync_devices import sync_devices
    from tasks.advisory_lock import advisory_lock

    store = make_store(tmp_path / "busy.db", 25)
    other = make_store(tmp_path / "free.db", 10)
    sync_state.register_device(state_db, store, Identity("busy", "u", "p"))
    sync_state.register_device(state_db, other, Identity("free", "u", "p"))
    try:
        with advisory_lock(state_db, "flowyard-sync-device:busy"):  # what the other run holds
            run = sync_devices(stores=[str(store), str(other)], central_url=fresh_db, return_state=True)
        assert run.is_completed(), run.message
        result = run.result()
        assert list(result["devices"]) == ["free"] and result["devices"]["free"]["uploaded"] == 10
        assert result["skipped"] == (
            "devices being synced by another run, left to it: busy (`flowyard sync history` shows its result)"
        )
        assert _central_counts(fresh_db) == (10, 10)
        with device_store.open_store(store) as conn:
            assert device_store.schema_version(conn) == device_store.V1  # not touched by this run
        assert "busy" not in {row.device_id for row in sync_state.history(state_db, limit=1000)}
        assert {d.device_id: d.last_error for d in sync_state.list_devices(state_db)}["busy"] is None
    finally:
        sync_state.remove_device(state_db, "busy")
        sync_state.remove_device(state_db, "free")


def test_a_sync_role_given_a_ready_made_devflow_schema_syncs(
    limited_role: Role, fresh_db: str, state_db: str, tmp_path: Path
) -> None:
    """The least-privilege set-up a DBA gives a central: ``CREATE SCHEMA devflow AUTHORIZATION
    <sync role>``, no CREATE on the database. The role may create every table, index and month
    partition in its schema, but ``CREATE SCHEMA IF NOT EXISTS`` checks the database privilege
    before it looks for the schema: the run's schema step failed the whole run before any device
    synced (and each device's upload would have failed the same way)."""
    from flows.sync_devices import sync_devices

    with psycopg.connect(fresh_db, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA devflow AUTHORIZATION {}").format(sql.Identifier(limited_role.name)))
    store = make_store(tmp_path / "least-privilege.db", 120)
    result = sync_devices(stores=[str(store)], central_url=limited_role.url(fresh_db))
    outcome = result["devices"]["least-privilege"]
    assert (outcome["uploaded"], outcome["failed"], outcome["pending_after"], outcome["error"]) == (120, 0, 0, None)
    assert _central_counts(fresh_db) == (120, 120) and synced_events(store) == 120


def test_a_central_read_only_for_the_sync_role_is_named_in_the_runs_schema_warning(
    limited_role: Role, fresh_db: str, state_db: str, tmp_path: Path
) -> None:
    """A DBA's ``ALTER ROLE … IN DATABASE … SET default_transaction_read_only = on`` for the sync
    role: the run's warning was PostgreSQL's ``cannot execute CREATE SEQUENCE in a read-only
    transaction``, naming neither the setting nor the fix, which each device's error names."""
    from flows.sync_devices import sync_devices

    central, database = limited_role.url(fresh_db), database_name(fresh_db)
    with psycopg.connect(fresh_db, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA devflow AUTHORIZATION {}").format(sql.Identifier(limited_role.name)))
        central_store.ensure_schema(central)
        conn.execute(
            sql.SQL("ALTER ROLE {} IN DATABASE {} SET default_transaction_read_only = on").format(
                sql.Identifier(limited_role.name), sql.Identifier(database)
            )
        )
    store = make_store(tmp_path / "frozen.db", 30)
    collect = _Collect()
    logging.getLogger("prefect.flow_runs").addHandler(collect)
    try:
        run = sync_devices(stores=[str(store)], central_url=central, return_state=True)
    finally:
        logging.getLogger("prefect.flow_runs").removeHandler(collect)
    assert run.is_failed()
    [warning] = [m for m in collect.messages if m.startswith("central schema not ready")]
    assert warning.startswith(
        f"central schema not ready on {central.replace(limited_role.password, '***')}: the server accepts no "
        "writes (cannot execute CREATE"
    )
    assert (
        f"set for role {limited_role.name} in database {database} (pg_settings.source: database user); "
        f'run ALTER ROLE "{limited_role.name}" IN DATABASE "{database}" RESET default_transaction_read_only'
    ) in warning


def test_a_sync_role_refused_the_schema_fails_each_device_in_one_line_and_keeps_its_events(
    limited_role: Role, fresh_db: str, state_db: str, tmp_path: Path
) -> None:
    """No ready-made schema and no CREATE on the database: the run's schema step is refused.
    That refusal ended the run with PostgreSQL's multi-line InsufficientPrivilege before any
    device ran; now each device records it as its one-line error, its events stay queued, and
    the run ends Failed with the one-line summary, like a central that cannot be reached."""
    from flows.sync_devices import sync_devices

    store = make_store(tmp_path / "no-privilege.db", 30)
    run = sync_devices(stores=[str(store)], central_url=limited_role.url(fresh_db), return_state=True)
    assert run.is_failed()
    error = run.result(raise_on_failure=False)
    assert isinstance(error, SyncIncomplete) and "\n" not in str(error)
    assert str(error).startswith("1 of 1 devices did not sync fully")
    assert "permission denied for database" in str(error)
    outcome = error.result["devices"]["no-privilege"]
    assert (outcome["uploaded"], outcome["failed"], outcome["pending_after"]) == (0, 30, 30)
    with device_store.open_store(store) as conn:
        assert device_store.counts(conn).failed == 30


def test_a_schema_step_warning_is_in_sync_status_and_the_runs_table_until_it_clears(
    limited_role: Role, fresh_db: str, state_db: str, tmp_path: Path
) -> None:
    """A DBA's central whose tombstone trigger was dropped, for a sync role that may not restore it:
    each run's schema step warned of the grant in the run's log alone, while ``sync status`` and the
    run's table showed a clean sync, so an operator never learnt that deleted projects stay in the
    stores. Both name the grant until a run's schema step completes."""
    from flows.sync_devices import sync_devices

    central = central_of_a_dba_without_a_tombstone_trigger(limited_role, fresh_db)
    shown = mask_url(central)
    store = make_store(tmp_path / "dba.db", 0)
    grant = f'GRANT TRIGGER ON devflow.project_status TO "{limited_role.name}"'
    run = sync_devices(stores=[str(store)], central_url=central, return_state=True)
    assert run.is_completed()
    table = next(a for a in flow_run_artifacts(run) if a.type == "table")
    assert grant in table.description
    [line] = _schema_lines(shown)
    assert line.startswith(f"schema:     not ready on {shown} (run at ")
    assert grant in line
    with psycopg.connect(fresh_db, autocommit=True) as dba:
        dba.execute(grant)
    again = sync_devices(stores=[str(store)], central_url=central, return_state=True)
    assert again.is_completed()
    assert _schema_lines(shown) == []
    assert next(a for a in flow_run_artifacts(again) if a.type == "table").description == "Per-device sync results"


def test_the_sync_status_flow_names_a_standing_schema_step_warning(
    limited_role: Role, fresh_db: str, state_db: str, tmp_path: Path
) -> None:
    """``sync status`` on the CLI names the grant a central's schema step was refused; the
    ``sync-status`` flow's artifact said only "Devices", so one using the UI or REST alone saw a
    clean status while deleted projects stayed in the stores."""
    from flows.sync_controls import sync_status
    from flows.sync_devices import sync_devices

    central = central_of_a_dba_without_a_tombstone_trigger(limited_role, fresh_db)
    store = make_store(tmp_path / "status.db", 0)
    assert sync_devices(stores=[str(store)], central_url=central, return_state=True).is_completed()
    run = sync_status(return_state=True)
    assert run.is_completed()
    table = next(a for a in flow_run_artifacts(run) if a.type == "table")
    assert f"central schema not ready on {mask_url(central)} (run at " in table.description
    assert f'GRANT TRIGGER ON devflow.project_status TO "{limited_role.name}"' in table.description


def test_a_clean_run_into_another_central_leaves_a_centrals_schema_warning_standing(
    pg: Server, limited_role: Role, fresh_db: str, state_db: str, tmp_path: Path
) -> None:
    """Runs name their central (``sync trigger --central-url``), and one state database serves them
    all: the schema step's outcome was one row for all of them, so a clean run into central B cleared
    central A's warning of the TRIGGER grant, and ``sync status`` went quiet while A's deleted projects
    still stayed in the stores. Each central's warning stands until a run into that central clears it."""
    from flows.sync_devices import sync_devices

    central = central_of_a_dba_without_a_tombstone_trigger(limited_role, fresh_db)
    shown = mask_url(central)
    store = make_store(tmp_path / "two-centrals.db", 0)
    assert sync_devices(stores=[str(store)], central_url=central, return_state=True).is_completed()
    with scratch_database(pg) as other:
        assert sync_devices(stores=[str(store)], central_url=other, return_state=True).is_completed()
        assert _schema_lines(mask_url(other)) == []
    [line] = _schema_lines(shown)
    assert f'GRANT TRIGGER ON devflow.project_status TO "{limited_role.name}"' in line
    with psycopg.connect(fresh_db, autocommit=True) as dba:
        dba.execute(sql.SQL("GRANT TRIGGER ON devflow.project_status TO {}").format(sql.Identifier(limited_role.name)))
    assert sync_devices(stores=[str(store)], central_url=central, return_state=True).is_completed()
    assert _schema_lines(shown) == []


def _schema_lines(central: str) -> list[str]:
    """``sync status``'s schema-step lines for ``central`` (masked); the session's other tests leave
    their own centrals' lines in the state database they share."""
    return [
        line
        for line in run_cli("sync", "status").stdout.splitlines()
        if line.startswith(f"schema:     not ready on {central} ")
    ]


def test_devices_sync_into_an_older_server_holding_central_and_flowyards_state(older_db: str, tmp_path: Path) -> None:
    """Central and flowyard's state (its Alembic migrations) on the oldest major tested (14-17): a
    first sync, a second after new events, where last write wins between two devices' snapshots
    of one project, and a third device's download of the winner."""
    from flows.sync_devices import sync_devices

    names = ("older-a", "older-b", "older-c")
    stores = [make_store(tmp_path / f"{n}.db", 40, seed=i, identity=Identity(n, "u", "older")) for i, n in enumerate(names)]

    def sync(*synced: Path) -> dict[str, tuple[int, int, str | None]]:
        run = sync_devices(
            stores=[str(s) for s in synced], central_url=older_db, download_updates=True, state_database_url=older_db
        )
        return {d: (r["uploaded"], r["duplicates"], r["error"]) for d, r in run["devices"].items()}

    assert sync(*stores) == dict.fromkeys(names, (40, 0, None))
    now, hour = device_store.now_ms(), 3_600_000
    _write_status(stores[0], now + hour, "green")  # the newer snapshot, though written first
    _write_status(stores[1], now, "red")
    assert sync(*stores) == {"older-a": (1, 0, None), "older-b": (1, 0, None), "older-c": (0, 0, None)}
    _central_consistent(older_db)
    assert _central_counts(older_db) == (122, 122)
    assert sync(stores[2]) == {"older-c": (0, 0, None)}  # the download after both uploads
    with device_store.open_store(stores[2]) as conn:
        downloaded = conn.execute("SELECT status, device_id FROM remote_project_status WHERE project_id = 'older'")
        assert downloaded.fetchall() == [('{"status": "green"}', "older-a")]
    with psycopg.connect(older_db) as conn:
        assert one_row(conn, "SELECT count(*) FROM flowyard.sync_runs")[0] == 7
