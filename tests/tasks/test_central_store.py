"""Central store: idempotent uploads, monthly partitions, rollups, last-write-wins snapshots."""

from __future__ import annotations

import itertools
import threading
import uuid
from datetime import UTC, datetime

import orjson
import psycopg
import pytest

from tasks import central_store
from tasks.central_store import CentralSession, UploadRow


def _ms(year: int, month: int, day: int, hour: int = 0) -> int:
    return int(datetime(year, month, day, hour, tzinfo=UTC).timestamp() * 1000)


def _row(
    ts: int, *, device: str = "d1", kind: str = "file_edit", data: dict | None = None, project: str = "p"
) -> UploadRow:
    return (
        str(uuid.uuid4()),
        1,
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
        updates = session.download_updates(0)
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
    assert {u.project_id: u.status["status"] for u in updates} == final


def test_download_since_cursor_returns_only_newer_changes(central: str) -> None:
    base = _ms(2026, 7, 1)
    session = CentralSession(central)
    try:
        session.upload([_status("a", base, "one", "p1"), _status("a", base, "two", "p2")])
        cursor = max(u.seq for u in session.download_updates(0))
        assert session.download_updates(cursor) == []
        result = session.upload([_status("b", base - 1, "stale", "p1")])  # older: no change
        assert result.status_changes == 0
        assert session.download_updates(cursor) == []
        session.upload([_status("b", base + 1, "newer", "p1")])
        later = session.download_updates(cursor)
    finally:
        session.close()
    assert [(u.project_id, u.status, u.device_id) for u in later] == [("p1", {"status": "newer"}, "b")]
    assert later[0].seq > cursor
