"""A developer machine's local SQLite event store (seed 002 §5.1, §7.2, §7.3).

v1 is the seed's plain ``events`` table. v2 adds the sync metadata in place: a ``sync_id``
UUID per event (generated for existing rows and, by trigger, for rows a v1-era writer
inserts later), the sync state columns, the device/user/project identity and an index on
``sync_status``. ``downgrade_to_v1`` removes exactly that metadata and never an event.

The version lives in ``PRAGMA user_version``; a store the app set back to 1 that still holds
the sync columns is v2 (:func:`schema_version`). Every open failure (not a database, locked
by another process, missing file, a file or directory flowyard may not write) becomes a
one-line :class:`UserError` naming the store, so one bad device never hides the others.
"""

from __future__ import annotations

import os
import re
import shlex
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from uuid import UUID

import orjson

from tasks.errors import UserError, check_user_file, check_utf8, control_character, resolve_user_path

V1, V2 = 1, 2
SYNC_STATUSES = ("pending", "synced", "failed")
DEFAULT_BUSY_TIMEOUT = 5.0
RETRY_BASE_SECONDS = 30
RETRY_CAP_SECONDS = 3600
_NOT_UTF8 = "Could not decode to UTF-8"
"""How :mod:`sqlite3` starts the error for a TEXT value that is not UTF-8; the rest quotes the value."""

_V1_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    timestamp   INTEGER NOT NULL,              -- Unix epoch milliseconds
    event_type  TEXT    NOT NULL,
    event_data  TEXT    NOT NULL DEFAULT '{}'  -- JSON object
);
PRAGMA user_version = 1;
"""

# An RFC 9562 version-7 UUID in plain SQL, so v1-era writers get sync ids too: the event's own
# millisecond timestamp in the top 48 bits, 74 random bits below. Ids of events close in time
# are close in the central registry's primary key and the store's unique index, so a batch
# inserts into a few adjacent index pages instead of 5,000 random ones (a random version-4 id
# touches a random leaf page of an index that grows with every device, forever). The masks
# keep every field in range whatever the column holds, so the id is always well formed.
_UUID7_SQL = (
    "printf('%08x-%04x-7%03x-%x%03x-%012x', (events.timestamp & 281474976710655) >> 16, "
    "events.timestamp & 65535, random() & 4095, 8 + (random() & 3), random() & 4095, "
    "random() & 281474976710655)"
)

_V2_COLUMNS = {
    statement.split()[5]: statement
    for statement in (
        "ALTER TABLE events ADD COLUMN sync_id TEXT",
        "ALTER TABLE events ADD COLUMN sync_status TEXT NOT NULL DEFAULT 'pending' "
        "CHECK (sync_status IN ('pending', 'synced', 'failed'))",
        "ALTER TABLE events ADD COLUMN sync_attempts INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE events ADD COLUMN last_sync_error TEXT",
        "ALTER TABLE events ADD COLUMN synced_at INTEGER",
        "ALTER TABLE events ADD COLUMN next_retry_at INTEGER",
        "ALTER TABLE events ADD COLUMN device_id TEXT",
        "ALTER TABLE events ADD COLUMN user_id TEXT",
        "ALTER TABLE events ADD COLUMN project_id TEXT",
    )
}
"""The statement adding each column v2 adds to ``events``, by the column's name (the names are
what makes a store v2), so an upgrade can add only the ones a store lacks."""
_SYNC_COLUMNS = frozenset(_V2_COLUMNS)
_SNAPSHOTS_CENTRAL_TABLE = (
    "CREATE TABLE IF NOT EXISTS remote_status_central (only_row INTEGER PRIMARY KEY CHECK (only_row = 1), "
    "central_id TEXT NOT NULL)"
)
"""The central whose snapshots ``remote_project_status`` holds; also made by the first download
into a store upgraded before flowyard recorded it (see :func:`save_remote_status`)."""
_DELETIONS_THROUGH_TABLE = (
    "CREATE TABLE IF NOT EXISTS remote_status_deleted (only_row INTEGER PRIMARY KEY CHECK (only_row = 1), "
    "seq INTEGER NOT NULL)"
)
"""The seq of the newest tombstone applied (a project deleted in central), made by the first download
of one: no snapshot holds that seq, and the download must go on after it (:func:`downloaded_through`)."""
# IF NOT EXISTS throughout: a store left part-way to v2 (an upgrade by other means interrupted,
# an app that made one of these itself) may hold some of them already.
_V2_OBJECTS = (
    "CREATE TABLE IF NOT EXISTS sync_identity (only_row INTEGER PRIMARY KEY CHECK (only_row = 1), "
    "device_id TEXT NOT NULL, user_id TEXT NOT NULL, project_id TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS remote_project_status (project_id TEXT PRIMARY KEY, status TEXT NOT NULL, "
    "updated_at TEXT NOT NULL, device_id TEXT NOT NULL, seq INTEGER NOT NULL)",
    _SNAPSHOTS_CENTRAL_TABLE,
    "CREATE UNIQUE INDEX IF NOT EXISTS idx_events_sync_id ON events (sync_id)",
    "CREATE INDEX IF NOT EXISTS idx_sync_status ON events (sync_status, id)",
    # Constant SQL fragments only (no input is ever concatenated), hence the noqa.
    "CREATE TRIGGER IF NOT EXISTS events_sync_defaults AFTER INSERT ON events "  # noqa: S608
    "WHEN NEW.sync_id IS NULL OR NEW.device_id IS NULL OR NEW.user_id IS NULL OR NEW.project_id IS NULL "
    "BEGIN UPDATE events SET "
    "sync_id = coalesce(NEW.sync_id, " + _UUID7_SQL + "), "
    "device_id = coalesce(NEW.device_id, (SELECT device_id FROM sync_identity)), "
    "user_id = coalesce(NEW.user_id, (SELECT user_id FROM sync_identity)), "
    "project_id = coalesce(NEW.project_id, (SELECT project_id FROM sync_identity)) "
    "WHERE id = NEW.id; END",
)
_UPGRADE_PROGRESS = "sync_upgrade_progress"
"""The table of an upgrade under way: the events up to ``last_id`` existed when it began (later
ones get their sync state from the insert trigger); those up to ``done_through`` have theirs."""
_V2_DOWN = (
    "DROP TRIGGER IF EXISTS events_sync_defaults",
    f"DROP TABLE IF EXISTS {_UPGRADE_PROGRESS}",
    "DROP INDEX IF EXISTS idx_sync_status",
    "DROP INDEX IF EXISTS idx_events_sync_id",
    "DROP TABLE IF EXISTS sync_identity",
    "DROP TABLE IF EXISTS remote_project_status",
    "DROP TABLE IF EXISTS remote_status_central",
    "DROP TABLE IF EXISTS remote_status_deleted",
    "ALTER TABLE events DROP COLUMN project_id",
    "ALTER TABLE events DROP COLUMN user_id",
    "ALTER TABLE events DROP COLUMN device_id",
    "ALTER TABLE events DROP COLUMN next_retry_at",
    "ALTER TABLE events DROP COLUMN synced_at",
    "ALTER TABLE events DROP COLUMN last_sync_error",
    "ALTER TABLE events DROP COLUMN sync_attempts",
    "ALTER TABLE events DROP COLUMN sync_status",
    "ALTER TABLE events DROP COLUMN sync_id",
)


DEFAULT_USER_ID = "unknown"
DEFAULT_PROJECT_ID = "default"


@dataclass(frozen=True)
class Identity:
    """Who wrote a store's events; stamped on existing rows at upgrade and on new rows by trigger."""

    device_id: str
    user_id: str
    project_id: str

    @classmethod
    def of(cls, device_id: str, user_id: str | None = None, project_id: str | None = None) -> Identity:
        """The identity to stamp on a store, where an unset or empty user or project id counts as
        unknown and becomes the default a new store gets: rows an older flowyard recorded with ''
        would otherwise put '' on the store at its next (re-)upgrade and on every event since."""
        return cls(device_id, user_id or DEFAULT_USER_ID, project_id or DEFAULT_PROJECT_ID)


