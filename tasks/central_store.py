"""The central PostgreSQL side of device sync (seed 002 §3.2, §3.3, §6.1).

- ``devflow.events`` is partitioned by month of the event time; partitions are created on
  demand. Events are immutable: every one is kept exactly once, through the global key
  registry ``devflow.event_keys`` (a partitioned table cannot have a unique index without
  the partition key). The registry has two unique keys and the upload inserts into it with
  ``ON CONFLICT DO NOTHING``, so an event is a duplicate if either is already known:
  ``sync_id``, and its origin ``(device_id, local_id, occurred_at, event_type)``. The origin
  catches an event that comes back under a new sync id, because ``migrate down --to=v1``
  dropped its id and the re-upgrade generated another; a store recreated under the same
  device id restarts its local ids, but its new events have other times, so they are kept.
- A batch is COPY'd into a temporary table and moved with one ``INSERT … SELECT`` that
  also bumps the hourly/daily rollups by exactly the newly inserted rows, so a re-sent
  batch changes nothing.
- ``devflow.events`` is indexed only by ``seq``, for readers of central (taken without the lock
  the snapshots' seq takes, so not in commit order: no download pages on it). Counts by project, user and type
  are read from the rollups. An index on ``(project_id, occurred_at)`` or ``(user_id,
  occurred_at)`` takes every upload of a project (or user) to the same, rightmost end of
  the index; the two of them cost 3-6 µs more server CPU per event, a sixth of the sync's
  CPU (docs/benchmarks.md). Centrals created with them keep them.
- ``devflow.project_status`` holds the mutable per-project snapshot (events of type
  ``project_status``): last write wins by event time, ties broken by device id, local id, then
  sync id, and an older arrival never replaces a newer value.
- Every snapshot change takes the next value of ``devflow.change_seq`` under a
  transaction-scoped advisory lock, so seq order equals commit order and a device can
  download "everything after cursor N" without missing a row committed late.
- A snapshot deleted in central (``DELETE``, ``TRUNCATE``) leaves a tombstone in
  ``devflow.project_deletions`` (:data:`_DELETIONS_DDL`), numbered by ``change_seq`` under the
  same lock, so a download sees deletions and changes in one seq order. Every path locks the
  snapshot table before that lock.
- ``devflow.central_identity`` holds the database's random id: a cursor counts in one
  central's ``change_seq``, and means nothing in another (``--central-url``), where the
  download must start again from 0.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from uuid import UUID

import psycopg
from psycopg import sql

from tasks.copy_pipe import copy_in_statement
from tasks.db import connect, one_row
from tasks.errors import first_line, printable
from tasks.json_values import has_nul

SCHEMA = "devflow"
STATUS_EVENT = "project_status"
_PARTITION_LOCK = 7_202_611_001
_SEQUENCER_LOCK = 7_202_611_002
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

# Created only when missing: even with IF NOT EXISTS, CREATE SCHEMA needs CREATE on the database,
# which a sync role given a ready-made schema (``CREATE SCHEMA devflow AUTHORIZATION <role>``) may
# not have; everything else below needs only the schema, which that role owns.
_HAS_SCHEMA = "SELECT EXISTS (SELECT FROM pg_namespace WHERE nspname = %s)"
_MAY_USE_SCHEMA = "SELECT coalesce((SELECT has_schema_privilege(oid, 'USAGE') FROM pg_namespace WHERE nspname = %s), true)"
"""Whether the session's role may use the schema (true while there is none: nothing to grant yet)."""
_SCHEMA_DDL = "CREATE SCHEMA IF NOT EXISTS devflow"

_DDL = (
    "CREATE SEQUENCE IF NOT EXISTS devflow.change_seq",
    """
    CREATE TABLE IF NOT EXISTS devflow.event_keys (
        sync_id uuid PRIMARY KEY, device_id text, local_id bigint, occurred_at timestamptz, event_type text
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS devflow.events (
        seq          bigint      NOT NULL DEFAULT nextval('devflow.change_seq'),
        sync_id      uuid        NOT NULL,
        local_id     bigint      NOT NULL,
        device_id    text        NOT NULL,
        user_id      text        NOT NULL,
        project_id   text        NOT NULL,
        event_type   text        NOT NULL,
        event_data   jsonb       NOT NULL,
        occurred_at  timestamptz NOT NULL,
        received_at  timestamptz NOT NULL DEFAULT now()
    ) PARTITION BY RANGE (occurred_at)
    """,
    """
    CREATE TABLE IF NOT EXISTS devflow.project_status (
        project_id  text        PRIMARY KEY,
        status      jsonb       NOT NULL,
        updated_at  timestamptz NOT NULL,
        device_id   text        NOT NULL,
        sync_id     uuid        NOT NULL,
        seq         bigint      NOT NULL,
        local_id    bigint
    )
    """,
)

# The snapshot's local id, added in place to tables created before it (NULL on their rows),
# only while missing: ALTER TABLE would lock the snapshot table at the start of every run.
_HAS_STATUS_LOCAL_ID = (
    "SELECT EXISTS (SELECT FROM pg_attribute WHERE attrelid = 'devflow.project_status'::regclass"
    " AND attname = 'local_id' AND NOT attisdropped)"
)
_STATUS_LOCAL_ID_UPGRADE = "ALTER TABLE devflow.project_status ADD COLUMN local_id bigint"

# The central's identity, added to a central from before it by the schema step. The row is written
# once: its id never changes. It is inserted only while missing (a DBA deleted it, a restore left it
# out), since the INSERT needs a privilege a DBA's sync role, which only reads it, may not have.
_IDENTITY_DDL = """
CREATE TABLE IF NOT EXISTS devflow.central_identity (
    only_row    boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    central_id  uuid    NOT NULL DEFAULT gen_random_uuid()
)
"""
_IDENTITY = "SELECT central_id FROM devflow.central_identity"
_IDENTITY_ROW = sql.SQL("INSERT INTO devflow.central_identity DEFAULT VALUES ON CONFLICT (only_row) DO NOTHING")

