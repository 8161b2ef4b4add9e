"""The local SQLite store: v1→v2 upgrade with data, downgrade keeping every event, clear errors."""

from __future__ import annotations

import re
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tasks import device_store
from tasks.device_store import Identity
from tasks.errors import UserError
from tasks.sample_devices import make_store
from tests.conftest import ROOT

IDENTITY = Identity("laptop-1", "alice", "proj-x")


def _events(conn: sqlite3.Connection) -> list[tuple]:
    return conn.execute("SELECT id, timestamp, event_type, event_data FROM events ORDER BY id").fetchall()


def _uuid7_time_ms(sync_id: str) -> int:
    """The millisecond time a canonical RFC 9562 version-7 id carries; fails on anything else."""
    parsed = uuid.UUID(sync_id)
    assert str(parsed) == sync_id and parsed.version == 7 and parsed.variant == uuid.RFC_4122
    return parsed.int >> 80


def _mark_synced(conn: sqlite3.Connection, ids: list[int]) -> None:
    """Mark the events with these local ids synced, as a run does after uploading them as read."""
    events = device_store.read_pending(conn, device_store.BEFORE_FIRST_ID, 1_000_000, now_ms=0, force=True)
    device_store.mark_synced(conn, [event for event in events if event[1] in ids], now_ms=device_store.now_ms())


def _columns(conn: sqlite3.Connection) -> set[str]:
    return {row[1] for row in conn.execute("PRAGMA table_info(events)")}


def test_upgrade_with_data_then_downgrade_keeps_every_event(tmp_path: Path) -> None:
    store = make_store(tmp_path / "dev.db", 500, seed=3)
    with device_store.open_store(store) as conn:
        original = _events(conn)
        assert device_store.schema_version(conn) == 1
        assert device_store.upgrade_to_v2(conn, IDENTITY) is True
        assert device_store.upgrade_to_v2(conn, IDENTITY) is False
        assert device_store.schema_version(conn) == 2
        rows = conn.execute(
            "SELECT sync_id, sync_status, sync_attempts, last_sync_error, synced_at, device_id, user_id, project_id "
            "FROM events ORDER BY id"
        ).fetchall()
        assert len(rows) == 500
        # Version-7 ids carry each event's own time, so they sort like the events.
        assert [_uuid7_time_ms(r[0]) for r in rows] == [e[1] for e in original]
        assert len({r[0] for r in rows}) == 500
        assert {r[1:] for r in rows} == {("pending", 0, None, None, "laptop-1", "alice", "proj-x")}
        indexes = {row[1] for row in conn.execute("PRAGMA index_list(events)")}
        assert "idx_sync_status" in indexes
        assert conn.execute("PRAGMA index_info(idx_sync_status)").fetchone()[2] == "sync_status"
        assert _events(conn) == original

        # A v1-era writer (no sync columns in its INSERT) still gets a sync id and the identity.
        device_store.insert_events(conn, [(1, "file_edit", {"action": "save"})])
        new = conn.execute(
            "SELECT sync_id, device_id, user_id, project_id, sync_status FROM events ORDER BY id DESC LIMIT 1"
        ).fetchone()
        assert _uuid7_time_ms(new[0]) == 1 and new[1:] == ("laptop-1", "alice", "proj-x", "pending")
        _mark_synced(conn, [1, 2])
        with_new = _events(conn)

        assert device_store.downgrade_to_v1(conn) is True
        assert device_store.schema_version(conn) == 1
        assert _columns(conn) == {"id", "timestamp", "event_type", "event_data"}
        assert _events(conn) == with_new
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
        assert not tables & {
            "sync_identity",
            "remote_project_status",
            "idx_sync_status",
            "events_sync_defaults",
        }

        # And up again: fresh sync ids, everything pending once more.
        device_store.upgrade_to_v2(conn, IDENTITY)
        assert device_store.counts(conn).pending == 501


def test_failed_events_wait_for_backoff_unless_forced(tmp_path: Path) -> None:
    store = make_store(tmp_path / "dev.db", 10, identity=IDENTITY)
    with device_store.open_store(store) as conn:
        now = device_store.now_ms()
        batch = device_store.read_pending(conn, 0, 4, now_ms=now)
        assert device_store.local_ids(batch) == [1, 2, 3, 4]
        device_store.mark_failed(conn, [1, 2], "boom", now_ms=now)
        device_store.mark_failed(conn, [1], "boom again", now_ms=now)
        row1, row2 = conn.execute(
            "SELECT sync_status, sync_attempts, last_sync_error, next_retry_at FROM events WHERE id IN (1, 2) ORDER BY id"
        ).fetchall()
        assert row1[:3] == ("failed", 2, "boom again") and row2[:3] == ("failed", 1, "boom")
        assert row1[3] - now == 2 * (row2[3] - now) == 2 * device_store.RETRY_BASE_SECONDS * 1000
        assert device_store.local_ids(device_store.read_pending(conn, 0, 3, now_ms=now)) == [3, 4, 5]
        later = now + device_store.RETRY_BASE_SECONDS * 1000
        assert device_store.local_ids(device_store.read_pending(conn, 0, 3, now_ms=later)) == [2, 3, 4]
        assert device_store.local_ids(device_store.read_pending(conn, 0, 3, now_ms=now, force=True)) == [
            1,
            2,
            3,
        ]
        counts = device_store.counts(conn)
        assert (counts.pending, counts.failed, counts.waiting) == (8, 2, 2)


