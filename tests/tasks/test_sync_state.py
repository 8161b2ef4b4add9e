"""Which device a store passed by path syncs as, and what a device's failure leaves in the state."""

from __future__ import annotations

import contextlib
import logging
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from alembic import command
from psycopg.types.json import Jsonb

from tasks import central_store, device_store, sync_alerts, sync_state
from tasks.device_store import Identity
from tasks.errors import UserError
from tasks.sample_devices import make_store
from tasks.state import migration_config
from tasks.sync_batches import DeviceReport, SyncOptions, sync_device
from tasks.sync_report import settle_device
from tasks.sync_setup import NewStore, SetupChange, apply_setup, store_identity
from tasks.sync_state import SyncConfig, SyncTarget, resolve_targets


def _targets(state: str, *stores: Path) -> list[SyncTarget]:
    return resolve_targets(state, [str(s) for s in stores], force=False, download=None, config=SyncConfig()).sync


def _events_per_device(central: str) -> dict[str, int]:
    with psycopg.connect(central) as conn:
        rows = conn.execute("SELECT device_id, count(*) FROM devflow.events GROUP BY device_id").fetchall()
    return dict(rows)


def test_same_named_stores_sync_as_different_devices(state_db: str, fresh_db: str, tmp_path: Path) -> None:
    """The DevFlow app names every store ``devflow.db``: two of them synced in one run must not
    share a device id (lock, state row, central's origin key), and keep their ids next run."""
    central_store.ensure_schema(fresh_db)
    first = make_store(tmp_path / "alice" / "devflow.db", 200, seed=1)
    second = make_store(tmp_path / "bob" / "devflow.db", 300, seed=2)
    targets = _targets(state_db, first, second)
    ids = [t.device_id for t in targets]
    assert len(set(ids)) == 2 and all(i.startswith("devflow-") for i in ids)
    reports = [sync_device(Path(t.store), t.identity, SyncOptions(fresh_db)) for t in targets]
    assert [r.device_id for r in reports] == ids
    assert [r.uploaded for r in reports] == [200, 300]
    assert _events_per_device(fresh_db) == {ids[0]: 200, ids[1]: 300}
    # Stable: the next run reads each id back from its store, also when one store is synced alone.
    assert [t.device_id for t in _targets(state_db, first, second)] == ids
    assert [t.device_id for t in _targets(state_db, second)] == ids[1:]


def test_a_new_store_avoids_the_ids_flowyard_knows(state_db: str, tmp_path: Path) -> None:
    """A store upgraded before syncs under the identity recorded in it; a new one takes its
    file stem only while no known device has that id."""
    upgraded = make_store(tmp_path / "a" / "work.db", 5, identity=Identity("laptop-9", "erin", "web"))
    registered = make_store(tmp_path / "b" / "desk.db", 5)
    sync_state.register_device(state_db, registered, Identity("desk", "frank", "web"))
    try:
        fresh = make_store(tmp_path / "c" / "desk.db", 5)
        unique = make_store(tmp_path / "c" / "travel.db", 5)
        targets = _targets(state_db, upgraded, fresh, unique)
    finally:
        sync_state.remove_device(state_db, "desk")
    assert targets[0].identity == Identity("laptop-9", "erin", "web")
    assert targets[1].device_id.startswith("desk-") and targets[1].device_id == sync_state.new_device_id(
        fresh, {"desk"}
    )
    assert targets[2].device_id == "travel"


def test_registering_a_second_same_named_store_adds_a_device(state_db: str, tmp_path: Path) -> None:
    """``sync configure --add-store`` without ``--device-id``: the second ``devflow.db`` must become
    its own device, not re-point the first; registering the first again keeps its id."""
    first = make_store(tmp_path / "alice" / "devflow.db", 5)
    second = make_store(tmp_path / "bob" / "devflow.db", 5)
    try:
        ids = [apply_setup(state_db, SetupChange(add_store=NewStore(s))).added for s in (first, second)]
        assert ids[0] is not None and ids[1] is not None and ids[0].device_id != ids[1].device_id
        again = apply_setup(state_db, SetupChange(add_store=NewStore(first))).added
        assert again is not None and again.device_id == ids[0].device_id
        stores = {d.device_id: d.store_path for d in sync_state.list_devices(state_db, registered_only=True)}
        assert stores[ids[0].device_id] == str(first.resolve()) and stores[ids[1].device_id] == str(second.resolve())
    finally:
        for identity in ids:
            sync_state.remove_device(state_db, identity.device_id)