# Tombstones of deleted snapshots, created last by the schema step (also in a central from before
# them), so a session takes their presence for a complete schema. A deleted project has no later
# change, so without them a store kept its snapshot for good. A statement trigger takes the
# sequencer lock before the DELETE (or TRUNCATE) locks any row, in the order an upload takes them
# (lock, then rows: the other order deadlocks with an upload of a deleted project), and the
# tombstones' seqs are then in commit order with every snapshot change. Every path takes the
# snapshot table's lock before the sequencer lock (:data:`_SEQUENCE_SNAPSHOTS`; a DELETE or TRUNCATE
# locks its table before its trigger runs; here, CREATE TRIGGER does): a TRUNCATE took the table
# and waited for the lock an upload held, which then waited for the table, and PostgreSQL aborted
# one of them. The first row, of no project, marks where tombstones start: a deletion before it (a
# central from before them, or one made while a trigger was missing) was not recorded, so a store
# whose cursor is below it downloads from 0 once (:class:`DownloadPage`); tombstones older than a new
# first row tell a store nothing, and are deleted with its insert.
_DELETIONS = "devflow.project_deletions"
_DELETION_TRIGGERS = ("project_status_lock", "project_status_deleted")
_DELETIONS_TABLE = "CREATE TABLE IF NOT EXISTS devflow.project_deletions (seq bigint PRIMARY KEY, project_id text)"
_DELETION_FUNCTIONS = (
    (
        "project_status_lock",
        sql.SQL("""
    BEGIN
        PERFORM pg_advisory_xact_lock({lock});
        IF TG_OP = 'TRUNCATE' THEN  -- no transition table for TRUNCATE: every row goes
            INSERT INTO devflow.project_deletions (seq, project_id)
            SELECT nextval('devflow.change_seq'), project_id FROM devflow.project_status;
        END IF;
        RETURN NULL;
    END """).format(lock=sql.Literal(_SEQUENCER_LOCK)).as_string(),
    ),
    (
        "project_status_deleted",
        """
    BEGIN
        INSERT INTO devflow.project_deletions (seq, project_id)
        SELECT nextval('devflow.change_seq'), project_id FROM gone;
        RETURN NULL;
    END """,
    ),
)
"""The trigger functions' names and plpgsql bodies (``pg_proc.prosrc``), made or replaced only when
a body differs (:func:`_create_tombstones`)."""
_FUNCTION_DDL = sql.SQL("CREATE OR REPLACE FUNCTION {}() RETURNS trigger LANGUAGE plpgsql AS {}")
_FUNCTION_BODY = "SELECT (SELECT prosrc FROM pg_proc WHERE oid = to_regprocedure(%s))"
# Whether the session's role may add the triggers (as the table's owner, or by a grant): no lock taken.
_MAY_ADD_TRIGGERS = "SELECT has_table_privilege('devflow.project_status', 'TRIGGER')"
_DELETIONS_DDL = (
    "CREATE OR REPLACE TRIGGER project_status_lock BEFORE DELETE OR TRUNCATE ON devflow.project_status "
    "FOR EACH STATEMENT EXECUTE FUNCTION devflow.project_status_lock()",
    "CREATE OR REPLACE TRIGGER project_status_deleted AFTER DELETE ON devflow.project_status REFERENCING OLD TABLE AS gone "
    "FOR EACH STATEMENT EXECUTE FUNCTION devflow.project_status_deleted()",
    sql.SQL("SELECT pg_advisory_xact_lock({})").format(sql.Literal(_SEQUENCER_LOCK)),
    "DELETE FROM devflow.project_deletions",
    "INSERT INTO devflow.project_deletions (seq) VALUES (nextval('devflow.change_seq'))",
)

# Whether the tombstones' table is there and both triggers fire (a trigger disabled, or firing only
# in replica mode, records nothing either): one catalog lookup per schema step, which runs the DDL
# above only when something is missing, since CREATE TRIGGER locks out every upload of a snapshot.
_DELETIONS_READY = """
SELECT to_regclass('devflow.project_deletions') IS NOT NULL
   AND (SELECT count(*) FROM pg_trigger WHERE tgrelid = 'devflow.project_status'::regclass
        AND tgname = ANY(%(names)s) AND tgenabled IN ('O', 'A')) = cardinality(%(names)s::text[])
"""

# Every snapshot change takes its seq under the sequencer lock, after the snapshot table's lock (see
# :data:`_DELETIONS_DDL`), in one round trip.
_SEQUENCE_SNAPSHOTS = sql.SQL(
    "LOCK TABLE devflow.project_status IN ROW EXCLUSIVE MODE; SELECT pg_advisory_xact_lock({})"
).format(sql.Literal(_SEQUENCER_LOCK))

# The origin key, added in place to registries created before it existed. The origin is
# NULL on keys an older version registered until the backfill; of events already stored
# twice under different sync ids (by that older version) only the first copy gets it.
_ORIGIN_COLUMNS = ("device_id", "local_id", "occurred_at", "event_type")
_ORIGIN_BACKFILL = (
    """
    ALTER TABLE devflow.event_keys ADD COLUMN IF NOT EXISTS device_id text,
        ADD COLUMN IF NOT EXISTS local_id bigint, ADD COLUMN IF NOT EXISTS occurred_at timestamptz,
        ADD COLUMN IF NOT EXISTS event_type text
    """,
    """
    UPDATE devflow.event_keys k
    SET device_id = e.device_id, local_id = e.local_id, occurred_at = e.occurred_at, event_type = e.event_type
    FROM (
        SELECT DISTINCT ON (device_id, local_id, occurred_at, event_type)
               sync_id, device_id, local_id, occurred_at, event_type
        FROM devflow.events ORDER BY device_id, local_id, occurred_at, event_type, seq
    ) e
    WHERE k.sync_id = e.sync_id AND k.device_id IS NULL
    """,
)

ROLLUP_TABLES = ("rollup_hourly", "rollup_daily")
_ROLLUP_DDL = sql.SQL(
    """
    CREATE TABLE IF NOT EXISTS {} (
        bucket      timestamptz NOT NULL,
        project_id  text        NOT NULL,
        user_id     text        NOT NULL,
        event_type  text        NOT NULL,
        events      bigint      NOT NULL,
        PRIMARY KEY (bucket, project_id, user_id, event_type)
    )
    """
)
_ROLLUP_KEY = ("bucket", "project_id", "user_id", "event_type")


@dataclass(frozen=True)
class _Key:
    """An index the sync relies on, known by what it indexes rather than by its name: a DBA may
    rename one (then a rebuild under the old name was a second index every upload writes), drop
    one (a primary key, which ``CREATE TABLE IF NOT EXISTS`` never restores), or rename its table
    aside (its index keeps the name, so ``CREATE INDEX IF NOT EXISTS`` skipped the new table's)."""

    table: str
    columns: tuple[str, ...]
    name: str | None
    """The name it gets when restored, unless another relation has it: PostgreSQL then picks one.
    None for the table's primary key (restored as one, named by PostgreSQL)."""
    unique: bool

    def served_by(self, columns: Sequence[str], unique: bool) -> bool:
        """Whether an index with these key columns does this key's work: a unique key needs a
        unique index on the same columns, in any order; the cursor's needs an index led by them."""
        if self.unique:
            return unique and sorted(columns) == sorted(self.columns)
        return tuple(columns[: len(self.columns)]) == self.columns


_KEYS = (
    _Key("event_keys", ("sync_id",), None, unique=True),
    _Key("event_keys", _ORIGIN_COLUMNS, "event_keys_origin", unique=True),
    # The cursor's index only: see the module docstring for why events have no index by project or user.
    _Key("events", ("seq",), "events_seq", unique=False),
    _Key("project_status", ("project_id",), None, unique=True),
    _Key("project_status", ("seq",), "project_status_seq", unique=False),
    *(_Key(name, _ROLLUP_KEY, None, unique=True) for name in ROLLUP_TABLES),
)