def test_an_event_the_app_replaced_during_the_upload_is_not_marked_synced(tmp_path: Path) -> None:
    """The app writes on while a batch uploads. An event it replaced under the same local id (``INSERT
    OR REPLACE``, or a cleared table numbering its events from 1 again) is another event with a new
    sync id; marked by local id alone, it was recorded as synced without ever reaching central."""
    store = make_store(tmp_path / "dev.db", 4, identity=IDENTITY)
    with device_store.open_store(store) as conn:
        batch = device_store.read_pending(conn, device_store.BEFORE_FIRST_ID, 10, now_ms=device_store.now_ms())
        assert device_store.local_ids(batch) == [1, 2, 3, 4]
        app = sqlite3.connect(store, isolation_level=None)  # the app, while the batch is being uploaded
        try:
            app.execute("INSERT OR REPLACE INTO events (id, timestamp, event_type, event_data) VALUES (2, 5, 'new', '{}')")
            app.execute("DELETE FROM events WHERE id = 3")
            app.execute("INSERT INTO events (id, timestamp, event_type, event_data) VALUES (3, 6, 'new', '{}')")
        finally:
            app.close()
        device_store.mark_synced(conn, batch, now_ms=device_store.now_ms())
        states = conn.execute("SELECT id, event_type, sync_status FROM events ORDER BY id").fetchall()
        again = device_store.read_pending(conn, device_store.BEFORE_FIRST_ID, 10, now_ms=device_store.now_ms())
    assert [state[2] for state in states] == ["synced", "pending", "pending", "synced"]
    assert [(event[1], event[6]) for event in again] == [(2, "new"), (3, "new")]


def test_a_store_downgraded_while_a_run_holds_it_is_one_line_saying_so(tmp_path: Path) -> None:
    """`migrate down` takes no device lock: run while a sync uploads a batch, the run's mark of that
    batch met a bare "no such column: sync_status", which named neither the downgrade nor the way on."""
    store = make_store(tmp_path / "dev.db", 3, identity=IDENTITY)
    with pytest.raises(UserError) as raised, device_store.open_store(store, device_id="laptop-1") as conn:
        batch = device_store.read_pending(conn, device_store.BEFORE_FIRST_ID, 10, now_ms=device_store.now_ms())
        with device_store.open_store(store) as other:  # `flowyard sync migrate down --to=v1`, meanwhile
            assert device_store.downgrade_to_v1(other) is True
        device_store.mark_synced(conn, batch, now_ms=device_store.now_ms())
    message = str(raised.value)
    assert "lost its sync columns while in use (no such column: sync_status)" in message
    assert "\n" not in message
    assert "migrate down" in message and "next sync upgrades it again" in message


def test_the_oldest_unsynced_time_counts_numeric_times_only(tmp_path: Path) -> None:
    """SQLite keeps a time the app wrote as text as text, which has no age: the oldest unsynced
    time was that text when no other unsynced event had a number, and the lag failed the device.
    A REAL time counts as the millisecond it is sent as."""
    store = make_store(tmp_path / "dev.db", 10, identity=IDENTITY)
    with device_store.open_store(store) as conn:
        conn.execute("UPDATE events SET timestamp = '2026-11-01T10:00' WHERE id = 3")
        conn.execute("UPDATE events SET timestamp = 1700000000000.5 WHERE id = 6")
        _mark_synced(conn, [1, 2, 4, 5, 7, 8, 9, 10])
        assert device_store.counts(conn).oldest_pending_ms == 1_700_000_000_000
        _mark_synced(conn, [6])
        counts = device_store.counts(conn)
    assert (counts.pending, counts.oldest_pending_ms) == (1, None)


def _counting_steps(store: Path) -> tuple[device_store.StoreCounts, int]:
    """:func:`device_store.counts` of ``store`` and the SQLite VM instructions it took."""
    steps = 0

    def step() -> int:
        nonlocal steps
        steps += 1
        return 0

    with device_store.open_store(store) as conn:
        conn.set_progress_handler(step, 1)
        counts = device_store.counts(conn)
    return counts, steps