def test_a_multi_line_task_error_is_recorded_as_one_line(
    state_db: str, fresh_db: str, tmp_path: Path
) -> None:
    """A device task that failed with a PostgreSQL error (message, then LINE and caret lines)
    leaves one line in the outcome, the run's table row and the history."""
    with psycopg.connect(fresh_db) as conn, pytest.raises(psycopg.Error) as info:
        conn.execute("SELEC 1")
    assert "\n" in str(info.value)
    target = SyncTarget(str(tmp_path / "x.db"), "one-line-error", "u", "p", None)
    outcome = settle_device(state_db, None, target, info.value, None, SyncConfig(), logging.getLogger("test"))
    assert outcome.error == 'syntax error at or near "SELEC"'
    assert outcome.row["error"] == outcome.error and outcome.state == {"error": outcome.error}
    recorded = [row for row in sync_state.history(state_db, limit=50) if row.device_id == "one-line-error"]
    assert [row.error for row in recorded] == [outcome.error]
    sync_state.remove_device(state_db, "one-line-error")


def test_an_unusable_stores_table_row_shows_the_counts_its_history_row_records(
    state_db: str, tmp_path: Path
) -> None:
    """A device whose store could not be used (corrupt, locked): the run's table artifact said
    ``failed: None`` where ``flowyard sync history`` says 0 for the same run."""
    target = SyncTarget(str(tmp_path / "locked.db"), "unusable-store", "u", "p", None)
    error = UserError(f"device store {target.store} is locked by another process (database is locked)")
    outcome = settle_device(state_db, None, target, error, None, SyncConfig(), logging.getLogger("test"))
    try:
        [recorded] = [row for row in sync_state.history(state_db, limit=50) if row.device_id == "unusable-store"]
    finally:
        sync_state.remove_device(state_db, "unusable-store")
    shown = {name: outcome.row[name] for name in ("pending before", "uploaded", "duplicates skipped", "failed")}
    assert shown == {
        "pending before": recorded.pending_before,
        "uploaded": recorded.uploaded,
        "duplicates skipped": recorded.duplicates,
        "failed": recorded.failed,
    }
    assert (recorded.pending_before, recorded.failed) == (None, 0)


def _sync_by_path(state: str, central: str, store: Path) -> None:
    """Sync one store named by path and record the outcome, as a ``sync-devices`` run does."""
    (target,) = _targets(state, store)
    report = sync_device(Path(target.store), target.identity, SyncOptions(central))
    settle_device(state, None, target, report, None, SyncConfig(), logging.getLogger("test"))


def _downgrade_and_write(store: Path) -> None:
    """``migrate down --to=v1``, then the app writes one more event, which the next upgrade stamps."""
    with device_store.open_store(store) as conn:
        device_store.downgrade_to_v1(conn)
        device_store.insert_events(conn, [(device_store.now_ms(), "file_edit", {})])


def _stamped(central: str) -> list[tuple[str, str]]:
    with psycopg.connect(central) as conn:
        return conn.execute("SELECT DISTINCT user_id, project_id FROM devflow.events").fetchall()


def test_a_store_first_synced_by_path_keeps_its_identity_when_re_upgraded(
    state_db: str, fresh_db: str, tmp_path: Path
) -> None:
    """A v1 store synced by path, never configured, is stamped 'unknown' / 'default' and recorded
    as a device. After ``migrate down --to=v1`` the next sync upgrades it as that device again:
    its row used to hold empty user and project ids, which went onto every event written since."""
    central_store.ensure_schema(fresh_db)
    store = make_store(tmp_path / "roamer.db", 5)
    try:
        _sync_by_path(state_db, fresh_db, store)
        _downgrade_and_write(store)
        _sync_by_path(state_db, fresh_db, store)
    finally:
        sync_state.remove_device(state_db, "roamer")
    assert _stamped(fresh_db) == [("unknown", "default")]


def test_an_unreadable_store_first_seen_by_a_run_is_recorded_with_its_identity(
    state_db: str, tmp_path: Path
) -> None:
    """A device first seen failing (its store corrupt) keeps the identity the run gave it, so
    syncing the repaired store later stamps that, not empty ids, on its events."""
    store = tmp_path / "broken.db"
    store.write_bytes(b"SQLite format 3\x00" + b"not a database" * 100)  # a SQLite file whose pages are gone
    (target,) = _targets(state_db, store)
    settle_device(state_db, None, target, UserError("corrupt"), None, SyncConfig(), logging.getLogger("test"))
    try:
        device = sync_state.device_for_store(state_db, store)
    finally:
        sync_state.remove_device(state_db, target.device_id)
    assert device is not None and (device.user_id, device.project_id) == ("unknown", "default")


