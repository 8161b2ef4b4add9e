"""Central store: idempotent uploads, monthly partitions, rollups, last-write-wins snapshots."""

from __future__ import annotations

import itertools
import threading
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import orjson
import psycopg
import pytest
from psycopg import sql

from tasks import central_store
from tasks.central_store import CentralSession, UploadRow
from tests.conftest import Role


def _ms(year: int, month: int, day: int, hour: int = 0) -> int:
    return int(datetime(year, month, day, hour, tzinfo=UTC).timestamp() * 1000)


_LOCAL_IDS = itertools.count(1)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _row(
    ts: int, *, device: str = "d1", kind: str = "file_edit", data: dict | None = None, project: str = "p"
) -> UploadRow:
    """A new event: own sync id and own local id (a device never reuses one within a store)."""
    return (
        str(uuid.uuid4()),
        next(_LOCAL_IDS),
        ts,
        device,
        f"user-{device}",
        project,
        kind,
        orjson.dumps(data or {}).decode(),
    )


@pytest.fixture()
def central(fresh_db: str) -> str:
    central_store.ensure_schema(fresh_db)
    central_store.ensure_schema(fresh_db)  # idempotent
    return fresh_db


def _scalar(url: str, query: str) -> object:
    with psycopg.connect(url) as conn:
        return conn.execute(query).fetchone()[0]


def test_reupload_keeps_one_copy_and_rollups_count_once(central: str) -> None:
    rows = [_row(_ms(2026, 1, 31, 23) + i * 60_000, kind=("build", "test_run")[i % 2]) for i in range(300)]
    session = CentralSession(central)
    try:
        first = session.upload(rows)
        again = session.upload(rows[100:] + [_row(_ms(2026, 3, 1))])
    finally:
        session.close()
    assert (first.inserted, first.duplicates) == (300, 0)
    assert (again.inserted, again.duplicates) == (1, 200)
    assert _scalar(central, "SELECT count(*) FROM devflow.events") == 301
    assert _scalar(central, "SELECT count(DISTINCT sync_id) FROM devflow.events") == 301
    # Three months touched → three partitions, each holding its own rows.
    partitions = _scalar(
        central,
        "SELECT array_agg(c.relname::text ORDER BY c.relname) FROM pg_inherits i "
        "JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = 'devflow.events'::regclass",
    )
    assert partitions == ["events_y2026m01", "events_y2026m02", "events_y2026m03"]
    assert _scalar(central, "SELECT count(*) FROM devflow.events_y2026m01") == 60
    # Incremental rollups equal a full recomputation from the events.
    for table, unit in (("rollup_hourly", "hour"), ("rollup_daily", "day")):
        mismatch = _scalar(
            central,
            f"""
            SELECT count(*) FROM (
                (SELECT bucket, project_id, user_id, event_type, events FROM devflow.{table}
                 EXCEPT SELECT date_trunc('{unit}', occurred_at, 'UTC'), project_id, user_id, event_type, count(*)
                 FROM devflow.events GROUP BY 1, 2, 3, 4)
                UNION ALL
                (SELECT date_trunc('{unit}', occurred_at, 'UTC'), project_id, user_id, event_type, count(*)
                 FROM devflow.events GROUP BY 1, 2, 3, 4
                 EXCEPT SELECT bucket, project_id, user_id, event_type, events FROM devflow.{table})
            ) diff
            """,
        )
        assert mismatch == 0, table
    assert _scalar(central, "SELECT sum(events) FROM devflow.rollup_daily") == 301


def test_events_of_december_9999_get_a_partition_up_to_year_10000(central: str) -> None:
    """The last month a millisecond time can name needs an upper bound Python's date cannot hold."""
    last_ms = _ms(9999, 12, 31, 23) + 3_599_999
    session = CentralSession(central)
    try:
        result = session.upload([_row(_ms(9999, 12, 15)), _row(last_ms), _row(_ms(2026, 1, 2))])
    finally:
        session.close()
    assert (result.inserted, result.duplicates) == (3, 0)
    assert _scalar(central, "SELECT count(*) FROM devflow.events_y9999m12") == 2
    bound = _scalar(
        central, "SELECT pg_get_expr(relpartbound, oid) FROM pg_class WHERE oid = 'devflow.events_y9999m12'::regclass"
    )
    assert bound == "FOR VALUES FROM ('9999-12-01 00:00:00+00') TO ('10000-01-01 00:00:00+00')"