LocalEvent = tuple[str, int, int, str, str, str, str, str]
"""One pending event as read for upload: ``(sync_id, local_id, timestamp_ms, device_id, user_id,
project_id, event_type, event_data)``, ``event_data`` still the raw local JSON text.

The row exactly as SQLite returns it, in the central upload's column order, so a batch needs no
per-field copying. A plain tuple on purpose, not a NamedTuple: CPython's collector stops
tracking a plain tuple of strings and numbers at the first collection it sees, but never a
tuple subclass. Each batch's 5,000 named events were promoted to the oldest generation and set
off a full collection of the flow process's heap (Prefect's objects included) every few
batches: the sync bench ran 18% faster without them (median of 3 alternated runs,
docs/benchmarks.md)."""


def local_ids(events: Sequence[LocalEvent]) -> list[int]:
    """The events' local ids, in batch order: what a batch is marked by."""
    return [event[1] for event in events]


@dataclass(frozen=True)
class StoreCounts:
    pending: int
    failed: int
    waiting: int
    """The failed events whose retry backoff has not ended: a run leaves them unless forced."""
    oldest_pending_ms: float | None
    """The oldest of the unsynced events' times in Unix milliseconds (:data:`_EVENT_MS_SQL`: a
    number, or text of digits alone); None when they have none. A time the app wrote as other text
    (``'2026-11-01T10:00'``), which central refuses, has no age."""


def remove_store_command(device_id: str, then_add: Path | None = None) -> str:
    """The command that takes a device off flowyard's list (and adds its store back under the
    store's own id), quoted for a POSIX shell: a device id or a path with a space or a quote in
    it would otherwise be pasted as two arguments."""
    command = f"flowyard sync configure --remove-store {shlex.quote(device_id)}"
    return command + (f" --add-store {shlex.quote(str(then_add))}" if then_add is not None else "")


def _explain(path: Path, exc: sqlite3.Error, device_id: str | None) -> UserError:
    """Turn a SQLite failure into the one-line, per-device message the user can act on: a corrupt
    store of a device flowyard has (``device_id``) can be removed from the device list, any
    other is a file to check or replace (``--remove-store`` would only answer "no device")."""
    text = str(exc)
    if text.startswith(_NOT_UTF8):  # the rest of the message quotes the stored value: private data
        text = text.partition(" with text ")[0]
    if "locked" in text or "busy" in text:
        return UserError(
            f"device store {path} is locked by another process ({text}); "
            "close the program holding it or retry later — its events stay pending"
        )
    if "not a database" in text or "malformed" in text or "corrupt" in text:
        fix = (
            f"restore it from a backup or remove it with `{remove_store_command(device_id)}`"
            if device_id is not None
            else "check that the path names the device's SQLite file, or restore it from a backup"
        )
        return UserError(f"device store {path} is corrupt ({text}); {fix}")
    if _disk_full(path, exc):
        return UserError(
            f"device store {path} cannot be written: its disk is full ({text}); free space on that disk "
            "and sync again — its events stay pending, and central keeps one copy of any it already holds"
        )
    if (reason := _unwritable(path, text)) is not None:
        return UserError(
            f"device store {path} cannot be written ({reason}); give the user flowyard runs as write access "
            "to the file and its directory — its events stay pending"
        )
    if text.removeprefix("no such column: ") in _SYNC_COLUMNS:
        # `migrate down` takes no device lock (it works without flowyard's state): run while a sync
        # uploaded, it left the run a bare "no such column: sync_status" when marking the batch.
        return UserError(
            f"device store {path} lost its sync columns while in use ({text}): it was downgraded to v1 "
            "(`flowyard sync migrate down`) or changed by another program; its events stay in it, and "
            "the next sync upgrades it again, central skipping the events it already holds"
        )
    return UserError(f"device store {path}: {text}")


_NEARLY_FULL_BYTES = 1 << 20
"""Room left on a store's file system below which an I/O error is taken for the disk being full."""