# Every usable index of those tables, with its key columns: one catalog query per schema step. A
# partial or expression index, an invalid one (a failed CONCURRENTLY build) and a deferrable unique
# one (no arbiter for ON CONFLICT) do no key's work.
_INDEXES = """
SELECT c.relname::text, i.indisunique AND i.indimmediate,
       array(SELECT a.attname::text FROM unnest(i.indkey::int2[]) WITH ORDINALITY k(attnum, ord)
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
             WHERE k.ord <= i.indnkeyatts ORDER BY k.ord)
FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid
WHERE c.relnamespace = 'devflow'::regnamespace AND c.relname = ANY(%s)
  AND i.indisvalid AND i.indpred IS NULL AND i.indexprs IS NULL
"""


def event_time(ms: sql.Composable) -> sql.Composed:
    """SQL for the timestamptz of the Unix milliseconds ``ms``, exact for every time of the years 1-9999.

    ``to_timestamp(ms / 1000::float8)`` rounds through a binary fraction and misses by
    microseconds before the 1850s and after the 2240s (9999-12-31 23:59:59.999 became
    …59.999008), which would store such events, their origin keys and last-write-wins snapshots
    at times the device never wrote. Whole seconds and the remaining milliseconds are each
    multiplied into an interval exactly: PostgreSQL multiplies in float8, but ``seconds × 10^6``
    µs is ``seconds × 15625 × 2^6``, whose significand stays below 2^52 for |seconds| < 2^38
    (year 9999 is 2^37.9). ``timezone(interval, …)``
    instead of the session time zone keeps the expression immutable, as a generated column needs.
    """
    return sql.SQL(
        "timezone(interval '0', 'epoch'::timestamp + ({ms} / 1000) * interval '1 second'"
        " + mod({ms}, 1000) * interval '1 millisecond')"
    ).format(ms=ms)


# The event time is computed once per row, as the COPY stores it. Named in pg_temp wherever it is
# used: a role's search_path listing pg_temp after a schema with its own upload_batch table sent
# every batch to that table.
_TEMP_TABLE = sql.SQL(
    """
CREATE TEMP TABLE IF NOT EXISTS pg_temp.upload_batch (
    sync_id uuid, local_id bigint, ts_ms bigint, device_id text, user_id text,
    project_id text, event_type text, event_data jsonb,
    occurred_at timestamptz GENERATED ALWAYS AS ({}) STORED
) ON COMMIT DELETE ROWS
"""
).format(event_time(sql.Identifier("ts_ms")))
UPLOAD_COLUMNS = (
    "sync_id",
    "local_id",
    "ts_ms",
    "device_id",
    "user_id",
    "project_id",
    "event_type",
    "event_data",
)
_COPY = copy_in_statement(sql.Identifier("pg_temp", "upload_batch"), UPLOAD_COLUMNS, "text")

# Events, key registry and rollups in one statement: the rollups count only rows that were
# really inserted, so a re-sent batch (crash before the local mark) adds nothing twice.
# ON CONFLICT without a target skips a row that hits either unique key of the registry
# (sync id or origin), also when a concurrent upload inserted that key first.
_INSERT_EVENTS = """
WITH fresh AS (
    INSERT INTO devflow.event_keys (sync_id, device_id, local_id, occurred_at, event_type)
    SELECT sync_id, device_id, local_id, occurred_at, event_type FROM pg_temp.upload_batch
    ON CONFLICT DO NOTHING
    RETURNING sync_id
), ins AS (
    INSERT INTO devflow.events
        (sync_id, local_id, device_id, user_id, project_id, event_type, event_data, occurred_at)
    SELECT b.sync_id, b.local_id, b.device_id, b.user_id, b.project_id, b.event_type, b.event_data, b.occurred_at
    FROM pg_temp.upload_batch b JOIN fresh USING (sync_id)
    RETURNING project_id, user_id, event_type, occurred_at
), hourly AS (
    INSERT INTO devflow.rollup_hourly AS r (bucket, project_id, user_id, event_type, events)
    SELECT date_trunc('hour', occurred_at), project_id, user_id, event_type, count(*)
    FROM ins GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4
    ON CONFLICT (bucket, project_id, user_id, event_type) DO UPDATE SET events = r.events + EXCLUDED.events
), daily AS (
    INSERT INTO devflow.rollup_daily AS r (bucket, project_id, user_id, event_type, events)
    SELECT date_trunc('day', occurred_at), project_id, user_id, event_type, count(*)
    FROM ins GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4
    ON CONFLICT (bucket, project_id, user_id, event_type) DO UPDATE SET events = r.events + EXCLUDED.events
)
SELECT count(*) FROM ins
"""

# Last write wins: newest event time, then device id, then the device's own write order
# (its local id: two snapshots of one millisecond), then sync id; the WHERE clause makes a
# late (older) arrival a no-op, so replays and out-of-order batches converge. Only events
# registered under their own sync id count: a copy skipped by its origin (a re-upgraded
# store's new sync id) would otherwise win the sync-id tie-break against itself. A row from
# before the local id was kept counts as the device's first write of its millisecond.
_UPSERT_STATUS = """
WITH latest AS (
    SELECT DISTINCT ON (project_id)
           project_id, event_data, occurred_at AS updated_at, device_id, local_id, sync_id
    FROM pg_temp.upload_batch b
    WHERE event_type = %s AND EXISTS (SELECT FROM devflow.event_keys k WHERE k.sync_id = b.sync_id)
    ORDER BY project_id, ts_ms DESC, device_id DESC, local_id DESC, sync_id DESC
), changed AS (
    INSERT INTO devflow.project_status AS s (project_id, status, updated_at, device_id, local_id, sync_id, seq)
    SELECT project_id, event_data, updated_at, device_id, local_id, sync_id, nextval('devflow.change_seq')
    FROM latest
    ON CONFLICT (project_id) DO UPDATE
        SET status = EXCLUDED.status, updated_at = EXCLUDED.updated_at, device_id = EXCLUDED.device_id,
            local_id = EXCLUDED.local_id, sync_id = EXCLUDED.sync_id, seq = EXCLUDED.seq
        WHERE (EXCLUDED.updated_at, EXCLUDED.device_id, EXCLUDED.local_id, EXCLUDED.sync_id)
            > (s.updated_at, s.device_id, coalesce(s.local_id, 0), s.sync_id)
    RETURNING 1
)
SELECT count(*) FROM changed
"""

UploadRow = tuple[str, int, int, str, str, str, str, str]
"""(sync_id, local_id, timestamp_ms, device_id, user_id, project_id, event_type, event_data JSON)."""


@dataclass(frozen=True)
class UploadResult:
    inserted: int
    duplicates: int
    status_changes: int