def _times_ms(url: str, table: str, key: str, moment: str) -> dict[str, Decimal]:
    """A central table's times as exact Unix milliseconds by row key (``extract(epoch …)`` is numeric)."""
    query = sql.SQL("SELECT {}::text, extract(epoch FROM {}) * 1000 FROM {}").format(
        sql.Identifier(key), sql.Identifier(moment), sql.Identifier(central_store.SCHEMA, table)
    )
    with psycopg.connect(url) as conn:
        return dict(conn.execute(query).fetchall())


def test_event_times_arrive_to_the_exact_millisecond(central: str) -> None:
    """Central's event and snapshot times are the device's Unix milliseconds exactly, at both
    ends of the years 1-9999 too. A float8 division by 1000 misses by microseconds before the
    1850s and after the 2240s: 9999-12-31 23:59:59.999 arrived as …59.999008."""
    tricky = [
        -62_135_596_800_000 + 1,  # 0001-01-01 00:00:00.001
        -3_557_830_362_428,  # 1857
        -1,
        1,
        1_700_000_000_001,
        1_700_000_000_009,
        8_590_155_858_207,  # 2242
        253_402_300_799_999,  # 9999-12-31 23:59:59.999
    ]
    events = [_row(ts) for ts in tricky]
    snapshots = [_status("d1", ts, "green", f"p{ts}") for ts in tricky]
    session = CentralSession(central)
    try:
        session.upload(events + snapshots)
        downloaded = {u.project_id: u.updated_at for u in session.download_updates(0).updates if u.status is not None}
    finally:
        session.close()
    sent = {row[0]: Decimal(row[2]) for row in events + snapshots}
    assert _times_ms(central, "events", "sync_id", "occurred_at") == sent
    assert _times_ms(central, "event_keys", "sync_id", "occurred_at") == sent
    snapshot_times = {f"p{ts}": Decimal(ts) for ts in tricky}
    assert _times_ms(central, "project_status", "project_id", "updated_at") == snapshot_times
    assert downloaded == {f"p{ts}": _EPOCH + timedelta(milliseconds=ts) for ts in tricky}


def test_concurrent_uploaders_of_overlapping_batches_keep_one_copy(central: str) -> None:
    rows = [_row(_ms(2026, 5, 1) + i) for i in range(2000)]
    results = []

    def upload(part: list[UploadRow]) -> None:
        session = CentralSession(central)
        try:
            results.append(session.upload(part))
        finally:
            session.close()

    workers = [threading.Thread(target=upload, args=(rows[i * 500 : i * 500 + 1500],)) for i in range(2)]
    workers += [threading.Thread(target=upload, args=(rows,))]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert sum(r.inserted for r in results) == 2000
    assert sum(r.inserted + r.duplicates for r in results) == 1500 * 2 + 2000
    assert _scalar(central, "SELECT count(*) FROM devflow.events") == 2000
    assert _scalar(central, "SELECT sum(events) FROM devflow.rollup_hourly") == 2000


def _status(device: str, ts: int, value: str, project: str) -> UploadRow:
    return _row(ts, device=device, kind=central_store.STATUS_EVENT, data={"status": value}, project=project)


def test_last_write_wins_under_clock_skew_and_any_arrival_order(central: str) -> None:
    base = _ms(2026, 6, 1)
    # laptop's clock runs an hour ahead: its write is "latest" even though it was sent first;
    # desktop and ci wrote at the same instant, so the higher device id ("desktop" < "laptop") decides the tie.
    writes = [
        [_status("laptop", base + 3_600_000, "laptop-skewed", "")],
        [_status("desktop", base, "desktop", ""), _status("ci", base, "ci", "")],
        [_status("ci", base - 60_000, "ci-old", "")],
    ]
    session = CentralSession(central)
    try:
        for n, order in enumerate(itertools.permutations(writes)):
            project = f"proj-{n}"
            for batch in order:
                session.upload([r[:5] + (project,) + r[6:] for r in batch])
        tie = [_status("ci", base, "ci", "tie"), _status("desktop", base, "desktop", "tie")]
        session.upload(tie[:1])
        session.upload(tie[1:])
        updates = session.download_updates(0).updates
    finally:
        session.close()
    with psycopg.connect(central) as conn:
        final = dict(
            conn.execute("SELECT project_id, status->>'status' FROM devflow.project_status").fetchall()
        )
    assert {final[f"proj-{n}"] for n in range(6)} == {"laptop-skewed"}
    assert final["tie"] == "desktop"
    # The download cursor is strictly increasing and reflects each project's last change.
    seqs = [u.seq for u in updates]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert {u.project_id: orjson.loads(u.status)["status"] for u in updates if u.status is not None} == final