def _disk_full(path: Path, exc: sqlite3.Error) -> bool:
    """Whether SQLite failed for want of room on the store's disk: ``SQLITE_FULL`` ("database or
    disk is full"), or an I/O error while that file system is (nearly) full. A WAL store's first
    write grows its ``-shm`` file, and SQLite reports that failing as ``SQLITE_IOERR_SHMSIZE``,
    the bare "disk I/O error", which named neither the cause nor the fix. The code is absent on
    errors of the driver itself (a closed connection)."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code == sqlite3.SQLITE_FULL:
        return True
    if code is None or code & 0xFF != sqlite3.SQLITE_IOERR:
        return False
    try:
        room = os.statvfs(path.parent)
    except OSError:
        return False
    return room.f_bavail * room.f_frsize < _NEARLY_FULL_BYTES


def _unwritable(path: Path, text: str) -> str | None:
    """Why SQLite could not write the store, None for any other failure. It opens a file it may not
    write read-only and refuses the first write ("attempt to write a readonly database": an upgrade,
    or marking an uploaded batch synced). A store whose directory it may not write opens and reads,
    but its first write cannot create the journal beside it: the bare "unable to open database
    file", which named neither the directory nor the fix. SQLite says the same of a file it cannot
    open at all, so it is read so only when the file is readable and its directory is not writable
    (``access`` also reports the immutable attribute, which stops root, whom no mode bits stop)."""
    if "readonly database" in text:
        return text
    if "unable to open" in text and os.access(path, os.R_OK) and not os.access(path.parent, os.W_OK):
        return f"{text}: its directory cannot be written, so SQLite cannot create its journal there"
    return None


def store_path(given: str | Path) -> Path:
    """A store path as the user gave it (a CLI option or argument, a flow parameter), absolute:
    ``~`` is the home of the user flowyard runs as (a Prefect run's parameters too: its flow runs
    as that same user), and the path is resolved, so one file is one device row however it is named.
    The one place a store path is parsed: a shell leaves ``--store=~/x.db`` and a quoted ``~`` alone.
    A path that is not UTF-8 is refused here: flowyard records every store's path in PostgreSQL.
    So is one with a control character (a newline, an escape), which split or recoloured every
    message naming the store, and an empty one (an unset shell variable, an empty entry in a list
    of stores): pathlib reads it as the current directory, which was then refused as "a
    directory", naming neither slip."""
    if str(given) == "":
        raise UserError(
            "device store path '' is empty; give the path of the device's SQLite file "
            "(an unset shell variable or an empty entry in a list of stores leaves it empty)"
        )
    expanded = _home_expanded(Path(given))
    path = resolve_user_path(
        expanded, f"device store path {str(expanded)!r}", "give the path of the device's SQLite file"
    )
    check_utf8(str(path), f"device store path {str(path)!r}", "rename the file (or its folder) to a UTF-8 name")
    if (char := control_character(str(path))) is not None:
        raise UserError(
            f"device store path {str(path)!r} holds the control character {char!r}; rename the file (or its "
            "folder) without it"
        )
    return path


def _home_expanded(path: Path) -> Path:
    """``path`` with a leading ``~`` or ``~user`` made that home directory; one line when it names
    none (a mistyped user, or no ``HOME`` for a user without a passwd entry, as in some
    containers): pathlib's RuntimeError would be a traceback. An empty ``HOME`` names none
    either, though Python reads it as the root: ``~/x.db`` would silently be ``/x.db``."""
    if path.parts[:1] == ("~",) and os.environ.get("HOME") == "":
        raise UserError(
            f"device store path {str(path)!r} starts with '~', but HOME is set to the empty string; "
            "set HOME to your home directory (or unset it), or give the store's absolute path"
        )
    try:
        return path.expanduser()
    except RuntimeError:
        raise UserError(
            f"device store path {str(path)!r} starts with {path.parts[0]!r}, which names no home directory "
            "here; give the store's absolute path"
        ) from None


def check_store_path(path: Path) -> None:
    """A store is a file: a missing path, a directory (a common slip: the app's data folder
    instead of its database) and a FIFO, socket or device are one line, before SQLite creates an
    empty store at a typo or waits forever on a FIFO."""
    check_user_file(path, "device store", "give the path of the device's SQLite file", regular=True)


_SQLITE_HEADER = b"SQLite format 3\x00"
"""How every SQLite database file starts (its first 16 bytes), however damaged the pages after it."""


def check_sqlite_file(path: Path) -> None:
    """Refuse a file that is not a SQLite database at all (a text file, an empty one): named as a
    store flowyard has no device for, it is a wrong path, not a device whose store went bad, and
    a run would record it as a device with an error in status and history. A damaged store
    keeps the header and still gets its per-device error from :func:`open_store`."""
    with path.open("rb") as file:
        head = file.read(len(_SQLITE_HEADER))
    if head != _SQLITE_HEADER:
        reason = "it is empty" if not head else "it does not start with SQLite's header"
        raise UserError(
            f"device store {path} is not a SQLite database ({reason}); give the path of the device's SQLite file"
        )


def check_store_file(path: Path) -> None:
    """Refuse a path that cannot be any store: no file (:func:`check_store_path`), or a file that
    is not SQLite (:func:`check_sqlite_file`). A local check: it needs no database."""
    check_store_path(path)
    check_sqlite_file(path)


@contextmanager
def open_store(
    path: Path, *, busy_timeout: float = DEFAULT_BUSY_TIMEOUT, device_id: str | None = None
) -> Iterator[sqlite3.Connection]:
    """An autocommit connection to an existing store; SQLite errors become per-device UserErrors.

    ``device_id``: the device flowyard has (or, in a run, records) for the store, which the error
    for a corrupt one suggests removing; None for a file not (known to be) a device's store."""
    check_store_path(path)
    try:
        conn = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None)
    except sqlite3.Error as exc:
        raise _explain(path, exc, device_id) from None
    try:
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        yield conn
    except sqlite3.Error as exc:
        raise _explain(path, exc, device_id) from None
    finally:
        conn.close()