@dataclass(frozen=True)
class StatusUpdate:
    """A snapshot change, or with ``status`` None a tombstone: the project was deleted (none for
    the tombstones' first row, which only moves the cursor)."""

    project_id: str | None
    status: str | None
    """The snapshot's JSON as central's jsonb writes it, stored in the device as is: read into
    Python and encoded again with orjson, an integer beyond 64 bits (the privacy filter keeps
    one, and a number beyond float64, to the last digit) failed the download."""
    updated_at: datetime | None
    device_id: str | None
    seq: int

    def store_row(self) -> tuple[str | None, str | None, str | None, str | None, int]:
        """The row :func:`tasks.device_store.save_remote_status` stores."""
        updated_at = None if self.updated_at is None else self.updated_at.isoformat()
        return self.project_id, self.status, updated_at, self.device_id, self.seq


@dataclass(frozen=True)
class DownloadPage:
    """One page of a download, and where central's record of deletions started when it was read."""

    updates: list[StatusUpdate]
    record_start: int
    """The seq of the tombstones' first row (0 for none): a deletion before it was not recorded, so
    a cursor below it means nothing (:func:`tasks.sync_batches.download_into_store`)."""


# A page, with the record's start read in the same statement (one snapshot): read apart, a record
# started again between the two reads went unseen. A page with no change is one row of NULLs.
_DOWNLOAD = """
SELECT start.seq, c.project_id, c.status, c.updated_at, c.device_id, c.seq
FROM (SELECT coalesce(min(seq), 0) AS seq FROM devflow.project_deletions) start
LEFT JOIN LATERAL (
    SELECT * FROM (
        (SELECT project_id, status::text AS status, updated_at, device_id, seq FROM devflow.project_status
         WHERE seq > %(since)s ORDER BY seq LIMIT %(limit)s)
        UNION ALL
        (SELECT project_id, NULL, NULL, NULL, seq FROM devflow.project_deletions
         WHERE seq > %(since)s ORDER BY seq LIMIT %(limit)s)
    ) changes ORDER BY seq LIMIT %(limit)s
) c ON true
ORDER BY c.seq
"""

# Whether a store's cursor (``since`` > 0) still counts here: false when central no longer has the
# store's newest snapshot, nor a tombstone of it (a restore from a backup, whose sequence restarts
# below the device's cursor: the snapshots it takes next get seqs the device had passed, so a
# download from that cursor missed them for good and kept projects central no longer has). A
# restore followed by a new change of that very project before the device's next run goes unnoticed
# here. A cursor below the tombstones' first row is the download's to notice, on every page.
_RESUMABLE = """
SELECT %(project)s::text IS NULL
    OR EXISTS (SELECT FROM devflow.project_status WHERE project_id = %(project)s AND seq >= %(seq)s::bigint)
    OR EXISTS (SELECT FROM devflow.project_deletions WHERE seq > %(seq)s::bigint AND project_id = %(project)s)
"""


def ensure_schema(url: str) -> None:
    """Create the central tables if missing, or upgrade them in place (idempotent; serialised
    by an advisory lock).

    The origin-key and snapshot local-id upgrades run only while what they add is missing: their
    ALTER TABLE would otherwise take an exclusive lock at the start of every run. So does every
    index the sync relies on (:data:`_KEYS`), found by what it indexes, whatever its name.

    What only a table's owner may do (a key, a column, the tombstones' trigger) runs in a savepoint:
    a sync role that does not own a DBA's tables is told what to run once the rest of the step has
    committed, in one privilege error. Refused as a whole, the step undid on every run all it had
    done: a rollup table or the central's id restored (every batch then refused for the missing
    table, every download for the missing id), a tombstone trigger a role granted TRIGGER restored
    (its stores kept deleted projects for good, the warning naming only an index it may not build).
    """
    refusals: list[str] = []
    with connect(url) as conn, _usage_named(conn), conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_PARTITION_LOCK,))
        if not one_row(conn, _HAS_SCHEMA, (SCHEMA,))[0]:
            conn.execute(_SCHEMA_DDL)
        for statement in _DDL:
            conn.execute(statement)
        for name in ROLLUP_TABLES:
            conn.execute(_ROLLUP_DDL.format(sql.Identifier(SCHEMA, name)))
        for key in _missing_keys(conn):
            refusals += _as_owner(conn, key.table, _key_statements(conn, key))
        if not one_row(conn, _HAS_STATUS_LOCAL_ID)[0]:
            refusals += _as_owner(conn, "project_status", [sql.SQL(_STATUS_LOCAL_ID_UPGRADE)])
        conn.execute(_IDENTITY_DDL)
        if conn.execute(_IDENTITY).fetchone() is None:
            refusals += _as_owner(conn, "central_identity", [_IDENTITY_ROW])
        if not one_row(conn, _DELETIONS_READY, {"names": list(_DELETION_TRIGGERS)})[0]:
            try:
                with conn.transaction():
                    _create_tombstones(conn)
            except psycopg.errors.InsufficientPrivilege as exc:
                refusals.append(str(exc))
    if refusals:
        raise psycopg.errors.InsufficientPrivilege("; ".join(refusals))


def _as_owner(conn: psycopg.Connection, table: str, statements: list[sql.SQL | sql.Composed]) -> list[str]:
    """Run ``statements``, which only the owner of ``devflow.<table>`` may, in a savepoint; for a
    role refused them (a DBA's table), the line naming them for the owner, else nothing."""
    try:
        with conn.transaction():
            for statement in statements:
                conn.execute(statement)
    except psycopg.errors.InsufficientPrivilege as exc:
        return [_owner_fix(conn, table, statements, first_line(exc))]
    return []


def _owner_fix(conn: psycopg.Connection, table: str, statements: list[sql.SQL | sql.Composed], reason: str) -> str:
    """The line telling the owner of ``devflow.<table>`` the ``statements`` the schema step may not run
    (``reason``): the schema step's warning, and the refusal of every request that needs them done."""
    text = "; ".join(" ".join(statement.as_string(conn).split()) for statement in statements)
    role = _role(conn)
    return (
        f"central's schema step may not change devflow.{table} ({reason}); as its owner, run "
        f"`{text}`, or make {role} its owner"
    )


def _create_tombstones(conn: psycopg.Connection) -> None:
    """Create :data:`_DELETIONS_DDL`, or restore a trigger a DBA dropped or disabled (or a restore
    left out): created only with their table, a dropped trigger was never restored, and deletions
    stopped reaching the stores for good. Deletions made meanwhile were not recorded, so the record
    starts again, and every store downloads from 0 once.

    A role that neither owns ``devflow.project_status`` nor has TRIGGER on it (a DBA made the
    table) cannot: without tombstones its stores would keep deleted projects for good, so that is
    one line naming the grant instead, still the privilege error it is (central answered, and
    refuses every batch alike until the grant). The trigger functions are replaced only when their
    body differs from flowyard's: ``CREATE OR REPLACE FUNCTION`` needs their ownership, which that
    grant does not give, so a role granted it was refused ("must be owner of function") and told
    the same grant again on every run, the trigger never restored.

    That privilege is looked up first: ``CREATE TRIGGER`` checks it only once it holds a lock on
    the table that waits for every open upload of a snapshot (and a DBA's open change), which every
    later upload of one waits behind, only to be refused, on every run."""
    if not one_row(conn, _MAY_ADD_TRIGGERS)[0]:
        raise _tombstones_refused(conn, "no TRIGGER privilege on devflow.project_status")
    try:
        conn.execute(_DELETIONS_TABLE)
        for name, body in _DELETION_FUNCTIONS:
            if one_row(conn, _FUNCTION_BODY, (f"{SCHEMA}.{name}()",))[0] != body:
                conn.execute(_FUNCTION_DDL.format(sql.Identifier(SCHEMA, name), sql.Literal(body)))
        for statement in _DELETIONS_DDL:
            conn.execute(statement)
    except psycopg.errors.InsufficientPrivilege as exc:
        raise _tombstones_refused(conn, first_line(exc)) from None