def test_a_devices_later_write_in_the_same_millisecond_wins(central: str) -> None:
    """Two snapshots one device wrote in the same millisecond: its later write (higher local id)
    wins in any arrival order. The tie used to fall to the sync id, whose bits below the
    millisecond are random, so the earlier write won about half the time."""
    base = _ms(2026, 6, 2)
    early, late = _status("d1", base, "building", ""), _status("d1", base, "failed", "")
    early = ("ffffffff-ffff-7fff-bfff-ffffffffffff", *early[1:])  # the larger sync id goes to the earlier write
    late = ("00000000-0000-7000-8000-000000000000", *late[1:])
    arrivals = {"one-batch": [[early, late]], "in-order": [[early], [late]], "reversed": [[late], [early]]}
    session = CentralSession(central)
    try:
        for project, batches in arrivals.items():
            for batch in batches:
                session.upload([r[:5] + (project,) + r[6:] for r in batch])
    finally:
        session.close()
    with psycopg.connect(central) as conn:
        final = dict(conn.execute("SELECT project_id, status->>'status' FROM devflow.project_status").fetchall())
    assert final == {"one-batch": "failed", "in-order": "failed", "reversed": "failed"}


def test_a_snapshot_table_from_before_the_local_id_is_upgraded_in_place(central: str) -> None:
    """A central database whose snapshots predate the local id gets the column on the next
    schema check; its old rows count as their device's first write of that millisecond."""
    base = _ms(2026, 6, 3)
    session = CentralSession(central)
    try:
        session.upload([_status("d1", base, "old", "legacy")])
    finally:
        session.close()
    with psycopg.connect(central, autocommit=True) as conn:
        conn.execute("ALTER TABLE devflow.project_status DROP COLUMN local_id")
    central_store.ensure_schema(central)
    assert _scalar(central, "SELECT local_id FROM devflow.project_status WHERE project_id = 'legacy'") is None
    session = CentralSession(central)
    try:
        assert session.upload([_status("d1", base, "new", "legacy")]).status_changes == 1
    finally:
        session.close()
    assert _scalar(central, "SELECT status->>'status' FROM devflow.project_status") == "new"


def test_download_since_cursor_returns_only_newer_changes(central: str) -> None:
    base = _ms(2026, 7, 1)
    session = CentralSession(central)
    try:
        session.upload([_status("a", base, "one", "p1"), _status("a", base, "two", "p2")])
        cursor = max(u.seq for u in session.download_updates(0).updates)
        assert session.download_updates(cursor).updates == []
        result = session.upload([_status("b", base - 1, "stale", "p1")])  # older: no change
        assert result.status_changes == 0
        assert session.download_updates(cursor).updates == []
        session.upload([_status("b", base + 1, "newer", "p1")])
        later = session.download_updates(cursor).updates
    finally:
        session.close()
    assert [(u.project_id, u.status, u.device_id) for u in later] == [("p1", '{"status": "newer"}', "b")]
    assert later[0].seq > cursor


def test_an_event_back_under_a_new_sync_id_is_a_duplicate(central: str) -> None:
    """A re-upgraded store re-sends its events with new sync ids: the origin key skips them,
    without touching rollups or snapshots; an event with only the local id in common is new."""
    base = _ms(2026, 8, 1)
    first = [_row(base + i * 1000) for i in range(99)] + [_status("d1", base + 99_000, "green", "p")]
    session = CentralSession(central)
    try:
        assert session.upload(first).inserted == 100
        cursor = max(u.seq for u in session.download_updates(0).updates)
        again = [(str(uuid.uuid4()), *row[1:]) for row in first[:-1]]
        again.append(("ffffffff-ffff-4fff-bfff-ffffffffffff", *first[-1][1:]))  # wins any sync-id tie
        assert session.upload(again) == central_store.UploadResult(0, 100, 0)
        assert session.download_updates(cursor).updates == []
        reused_id = (str(uuid.uuid4()), first[0][1], base - 1, *first[0][3:])
        assert session.upload([reused_id]).inserted == 1
    finally:
        session.close()
    assert _scalar(central, "SELECT count(*) FROM devflow.events") == 101
    assert _scalar(central, "SELECT sum(events) FROM devflow.rollup_daily") == 101
    with psycopg.connect(central) as conn:
        snapshot = conn.execute("SELECT sync_id::text FROM devflow.project_status").fetchall()
    assert snapshot == [(first[-1][0],)]