def test_a_device_row_with_empty_ids_takes_its_stores_ids_at_the_next_run(
    state_db: str, fresh_db: str, tmp_path: Path
) -> None:
    """Rows a run recorded before it wrote ids hold user and project ''; the next run writes the
    ids recorded in the store, so a later re-upgrade (``migrate down`` and a sync) stamps those."""
    central_store.ensure_schema(fresh_db)
    store = make_store(tmp_path / "legacy.db", 5, identity=Identity("legacy", "alice", "web"))
    try:
        _sync_by_path(state_db, fresh_db, store)
        with psycopg.connect(state_db) as conn:  # as a run before commit e8c2747 left it
            conn.execute("UPDATE flowyard.sync_devices SET user_id = '', project_id = '' WHERE device_id = 'legacy'")
        _sync_by_path(state_db, fresh_db, store)
        device = sync_state.device_for_store(state_db, store)
        assert device is not None and (device.user_id, device.project_id) == ("alice", "web")
        _downgrade_and_write(store)
        _sync_by_path(state_db, fresh_db, store)
    finally:
        sync_state.remove_device(state_db, "legacy")
    assert _stamped(fresh_db) == [("alice", "web")]


def _sync_configured(state: str, central: str, device_id: str) -> None:
    """Sync one configured device as a scheduled ``sync-devices`` run (no stores given) does."""
    targets = resolve_targets(state, None, force=False, download=None, config=SyncConfig()).sync
    (target,) = [t for t in targets if t.device_id == device_id]
    report = sync_device(Path(target.store), target.identity, SyncOptions(central))
    settle_device(state, None, target, report, None, SyncConfig(), logging.getLogger("test"))


@pytest.mark.parametrize("named", ["by path", "configured"])
def test_a_downgraded_store_of_a_row_with_empty_ids_is_re_upgraded_with_the_defaults(
    state_db: str, fresh_db: str, tmp_path: Path, named: str
) -> None:
    """A row an older flowyard left with user and project '' whose store was downgraded before
    a run could repair the row: nothing records the store's ids any more, so the re-upgrade
    stamps what a new store gets ('unknown', 'default'), not '' on the store and its events."""
    central_store.ensure_schema(fresh_db)
    store = make_store(tmp_path / "blank.db", 5, identity=Identity("blank", "alice", "web"))
    _downgrade_and_write(store)
    sync_state.register_device(state_db, store, Identity("blank", "", ""))
    try:
        assert store_identity(state_db, NewStore(store)) == Identity("blank", "unknown", "default")
        if named == "by path":
            _sync_by_path(state_db, fresh_db, store)
        else:
            _sync_configured(state_db, fresh_db, "blank")
        device = sync_state.device_for_store(state_db, store)
    finally:
        sync_state.remove_device(state_db, "blank")
    with device_store.open_store(store) as conn:
        assert device_store.identity_of(conn) == Identity("blank", "unknown", "default")
    assert device is not None and (device.user_id, device.project_id) == ("unknown", "default")
    assert _stamped(fresh_db) == [("unknown", "default")]


def test_status_of_a_device_whose_store_went_corrupt_names_the_device_to_remove(
    state_db: str, tmp_path: Path
) -> None:
    """The hint said `--remove-store` without the id that option needs."""
    store = make_store(tmp_path / "gone-bad.db", 3)
    sync_state.register_device(state_db, store, Identity.of("gone-bad"))
    try:
        store.write_bytes(b"SQLite format 3\x00" + b"junk" * 300)
        [row] = [r for r in sync_state.status_rows(state_db) if r["device"] == "gone-bad"]
    finally:
        sync_state.remove_device(state_db, "gone-bad")
    assert row["queued"] == (
        f"unreadable: device store {store} is corrupt (file is not a database); restore it from a backup "
        "or remove it with `flowyard sync configure --remove-store gone-bad`"
    )