def test_counting_the_queue_costs_the_same_however_much_the_store_has_synced(tmp_path: Path) -> None:
    """Each run counts the queue twice and ``sync status`` once per device. Summed over every row
    of ``events``, a store of a million synced events took 0.27 s each time (holding a shared lock
    the app's commits wait out in a rollback-journal store); the counts come from the status
    index instead, so 20,000 more synced events change neither them nor their cost."""
    measured = []
    for synced in (1_000, 21_000):
        store = make_store(tmp_path / f"dev-{synced}.db", synced + 7, identity=IDENTITY)
        with device_store.open_store(store) as conn:
            conn.execute("UPDATE events SET sync_status = 'synced' WHERE id <= ?", (synced,))
            device_store.mark_failed(conn, [synced + 1, synced + 2], "boom", now_ms=device_store.now_ms())
        measured.append(_counting_steps(store))
    (small, small_steps), (large, large_steps) = measured
    assert (small.pending, small.failed, small.waiting) == (large.pending, large.failed, large.waiting) == (5, 2, 2)
    assert large_steps - small_steps < 100, (small_steps, large_steps)  # the sum() took 30 per synced event


LATIN1_EVENT = b'{"action":"sav\xe9","file_path":"/home/j\xe9r\xf4me/x.py"}'
"""What an app writing Latin-1 leaves in a TEXT column: SQLite stores the bytes as they are."""


def test_event_data_that_is_not_utf8_is_read_with_replacement_characters(tmp_path: Path) -> None:
    store = make_store(tmp_path / "dev.db", 5, identity=IDENTITY)
    with device_store.open_store(store) as conn:
        conn.execute("UPDATE events SET event_data = CAST(? AS TEXT) WHERE id = 3", (LATIN1_EVENT,))
        batch = device_store.read_pending(conn, 0, 10, now_ms=device_store.now_ms())
        assert device_store.local_ids(batch) == [1, 2, 3, 4, 5]
        assert batch[2][-1] == '{"action":"sav\ufffd","file_path":"/home/j\ufffdr\ufffdme/x.py"}'
        # Only that read decodes leniently: the connection's decoder is the default again.
        assert conn.text_factory is str
        assert [type(data) for *_, data in batch] == [str] * 5


def test_text_the_app_wrote_as_a_blob_is_read_as_its_text(tmp_path: Path) -> None:
    """SQLite keeps any type in any column: an app handing its driver bytes stores a BLOB, which
    went to central as bytea text (``\\x6c6f67``) or was refused as no uuid. It is read as the
    text it holds, invalid UTF-8 with U+FFFD as in a TEXT value."""
    store = make_store(tmp_path / "dev.db", 3, identity=IDENTITY)
    text_columns = ("sync_id", "device_id", "user_id", "project_id", "event_type", "event_data")
    with device_store.open_store(store) as conn:
        expected = device_store.read_pending(conn, 0, 10, now_ms=device_store.now_ms())
        as_blobs = ", ".join(f"{column} = CAST({column} AS BLOB)" for column in text_columns)
        conn.execute(f"UPDATE events SET {as_blobs} WHERE id = 2")
        conn.execute("UPDATE events SET event_type = ? WHERE id = 3", (b"lo\xe9",))
        stored = conn.execute("SELECT typeof(sync_id), typeof(event_type) FROM events WHERE id = 2").fetchone()
        assert stored == ("blob", "blob")
        batch = device_store.read_pending(conn, 0, 10, now_ms=device_store.now_ms())
    assert batch[:2] == expected[:2]
    assert batch[2] == (*expected[2][:6], "lo\ufffd", expected[2][7])


def test_a_decode_error_never_quotes_the_stored_text(tmp_path: Path) -> None:
    store = make_store(tmp_path / "dev.db", 1, identity=IDENTITY)
    with pytest.raises(UserError, match=r"Could not decode to UTF-8 column 'data'$") as info:
        with device_store.open_store(store) as conn:
            conn.execute("SELECT CAST(? AS TEXT) AS data", (LATIN1_EVENT,)).fetchall()
    assert "home" not in str(info.value)


def test_corrupt_store_gives_one_line_error(tmp_path: Path) -> None:
    store = tmp_path / "broken.db"
    store.write_bytes(b"this is not sqlite at all" * 100)
    with pytest.raises(UserError, match=r"device store .*broken\.db is corrupt") as info:
        with device_store.open_store(store, device_id="ana's laptop"):
            pass
    assert "\n" not in str(info.value)
    assert str(info.value).endswith(
        "remove it with `flowyard sync configure --remove-store 'ana'\"'\"'s laptop'`"
    )