def test_a_central_database_from_before_the_origin_key_is_upgraded_in_place(central: str) -> None:
    """The registry as the previous version created it (sync id only), holding an event that
    version already stored twice: ensure_schema adds and backfills the origin key, keeps
    both old copies (it never deletes an event) and dedups every later copy."""
    base = _ms(2026, 9, 1)
    rows = [_row(base + i * 1000) for i in range(50)]
    session = CentralSession(central)
    try:
        session.upload(rows)
        with psycopg.connect(central, autocommit=True) as conn:
            conn.execute("DROP INDEX devflow.event_keys_origin")
            conn.execute(
                "ALTER TABLE devflow.event_keys DROP COLUMN device_id, DROP COLUMN local_id, "
                "DROP COLUMN occurred_at, DROP COLUMN event_type"
            )
            twin = str(uuid.uuid4())  # the old duplication: the first event again, under a new sync id
            conn.execute("INSERT INTO devflow.event_keys (sync_id) VALUES (%s)", (twin,))
            conn.execute(
                "INSERT INTO devflow.events (sync_id, local_id, device_id, user_id, project_id, event_type, "
                "event_data, occurred_at) SELECT %s, local_id, device_id, user_id, project_id, event_type, "
                "event_data, occurred_at FROM devflow.events WHERE sync_id = %s",
                (twin, rows[0][0]),
            )
        central_store.ensure_schema(central)
        central_store.ensure_schema(central)
        session.close()
        session = CentralSession(central)
        later = [(str(uuid.uuid4()), *row[1:]) for row in rows]
        assert session.upload(later) == central_store.UploadResult(0, 50, 0)
    finally:
        session.close()
    assert _scalar(central, "SELECT count(*) FROM devflow.events") == 51
    assert _scalar(central, "SELECT count(*) FROM devflow.event_keys WHERE device_id IS NULL") == 1
    assert _scalar(central, "SELECT to_regclass('devflow.event_keys_origin')::text") == (
        "devflow.event_keys_origin"
    )


def _central_ids(url: str) -> list[uuid.UUID]:
    with psycopg.connect(url) as conn:
        return [central for (central,) in conn.execute("SELECT central_id FROM devflow.central_identity")]


def test_a_central_from_before_its_identity_gets_one_in_place_that_never_changes(central: str) -> None:
    """A download cursor counts in one central, so every central needs an id: one created by an
    earlier flowyard gets it from a session (when the run's schema step could not reach it) or
    from the next schema step, which devices may run at once; later steps keep it."""
    with psycopg.connect(central, autocommit=True) as conn:  # nor its tombstones, made after it
        conn.execute("DROP TABLE devflow.central_identity, devflow.project_deletions")
    session = CentralSession(central)
    try:
        assert [session.central_id()] == _central_ids(central)
    finally:
        session.close()
    with psycopg.connect(central, autocommit=True) as conn:
        conn.execute("DROP TABLE devflow.central_identity")
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(central_store.ensure_schema, [central] * 4))
    [central_id] = _central_ids(central)
    central_store.ensure_schema(central)
    assert _central_ids(central) == [central_id]


def _event_indexes(url: str) -> set[str]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT indexrelid::regclass::text FROM pg_index WHERE indrelid = 'devflow.events'::regclass"
        ).fetchall()
    return {name for (name,) in rows}


def test_events_are_indexed_by_the_cursor_only_and_indexes_of_older_centrals_are_kept(central: str) -> None:
    """A new central indexes events by ``seq`` alone (an index by project or user costs every
    upload 3-6 µs of server CPU per event, docs/sync.md); the two an earlier flowyard created
    stay, also on the partitions created after the upgrade, because queries may use them."""
    assert _event_indexes(central) == {"devflow.events_seq"}
    with psycopg.connect(central, autocommit=True) as conn:
        conn.execute("CREATE INDEX events_project_time ON devflow.events (project_id, occurred_at)")
        conn.execute("CREATE INDEX events_user_time ON devflow.events (user_id, occurred_at)")
    central_store.ensure_schema(central)
    session = CentralSession(central)
    try:
        assert session.upload([_row(_ms(2027, 3, 1))]).inserted == 1
    finally:
        session.close()
    assert _event_indexes(central) == {
        "devflow.events_seq",
        "devflow.events_project_time",
        "devflow.events_user_time",
    }
    assert _scalar(
        central, "SELECT count(*) FROM pg_indexes WHERE schemaname = 'devflow' AND tablename = 'events_y2027m03'"
    ) == 3