def test_recorded_download_cursors_keep_to_their_central_through_the_migration(fresh_db: str) -> None:
    """sync_0003 records the central a download cursor counts in: a cursor from before keeps its
    value with none (its next download starts from 0). A run's cursor of another central replaces
    the recorded one, even when smaller, a later one of that central moves it forward only, and a
    run without a download keeps both; the downgrade drops only the central."""
    config = migration_config(fresh_db)
    command.upgrade(config, "sync@sync_0002")
    with psycopg.connect(fresh_db) as conn:
        conn.execute(
            "INSERT INTO flowyard.sync_devices (device_id, store_path, user_id, project_id, download_cursor) "
            "VALUES ('old', '/old.db', 'u', 'p', 42)"
        )
    command.upgrade(config, "heads")

    def recorded(cursor: int | None, central: uuid.UUID | None) -> tuple[int, uuid.UUID | None]:
        report = DeviceReport("old", "u", "p", "/old.db", 0, 0, 0, 0, 0, 0, None, 0, 0, 10, cursor, central)
        sync_state.record_device_run(fresh_db, None, report)
        [device] = sync_state.list_devices(fresh_db)
        return device.download_cursor, device.download_central

    [device] = sync_state.list_devices(fresh_db)
    assert (device.download_cursor, device.download_central) == (42, None)
    one, other = uuid.uuid4(), uuid.uuid4()
    assert recorded(None, None) == (42, None)
    assert recorded(5, one) == (5, one)
    assert recorded(3, one) == (5, one) and recorded(9, one) == (9, one)
    assert recorded(None, None) == (9, one) and recorded(2, other) == (2, other)
    command.downgrade(config, "sync@sync_0002")
    with psycopg.connect(fresh_db) as conn:
        columns = conn.execute(
            "SELECT column_name FROM information_schema.columns "
            "WHERE table_schema = 'flowyard' AND table_name = 'sync_devices' AND column_name LIKE 'download%'"
        ).fetchall()
        cursor = conn.execute("SELECT download_cursor FROM flowyard.sync_devices").fetchone()
    assert (columns, cursor) == ([("download_cursor",)], (2,))


def test_each_centrals_schema_warning_stands_through_the_migration(fresh_db: str) -> None:
    """sync_0005 keeps the schema step's outcome per central: the one row sync_0004 kept stays, under
    its central, a clean step of another central leaves it standing, and a clean step of its own
    clears it; the downgrade keeps the latest step's row."""
    config = migration_config(fresh_db)
    command.upgrade(config, "sync@sync_0004")
    with psycopg.connect(fresh_db) as conn:
        conn.execute("INSERT INTO flowyard.sync_schema_step (central, warning) VALUES ('postgresql://a', 'grant it')")
    command.upgrade(config, "heads")
    [kept] = sync_state.schema_warnings(fresh_db)
    assert kept.startswith("not ready on postgresql://a (run at ") and kept.endswith("): grant it")
    sync_state.record_schema_step(fresh_db, "postgresql://b", None)
    sync_state.record_schema_step(fresh_db, "postgresql://c", "own it")
    assert [line.split(" (run at ")[0] for line in sync_state.schema_warnings(fresh_db)] == [
        "not ready on postgresql://a",
        "not ready on postgresql://c",
    ]
    sync_state.record_schema_step(fresh_db, "postgresql://a", None)
    [standing] = sync_state.schema_warnings(fresh_db)
    assert standing.startswith("not ready on postgresql://c ")
    command.downgrade(config, "sync@sync_0004")
    with psycopg.connect(fresh_db) as conn:
        rows = conn.execute("SELECT only_row, central, warning FROM flowyard.sync_schema_step").fetchall()
    assert rows == [(True, "postgresql://a", None)]


def test_a_disabled_device_is_left_out_wherever_its_store_is_named(state_db: str, tmp_path: Path) -> None:
    """Disabled is a device's, not a path's: the store of disabled device ``moved`` upgraded
    under its id at another path (a moved file, a bind mount) is left out too."""
    old = make_store(tmp_path / "old" / "moved.db", 5)
    sync_state.register_device(state_db, old, Identity("moved", "u", "p"))
    sync_state.set_enabled(state_db, "moved", False)
    try:
        new = make_store(tmp_path / "new" / "moved.db", 5, identity=Identity("moved", "u", "p"))
        off = resolve_targets(state_db, [str(new)], force=False, download=None, config=SyncConfig())
        assert (off.sync, off.disabled) == ([], ["moved"])
        forced = resolve_targets(state_db, [str(new)], force=True, download=None, config=SyncConfig())
        assert [t.device_id for t in forced.sync] == ["moved"] and forced.disabled == []
    finally:
        sync_state.remove_device(state_db, "moved")