def test_a_corrupt_file_flowyard_has_no_device_for_is_not_told_to_remove_one(tmp_path: Path) -> None:
    """``--remove-store`` only answers "no device" for a file that was never added."""
    store = tmp_path / "broken.db"
    store.write_bytes(b"this is not sqlite at all" * 100)
    with pytest.raises(UserError) as info:
        with device_store.open_store(store):
            pass
    assert str(info.value) == (
        f"device store {store} is corrupt (file is not a database); check that the path names "
        "the device's SQLite file, or restore it from a backup"
    )


def test_locked_store_gives_one_line_error(tmp_path: Path) -> None:
    store = make_store(tmp_path / "busy.db", 5)
    holder = sqlite3.connect(store, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(UserError, match=r"busy\.db is locked by another process"):
            with device_store.open_store(store, busy_timeout=0.2) as conn:
                device_store.upgrade_to_v2(conn, IDENTITY)
    finally:
        holder.execute("ROLLBACK")
        holder.close()


@pytest.mark.parametrize(("name", "reason"), [("nope.db", "no such file"), ("", "it is a directory")])
def test_a_missing_store_or_a_directory_is_one_line_and_creates_nothing(
    tmp_path: Path, name: str, reason: str
) -> None:
    path = tmp_path / name if name else tmp_path
    message = f"cannot read device store {path}: {reason}; give the path of the device's SQLite file"
    with pytest.raises(UserError) as error:
        with device_store.open_store(path):
            pass
    assert str(error.value) == message
    assert not (tmp_path / "nope.db").exists()


def test_a_v1_store_the_app_made_without_a_schema_version_upgrades(tmp_path: Path) -> None:
    """Seed 002 only asks for "version < 2": the app may leave PRAGMA user_version at 0."""
    store = tmp_path / "app.db"
    with sqlite3.connect(store) as conn:
        conn.execute(
            "CREATE TABLE events (id INTEGER PRIMARY KEY AUTOINCREMENT, timestamp INTEGER NOT NULL, "
            "event_type TEXT NOT NULL, event_data TEXT NOT NULL DEFAULT '{}', app_flag INTEGER)"
        )
        conn.executemany(
            "INSERT INTO events (timestamp, event_type, event_data) VALUES (?, 'file_edit', '{}')", [(1,), (2,)]
        )
    with device_store.open_store(store) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 0
        assert device_store.schema_version(conn) == 1
        assert device_store.downgrade_to_v1(conn) is False, "already v1: nothing to remove"
        assert device_store.upgrade_to_v2(conn, IDENTITY) is True
        assert conn.execute("SELECT count(*), count(sync_id) FROM events").fetchone() == (2, 2)
        assert device_store.downgrade_to_v1(conn) is True
        assert device_store.schema_version(conn) == 1 and "app_flag" in _columns(conn)
        assert conn.execute("SELECT count(*) FROM events").fetchone() == (2,)


def test_a_v2_store_whose_app_set_its_version_back_to_1_stays_v2(tmp_path: Path) -> None:
    """The app may re-run its v1 script on every start (``CREATE TABLE IF NOT EXISTS events``,
    ``PRAGMA user_version = 1``): read as v1, the store's every upgrade (each sync) failed on
    "duplicate column name: sync_id", and a downgrade said "already v1" and kept the sync columns."""
    store = make_store(tmp_path / "dev.db", 5, identity=IDENTITY)
    with device_store.open_store(store) as conn:
        _mark_synced(conn, [1, 2])
        states = conn.execute("SELECT id, sync_id, sync_status, synced_at FROM events ORDER BY id").fetchall()
    device_store.create_v1(store)  # the app starting again
    with device_store.open_store(store) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
        assert device_store.schema_version(conn) == 2
        assert device_store.upgrade_to_v2(conn, IDENTITY) is False
        # Synced events stay synced under their sync ids: nothing is re-sent as new.
        assert conn.execute("SELECT id, sync_id, sync_status, synced_at FROM events ORDER BY id").fetchall() == states
        assert device_store.local_ids(device_store.read_pending(conn, 0, 10, now_ms=device_store.now_ms())) == [3, 4, 5]
        original = _events(conn)
        assert device_store.downgrade_to_v1(conn) is True
        assert device_store.schema_version(conn) == 1
        assert _columns(conn) == {"id", "timestamp", "event_type", "event_data"}
        assert _events(conn) == original


@pytest.mark.parametrize(
    "partial",
    [
        pytest.param("ALTER TABLE events ADD COLUMN device_id TEXT", id="an app's own device_id column"),
        pytest.param(
            "ALTER TABLE events ADD COLUMN sync_id TEXT; ALTER TABLE events ADD COLUMN sync_status TEXT; "
            "UPDATE events SET sync_id = 'stale-' || id; CREATE UNIQUE INDEX idx_events_sync_id ON events (sync_id); "
            "CREATE TABLE sync_identity (only_row INTEGER PRIMARY KEY CHECK (only_row = 1), "
            "device_id TEXT NOT NULL, user_id TEXT NOT NULL, project_id TEXT NOT NULL); "
            "INSERT INTO sync_identity VALUES (1, 'old', 'old', 'old')",
            id="an upgrade by other means interrupted",
        ),
    ],
)
def test_a_v1_store_holding_some_sync_columns_upgrades_adding_only_the_missing_ones(
    tmp_path: Path, partial: str
) -> None:
    """A v1 store with only some of v2's columns (and objects) failed every upgrade, so every
    sync, on SQLite's "duplicate column name". Its events get what a fresh upgrade gives them:
    a NULL ``sync_status`` the app's column left would keep them from ever syncing."""
    store = make_store(tmp_path / "dev.db", 5)
    with device_store.open_store(store) as conn:
        conn.executescript(partial)
        original = _events(conn)
        assert device_store.schema_version(conn) == 1
        assert device_store.upgrade_to_v2(conn, IDENTITY) is True
        assert conn.execute("PRAGMA user_version").fetchone()[0] == device_store.schema_version(conn) == 2
        rows = conn.execute(
            "SELECT sync_id, sync_status, sync_attempts, device_id, user_id, project_id FROM events ORDER BY id"
        ).fetchall()
        assert [_uuid7_time_ms(row[0]) for row in rows] == [event[1] for event in original]
        assert {row[1:] for row in rows} == {("pending", 0, "laptop-1", "alice", "proj-x")}
        assert device_store.identity_of(conn) == IDENTITY
        assert device_store.local_ids(device_store.read_pending(conn, 0, 10, now_ms=device_store.now_ms())) == [
            1, 2, 3, 4, 5
        ]
        assert device_store.downgrade_to_v1(conn) is True
        assert _columns(conn) == {"id", "timestamp", "event_type", "event_data"}
        assert _events(conn) == original


def test_an_upgrade_keeps_the_user_ids_an_apps_own_column_holds(tmp_path: Path) -> None:
    """An app with its own ``user_id`` column keeps what it wrote there: only the events it left
    empty get the store's identity (as the insert trigger fills only what a new event lacks)."""
    store = make_store(tmp_path / "dev.db", 3)
    with device_store.open_store(store) as conn:
        conn.executescript("ALTER TABLE events ADD COLUMN user_id TEXT; UPDATE events SET user_id = 'bob' WHERE id = 2")
        assert device_store.upgrade_to_v2(conn, IDENTITY) is True
        rows = conn.execute("SELECT user_id, device_id, sync_status FROM events ORDER BY id").fetchall()
    assert rows == [("alice", "laptop-1", "pending"), ("bob", "laptop-1", "pending"), ("alice", "laptop-1", "pending")]


def test_a_version_1_store_without_the_v1_columns_is_refused_naming_them(tmp_path: Path) -> None:
    """A store at ``user_version`` 1 whose ``events`` lacks v1's columns (another tool's table) was
    read as v1: its upgrade failed on SQLite's bare "no such column: id" and ``migrate down`` said
    it was v1 already. Both now refuse it in one line naming the missing columns."""
    store = tmp_path / "other.db"
    with sqlite3.connect(store) as conn:
        conn.executescript("CREATE TABLE events (a, id); INSERT INTO events VALUES (1, 1); PRAGMA user_version = 1;")
    conn.close()
    expected = (
        f"^{re.escape(str(store))} has an events table without the v1 columns "
        "event_data, event_type, timestamp \\(columns: a, id\\): it is not a DevFlow event store"
    )
    with device_store.open_store(store) as conn:
        with pytest.raises(UserError, match=expected):
            device_store.upgrade_to_v2(conn, IDENTITY)
        with pytest.raises(UserError, match=expected):
            device_store.downgrade_to_v1(conn)
        assert _columns(conn) == {"a", "id"}


@pytest.mark.parametrize(("declared", "bad_id", "kind"), [("TEXT", "a1", "text"), ("REAL", 2.5, "real"), ("INTEGER", None, "null")])
def test_an_upgrade_refuses_an_event_id_that_is_no_integer_leaving_the_store_v1(
    tmp_path: Path, declared: str, bad_id: object, kind: str
) -> None:
    """An app's own table whose ``id`` holds a text, real or NULL value: a text id stopped the
    upgrade half-way with a Python ``TypeError`` traceback, and a NULL id was upgraded with no sync
    id, pending forever. Now one line names the store and the fix, and nothing is changed."""
    store = tmp_path / "own.db"
    with sqlite3.connect(store) as conn:
        conn.execute(f"CREATE TABLE events (id {declared}, timestamp INTEGER, event_type TEXT, event_data TEXT)")
        conn.executemany("INSERT INTO events VALUES (?, 1764950000000, 'commit', '{}')", [(1,), (bad_id,)])
    conn.close()
    with device_store.open_store(store) as conn:
        with pytest.raises(UserError, match=f"^device store {re.escape(str(store))} has an event whose id is {kind}, "):
            device_store.upgrade_to_v2(conn, IDENTITY)
        assert _columns(conn) == {"id", "timestamp", "event_type", "event_data"}
        assert device_store.schema_version(conn) == device_store.V1


@pytest.mark.parametrize(
    ("kind", "name", "column", "ddl"),
    [
        ("index", "app_idx", "device_id", "CREATE INDEX app_idx ON events (device_id, timestamp)"),
        ("view", "app view", "user_id", 'CREATE VIEW "app view" AS SELECT id, user_id FROM events'),
        (
            "trigger",
            "app_trg",
            "sync_status",
            "CREATE TRIGGER app_trg AFTER UPDATE ON events WHEN NEW.sync_status = 'failed' BEGIN SELECT 1; END",
        ),
    ],
)
def test_a_downgrade_refused_by_an_object_using_a_sync_column_names_it_and_the_fix(
    tmp_path: Path, kind: str, name: str, column: str, ddl: str
) -> None:
    """An index, view or trigger the app made on a sync column stops SQLite's DROP COLUMN: the
    error was SQLite's own ("error in index app_idx after drop column: no such column: …"),
    which says neither that the store is unchanged nor what to do."""
    store = make_store(tmp_path / "dev.db", 5, identity=IDENTITY)
    with device_store.open_store(store) as conn:
        conn.execute(ddl)
        original = _events(conn)
    with pytest.raises(UserError) as refused:
        with device_store.open_store(store) as conn:
            device_store.downgrade_to_v1(conn)
    assert str(refused.value) == (
        f"device store {store}: the sync column {column} is used by {kind} {name!r}, which flowyard did "
        f"not create; the store is unchanged: drop that {kind} and downgrade again, or keep the store at v2"
    )
    with device_store.open_store(store) as conn:
        assert device_store.schema_version(conn) == 2 and "sync_id" in _columns(conn)
        assert _events(conn) == original
        conn.execute(f'DROP {kind} "{name}"')  # what the message says to do
        assert device_store.downgrade_to_v1(conn) is True
        assert _events(conn) == original


@pytest.mark.parametrize(
    ("schema", "message"),
    [
        ("", "has no events table: it is not a DevFlow event store"),
        ("CREATE TABLE notes (body TEXT)", "has no events table: it is not a DevFlow event store"),
        (
            "CREATE TABLE events (id INTEGER PRIMARY KEY, timestamp INTEGER, event_type TEXT, "
            "event_data TEXT, sync_id TEXT)",
            "has no schema version and its events table is not a v1 store (columns: event_data, event_type, "
            "id, sync_id, timestamp); it was changed by another tool",
        ),
        ("CREATE TABLE events (id INTEGER); PRAGMA user_version = 7", "has unknown schema version 7"),
        (  # it was told to set PRAGMA user_version, which would not make it a store
            "CREATE TABLE events (body TEXT, at INTEGER)",
            "has an events table without the v1 columns event_data, event_type, id, timestamp (columns: at, "
            "body): it is not a DevFlow event store; give the path of the DevFlow app's own store",
        ),
    ],
)
def test_a_file_that_is_no_store_flowyard_knows_is_refused_naming_it(
    tmp_path: Path, schema: str, message: str
) -> None:
    store = tmp_path / "other.db"
    with sqlite3.connect(store) as conn:
        conn.executescript(schema or "PRAGMA user_version = 0")
    with device_store.open_store(store) as conn, pytest.raises(UserError) as refused:
        device_store.upgrade_to_v2(conn, IDENTITY)
    assert str(refused.value).startswith(f"{store} ") and message in str(refused.value)
    with sqlite3.connect(store) as conn:
        assert conn.execute("SELECT count(*) FROM pragma_table_info('events') WHERE name = 'sync_status'").fetchone() == (0,)


def test_a_file_that_is_not_a_sqlite_database_is_told_apart_from_a_damaged_store(tmp_path: Path) -> None:
    empty, notes, damaged = tmp_path / "empty.db", tmp_path / "notes.db", tmp_path / "damaged.db"
    empty.touch()
    notes.write_text("just some notes\n")
    damaged.write_bytes(b"SQLite format 3\x00" + b"junk" * 300)
    for path, reason in ((empty, "it is empty"), (notes, "it does not start with SQLite's header")):
        with pytest.raises(UserError) as info:
            device_store.check_sqlite_file(path)
        assert str(info.value) == (
            f"device store {path} is not a SQLite database ({reason}); give the path of the device's SQLite file"
        )
    device_store.check_sqlite_file(damaged)  # a run gives it its per-device error instead


_APP = """
import sqlite3, sys, time
from pathlib import Path
store, stop = Path(sys.argv[1]), Path(sys.argv[2])
conn = sqlite3.connect(store, timeout=float(sys.argv[3]), isolation_level=None)
inserted = during_upgrade = 0
while not stop.exists():
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("INSERT INTO events (timestamp, event_type, event_data) VALUES (?, 'app', '{}')", (inserted + 1,))
    during_upgrade += conn.execute(
        "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'sync_upgrade_progress'"
    ).fetchone()[0]
    conn.execute("COMMIT")
    inserted += 1
    if inserted == 1:
        print("inserting", flush=True)
    time.sleep(0.01)
print(inserted, during_upgrade)
"""
"""The local app: an event every 10 ms or so, one per transaction, until ``stop`` exists; it
counts the inserts it committed while an upgrade was under way. (Inserting without a pause, it
would keep the upgraders from the lock.)"""

_UPGRADER = """
import sys
from pathlib import Path
from tasks import device_store
print("ready", flush=True)
sys.stdin.readline()
with device_store.open_store(Path(sys.argv[1])) as conn:
    identity = device_store.Identity("laptop-1", "alice", "proj-x")
    print(device_store.upgrade_to_v2(conn, identity), flush=True)
"""
"""A ``sync``/``migrate up`` process: says ready, waits for a line, then upgrades."""


def _upgraders(store: Path, count: int) -> list[subprocess.Popen[str]]:
    """``count`` upgrader processes, each waiting for a line on stdin to begin."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _UPGRADER, str(store)],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(count)
    ]
    for proc in procs:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
    return procs


def _go(procs: list[subprocess.Popen[str]]) -> None:
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()


def _assert_every_event_has_its_sync_state(store: Path, events: int) -> None:
    with device_store.open_store(store) as conn:
        assert device_store.schema_version(conn) == 2
        total, distinct, missing, statuses = conn.execute(
            "SELECT count(*), count(DISTINCT sync_id), "
            "sum(sync_id IS NULL OR device_id IS NOT 'laptop-1' OR user_id IS NOT 'alice'), "
            "group_concat(DISTINCT sync_status) FROM events"
        ).fetchone()
    assert (total, distinct, missing, statuses) == (events, events, 0, "pending")


def test_an_app_writes_to_its_store_while_two_upgrades_run_at_once(tmp_path: Path) -> None:
    """One transaction over 300k events held the write lock about 1.5 s, so the app could not
    write at all until the upgrade ended (with a busy timeout under that, it got "database is
    locked"). The app now commits inserts between the upgrade's steps; the test counts them
    rather than timing the waits, which a slower machine would stretch. Two upgraders at once
    (a sync and a ``migrate up``) share the chunked upgrade, one of them reporting it; every
    event, the app's included, ends with a sync id and the store's identity."""
    store, stop = make_store(tmp_path / "dev.db", 300_000, seed=5), tmp_path / "stop"
    app = subprocess.Popen(
        [sys.executable, "-c", _APP, str(store), str(stop), "60"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert app.stdout is not None and app.stdout.readline() == "inserting\n"
        upgraders = _upgraders(store, 2)
        _go(upgraders)
        results = [proc.communicate() for proc in upgraders]
        assert [proc.returncode for proc in upgraders] == [0, 0], results
        assert sorted(out.strip() for out, _ in results) == ["False", "True"]
        stop.touch()
        out, err = app.communicate()
        assert app.returncode == 0, err
    finally:
        app.kill()
        app.wait()
    inserted, during_upgrade = map(int, out.split())
    assert during_upgrade > 0
    _assert_every_event_has_its_sync_state(store, 300_000 + inserted)


def _some_sync_ids(conn: sqlite3.Connection) -> bool:
    return "sync_id" in _columns(conn) and bool(conn.execute("SELECT count(sync_id) FROM events").fetchone()[0])


def test_an_upgrade_killed_part_way_reads_as_v1_and_resumes_or_downgrades(tmp_path: Path) -> None:
    """SIGKILL once part of the events have their sync state: the store is consistent, reads as
    v1, takes the app's new events (with sync ids, by the trigger), and the next upgrade resumes
    it, keeping the sync ids given before the kill; ``migrate down`` undoes it instead."""
    events = 60_000  # three chunks
    store = make_store(tmp_path / "dev.db", events, seed=6)
    with device_store.open_store(store) as conn:
        original = _events(conn)
    (upgrader,) = _upgraders(store, 1)
    try:
        _go([upgrader])
        with device_store.open_store(store) as conn:
            while upgrader.poll() is None and not _some_sync_ids(conn):
                time.sleep(0.01)  # until some events have their sync ids (or the upgrade ended)
            upgrader.kill()
    finally:
        upgrader.kill()
        upgrader.communicate()
    assert upgrader.returncode == -signal.SIGKILL
    with device_store.open_store(store) as conn:
        assert device_store.schema_version(conn) == 1
        given = dict(conn.execute("SELECT id, sync_id FROM events WHERE sync_id IS NOT NULL").fetchall())
        assert 0 < len(given) < events
        device_store.insert_events(conn, [(1, "app", {})])
        assert conn.execute("SELECT sync_id IS NOT NULL FROM events WHERE id = ?", (events + 1,)).fetchone() == (1,)
        copy = sqlite3.connect(tmp_path / "copy.db", isolation_level=None)
        conn.backup(copy)
        assert device_store.downgrade_to_v1(copy) is True
        assert device_store.schema_version(copy) == 1
        assert _events(copy)[:events] == original and len(_events(copy)) == events + 1
        assert {row[0] for row in copy.execute("SELECT name FROM sqlite_master")} == {"events", "sqlite_sequence"}
        copy.close()
        assert device_store.upgrade_to_v2(conn, IDENTITY) is True
        assert {i: s for i, s in conn.execute("SELECT id, sync_id FROM events") if i in given} == given
    _assert_every_event_has_its_sync_state(store, events + 1)


def _events_as_a_view(store: Path) -> Path:
    """``store`` with its events moved to another table, and ``events`` a view over them."""
    with device_store.open_store(store) as conn:
        conn.executescript(
            "ALTER TABLE events RENAME TO app_events; CREATE VIEW events AS SELECT * FROM app_events; "
            "PRAGMA user_version = 1;"
        )
    return store


@pytest.mark.parametrize("upgraded", [False, True], ids=["v1-columns", "v2-columns"])
def test_a_store_whose_events_is_a_view_is_refused_naming_it(tmp_path: Path, upgraded: bool) -> None:
    """SQLite describes a view's columns like a table's: a view over v1's columns read as v1 and
    its upgrade failed on "Cannot add a column to a view"; one over v2's read as v2."""
    store = _events_as_a_view(make_store(tmp_path / "view.db", 4, identity=IDENTITY if upgraded else None))
    refused = f"^device store {store}: events is a view, not a table; flowyard syncs only the DevFlow app's own store"
    with device_store.open_store(store) as conn:
        for read in (device_store.schema_version, device_store.known_version):
            with pytest.raises(UserError, match=refused):
                read(conn)
        with pytest.raises(UserError, match=refused):
            device_store.upgrade_to_v2(conn, IDENTITY)
        with pytest.raises(UserError, match=refused):
            device_store.downgrade_to_v1(conn)
        assert conn.execute("SELECT count(*) FROM app_events").fetchone() == (4,)
        assert conn.execute("SELECT type FROM sqlite_master WHERE name = 'events'").fetchone() == ("view",)


@pytest.mark.parametrize("dropped", [False, True], ids=["a-v1-store", "a-v2-store-less-a-column"])
def test_version_2_without_the_sync_columns_is_refused_with_the_way_back(tmp_path: Path, dropped: bool) -> None:
    """A v1 store another tool set to version 2 (or a v2 store that lost a sync column) read as
    v2: `migrate up` took it for v2 already (then failed on "no such table: sync_identity", or said
    "already v2"), every sync and `sync status` failed on "no such column: sync_status" and `migrate
    down` on "no such column". Set back to 1 as the error says, it upgrades."""
    store = make_store(tmp_path / "v2-in-name.db", 3, identity=IDENTITY if dropped else None)
    with device_store.open_store(store) as conn:
        if dropped:
            conn.execute("ALTER TABLE events DROP COLUMN last_sync_error")
        conn.execute("PRAGMA user_version = 2")
        missing = "column last_sync_error (" if dropped else "columns device_id, last_sync_error, next_retry_at"
        lacks = f"device store {store} is at schema version 2, but its events table lacks the sync {missing}"
        with pytest.raises(UserError, match="^" + re.escape(lacks)):
            device_store.upgrade_to_v2(conn, IDENTITY)
        with pytest.raises(UserError, match=r"set its version back to 1 \(`sqlite3 .* 'PRAGMA user_version = 1'`\)"):
            device_store.downgrade_to_v1(conn)
        conn.execute("PRAGMA user_version = 1")
        assert device_store.upgrade_to_v2(conn, IDENTITY) is True
        assert device_store.schema_version(conn) == device_store.V2
        assert device_store.counts(conn).pending == 3