class _UsageRefused(psycopg.errors.InsufficientPrivilege):
    """A refusal :func:`_usage_named` has worded with its grant already (the session's schema
    step runs ``ensure_schema``, which words its own, inside the session's wording)."""


@contextmanager
def _usage_named(conn: psycopg.Connection) -> Iterator[None]:
    """A privilege error of a role a DBA revoked USAGE on ``devflow`` from (every statement on it is
    refused) as the same error naming the grant: PostgreSQL's words (``permission denied for schema
    devflow``) named no fix, for every batch and download of every device. Looked up on ``conn``
    only once refused, so a request that goes through costs nothing more."""
    try:
        yield
    except psycopg.errors.InsufficientPrivilege as exc:
        if isinstance(exc, _UsageRefused):
            raise
        conn.rollback()
        role = None if one_row(conn, _MAY_USE_SCHEMA, (SCHEMA,))[0] else _role(conn)
        conn.rollback()  # the look-ups' transaction ends here, whichever error goes on
        if role is None:
            raise
        raise _UsageRefused(
            f"{first_line(exc)}; as the owner of schema {SCHEMA}, run `GRANT USAGE ON SCHEMA {SCHEMA} TO {role}`"
        ) from None


def _tombstones_refused(conn: psycopg.Connection, reason: str) -> psycopg.errors.InsufficientPrivilege:
    """The privilege error that tells a role refused the tombstones (``reason``) the grant they need."""
    role = _role(conn)
    return psycopg.errors.InsufficientPrivilege(
        f"central cannot record deleted projects ({reason}); as the owner of devflow.project_status, "
        f"run `GRANT TRIGGER ON devflow.project_status TO {role}` (and CREATE on schema devflow), or make "
        f"{role} its owner"
    )


def _role(conn: psycopg.Connection) -> str:
    """The session's role as a DBA types it in the statement a refusal names."""
    return sql.Identifier(conn.info.user).as_string(conn)


def _missing_keys(conn: psycopg.Connection) -> list[_Key]:
    """The keys of :data:`_KEYS` that no index of their table serves."""
    tables = sorted({key.table for key in _KEYS})
    indexes = conn.execute(_INDEXES, (tables,)).fetchall()
    return [
        key
        for key in _KEYS
        if not any(table == key.table and key.served_by(columns, unique) for table, unique, columns in indexes)
    ]


def _key_statements(conn: psycopg.Connection, key: _Key) -> list[sql.SQL | sql.Composed]:
    """The statements that build a missing key under its own name, or one PostgreSQL picks when a
    relation has that name (the index of a table a DBA renamed aside keeps it). The origin key is
    first added with its columns and filled in, for a registry from before it."""
    backfill = [sql.SQL(statement) for statement in _ORIGIN_BACKFILL] if key.columns == _ORIGIN_COLUMNS else []
    columns = sql.SQL(", ").join(map(sql.Identifier, key.columns))
    table = sql.Identifier(SCHEMA, key.table)
    if key.name is None:
        return [*backfill, sql.SQL("ALTER TABLE {} ADD PRIMARY KEY ({})").format(table, columns)]
    taken = one_row(conn, "SELECT to_regclass(%s)", (f"{SCHEMA}.{key.name}",))[0] is not None
    name = sql.SQL("") if taken else sql.Identifier(key.name)
    kind = sql.SQL("UNIQUE INDEX" if key.unique else "INDEX")
    return [*backfill, sql.SQL("CREATE {} {} ON {} ({})").format(kind, name, table, columns)]


def month_start(ts_ms: int) -> date:
    """The month of an event time, by integer arithmetic as in :func:`event_time`, so the
    partition chosen here is the one PostgreSQL routes the row to."""
    moment = _EPOCH + timedelta(milliseconds=ts_ms)
    return date(moment.year, moment.month, 1)


def _month_range(timestamps_ms: Sequence[int]) -> tuple[date, date]:
    """The first and last month of a batch.

    A local ``timestamp`` may hold anything (SQLite keeps text or a year-10000 value in an
    INTEGER column); such a time is that row's bad data, raised as :class:`psycopg.DataError`
    like the values PostgreSQL refuses, so the upload isolates the row instead of failing
    the device on every run. Every other time of the batch lies between these two, so its
    month is computable too.
    """
    try:
        return month_start(min(timestamps_ms)), month_start(max(timestamps_ms))
    except (TypeError, ValueError, OverflowError) as exc:
        raise psycopg.DataError(
            f"event time is not Unix milliseconds within the years 1-9999 ({_not_a_time(timestamps_ms, exc)})"
        ) from None


def _not_a_time(timestamps_ms: Sequence[object], exc: Exception) -> str:
    """Why a batch's times have no month, in the store's terms. Python's own words for a time the
    app wrote as text or left NULL ("unsupported type for timedelta milliseconds component: str")
    named neither what the app wrote nor what central expects; the value itself is not quoted."""
    if any(ts is None for ts in timestamps_ms):
        return "the app wrote no time: timestamp is NULL"
    if any(isinstance(ts, str | bytes) for ts in timestamps_ms):
        return "the app wrote it as text (or a BLOB) other than its Unix milliseconds in digits alone"
    return str(exc)


def _nul_fields(rows: Sequence[UploadRow]) -> list[str]:
    """The event data fields of ``rows`` that hold a NUL character (``\\u0000``: valid JSON, which
    jsonb cannot store), by name. Looked for only once central refused a batch, so a batch that goes
    through pays nothing. The privacy filter wrote each row's event data (an object); Python's
    ``json`` reads what orjson refuses (a number beyond float64), and an object nested deeper than
    the stack here reaches is left unnamed."""
    fields: set[str] = set()
    for row in rows:
        if "\\u0000" in row[7]:
            try:
                data = json.loads(row[7])
            except RecursionError:
                continue
            fields.update(name for name, value in data.items() if has_nul({name: value}))
    return sorted(fields)


def _nul_refusal(fields: Sequence[str]) -> str:
    """Why central refuses event data with a NUL character in ``fields`` (allowlisted ones: the rest
    were dropped or hashed), and the fix. PostgreSQL's words (``unsupported Unicode escape sequence``)
    named neither the field nor the fix; removing the NUL on the way changed the value unannounced."""
    named = ", ".join(repr(printable(field)) for field in fields)
    return (
        f"event_data field {named} holds a NUL character (\\u0000), which PostgreSQL's jsonb cannot store; "
        "remove it from the event in the store, or the field from the allowlist (`flowyard sync configure "
        "--allow …`, which replaces the list), then `flowyard sync trigger --force`"
    )