def test_a_session_that_cannot_be_built_closes_its_connection(limited_role: Role, fresh_db: str) -> None:
    """A central without the schema, for a role that may not create it: the session fails, and
    its half-built connection is closed at once. Left to the garbage collector, it would stay
    open for as long as anything holds the exception (here ``info``; in a run, the task's
    failed state)."""
    name = f"flowyard-test-{uuid.uuid4().hex[:8]}"
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied for database") as info:
        CentralSession(limited_role.url(fresh_db), application_name=name)
    with psycopg.connect(fresh_db) as conn:
        left = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (name,))
        assert left.fetchone() == (0,), info.value


def _partitions(url: str) -> dict[str, int]:
    """Each partition of ``devflow.events`` (by name) with its row count."""
    with psycopg.connect(url) as conn:
        names = conn.execute(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = 'devflow.events'::regclass"
        ).fetchall()
        return {
            name: conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier("devflow", name))).fetchone()[0]
            for (name,) in names
        }


def _upload(url: str, rows: list[UploadRow]) -> central_store.UploadResult:
    session = CentralSession(url)
    try:
        return session.upload(rows)
    finally:
        session.close()


def test_a_month_whose_partition_a_dba_detached_gets_a_new_one(central: str) -> None:
    """A DBA detaches a month's partition (to archive it) or renames ``events`` aside, keeping its
    partitions' names: ``CREATE TABLE IF NOT EXISTS`` then skipped the month's new partition, and
    every later event of that month was refused one by one ("no partition … found for row"), every
    run. The new partition takes the next free name; the detached table keeps its rows."""
    assert _upload(central, [_row(_ms(2026, 12, 1) + i) for i in range(5)]).inserted == 5
    with psycopg.connect(central, autocommit=True) as conn:
        conn.execute("ALTER TABLE devflow.events DETACH PARTITION devflow.events_y2026m12")
    assert _upload(central, [_row(_ms(2026, 12, 2) + i) for i in range(7)]).inserted == 7
    with psycopg.connect(central, autocommit=True) as conn:
        conn.execute("ALTER TABLE devflow.events RENAME TO events_old")
    central_store.ensure_schema(central)  # a run's schema step: a new, empty devflow.events
    assert _upload(central, [_row(_ms(2026, 12, 3) + i) for i in range(3)]).inserted == 3
    assert _partitions(central) == {"events_y2026m12_2": 3}
    assert _scalar(central, "SELECT count(*) FROM devflow.events_y2026m12") == 5
    assert _scalar(central, "SELECT count(*) FROM devflow.events_old") == 7


def test_partitions_a_dba_made_take_the_months_they_cover(central: str) -> None:
    """A DEFAULT partition, or one under a name of the DBA's, failed every session ("invalid
    literal for int()"): every device, every run. A month such a partition covers (or one whose
    rows the DEFAULT partition holds already) is left to it instead of failing every batch."""
    with psycopg.connect(central, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE devflow.events_2027_q1 PARTITION OF devflow.events "
            "FOR VALUES FROM ('2027-01-01 00:00+00') TO ('2027-04-01 00:00+00')"
        )
        conn.execute("CREATE TABLE devflow.events_default PARTITION OF devflow.events DEFAULT")
        conn.execute(
            "INSERT INTO devflow.events (sync_id, local_id, device_id, user_id, project_id, event_type, event_data, "
            "occurred_at) VALUES (gen_random_uuid(), 1, 'd0', 'u', 'p', 'by-hand', '{}', '2026-05-05')"
        )
    rows = [_row(_ms(2027, 2, 1)), _row(_ms(2026, 5, 6)), _row(_ms(2026, 6, 1))]
    assert _upload(central, rows).inserted == 3
    assert _partitions(central) == {"events_2027_q1": 1, "events_default": 2, "events_y2026m06": 1}


def test_a_partition_detached_during_a_session_fails_the_batch_as_a_whole(central: str) -> None:
    """Not the rows' fault, so not theirs to be bisected into failed events: the batch fails as a
    whole, saying why, and the next session makes the partition again."""
    session = CentralSession(central)
    try:
        session.upload([_row(_ms(2026, 12, 1))])
        with psycopg.connect(central, autocommit=True) as conn:
            conn.execute("ALTER TABLE devflow.events DETACH PARTITION devflow.events_y2026m12")
        with pytest.raises(central_store.CentralRefused, match="was detached or dropped during this run"):
            session.upload([_row(_ms(2026, 12, 2))])
    finally:
        session.close()
    assert _upload(central, [_row(_ms(2026, 12, 2))]).inserted == 1