def check_writable(conn: sqlite3.Connection) -> None:
    """Fail (as :func:`open_store` words it: "cannot be written") on a store flowyard cannot
    write, before any of its events is uploaded. SQLite opens a file it may not write read-only,
    and a store whose directory it may not write opens and reads: either failed only when the
    first uploaded batch was marked synced, after that batch had reached central, so every run
    sent it again. A write of the store's header that is rolled back finds both at once and
    leaves the store as it was (in a rollback-journal store it needs the journal it creates
    beside the file; in a WAL store, its -wal and -shm files, which a directory that cannot be
    written fails at the store's first read already, when one of them is missing)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute("PRAGMA user_version = 2")  # any value: it is rolled back
    finally:
        if conn.in_transaction:
            conn.execute("ROLLBACK")


@contextmanager
def write_transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """``BEGIN IMMEDIATE`` … ``COMMIT``: take the write lock up front, roll back on any error,
    a failed ``COMMIT`` included. Only while the transaction is still open: on some errors (a full
    disk, an I/O error) SQLite has rolled it back already, and a ``ROLLBACK`` then raised "cannot
    rollback - no transaction is active" in place of the error that says what went wrong."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def create_v1(path: Path) -> None:
    """Create an empty v1 store (the seed's ``events`` table), as the local app does."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.executescript(_V1_SCHEMA)
    finally:
        conn.close()


_V1_COLUMNS = frozenset({"id", "timestamp", "event_type", "event_data"})


def _store_file(conn: sqlite3.Connection) -> str:
    """The file of the store a connection has open, for errors that must name the store."""
    return str(conn.execute("PRAGMA database_list").fetchone()[2])


def _event_columns(conn: sqlite3.Connection) -> set[str]:
    return {row[1] for row in conn.execute("PRAGMA table_info(events)")}


def schema_version(conn: sqlite3.Connection) -> int:
    """The store's schema version, ``PRAGMA user_version``.

    The local app may create its v1 store without setting a version (SQLite's default is 0, and
    seed 002 only asks for "version < 2"): a version-0 store whose ``events`` table has the v1
    columns and no sync columns is v1. Any other version-0 file is refused, naming the file.

    The app may also re-run its own v1 script on every start (``CREATE TABLE IF NOT EXISTS
    events …; PRAGMA user_version = 1``, as :func:`create_v1` does), which sets an upgraded
    store's version back to 1 and keeps every sync column, id and state: a version-1 store
    holding all the sync columns is v2. Read as v1, its every sync and ``migrate up`` failed
    on ``duplicate column name: sync_id``, and ``migrate down`` left the sync columns in place.
    One whose upgrade is under way (:func:`upgrade_to_v2`) is v1 until that upgrade finishes.

    A store whose ``events`` is a view (or any object but a table) is refused, naming the file:
    SQLite describes a view's columns like a table's, so one over the v1 columns read as v1 and
    its upgrade failed on "Cannot add a column to a view", and one over v2's read as v2.
    """
    kind = conn.execute(
        "SELECT type FROM sqlite_master WHERE name = 'events' COLLATE NOCASE AND type <> 'table' "
        "AND NOT EXISTS (SELECT 1 FROM sqlite_master WHERE name = 'events' COLLATE NOCASE AND type = 'table')"
    ).fetchone()
    if kind is not None:
        raise UserError(
            f"device store {_store_file(conn)}: events is a {kind[0]}, not a table; flowyard syncs only the "
            "DevFlow app's own store, whose events is a table: give the path of that SQLite file"
        )
    version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if version not in (0, V1, V2):
        return version
    columns = _event_columns(conn)
    if version == V2:
        if missing := sorted(_SYNC_COLUMNS - columns):
            # read as v2, it failed on "no such column: sync_status" in status and every sync, on
            # "no such column" in `migrate down`, and `migrate up` said it was v2 already
            store = _store_file(conn)
            raise UserError(
                f"device store {store} is at schema version 2, but its events table lacks the sync "
                f"column{'s' if len(missing) > 1 else ''} {', '.join(missing)} (another tool changed it); set "
                f"its version back to 1 (`sqlite3 {shlex.quote(store)} 'PRAGMA user_version = 1'`) and "
                "flowyard upgrades it again, keeping every event"
            )
        return V2
    store = _store_file(conn)
    if not columns:
        raise UserError(f"{store} has no events table: it is not a DevFlow event store")
    if missing := sorted(_V1_COLUMNS - columns):
        # another tool's table: at version 1 its upgrade failed on SQLite's bare "no such column:
        # id"; at 0 the line below told the user to set a version it does not have
        raise UserError(
            f"{store} has an events table without the v1 column{'s' if len(missing) > 1 else ''} "
            f"{', '.join(missing)} (columns: {', '.join(sorted(columns))}): it is not a DevFlow event "
            "store; give the path of the DevFlow app's own store"
        )
    if version == V1:
        return V2 if _SYNC_COLUMNS <= columns and not _upgrading(conn) else V1
    if "sync_id" not in columns:
        return V1
    raise UserError(
        f"{store} has no schema version and its events table is not a v1 store (columns: "
        f"{', '.join(sorted(columns))}); it was changed by another tool: set PRAGMA user_version to its version"
    )


def known_version(conn: sqlite3.Connection) -> int:
    """The store's schema version, refused in one line (naming the file) unless it is v1 or v2:
    a store another tool moved on must not be altered by statements written for v1 or v2."""
    version = schema_version(conn)
    if version not in (V1, V2):
        raise UserError(f"{_store_file(conn)} has unknown schema version {version}; flowyard knows v1 and v2")
    return version


UPGRADE_CHUNK_ROWS = 20_000
"""Existing events given their sync state per transaction of an upgrade: each holds the store's
write lock for about 80 ms, where one transaction over all of them held it about 1.5 s per 300k
events, and a local app writing then waited that long (or, with a short busy timeout, got
"database is locked")."""
UPGRADE_PAUSE_MS = 100
"""How long the write lock stays free after each chunk of an upgrade, whichever process upgrades.
SQLite's busy handler polls (sleeping up to 100 ms between tries) rather than queueing: an
upgrade taking the lock again at once (or a second upgrader taking it in the first's pause)
left a waiting app only microsecond gaps to hit, and it waited for the whole upgrade anyway. A
pause as long as the handler's longest sleep lets it in at its next try."""

def upgrade_to_v2(conn: sqlite3.Connection, identity: Identity) -> bool:
    """Upgrade a v1 store in place; returns False when it is v2 already (or another process
    completed the upgrade meanwhile).

    In short transactions, so a local app writing to its store during the first sync waits
    milliseconds, never the whole upgrade: :func:`_begin_upgrade` adds the columns, tables and
    insert trigger (an event the app inserts from then on gets its sync id and identity at
    once); :func:`_fill_chunk` gives the events that existed before their sync state,
    :data:`UPGRADE_CHUNK_ROWS` at a time, with a pause after each (:data:`UPGRADE_PAUSE_MS`);
    :func:`_finish_upgrade` builds the indexes and sets the version.
    Each step commits with its progress (the ``sync_upgrade_progress`` table), so a crash at any
    instant leaves a consistent store that reads as v1 until the upgrade is finished, and the
    next upgrade resumes where it stopped. Two processes upgrading at once share the steps:
    each one is taken under the write lock, and its state read there.
    """
    if schema_version(conn) == V2:
        return False
    if not _begin_upgrade(conn, identity):
        return False
    while (pause_ms := _fill_chunk(conn, UPGRADE_CHUNK_ROWS)) is not None:
        time.sleep(pause_ms / 1000)
    return _finish_upgrade(conn)


def _upgrading(conn: sqlite3.Connection) -> bool:
    """Whether an upgrade began and has not finished (the store is still v1 then)."""
    return _has_table(conn, _UPGRADE_PROGRESS)


def _begin_upgrade(conn: sqlite3.Connection, identity: Identity) -> bool:
    """Add what v2 adds but its indexes, and record the events the upgrade must fill; False
    when the store is v2 already. An upgrade already under way is resumed as it began.

    A v1 store may already hold some of v2's columns and objects (an upgrade by other means
    interrupted, an app that made one of them): only the missing ones are added, where adding
    them all failed on SQLite's ``duplicate column name`` on every sync."""
    _check_integer_ids(conn)
    with write_transaction(conn):
        if _upgrading(conn):
            return True
        if known_version(conn) == V2:
            return False
        present = _event_columns(conn)
        for name, statement in _V2_COLUMNS.items():
            if name not in present:
                conn.execute(statement)
        for statement in _V2_OBJECTS:
            if not statement.startswith(_INDEX_DDL):
                conn.execute(statement)
        conn.execute(
            "INSERT OR REPLACE INTO sync_identity (only_row, device_id, user_id, project_id) VALUES (1, ?, ?, ?)",
            (identity.device_id, identity.user_id, identity.project_id),
        )
        conn.execute("PRAGMA user_version = 1")  # an app may leave it 0; 0 with sync columns is no v1 store
        conn.execute(
            f"CREATE TABLE {_UPGRADE_PROGRESS} AS "  # noqa: S608 (a constant name)
            "SELECT ? AS done_through, coalesce(max(id), ?) AS last_id, 0 AS resume_at_ms FROM events",
            (BEFORE_FIRST_ID, BEFORE_FIRST_ID),
        )
    return True


def _check_integer_ids(conn: sqlite3.Connection) -> None:
    """Refuse, in one line naming the store, one whose ``events.id`` holds a value that is no
    integer (an app's own table declaring ``id TEXT``, ``REAL`` or a nullable ``id INTEGER``).

    The upgrade fills events by id range and the sync reads them by an integer id cursor: a text
    id stopped the upgrade with a Python ``TypeError`` traceback, half-way (columns added); a NULL
    id was left with no sync id, pending forever. Read before the write lock is taken (one scan
    of the table), so the local app's writes do not wait for it; an upgrade under way is
    checked too, so a store the old code left half-way gets this line and `migrate down` undoes it.
    """
    found = conn.execute(f"SELECT typeof(id) FROM ({_NON_INTEGER_IDS}) LIMIT 1").fetchone()  # noqa: S608 (a constant)
    if found is not None:
        store = _store_file(conn)
        raise UserError(
            f"device store {store} has an event whose id is {found[0]}, not an integer: "
            "flowyard tracks events by the app's integer ids (the seed's `id INTEGER PRIMARY KEY`); "
            f"give those events integer ids (`sqlite3 {shlex.quote(store)} \"{_NON_INTEGER_IDS}\"` "
            "lists them), or give the path of the DevFlow app's own store"
        )


_NON_INTEGER_IDS = "SELECT id FROM events WHERE typeof(id) <> 'integer'"
"""The events :func:`_check_integer_ids` refuses: its check reads the first, and its error gives
this query to list them all."""


BEFORE_FIRST_ID = float("-inf")
"""A local-id cursor below every event: the app may write its own ids, 0 and negative ones too
(``INTEGER PRIMARY KEY`` takes any 64-bit integer), which a cursor starting at 0 skipped: the
upgrade gave them no sync id and every run left them pending, with no error. A REAL, as no 64-bit
integer is below them all; SQLite compares it with an integer id exactly."""

_INDEX_DDL = ("CREATE INDEX", "CREATE UNIQUE INDEX")
"""How v2's index statements start: :func:`_finish_upgrade` builds them, once every event has
its sync id (built first, an app's own stale, duplicated ids would fail the unique one)."""


def _fill_chunk(conn: sqlite3.Connection, rows: int) -> int | None:
    """Give the next ``rows`` events that existed when the upgrade began the sync state any
    upgrade gives them; returns the milliseconds to wait before the next call, None when no
    event is left. Within :data:`UPGRADE_PAUSE_MS` of the last chunk (of any process) it fills
    none, and returns how long is left of that pause; a store of one chunk gets none.

    Every such event gets a new sync id and is pending, whatever a sync column the app made
    held: no event of a v1 store has synced under it, and an app's column without v2's default
    (a NULL ``sync_status``) would keep its events from ever being read as pending. A
    ``device_id``, ``user_id`` or ``project_id`` the app wrote is its data and is kept, as the
    insert trigger keeps it on new events; only the empty ones get the store's identity. The
    chunk ends at its ``rows``-th event, not ``rows`` ids on: ids may have gaps of any size."""
    with write_transaction(conn):
        if not _upgrading(conn):
            return None  # another process finished the upgrade
        done, last, resume_at = conn.execute(
            f"SELECT done_through, last_id, resume_at_ms FROM {_UPGRADE_PROGRESS}"  # noqa: S608
        ).fetchone()
        if (wait := resume_at - now_ms()) > 0:
            return min(int(wait), UPGRADE_PAUSE_MS)  # capped: the wall clock may have stepped back
        if done >= last:
            return None
        upper = conn.execute(
            "SELECT coalesce(max(id), ?) FROM (SELECT id FROM events WHERE id > ? AND id <= ? ORDER BY id LIMIT ?)",
            (last, done, last, rows),
        ).fetchone()[0]
        conn.execute(
            "UPDATE events SET sync_id = " + _UUID7_SQL + ", sync_status = 'pending', sync_attempts = 0, "  # noqa: S608
            "last_sync_error = NULL, synced_at = NULL, next_retry_at = NULL, "
            "device_id = coalesce(device_id, (SELECT device_id FROM sync_identity)), "
            "user_id = coalesce(user_id, (SELECT user_id FROM sync_identity)), "
            "project_id = coalesce(project_id, (SELECT project_id FROM sync_identity)) "
            "WHERE id > ? AND id <= ?",
            (done, upper),
        )
        # No pause for a store whose events all fit one chunk: its index build is as short.
        pause = 0 if done == BEFORE_FIRST_ID and upper >= last else UPGRADE_PAUSE_MS
        conn.execute(
            f"UPDATE {_UPGRADE_PROGRESS} SET done_through = ?, resume_at_ms = ?",  # noqa: S608
            (upper, now_ms() + pause),
        )
    return pause


def _finish_upgrade(conn: sqlite3.Connection) -> bool:
    """Build v2's indexes and set the version; False when another process finished first."""
    with write_transaction(conn):
        if not _upgrading(conn):
            return False
        for statement in _V2_OBJECTS:
            if statement.startswith(_INDEX_DDL):
                conn.execute(statement)
        conn.execute(f"DROP TABLE {_UPGRADE_PROGRESS}")
        conn.execute("PRAGMA user_version = 2")
    return True


_OBJECT_ON_COLUMN = re.compile(r"error in (index|view|trigger) (.+) after drop column: ")
"""How SQLite refuses ``DROP COLUMN`` of a column an index, view or trigger still uses (its type, its name)."""


def downgrade_to_v1(conn: sqlite3.Connection) -> bool:
    """``migrate down --to=v1``: drop the sync metadata only; every event row stays."""
    with write_transaction(conn):
        if known_version(conn) == V1 and not _upgrading(conn):
            return False
        for statement in _V2_DOWN:
            try:
                conn.execute(statement)
            except sqlite3.OperationalError as exc:
                raise _column_in_use(conn, statement, exc) from None
        conn.execute("PRAGMA user_version = 1")
    return True


def _column_in_use(conn: sqlite3.Connection, statement: str, exc: sqlite3.OperationalError) -> Exception:
    """The error for a sync column another object uses (flowyard's own are dropped before the
    columns, so the index, view or trigger is the app's): SQLite's own names it in passing and
    says neither that the transaction left the store unchanged nor what to do. Other errors as they are."""
    found = _OBJECT_ON_COLUMN.match(str(exc))
    if found is None:
        return exc
    kind, name = found.groups()
    column = statement.rsplit(" ", 1)[1]
    return UserError(
        f"device store {_store_file(conn)}: the sync column {column} is used by {kind} {name!r}, which flowyard "
        f"did not create; the store is unchanged: drop that {kind} and downgrade again, or keep the store at v2"
    )


def identity_of(conn: sqlite3.Connection) -> Identity:
    """The identity a v2 store was upgraded with; one line naming the store and the way back when
    its ``sync_identity`` row is gone (another tool emptied the table), which was a TypeError: a
    traceback in ``migrate up`` and ``configure``, and the end of a whole run, every device unsynced.
    The same line when the table itself is gone (dropped by hand), which was SQLite's bare "no such
    table: sync_identity", with no way back; ``migrate down`` drops only what exists."""
    try:
        row = conn.execute("SELECT device_id, user_id, project_id FROM sync_identity").fetchone()
        gone = "its sync_identity table is empty"
    except sqlite3.OperationalError as exc:
        if not str(exc).startswith("no such table"):
            raise
        row, gone = None, "its sync_identity table is missing"
    if row is None:
        store = _store_file(conn)
        last = conn.execute("SELECT device_id FROM events WHERE device_id IS NOT NULL ORDER BY id DESC LIMIT 1")
        carried = last.fetchone()
        device = shlex.quote(str(carried[0])) if carried is not None else "ID"
        raise UserError(
            f"device store {store} is v2 but records no device ({gone}; another tool "
            f"changed it); upgrade it again under its device's id: `flowyard sync migrate down --to=v1 "
            f"{shlex.quote(store)}`, then `flowyard sync migrate up {shlex.quote(store)} --device-id {device}` "
            "(every event stays, and central skips those it holds)"
        )
    return Identity(*row)


def insert_events(conn: sqlite3.Connection, events: Iterable[tuple[int, str, dict[str, object]]]) -> int:
    """Append ``(timestamp_ms, event_type, event_data)`` events the way the local app does."""
    with write_transaction(conn):
        cursor = conn.executemany(
            "INSERT INTO events (timestamp, event_type, event_data) VALUES (?, ?, ?)",
            ((ts, kind, orjson.dumps(data).decode()) for ts, kind, data in events),
        )
    return cursor.rowcount


# An event time the app wrote as REAL (a fraction of a millisecond, or any time in a column it
# declared REAL, where SQLite stores whole numbers as REAL too) is sent as the whole millisecond,
# truncated as SQLite's CAST does: central keeps Unix milliseconds (its upload column is a
# bigint, which refused the REAL's text form, so every such event failed), and the sync id
# carries the same millisecond (SQLite truncates a REAL the same way for the id's bit masks).
# A time the app wrote as text of digits alone (``'1700000000000'``: a v1 table whose column it
# declared TEXT, or an untyped one it bound strings to; SQLite's affinity makes such text an integer
# only in an INTEGER or NUMERIC column) is those Unix milliseconds, which nothing else digits could
# mean, and is sent as that integer, the millisecond its sync id carries too (SQLite reads the text
# as that number for the id's bit masks). A sign, a space, a fraction or an exponent leaves it text,
# as any other text (``'2026-11-01T10:00'``) and a BLOB are: sent as stored, each its row's error.
# Integers are tested first, so their one comparison is all they pay, as before.
# The text columns are read as text: SQLite's TEXT affinity turns a number written to them into
# text already, but keeps a BLOB (an app handing its driver bytes), which went to central as bytea
# text (an event type '\x636f6d6d6974') or was refused as no uuid. Cast, it is the text its bytes
# spell, and bytes that are not UTF-8 take the lenient read below, as in a TEXT value. The CAST of a
# TEXT value (or NULL) changes nothing and costs nothing measurable, where a CASE on typeof() cost
# 0.1 µs per column per event; a number in an app's own untyped column becomes the text a TEXT
# column would have stored.
_EVENT_MS_SQL = (
    "CASE typeof(timestamp) WHEN 'integer' THEN timestamp WHEN 'real' THEN CAST(timestamp AS INTEGER) "
    "WHEN 'text' THEN CASE WHEN timestamp <> '' AND timestamp NOT GLOB '*[^0-9]*' "
    "THEN CAST(timestamp AS INTEGER) ELSE timestamp END ELSE timestamp END"
)
"""An event's time as central takes it: Unix milliseconds, or the value as stored when it is none."""
# Constant SQL fragments only (no input is ever concatenated), hence the noqa.
_PENDING_SQL = (
    "SELECT CAST(sync_id AS TEXT), id, "  # noqa: S608
    + _EVENT_MS_SQL
    + """,
           CAST(device_id AS TEXT), CAST(user_id AS TEXT), CAST(project_id AS TEXT),
           CAST(event_type AS TEXT), CAST(event_data AS TEXT)
    FROM events WHERE id IN (
        SELECT id FROM (
            SELECT id FROM events WHERE sync_status = 'pending' AND id > :after ORDER BY id LIMIT :limit
        )
        UNION ALL
        SELECT id FROM (
            SELECT id FROM events
            WHERE sync_status = 'failed' AND id > :after AND (:force OR next_retry_at <= :now)
            ORDER BY id LIMIT :limit
        )
    )
    ORDER BY id LIMIT :limit
"""
)


BATCH_DATA_CHARS = 64 * 2**20
"""The event data a batch reads, at most, beyond its last event: a batch was ``limit`` events
whatever their size, and a store of 1 MB events read 5,000 of them (5 GB, about 1.4 times that at
the worker's peak) into memory at once."""


def read_pending(
    conn: sqlite3.Connection,
    after_id: float,
    limit: int,
    *,
    now_ms: int,
    force: bool = False,
    max_data_chars: int = BATCH_DATA_CHARS,
) -> list[LocalEvent]:
    """The next ``limit`` unsynced events after ``after_id`` (a local id, or :data:`BEFORE_FIRST_ID`
    for the first batch), by local id, fewer once their event data reaches ``max_data_chars``
    characters (at least one event: SQLite holds none over 1 GB). SQLite reads rows as they are
    fetched, so the events after that are not read at all.

    Failed events whose backoff has not elapsed are skipped unless ``force``. Each status is
    read as its own ordered range of ``idx_sync_status`` (status, id), so a batch costs
    O(limit) however many events are pending or already synced. The two ranges pick ids only;
    the rows are then read by ``rowid IN``, which SQLite walks in id order, so no whole row is
    sorted (a ``UNION ALL … ORDER BY`` of full rows sorted each side in a temporary B-tree:
    2.7 against 1.4 µs per event, measured on a 100k-event store).

    SQLite keeps whatever bytes the app wrote into a TEXT column (or as a BLOB, read as the text
    of its bytes); a batch holding a value that is not UTF-8 is read again with invalid bytes
    replaced by U+FFFD, so that event syncs like the others instead of failing its device on every
    run (with the value quoted in the error).
    Only that batch pays for the Python decoder.
    """
    params = {"after": after_id, "limit": limit, "force": force, "now": now_ms}
    try:
        return _fetch_up_to(conn.execute(_PENDING_SQL, params), max_data_chars)
    except sqlite3.OperationalError as exc:
        if not str(exc).startswith(_NOT_UTF8):
            raise
    default = conn.text_factory
    conn.text_factory = _decode_replacing  # the batch again, every TEXT value decoded leniently
    try:
        return _fetch_up_to(conn.execute(_PENDING_SQL, params), max_data_chars)
    finally:
        conn.text_factory = default


def _fetch_up_to(rows: sqlite3.Cursor, max_data_chars: int) -> list[LocalEvent]:
    """The cursor's events until their event data (the last column) reaches ``max_data_chars``. The
    cursor is closed: a statement left unfinished holds the store's read lock, which the app's next
    commit would wait for during the whole upload."""
    batch: list[LocalEvent] = []
    chars = 0
    try:
        for row in rows:
            batch.append(row)
            chars += len(row[-1] or "")
            if chars >= max_data_chars:
                break
    finally:
        rows.close()
    return batch


def _decode_replacing(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")


def mark_synced(conn: sqlite3.Connection, events: Sequence[LocalEvent], *, now_ms: int) -> None:
    """Mark the uploaded ``events`` synced: each row by its local id *and* the sync id it was sent with.

    The app writes on while a batch uploads. A row it replaced in the meantime (``INSERT OR
    REPLACE``, or a store cleared and written again by a table without ``AUTOINCREMENT``, which
    numbers its events from 1 again) holds the same local id but another event, with a new sync
    id: marked by its id alone, that event was recorded as synced without ever reaching central.
    Sync ids are unique in a store, so the two sets match exactly the rows that were sent; the
    sync id is compared as the text it was read as (an app's BLOB id included).
    """
    conn.execute(
        """
        UPDATE events SET sync_status = 'synced', synced_at = ?, last_sync_error = NULL,
                          next_retry_at = NULL, sync_attempts = sync_attempts + 1
        WHERE id IN (SELECT value FROM json_each(?))
          AND CAST(sync_id AS TEXT) IN (SELECT value FROM json_each(?))
        """,
        (
            now_ms,
            orjson.dumps(local_ids(events)).decode(),
            orjson.dumps([event[0] for event in events]).decode(),
        ),
    )


def mark_failed(conn: sqlite3.Connection, local_ids: Sequence[int], error: str, *, now_ms: int) -> None:
    """Record a failed upload attempt; the events stay in the store and are retried after backoff.

    The backoff doubles per attempt (30 s, 60 s, 120 s …, capped at an hour); SET expressions
    see the old ``sync_attempts``, so the shift uses the attempt count before this one.
    """
    conn.execute(
        """
        UPDATE events SET sync_status = 'failed', sync_attempts = sync_attempts + 1,
                          last_sync_error = ?,
                          next_retry_at = ? + min(? << min(sync_attempts, 20), ?)
        WHERE id IN (SELECT value FROM json_each(?))
        """,
        (
            error[:1000],
            now_ms,
            RETRY_BASE_SECONDS * 1000,
            RETRY_CAP_SECONDS * 1000,
            orjson.dumps(list(local_ids)).decode(),
        ),
    )


def save_remote_status(
    conn: sqlite3.Connection,
    rows: Sequence[tuple[str | None, str | None, str | None, str | None, int]],
    *,
    replace_for: UUID | None = None,
) -> None:
    """Store downloaded ``(project_id, status JSON, updated_at ISO, device_id, seq)`` snapshots,
    and apply tombstones (status None: the project was deleted in central), in one transaction;
    with ``replace_for`` (the central they come from), in place of every one held: a download from
    cursor 0 mirrors its central anew, so no snapshot of another central stays behind, and a
    download that fails before its first page leaves the store's snapshots as they were. The
    central is recorded in that transaction too: the cursor flowyard records in its state database
    after the run may never get there (the state database down), and only the store itself can
    tell which central its snapshots count in. A tombstone removes only an older snapshot, so a
    project deleted and created again in one page keeps its new one."""
    snapshots = [row for row in rows if row[1] is not None]
    tombstones = [(row[0], row[4]) for row in rows if row[1] is None]
    with write_transaction(conn):
        if replace_for is not None:
            conn.execute("DELETE FROM remote_project_status")
            conn.execute("DROP TABLE IF EXISTS remote_status_deleted")
            conn.execute(_SNAPSHOTS_CENTRAL_TABLE)
            conn.execute(
                "INSERT OR REPLACE INTO remote_status_central (only_row, central_id) VALUES (1, ?)", (str(replace_for),)
            )
        conn.executemany(
            "INSERT OR REPLACE INTO remote_project_status (project_id, status, updated_at, device_id, seq) "
            "VALUES (?, ?, ?, ?, ?)",
            snapshots,
        )
        if tombstones:
            conn.executemany("DELETE FROM remote_project_status WHERE project_id = ? AND seq < ?", tombstones)
            conn.execute(_DELETIONS_THROUGH_TABLE)
            conn.execute("INSERT OR REPLACE INTO remote_status_deleted (only_row, seq) VALUES (1, ?)", (tombstones[-1][1],))


def downloaded_through(conn: sqlite3.Connection, central: UUID) -> int:
    """The cursor in ``central`` the store's downloaded snapshots really reach (their newest
    ``seq``; 0 for none): downloads are saved page by page in seq order, so this is where the
    last one stopped. It falls behind the cursor flowyard recorded when the snapshots are gone
    (``migrate down --to=v1`` drops them, a store was recreated), and a download must then
    start from here, or the projects that do not change again never reach the store. It is
    ahead of that cursor when a download was killed after saving some pages, or its cursor
    never reached the state database (down at the run's end): every snapshot up to here is in
    the store, so the next download goes on from here instead of fetching them all again.

    0 too when the snapshots are another central's, or of no recorded one (saved before
    flowyard recorded it): a run into central B after A replaces the store's snapshots with B's,
    and when recording its cursor then fails, flowyard still holds A's cursor. Read as a
    position in A, B's newest seq made the next run into A download only A's later changes on
    top of B's snapshots; from 0, A's replace them."""
    if _snapshots_central(conn) != str(central):
        return 0
    newest = int(conn.execute("SELECT coalesce(max(seq), 0) FROM remote_project_status").fetchone()[0])
    if _has_table(conn, "remote_status_deleted"):
        newest = max(newest, int(conn.execute("SELECT coalesce(max(seq), 0) FROM remote_status_deleted").fetchone()[0]))
    return newest


def newest_snapshot(conn: sqlite3.Connection) -> tuple[str, int] | None:
    """The store's last downloaded ``(project_id, seq)``, which its central must still hold for the
    download cursor to mean anything there; None when the store holds no snapshot."""
    row = conn.execute("SELECT project_id, seq FROM remote_project_status ORDER BY seq DESC LIMIT 1").fetchone()
    return None if row is None else (str(row[0]), int(row[1]))


def _has_table(conn: sqlite3.Connection, name: str) -> bool:
    return conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)).fetchone() is not None