def test_alert_thresholds_saved_past_their_maximum_load_at_the_maximum_and_fire(state_db: str) -> None:
    """A configuration an older flowyard saved with --offline-seconds of 10**30 and a queue
    threshold past bigint still loads (syncs must run), and its alerts can fire again."""
    before = sync_state.load_config(state_db)
    stored = before.model_dump(mode="json")
    stored["alerts"].update(queue_threshold=2**63, offline_seconds=10**30)
    try:
        sync_state.save_config(state_db, before)  # the row to overwrite
        with psycopg.connect(state_db) as conn:
            conn.execute("UPDATE flowyard.sync_config SET config = %s", (Jsonb(stored),))
        config = sync_state.load_config(state_db)
        assert config.alerts.queue_threshold == sync_state.MAX_QUEUE_THRESHOLD
        assert config.alerts.offline_seconds == sync_state.MAX_OFFLINE_SECONDS
        now = datetime.now(UTC)
        queued = sync_state.MAX_QUEUE_THRESHOLD + 1
        report = DeviceReport("far", "u", "p", "/far.db", queued, 0, 0, 0, queued, 0, None, 0, 0, 10, None)
        report = replace(report, reached_central=True)
        alerts = sync_alerts.evaluate("far", report, now - timedelta(days=400), config.alerts, now)
        assert [a.kind for a in alerts] == ["queue-threshold"]  # a run that succeeded is not offline
        failed = replace(report, pending_after=0, reached_central=False, error="central unreachable")
        offline = sync_alerts.evaluate("far", failed, now - timedelta(days=400), config.alerts, now)
        assert [a.kind for a in offline] == ["offline"]
        # a configure of another setting saves the bounded values
        sync_state.update_config(state_db, {"batch_size": before.batch_size})
        assert sync_state.load_config(state_db).alerts == config.alerts
    finally:
        sync_state.save_config(state_db, before)


def test_a_saved_section_no_option_replaces_is_one_line_saying_to_remove_it(state_db: str) -> None:
    """A whole ``alerts`` section saved by hand as a number: no ``configure`` option replaces it
    (one sets a threshold inside it), so the line says to remove it, rather than naming an
    option that would fail on it again."""
    before = sync_state.load_config(state_db)
    sync_state.save_config(state_db, before)
    try:
        with psycopg.connect(state_db) as conn:
            conn.execute("UPDATE flowyard.sync_config SET config = jsonb_set(config, '{alerts}', '7')")
        for attempt in (
            lambda: sync_state.load_config(state_db),
            lambda: sync_state.update_config(state_db, {}, alerts={"queue_threshold": 5}),
        ):
            with pytest.raises(UserError) as info:
                attempt()
            message = str(info.value)
            assert message.startswith("the saved sync setting alerts is 7: "), message
            assert message.endswith(
                "; no `sync configure` option sets it: remove it from the saved configuration (flowyard.sync_config)"
            ), message
    finally:
        sync_state.save_config(state_db, before)


def test_a_device_removed_while_a_run_syncs_it_stays_removed(state_db: str, fresh_db: str, tmp_path: Path) -> None:
    """`sync configure --remove-store` while a run synced the device: the run's end wrote the
    device's row back, and it came back as `configured=no`, listed by `sync status` with its
    offline alert armed. Removal wins, for a device that synced and for one whose store failed;
    the run's history keeps what it did."""
    central_store.ensure_schema(fresh_db)
    stores = [make_store(tmp_path / f"{name}.db", 10) for name in ("removed-synced", "removed-failed")]
    for store in stores:
        sync_state.register_device(state_db, store, Identity(store.stem, "u", "p"))
    synced, failed = _targets(state_db, *stores)
    try:
        report = sync_device(Path(synced.store), synced.identity, SyncOptions(fresh_db))
        for target in (synced, failed):
            sync_state.remove_device(state_db, target.device_id)
        logger = logging.getLogger("test")
        settle_device(state_db, None, synced, report, None, SyncConfig(), logger)
        settle_device(state_db, None, failed, UserError("device store is locked"), None, SyncConfig(), logger)
        devices = {d.device_id for d in sync_state.list_devices(state_db)}
        history = [row.device_id for row in sync_state.history(state_db, limit=50)]
        assert devices.isdisjoint({"removed-synced", "removed-failed"})
        assert {"removed-synced", "removed-failed"} <= set(history)
    finally:
        for device_id in ("removed-synced", "removed-failed"):
            with contextlib.suppress(UserError):
                sync_state.remove_device(state_db, device_id)