def _keys(url: str, table: str) -> list[tuple[str, bool, str]]:
    """Each index of a ``devflow`` table: name, whether unique, and its definition's column list."""
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT c.relname::text, i.indisunique, pg_get_indexdef(i.indexrelid) FROM pg_index i "
            "JOIN pg_class c ON c.oid = i.indexrelid WHERE i.indrelid = %s::regclass ORDER BY 1",
            (f"devflow.{table}",),
        ).fetchall()
    return [(name, unique, definition.split(" USING btree ")[1]) for name, unique, definition in rows]


def test_a_key_index_a_dba_renamed_is_not_built_again(central: str) -> None:
    """Found by its name, a renamed origin key was built again under the old one: two unique
    indexes, one more index write per uploaded event, forever."""
    with psycopg.connect(central, autocommit=True) as conn:
        conn.execute("ALTER INDEX devflow.event_keys_origin RENAME TO dba_origin")
        conn.execute("ALTER INDEX devflow.events_seq RENAME TO dba_cursor")
    central_store.ensure_schema(central)
    assert _keys(central, "event_keys") == [
        ("dba_origin", True, "(device_id, local_id, occurred_at, event_type)"),
        ("event_keys_pkey", True, "(sync_id)"),
    ]
    assert _keys(central, "events") == [("dba_cursor", False, "(seq)")]


@pytest.mark.parametrize("table", ["event_keys", "project_status", "rollup_daily"])
def test_a_primary_key_a_dba_dropped_is_restored(central: str, table: str) -> None:
    """``CREATE TABLE IF NOT EXISTS`` never restored one. Without the registry's, a re-sent event
    whose origin changed was stored twice and each snapshot lookup scanned the registry; without a
    rollup's or the snapshot's, every upload failed (no unique index for its ON CONFLICT)."""
    with psycopg.connect(central, autocommit=True) as conn:
        conn.execute(sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(
            sql.Identifier("devflow", table), sql.Identifier(f"{table}_pkey")
        ))
    central_store.ensure_schema(central)
    central_store.ensure_schema(central)
    assert _scalar(
        central, f"SELECT count(*) FROM pg_constraint WHERE conrelid = 'devflow.{table}'::regclass AND contype = 'p'"
    ) == 1
    first = _row(_ms(2026, 4, 1), kind=central_store.STATUS_EVENT, data={"v": 1})
    moved = (first[0], next(_LOCAL_IDS), *first[2:6], "file_edit", "{}")  # its sync id, another origin
    assert _upload(central, [first]) == central_store.UploadResult(1, 0, 1)
    assert _upload(central, [moved]) == central_store.UploadResult(0, 1, 0)
    assert _scalar(central, "SELECT sum(events) FROM devflow.rollup_daily") == 1


def test_a_new_events_table_gets_its_cursor_index_while_the_renamed_one_keeps_the_name(central: str) -> None:
    """The index of an ``events`` renamed aside keeps the name ``events_seq``, so ``CREATE INDEX IF
    NOT EXISTS events_seq`` skipped the new table's: every download and cursor read scanned it."""
    with psycopg.connect(central, autocommit=True) as conn:
        conn.execute("ALTER TABLE devflow.events RENAME TO events_old")
    central_store.ensure_schema(central)
    assert _keys(central, "events_old") == [("events_seq", False, "(seq)")]
    assert _keys(central, "events") == [("events_seq_idx", False, "(seq)")]


def test_a_partition_is_known_by_its_bounds_not_its_name(central: str) -> None:
    """A partition under flowyard's name for December but attached for November (a DBA's rename,
    a table detached and attached again) hid December: no partition was made for it, and every
    batch with a December event was refused for want of one, on every run."""
    with psycopg.connect(central, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE devflow.events_y2026m12 PARTITION OF devflow.events "
            "FOR VALUES FROM ('2026-11-01 00:00+00') TO ('2026-12-01 00:00+00')"
        )
    assert _upload(central, [_row(_ms(2026, 12, 5)), _row(_ms(2026, 11, 5))]).inserted == 2
    assert _partitions(central) == {"events_y2026m12": 1, "events_y2026m12_1": 1}


def _upload_beside_a_reader(central: str, row: UploadRow) -> int:
    """Upload ``row`` in a session that gives up after 2 s of waiting for a lock, while a report's
    transaction holds devflow.events open: the number of events inserted."""
    with psycopg.connect(central) as reader:
        reader.execute("SELECT count(*) FROM devflow.events")
        session = CentralSession(central)
        try:
            session.conn.execute("SET lock_timeout = '2s'")  # waiting on the reader fails instead of hanging
            session.conn.commit()
            return session.upload([row]).inserted
        finally:
            session.close()