def _snapshots_central(conn: sqlite3.Connection) -> str | None:
    """The central the store's snapshots were downloaded from; None when none is recorded (a
    store upgraded before flowyard recorded it, and not downloaded into since)."""
    if not _has_table(conn, "remote_status_central"):
        return None
    row = conn.execute("SELECT central_id FROM remote_status_central").fetchone()
    return None if row is None else str(row[0])


_COUNTS_SQL = (
    "SELECT (SELECT count(*) FROM events WHERE sync_status = 'pending'), "  # noqa: S608 (constant fragments)
    "(SELECT count(*) FROM events WHERE sync_status = 'failed'), "
    "(SELECT count(*) FROM events WHERE sync_status = 'failed' AND next_retry_at > ?), "
    "(SELECT min(ms) FROM (SELECT " + _EVENT_MS_SQL + " AS ms FROM events WHERE sync_status IN ('pending', 'failed')) "
    "WHERE typeof(ms) = 'integer')"
)


def counts(conn: sqlite3.Connection) -> StoreCounts:
    """The store's unsynced events now; ``waiting`` by the rule :func:`read_pending` applies.

    Each figure is read from its own range of ``idx_sync_status`` (status, id), so this costs
    O(unsynced events), whatever the store has synced. A ``sum()`` over every row of ``events``
    read the whole table twice a run and once per ``sync status``: 0.27 s for a store of a million
    synced events, a shared lock the app's commits wait out in a rollback-journal store."""
    row = conn.execute(_COUNTS_SQL, (now_ms(),)).fetchone()
    return StoreCounts(*row)


def now_ms() -> int:
    return int(time.time() * 1000)