def _partition_name(month: date) -> str:
    return f"events_y{month.year:04d}m{month.month:02d}"


# Which of a batch's months (a date[]) a partition of devflow.events covers, wholly or in part, by
# the bounds it was attached with, whatever its name: flowyard's (``events_y2026m12``, or
# ``events_y2026m12_1`` when a detached table kept the name), a DBA's (pg_partman's
# ``events_p2026_12``, a quarter, a MINVALUE/MAXVALUE range). pg_get_expr writes a bound in the
# session's time zone (UTC) and style, which the cast reads back; a DEFAULT partition has none. A
# month no range covers whose rows a DEFAULT partition holds already is that partition's too (only
# it can hold them): creating one for it is refused, after an ACCESS EXCLUSIVE lock on
# devflow.events that waited behind every open reader, with every upload queued behind it, in
# every session. Reading the month's rows takes no such lock.
_COVERED_MONTHS = r"""
WITH ranges AS (
    SELECT CASE b[1] WHEN 'MINVALUE' THEN '-infinity' ELSE btrim(b[1], '''') END::timestamptz AS lower,
           CASE b[2] WHEN 'MAXVALUE' THEN 'infinity' ELSE btrim(b[2], '''') END::timestamptz AS upper
    FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid,
         regexp_match(pg_get_expr(c.relpartbound, c.oid), '^FOR VALUES FROM \((.+)\) TO \((.+)\)$') b
    WHERE i.inhparent = 'devflow.events'::regclass AND b IS NOT NULL
)
SELECT m FROM unnest(%s::date[]) m
WHERE EXISTS (SELECT FROM ranges WHERE lower < m + interval '1 month' AND upper > m)
   OR EXISTS (SELECT FROM devflow.events WHERE occurred_at >= m AND occurred_at < m + interval '1 month')
"""


class CentralRefused(Exception):
    """Central refused a batch for the way its schema was changed (or is owned: a sync role that
    may not add a month's partition), not for the batch's data: every event would be refused the
    same way, so the batch fails as a whole (as for a missing privilege) instead of being bisected
    into one failed event after another. The message names the fix."""


class CentralBusy(Exception):
    """A wait for a lock that central's ``lock_timeout`` (a DBA's setting for the sync role, the
    database or the server) cut short: a batch waited for other devices' uploads of snapshots, a
    partition being created or a DBA's open change; a download for a DBA's open change of the
    snapshots (a TRUNCATE, an ALTER TABLE); a connection completing the schema for a DBA's open
    change of its tables. Central answered, so it is no outage (as psycopg's OperationalError made
    it: an offline device, its download skipped); a later attempt may get the lock. The message
    names the setting and how to raise it for the sync role only."""


@dataclass(frozen=True)
class _Waiter:
    """What waited for a lock, in :class:`CentralBusy`'s words: what it may wait for, and what
    becomes of the work the wait cut short."""

    waits: str
    then: str


_UPLOAD_WAITER = _Waiter(
    "an upload may wait for other devices' snapshot uploads, a new partition or a DBA's open change",
    "the events are retried after their backoff",
)
_DOWNLOAD_WAITER = _Waiter(
    "a download may wait for a DBA's open change of a table it reads "
    "(a TRUNCATE or ALTER TABLE of devflow.project_status)",
    "the next run downloads from the same cursor",
)
_SCHEMA_WAITER = _Waiter(
    "a connection that finds central's schema incomplete completes it, waiting for another run's schema step "
    "or a DBA's open change of its tables",
    "the events are retried after their backoff, and the next run completes the schema",
)


# The session's lock_timeout and where it comes from (pg_settings.source), in a DBA's words.
_LOCK_TIMEOUT = "SELECT current_setting('lock_timeout'), source FROM pg_settings WHERE name = 'lock_timeout'"
_SETTING_SOURCES = {
    "user": "set for the role",
    "database": "set for the database",
    "database user": "set for the role in this database",
    "configuration file": "set in postgresql.conf",
    "client": "set in the central URL's options",
}


_FLOWYARD_COLUMNS = frozenset(
    {
        "seq", "sync_id", "local_id", "device_id", "user_id", "project_id", "event_type", "event_data",
        "occurred_at", "received_at", "bucket", "events", "status", "updated_at",
    }
)  # fmt: skip
"""Every column of flowyard's central tables. A NULL refused in one of them is the row's own (an
event without a type); in any other the column is one a DBA added, NOT NULL without a default."""


def _no_partition(exc: psycopg.Error) -> bool:
    """Whether ``exc`` is PostgreSQL finding no partition of ``devflow.events`` for a row: a
    check violation reported on the partitioned table itself, with no constraint (a CHECK a DBA
    added names itself and the partition). Never the row's fault: flowyard made the partition of
    its month before the upload, and a DBA has since detached or dropped it."""
    diag = exc.diag
    return (
        exc.sqlstate == "23514"
        and (diag.schema_name, diag.table_name) == (SCHEMA, "events")
        and diag.constraint_name is None
    )


def _partition_bounds(month: date) -> tuple[str, str]:
    """A month partition's range as timestamptz text.

    The upper bound is computed from the month number, not built as a ``date``: December
    9999's is 10000-01-01, which PostgreSQL accepts and Python's ``date`` cannot hold.
    """
    year, month_index = divmod(month.year * 12 + month.month, 12)
    return f"{month.isoformat()} 00:00:00+00", f"{year:04d}-{month_index + 1:02d}-01 00:00:00+00"