def test_a_month_a_dbas_partition_covers_is_not_created_by_every_session(central: str) -> None:
    """pg_partman names December's partition ``events_p2026_12``. Known by name, the month looked
    missing to every session, whose CREATE … PARTITION OF (refused as an overlap) first waited for
    an ACCESS EXCLUSIVE lock on devflow.events: behind any open reader of events, with every other
    upload queued behind it. Now an upload takes no lock a reader holds up."""
    with psycopg.connect(central, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE devflow.events_p2026_12 PARTITION OF devflow.events "
            "FOR VALUES FROM ('2026-12-01 00:00+00') TO ('2027-01-01 00:00+00')"
        )
    assert _upload_beside_a_reader(central, _row(_ms(2026, 12, 5))) == 1
    assert _partitions(central) == {"events_p2026_12": 1}


def test_a_month_the_default_partition_holds_takes_no_lock_readers_hold_up(central: str) -> None:
    """Every session tried to create the month's partition, which PostgreSQL refuses while the
    DEFAULT partition holds rows of it, but only after an ACCESS EXCLUSIVE lock on devflow.events:
    behind any open reader, with every other upload queued behind it."""
    with psycopg.connect(central, autocommit=True) as conn:
        conn.execute("CREATE TABLE devflow.events_default PARTITION OF devflow.events DEFAULT")
    assert _upload(central, [_row(_ms(2026, 5, 5))]).inserted == 1
    with psycopg.connect(central, autocommit=True) as conn:  # a DBA moves the month into DEFAULT
        conn.execute("ALTER TABLE devflow.events DETACH PARTITION devflow.events_y2026m05")
        conn.execute("INSERT INTO devflow.events SELECT * FROM devflow.events_y2026m05")
    assert _upload_beside_a_reader(central, _row(_ms(2026, 5, 6))) == 1
    assert _partitions(central) == {"events_default": 2}


def test_deletions_and_a_truncate_download_as_tombstones_in_seq_order(central: str) -> None:
    """A deleted snapshot has no later change: without a tombstone no download learnt of it."""
    base = _ms(2026, 7, 1)
    session = CentralSession(central)
    try:
        session.upload([_status("a", base, "one", "p1"), _status("a", base, "two", "p2"), _status("a", base, "three", "p3")])
        cursor = max(u.seq for u in session.download_updates(0).updates)
        with psycopg.connect(central, autocommit=True) as conn:
            conn.execute("DELETE FROM devflow.project_status WHERE project_id = 'p2'")
            conn.execute("TRUNCATE devflow.project_status")
        session.upload([_status("a", base, "back", "p1")])
        later = session.download_updates(cursor).updates
    finally:
        session.close()
    seqs = [u.seq for u in later]
    assert seqs == sorted(seqs) and seqs[0] > cursor
    changes = [(u.project_id, u.status) for u in later]
    assert changes[0] == ("p2", None) and changes[-1] == ("p1", '{"status": "back"}')
    assert sorted(changes[1:-1]) == [("p1", None), ("p3", None)]


def test_a_deletion_and_an_upload_of_its_project_commit_in_seq_order(central: str) -> None:
    """A DELETE takes the sequencer lock before it locks a row, as an upload does: an upload of the
    project being deleted waits for the deletion to commit (the other order deadlocks), and its
    snapshot comes after the tombstone, so a store applying them in seq order keeps it."""
    base = _ms(2026, 7, 1)
    session, other = CentralSession(central), CentralSession(central)
    results: list[central_store.UploadResult] = []
    try:
        session.upload([_status("a", base, "one", "p1")])
        cursor = max(u.seq for u in session.download_updates(0).updates)
        writer = threading.Thread(target=lambda: results.append(other.upload([_status("b", base + 1, "two", "p1")])))
        with psycopg.connect(central) as dba, psycopg.connect(central, autocommit=True) as watch:
            dba.execute("DELETE FROM devflow.project_status WHERE project_id = 'p1'")
            writer.start()
            waiting = "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = %s"
            while writer.is_alive() and not watch.execute(waiting, (other.conn.info.backend_pid,)).fetchone()[0]:
                threading.Event().wait(0.01)
            dba.commit()
        writer.join()
        later = session.download_updates(cursor).updates
    finally:
        session.close()
        other.close()
    assert [r.status_changes for r in results] == [1]
    assert [(u.project_id, u.status) for u in later] == [("p1", None), ("p1", '{"status": "two"}')]


def _until_waiting(watch: psycopg.Connection, running: Future[object], pid: int | None = None) -> None:
    """Until backend ``pid`` (or any backend of this database) waits for a lock, or ``running`` ended."""
    waiting = (
        "SELECT EXISTS (SELECT FROM pg_locks l JOIN pg_database d ON d.oid = l.database "
        "WHERE NOT l.granted AND d.datname = current_database() AND (%(pid)s::int IS NULL OR l.pid = %(pid)s))"
    )
    while not running.done() and not watch.execute(waiting, {"pid": pid}).fetchone()[0]:
        threading.Event().wait(0.01)


def test_a_truncate_and_an_upload_queued_behind_a_deletion_both_commit_in_seq_order(central: str) -> None:
    """An upload took the sequencer lock before the snapshot table, a TRUNCATE (its trigger) the
    table before the lock: queued behind a DBA's open DELETE, both were granted at its commit, each
    then waited for the other, and PostgreSQL aborted one ("deadlock detected"): an upload batch
    failed, or the DBA's TRUNCATE. Every path now takes the table first, then the lock."""
    base = _ms(2026, 7, 1)
    session, uploader = CentralSession(central), CentralSession(central)
    try:
        session.upload([_status("a", base, "one", "p1"), _status("a", base, "two", "p2")])
        cursor = max(u.seq for u in session.download_updates(0).updates)
        with (
            psycopg.connect(central) as dba,
            psycopg.connect(central, autocommit=True) as truncator,
            psycopg.connect(central, autocommit=True) as watch,
            ThreadPoolExecutor(2) as pool,
        ):
            dba.execute("DELETE FROM devflow.project_status WHERE project_id = 'p1'")
            upload = pool.submit(uploader.upload, [_status("b", base + 1, "three", "p3")])
            _until_waiting(watch, upload, uploader.conn.info.backend_pid)
            truncate = pool.submit(truncator.execute, "TRUNCATE devflow.project_status")
            _until_waiting(watch, truncate, truncator.info.backend_pid)
            dba.commit()
            assert upload.result().status_changes == 1
            truncate.result()
        later = session.download_updates(cursor).updates
    finally:
        session.close()
        uploader.close()
    seqs = [u.seq for u in later]
    assert seqs == sorted(seqs)  # the TRUNCATE, committed last, took the last seqs: p3's snapshot is gone too
    changes = [(u.project_id, u.status) for u in later]
    assert changes[0] == ("p1", None) and sorted(changes[1:]) == [("p2", None), ("p3", None)]


def test_a_trigger_restored_while_a_snapshot_uploads_deadlocks_neither(central: str) -> None:
    """Restoring a dropped trigger locks the snapshot table (CREATE TRIGGER) before the sequencer
    lock, as an upload does: queued behind a DBA's open DELETE, the other order deadlocked with an
    upload holding the table and waiting for the lock."""
    session = CentralSession(central)
    try:
        session.upload([_status("a", _ms(2026, 7, 1), "one", "p1")])
        with psycopg.connect(central, autocommit=True) as conn:
            conn.execute("DROP TRIGGER project_status_deleted ON devflow.project_status")
        with (
            psycopg.connect(central) as dba,
            psycopg.connect(central, autocommit=True) as watch,
            ThreadPoolExecutor(2) as pool,
        ):
            dba.execute("DELETE FROM devflow.project_status WHERE project_id = 'p1'")
            schema = pool.submit(central_store.ensure_schema, central)
            _until_waiting(watch, schema)
            upload = pool.submit(session.upload, [_status("b", _ms(2026, 7, 2), "two", "p2")])
            _until_waiting(watch, upload, session.conn.info.backend_pid)
            dba.commit()
            schema.result()
            assert upload.result().status_changes == 1
        assert [(u.project_id, u.status) for u in session.download_updates(0).updates] == [
            (None, None), ("p2", '{"status": "two"}')
        ]
    finally:
        session.close()
    assert _scalar(central, "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'devflow.project_status'::regclass "
                   "AND tgname = 'project_status_deleted'") == 1


@pytest.mark.parametrize("isolation", ["serializable", "repeatable read"])
def test_a_dbas_default_isolation_leaves_concurrent_uploaders_one_copy_each(central: str, isolation: str) -> None:
    """Under a database's ``default_transaction_isolation`` of serializable or repeatable read,
    devices uploading at once failed each other's batches (SQLSTATE 40001, taken for central being
    offline): the upload's ``ON CONFLICT`` and last-write-wins statements are written for READ
    COMMITTED, which each session now pins."""
    with psycopg.connect(central, autocommit=True) as conn:
        conn.execute(
            sql.SQL("ALTER DATABASE {} SET default_transaction_isolation = {}").format(
                sql.Identifier(conn.info.dbname), sql.Literal(isolation)
            )
        )
    test_concurrent_uploaders_of_overlapping_batches_keep_one_copy(central)