class CentralSession:
    """One device task's connection to the central database, with its upload machinery.

    Remembers the temp table and the partitions already known to exist, so a batch costs a
    COPY and one INSERT in the common case.
    """

    def __init__(self, url: str, *, application_name: str = "flowyard-sync") -> None:
        self.url = url
        self.schema_refusal: str | None = None
        self.conn: psycopg.Connection = connect(url, application_name=application_name)
        try:
            self.conn.execute("SET TIME ZONE 'UTC'")
            self._ensure_schema()
            self.conn.execute(_TEMP_TABLE)
            self.conn.commit()
            self._months: set[date] = set()
        except BaseException:
            self.conn.close()  # a half-built session must not hold a server connection
            raise

    def _ensure_schema(self) -> None:
        """Create or upgrade the schema when it is missing: the run's own schema step could not
        reach central, or the schema was dropped since. The tombstones' table is the last (and
        newest) object :func:`ensure_schema` builds, in one transaction, so its presence means
        the schema is complete, upgrades included, but for what only a DBA may do for a role that
        does not own their tables (each run's schema step names it); checking it costs one catalog lookup per
        session, not the DDL's table locks. A wait there that central's ``lock_timeout`` cut short
        is :class:`CentralBusy`, as an upload's or download's is: psycopg's OperationalError made it
        an outage (an offline device, its download skipped).

        A step refused only what the owner may do (a key, a column, the central's id), once the rest
        and the tombstones' table committed, leaves the session usable: its refusal is kept in
        :attr:`schema_refusal` for the caller to warn of, and left to the batch or download that needs
        what is missing to name (:meth:`_local_id_refusal`, :meth:`_identity_refusal`). Raised, it
        failed that session's first batch (or download) with a line about an index none needed."""
        if self._has_tombstones():
            return
        try:
            with self._central_refusals(_SCHEMA_WAITER):
                ensure_schema(self.url)
        except psycopg.errors.InsufficientPrivilege as exc:
            if not self._has_tombstones():
                raise
            self.schema_refusal = str(exc)

    def _has_tombstones(self) -> bool:
        """Whether the tombstones' table, the last object :func:`ensure_schema` builds, is there. The
        look's transaction ends with it: within it, a second look missed the table another connection
        had made meanwhile (the catalog is read again only at a transaction's start)."""
        with _usage_named(self.conn):
            has = one_row(self.conn, "SELECT to_regclass(%s)", (_DELETIONS,))[0] is not None
        self.conn.commit()
        return has

    def central_id(self) -> UUID:
        """The id of this central database, which a download cursor counts in: the seqs of
        another central are no position here."""
        with self._central_refusals(_DOWNLOAD_WAITER):
            row = self.conn.execute(_IDENTITY).fetchone()
        self.conn.commit()
        if row is None:
            raise self._identity_refusal()
        central: UUID = row[0]
        return central

    def _identity_refusal(self) -> CentralRefused:
        """A central whose id is gone (a DBA deleted the row, a restore left it out) and that this
        role's schema step could not restore (it may not insert into the table, or the step was refused
        before it), with the statement that restores it: no cursor counts in a central without one,
        and the download was a traceback (a bare "no row")."""
        reason = "devflow.central_identity has no row, which the download's cursor counts in"
        return CentralRefused(
            f"{_owner_fix(self.conn, 'central_identity', [_IDENTITY_ROW], reason)}, or let a run of a role that "
            "may insert into it restore it; the stores then download from 0"
        )

    def close(self) -> None:
        self.conn.close()

    def _covered(self, months: set[date]) -> set[date]:
        """Which of ``months`` an attached partition covers, by its bounds (:data:`_COVERED_MONTHS`).
        Known by name, a partition of flowyard's name attached with another month's bounds hid
        the month it names, whose every batch was then refused for want of a partition, every
        run; and a DBA's partition of exactly one month under another name was created again by
        every session, which failed only after locking all of ``devflow.events`` (a partition's
        CREATE takes an ACCESS EXCLUSIVE lock), waiting for every upload under way and stopping
        the others meanwhile."""
        return {month for (month,) in self.conn.execute(_COVERED_MONTHS, (sorted(months),)).fetchall()}

    def ensure_partitions(self, timestamps_ms: Sequence[int]) -> None:
        """Create the month partitions a batch needs (own short transaction, before the upload).

        Only months no partition covers are created, under the partition lock, after looking
        again there: another session may have made them meanwhile. The first look commits before
        that lock is awaited: its read of ``devflow.events`` holds a lock on the table to the end
        of its transaction, which the session creating a partition under the lock waited for
        (CREATE takes an ACCESS EXCLUSIVE lock), while this one waited for the partition lock, and
        PostgreSQL aborted one of them (two devices uploading the first events of a month)."""
        lo, hi = _month_range(timestamps_ms)
        if lo == hi and lo in self._months:
            return
        needed = {month_start(ts) for ts in timestamps_ms} - self._months
        if not needed:
            return
        with self.conn.transaction():
            missing = needed - self._covered(needed)
        if missing:
            with self.conn.transaction():
                self.conn.execute("SELECT pg_advisory_xact_lock(%s)", (_PARTITION_LOCK,))
                creates = [self._partition_ddl(month) for month in sorted(missing - self._covered(missing))]
                try:
                    for create in creates:
                        self._create_partition(create)
                except psycopg.errors.InsufficientPrivilege as exc:
                    raise self._partition_refusal(exc, creates) from None
        self._months |= needed

    def _partition_refusal(
        self, exc: psycopg.errors.InsufficientPrivilege, creates: list[sql.Composed]
    ) -> CentralRefused:
        """A sync role that may write to a central a DBA owns but not add partitions to its events
        (``must be owner of table events``) as :class:`CentralRefused`, naming the statements that
        give the batch its months (all of them: the transaction that made the first ones is undone
        with it) and the lasting fix. PostgreSQL's words alone named no fix, while every batch of a
        new month failed, run after run."""
        statements = "; ".join(create.as_string(self.conn) for create in creates)
        role = _role(self.conn)
        return CentralRefused(
            f"central refused a partition for these events' month ({first_line(exc)}); as the owner of "
            f"devflow.events, run `{statements}`, or make {role} its owner (with CREATE on schema devflow) so "
            "flowyard adds each month itself; the events are retried after their backoff"
        )

    def _partition_ddl(self, month: date) -> sql.Composed:
        """The statement that attaches a partition for ``month`` (:meth:`_create_partition`)."""
        lower, upper = _partition_bounds(month)
        return sql.SQL("CREATE TABLE {} PARTITION OF devflow.events FOR VALUES FROM ({}) TO ({})").format(
            sql.Identifier(SCHEMA, self._free_partition_name(month)), sql.Literal(lower), sql.Literal(upper)
        )

    def _create_partition(self, create: sql.Composed) -> None:
        """Attach a month's partition (``create``, :meth:`_partition_ddl`), which no partition covers
        (under the partition lock).

        Its name may be held by a table that is no partition of ``devflow.events`` (one a DBA
        detached, or a partition of an ``events`` table renamed aside): the new partition then
        takes the next free name (``events_y2026m12_1``). ``CREATE TABLE IF NOT EXISTS`` skipped it
        silently, and every later event of that month was refused ("no partition of relation
        events found for row"), one by one, on every run. A month whose rows a DEFAULT partition
        already holds is left to that partition: its rows go there, where creating ours failed
        every batch of that month."""
        try:
            with self.conn.transaction():
                self.conn.execute(create)
        except (psycopg.errors.InvalidObjectDefinition, psycopg.errors.CheckViolation):
            pass  # a DBA attached an overlapping partition since, or the DEFAULT partition holds rows of the month

    def _free_partition_name(self, month: date) -> str:
        """flowyard's name for ``month``'s partition, with the first suffix no relation of the
        schema has (a table a DBA detached keeps the name, and may even be attached again for
        another range)."""
        base = _partition_name(month)
        rows = self.conn.execute(
            "SELECT c.relname FROM pg_class c WHERE c.relnamespace = 'devflow'::regnamespace "
            "AND (c.relname = %s OR c.relname ~ %s)",
            (base, f"^{base}_[0-9]+$"),
        ).fetchall()
        taken = {name for (name,) in rows}
        return next(name for n in range(len(taken) + 1) if (name := f"{base}_{n}" if n else base) not in taken)

    def upload(self, rows: Sequence[UploadRow]) -> UploadResult:
        """COPY the batch into the temp table and insert it idempotently, in one transaction.

        Raises :class:`CentralRefused` when central refuses it for a change of its schema
        (:meth:`_schema_refusal`) or for an upgrade only the owner may make
        (:meth:`_local_id_refusal`), and the refused rows' error when it refuses their data (event
        data holding a NUL character as :func:`_nul_refusal` words it)."""
        if not rows:
            return UploadResult(0, 0, 0)
        try:
            with self._central_refusals(_UPLOAD_WAITER):
                return self._upload(rows)
        except psycopg.IntegrityError as exc:
            if (refusal := self._schema_refusal(exc)) is None:
                raise
            raise refusal from None
        except psycopg.errors.UntranslatableCharacter:
            if not (fields := _nul_fields(rows)):
                raise
            raise psycopg.DataError(_nul_refusal(fields)) from None
        except psycopg.errors.UndefinedColumn as exc:
            has_local_id = one_row(self.conn, _HAS_STATUS_LOCAL_ID)[0]
            self.conn.rollback()
            if has_local_id:
                raise
            raise self._local_id_refusal(exc) from None

    def _local_id_refusal(self, exc: psycopg.errors.UndefinedColumn) -> CentralRefused:
        """A batch with snapshots, refused by a DBA's central from before the snapshots' local id,
        which the sync role's schema step may not add (it does not own ``devflow.project_status``), as
        :class:`CentralRefused` with the statement the schema step's warning names: PostgreSQL's
        words alone (``column "local_id" … does not exist``) named no fix, on every batch with one."""
        statements: list[sql.SQL | sql.Composed] = [sql.SQL(_STATUS_LOCAL_ID_UPGRADE)]
        return CentralRefused(
            f"{_owner_fix(self.conn, 'project_status', statements, first_line(exc))}; "
            "the events are retried after their backoff"
        )

    @contextmanager
    def _central_refusals(self, waiter: _Waiter) -> Iterator[None]:
        """Raise a wait that central's ``lock_timeout`` cut short as :class:`CentralBusy`, for
        ``waiter`` (an upload, a download), instead of psycopg's OperationalError, which the sync
        takes for central down; and a schema the role may no longer use as the grant it needs
        (:func:`_usage_named`: revoked during a run, after the session's look at the schema)."""
        try:
            with _usage_named(self.conn):
                yield
        except psycopg.errors.LockNotAvailable as exc:
            raise self._lock_timeout_refusal(exc, waiter) from None

    def _lock_timeout_refusal(self, exc: psycopg.errors.LockNotAvailable, waiter: _Waiter) -> CentralBusy:
        """``exc`` as :class:`CentralBusy`, naming the ``lock_timeout`` that cut the wait, where it is
        set and the statement that raises it for the sync role alone (a setting for the role in this
        database overrides the role's and the database's), leaving every other role's as it is."""
        self.conn.rollback()
        value, source = one_row(self.conn, _LOCK_TIMEOUT)
        self.conn.rollback()
        role = _role(self.conn)
        database = sql.Identifier(self.conn.info.dbname).as_string(self.conn)
        fix = (
            "raise the lock_timeout in the options of the central URL, or drop it"
            if source == "client"
            else f"`ALTER ROLE {role} IN DATABASE {database} SET lock_timeout = '30s'` (0 waits as long as it takes)"
        )
        return CentralBusy(
            f"{first_line(exc)}: central's lock_timeout for {role} is {value} ({_SETTING_SOURCES.get(source, source)}), shorter than "
            f"{waiter.waits}; for this role only, {fix}; {waiter.then}"
        )

    def _schema_refusal(self, exc: psycopg.IntegrityError) -> CentralRefused | None:
        """``exc`` as :class:`CentralRefused` when no event could pass, whatever its data: no
        partition takes the rows (:func:`_no_partition`), or a NULL is refused in a column flowyard
        does not know (a DBA added it NOT NULL without a default). Either was bisected one event at
        a time into failed events, every run. None for an error of the rows' own data."""
        diag = exc.diag
        if _no_partition(exc):
            return CentralRefused(
                f"{first_line(exc)}: a partition of devflow.events was detached or dropped during this run "
                "(the next run makes it again), or one made by hand covers only part of these events' month "
                "(give central a partition for the rest of it)"
            )
        if not isinstance(exc, psycopg.errors.NotNullViolation) or diag.column_name in _FLOWYARD_COLUMNS:
            return None
        table = one_row(
            self.conn,
            "SELECT coalesce(pg_partition_root(c.oid), c.oid)::regclass::text FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relname = %s",
            (diag.schema_name, diag.table_name),
        )[0]
        self.conn.rollback()
        column = sql.Identifier(str(diag.column_name)).as_string(self.conn)
        return CentralRefused(
            f"central's table {table} has a column {column} that flowyard does not fill, NOT NULL without a "
            f"default (added by hand); give it a default (`ALTER TABLE {table} ALTER COLUMN {column} SET "
            "DEFAULT …`) or drop its NOT NULL: central refuses every event until then"
        )

    def _upload(self, rows: Sequence[UploadRow]) -> UploadResult:
        self.ensure_partitions([row[2] for row in rows])
        has_status = any(row[6] == STATUS_EVENT for row in rows)
        with self.conn.transaction():
            with self.conn.cursor().copy(_COPY) as copy:
                for row in rows:
                    copy.write_row(row)
            inserted = one_row(self.conn, _INSERT_EVENTS)[0]
            changes = 0
            if has_status:
                self.conn.execute(_SEQUENCE_SNAPSHOTS)
                changes = one_row(self.conn, _UPSERT_STATUS, (STATUS_EVENT,))[0]
        return UploadResult(inserted, len(rows) - inserted, changes)

    def resumable(self, snapshot: tuple[str, int] | None) -> bool:
        """Whether a download may go on from the cursor of a store whose newest downloaded snapshot
        of this central is ``snapshot`` (:data:`_RESUMABLE`); False means from 0."""
        project, seq = snapshot or (None, None)
        with self._central_refusals(_DOWNLOAD_WAITER):
            resumable = bool(one_row(self.conn, _RESUMABLE, {"project": project, "seq": seq})[0])
        self.conn.commit()
        return resumable

    def download_updates(self, since: int, limit: int = 1000) -> DownloadPage:
        """Project status snapshots changed, and tombstones of those deleted, after cursor
        ``since``, in seq order (seed ``downloadUpdates``): each side's seq index reads ``limit``
        rows at most."""
        with self._central_refusals(_DOWNLOAD_WAITER):
            rows = self.conn.execute(_DOWNLOAD, {"since": since, "limit": limit}).fetchall()
        self.conn.commit()
        return DownloadPage([StatusUpdate(*row[1:]) for row in rows if row[5] is not None], rows[0][0])
