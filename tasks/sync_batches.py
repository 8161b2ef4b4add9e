"""Sync one device store into the central database, batch by batch (seed 002 §5.2, §6.2).

Per batch: read pending events by local id, filter their ``event_data`` for privacy, upload
(COPY + ``INSERT … ON CONFLICT DO NOTHING`` on the sync id and the event's origin), then
mark them synced locally. The local mark comes strictly after the central commit, so a
crash in between only means the batch is sent again, and central keeps one copy; events
central already holds (re-sent, or back under new sync ids after a downgrade and
re-upgrade) count as duplicates and are marked synced too. A batch that cannot be uploaded after
a few quick reconnect attempts, or that central refuses for a reason other than its rows'
data (missing schema objects, privileges), is marked failed as a whole (attempts and error
recorded, retried after backoff on a later run); it is never dropped. Only a data error (or a
value past one of PostgreSQL's limits) is bisected down to the offending events. A batch central
refused is contact with central all the same, as a download it refused is: only a request that did
not get through (:data:`CONNECTION_TROUBLE`) counts as central down.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from uuid import UUID

import psycopg

from tasks import device_store
from tasks.central_store import CentralBusy, CentralRefused, CentralSession, UploadResult, UploadRow
from tasks.db import error_line, mask_url
from tasks.device_store import Identity, LocalEvent
from tasks.errors import ConnectionUnavailable, UserError, printable
from tasks.privacy_filter import PrivacyPolicy, compile_filter

PAUSE_AFTER_UPLOAD_ENV = "FLOWYARD_SYNC_PAUSE_AFTER_UPLOAD"
"""Test hook: a file path; after the first upload commits, the process writes it and waits to be killed."""

Quality = Literal["excellent", "good", "fair", "poor"]
_QUALITY_DIVISOR: dict[Quality, int] = {"excellent": 1, "good": 2, "fair": 10, "poor": 20}
"""Seed §6.2 sizes (1000/500/100/50) as the configured batch size divided by these: integer
division keeps every size up to 2^63-1 exact, where a float share rounded it up past SQLite's LIMIT."""
MIN_BATCH = 10
REFUSED_DATA = (psycopg.DataError, psycopg.IntegrityError, psycopg.errors.ProgramLimitExceeded)
"""What an upload raises for rows central will not store (a malformed sync id or JSON, a NUL
byte, a time out of range, a missing value, a value too large for an index): only these are
bisected down to the bad events. psycopg makes PostgreSQL's program_limit_exceeded (SQLSTATE
54000) an OperationalError, which would otherwise be taken for a cut connection and fail the
whole batch, on every run.
Any other error is about the connection, the schema or privileges, and would fail every
single event the same way."""
CONNECTION_TROUBLE = (psycopg.OperationalError, UserError)
"""What a request to central raises when it did not get through: a connection refused, cut or
timed out (flowyard's connect makes those a UserError, a cut mid-request is psycopg's
OperationalError, as are passing server conditions a retry may not meet: a deadlock, a
shutdown). Any other psycopg.Error is central answering with a refusal (a privilege, a missing
table): the request failed, but central was reached."""


@dataclass(frozen=True)
class SyncOptions:
    central_url: str
    batch_size: int = 5000
    policy: PrivacyPolicy = field(default_factory=PrivacyPolicy)
    force: bool = False
    upload_attempts: int = 3
    reconnect_backoff_seconds: float = 0.5
    busy_timeout: float = device_store.DEFAULT_BUSY_TIMEOUT
    batch_data_chars: int = device_store.BATCH_DATA_CHARS
    """A batch's event data at most (see :func:`device_store.read_pending`), whatever its size in events."""

    def reconnect_waits(self) -> list[float]:
        """The pause after each failed upload attempt that another attempt follows, doubling; none
        after the last one: waiting there only delayed the failure (2 s a device, with the
        defaults, while central is down)."""
        return [self.reconnect_backoff_seconds * 2**attempt for attempt in range(self.upload_attempts - 1)]


@dataclass(frozen=True)
class DeviceReport:
    """What one device's sync did; becomes a row of the run's table artifact and the device state."""

    device_id: str
    user_id: str
    project_id: str
    """The user and project ids recorded in the store, which its events carry."""
    store: str
    pending_before: int
    uploaded: int
    duplicates: int
    failed: int
    pending_after: int
    """Every event still unsynced, ``waiting_after`` included: the device's queue."""
    waiting_after: int
    """The failed events waiting out their retry backoff, which the next run leaves unless forced."""
    lag_seconds: float | None
    last_local_id: int
    batches: int
    final_batch_size: int
    download_cursor: int | None
    download_central: UUID | None = None
    """The central :attr:`download_cursor` counts in; None when the run never learnt it."""
    error: str | None = None
    reached_central: bool = False
    """Central answered every request of the run: each batch sent went in or was refused (for its
    data, or as a whole for a privilege or a missing table), the download (if any) went through or
    was refused and, when the run only found failed events waiting out their backoff, a connection
    opened. False when an upload or the download did not get through (:data:`CONNECTION_TROUBLE`),
    and when the run had nothing to ask central."""

    @property
    def succeeded(self) -> bool:
        """A successful sync, the one ``last_success_at`` and the offline alert count: central
        answered, or the run had nothing to send and nothing waiting. An event central refused
        for its data is contact all the same (the failure-rate alert speaks for it), or a device
        whose only events are bad would go "offline" with central up. A run that found only
        failed events waiting out their backoff counts when a connection to central opens: were
        it a success regardless, every such run while central is down would restart the offline
        clock; were it none, a bad event's backoff (up to an hour) would stop it between retries."""
        return self.reached_central or (self.error is None and self.waiting_after == 0)


def classify(events: int, seconds: float, failed: bool) -> Quality:
    """Network quality from the last upload's time per event (seed §6.2's categories)."""
    if failed:
        return "poor"
    per_event = seconds / max(events, 1)
    if per_event <= 50e-6:
        return "excellent"
    if per_event <= 200e-6:
        return "good"
    if per_event <= 1e-3:
        return "fair"
    return "poor"


def adapt_batch_size(base: int, quality: Quality) -> int:
    """The next batch's size: the quality's share of the configured ``base``, at least
    :data:`MIN_BATCH` events, but never more than ``base`` (a configured size below the floor is
    the most a batch may hold)."""
    return max(min(MIN_BATCH, base), base // _QUALITY_DIVISOR[quality])


def upload_rows(events: list[LocalEvent], policy: PrivacyPolicy) -> list[UploadRow]:
    """The batch as central rows, with ``event_data`` passed through the privacy filter."""
    keep = compile_filter(policy)
    return [
        (sync_id, local_id, ts, device, user, project, kind, keep(data))
        for sync_id, local_id, ts, device, user, project, kind, data in events
    ]


class _Uploader:
    """Holds the central session; reconnects with backoff when the connection is cut or refused,
    not when a connect timed out (see :attr:`ConnectionUnavailable.timed_out`)."""

    def __init__(self, options: SyncOptions) -> None:
        self.options = options
        self.session: CentralSession | None = None

    def session_or_connect(self) -> CentralSession:
        """The open session, or a new one; a new one whose completion of central's schema was refused
        only what no batch may need (:attr:`CentralSession.schema_refusal`) is warned of, as the run's
        own schema step warns of it."""
        if self.session is None or self.session.conn.closed:
            self.session = CentralSession(self.options.central_url)
            if self.session.schema_refusal is not None:
                _warn(f"central schema not ready on {mask_url(self.options.central_url)}: {self.session.schema_refusal}")
        return self.session

    def upload(self, rows: list[UploadRow]) -> UploadResult:
        """Upload one batch; raises a :data:`REFUSED_DATA` error for the caller to bisect, or
        :class:`_UploadFailed` when the batch as a whole cannot go now."""
        last_error: Exception | None = None
        reached = False
        for wait in [*self.options.reconnect_waits(), None]:  # None: the last attempt
            try:
                return self.session_or_connect().upload(rows)
            except REFUSED_DATA:
                raise
            except CentralBusy as exc:  # a DBA's lock_timeout cut a wait: central answered, the lock may come
                last_error, reached = exc, True
                if wait is None:
                    break
                time.sleep(wait)
            except CONNECTION_TROUBLE as exc:  # cut, refused, deadlock: reconnect
                last_error, reached = exc, False
                self.close()
                if wait is None or (isinstance(exc, ConnectionUnavailable) and exc.timed_out):
                    break  # the last attempt, or nothing answered for a whole connect timeout (another would wait as long)
                time.sleep(wait)
            except (psycopg.Error, CentralRefused) as exc:  # schema or privileges: a retry would fail the same way
                self.close()
                raise _UploadFailed(_one_line(exc, self.options.central_url), reached_central=True) from None
        raise _UploadFailed(_one_line(last_error, self.options.central_url), reached_central=reached)

    def close(self) -> None:
        if self.session is not None:
            try:
                self.session.close()
            except psycopg.Error:
                pass
            self.session = None


def _warn(message: str) -> None:
    """``message`` as a warning in the log of the run syncing the device (the task's), or of this
    module when no run does (a call from Python). Prefect is imported here, not with the module:
    the CLI imports this module (through ``tasks.sync_state``) before it points Prefect at
    flowyard's server, and Prefect fixes its settings when first imported, so every command then
    ran its flows on a temporary server of Prefect's own."""
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        logger: logging.Logger | logging.LoggerAdapter = get_run_logger()
    except MissingContextError:
        logger = logging.getLogger(__name__)
    logger.warning(message)


class _UploadFailed(Exception):
    """A batch that cannot go now as a whole. ``reached_central``: central answered with a refusal
    (a missing table, a privilege), which is contact, like a download it refuses; False when the
    upload did not get through (:data:`CONNECTION_TROUBLE`)."""

    def __init__(self, message: str, *, reached_central: bool) -> None:
        super().__init__(message)
        self.reached_central = reached_central


def _one_line(exc: Exception | None, url: str, action: str = "upload to") -> str:
    """The error a report and the store record: PostgreSQL's LINE/DETAIL/CONTEXT lines dropped; a
    write refused as read-only says why (a standby, a role's setting) and the fix."""
    return _failed(action, url, error_line(url, exc) if exc else "unknown error")


def _refused_event(event: LocalEvent, exc: Exception, url: str) -> str:
    """Why one event bisected out of its batch was refused, naming it by its local id and sync id
    (control characters escaped: the app wrote it). The line said only why, so which of a store's
    events central refused, and why the others were, was for its user to look up in the store."""
    sync_id, local_id = event[0], event[1]
    reason = f"event {local_id} (sync id {printable(str(sync_id))}) refused: {error_line(url, exc)}"
    return _failed("upload to", url, reason)


def _failed(action: str, url: str, reason: str) -> str:
    """One request's failure as :func:`_one_line` words it."""
    return f"{action} {mask_url(url)} failed: {reason}"


def _with_download_failure(error: str | None, exc: Exception, url: str) -> str:
    """The device's ``error`` once its download failed with ``exc`` too: after an upload that failed
    alike (a refusal of the role, naming its grant), one clause for both, which said the same
    reason and fix twice on one line."""
    reason = error_line(url, exc)
    if error == _failed("upload to", url, reason):
        return _failed("upload to and download from", url, reason)
    failure = _failed("download from", url, reason)
    return failure if error is None else f"{error}; {failure}"


def _pause_for_crash_test() -> None:
    marker = os.environ.get(PAUSE_AFTER_UPLOAD_ENV)
    if marker:
        Path(marker).write_text(str(os.getpid()))
        while True:
            time.sleep(1)


def _recorded_as(conn: sqlite3.Connection, store: Path, device_id: str) -> Identity:
    """The identity recorded in the store, which its events carry, refused when flowyard syncs
    the store as another device: uploading under the store's id would leave the run's device
    without its results, and re-upgrading under the run's id would send every event again."""
    recorded = device_store.identity_of(conn)
    if recorded.device_id != device_id:
        raise UserError(
            f"device store {store} was upgraded as device {recorded.device_id!r}, but flowyard has it as "
            f"{device_id!r}; register it under its own id: `{device_store.remove_store_command(device_id, store)}`"
        )
    return recorded


def sync_device(
    store: Path,
    identity: Identity,
    options: SyncOptions,
    download_since: int | None = None,
    download_central: UUID | None = None,
) -> DeviceReport:
    """Sync every eligible pending event of one store; raises UserError for an unusable store.

    With ``download_since`` (a cursor in central ``download_central``), project status
    snapshots changed after the store's own newest snapshot of this central
    (:func:`device_store.downloaded_through`) are pulled into the store afterwards and the new
    cursor is reported: also after a refused event or batch (central answered), not after an
    upload that did not get through (central unreachable). The store, not ``download_since``,
    says where its download stopped: it is ahead of the recorded cursor after a download killed
    part-way (or whose cursor the state database could not take), which must go on from there
    rather than fetch every page again, and behind it when it lost its snapshots. A cursor of
    another central, or of none recorded, is reported as 0 here: its seqs are no position in
    this central's sequence.
    """
    with device_store.open_store(
        store, busy_timeout=options.busy_timeout, device_id=identity.device_id
    ) as conn:
        device_store.upgrade_to_v2(conn, identity)
        identity = _recorded_as(conn, store, identity.device_id)
        before = device_store.counts(conn)
        pending_before = before.pending + before.failed
        if pending_before:
            device_store.check_writable(conn)
        uploader = _Uploader(options)
        uploaded = duplicates = failed = batches = 0
        last_id: int | None = None
        size = options.batch_size
        error: str | None = None
        answered = central_down = False
        cursor, cursor_central = download_since, download_central
        try:
            while True:
                events = device_store.read_pending(
                    conn,
                    device_store.BEFORE_FIRST_ID if last_id is None else last_id,
                    size,
                    now_ms=device_store.now_ms(),
                    force=options.force,
                    max_data_chars=options.batch_data_chars,
                )
                if not events:
                    break
                rows = upload_rows(events, options.policy)
                ids = device_store.local_ids(events)
                started = time.perf_counter()
                try:
                    result = uploader.upload(rows)
                except _UploadFailed as exc:  # unreachable or refusing every row: keep the rest queued for later
                    error = str(exc)
                    central_down = not exc.reached_central
                    answered = answered or exc.reached_central
                    device_store.mark_failed(conn, ids, error, now_ms=device_store.now_ms())
                    failed += len(ids)
                    size = adapt_batch_size(options.batch_size, "poor")
                    break
                except REFUSED_DATA as exc:  # central refused this data: bisect down to the bad events
                    if len(ids) > 1:
                        size = max(1, len(ids) // 2)
                        continue
                    refusal = _refused_event(events[0], exc, options.central_url)
                    device_store.mark_failed(conn, ids, refusal, now_ms=device_store.now_ms())
                    failed += 1
                    others = f" ({failed} events refused in this run, each with its error in the store)"
                    error = refusal + others if failed > 1 else refusal
                    last_id = ids[-1]
                    answered = True
                    continue
                upload_seconds = time.perf_counter() - started
                _pause_for_crash_test()
                device_store.mark_synced(conn, events, now_ms=device_store.now_ms())
                uploaded += result.inserted
                duplicates += result.duplicates
                batches += 1
                last_id = ids[-1]
                answered = True
                size = adapt_batch_size(options.batch_size, classify(len(ids), upload_seconds, False))
            after = device_store.counts(conn)
            # A refusal (of an event or a whole batch) says central answered: only an upload that
            # did not get through skips the download.
            if cursor is not None and not central_down:
                try:
                    session = uploader.session_or_connect()
                    if (central := session.central_id()) != cursor_central:
                        cursor, cursor_central = 0, central
                    since = device_store.downloaded_through(conn, central)
                    if since and not session.resumable(device_store.newest_snapshot(conn)):
                        since = 0  # central restored from a backup: mirror it
                    cursor = download_into_store(conn, session, since, central)
                    answered = True
                # The uploads stand; the cursor (0 in a new central) is kept.
                except (psycopg.Error, UserError, CentralBusy, CentralRefused) as exc:
                    error = _with_download_failure(error, exc, options.central_url)
                    if isinstance(exc, CONNECTION_TROUBLE):
                        central_down = True
                    else:  # central refused it (a privilege, a missing table) or cut a lock wait: contact
                        answered = True
            elif not answered and not central_down and after.waiting:  # sent nothing, events wait: is central up?
                answered, error = _central_answers(uploader)
        finally:
            uploader.close()
    return DeviceReport(
        device_id=identity.device_id,
        user_id=identity.user_id,
        project_id=identity.project_id,
        store=str(store),
        pending_before=pending_before,
        uploaded=uploaded,
        duplicates=duplicates,
        failed=failed,
        pending_after=after.pending + after.failed,
        waiting_after=after.waiting,
        lag_seconds=_lag_seconds(before.oldest_pending_ms),
        last_local_id=0 if last_id is None else last_id,
        batches=batches,
        final_batch_size=size,
        download_cursor=cursor,
        download_central=cursor_central,
        error=error,
        reached_central=answered and not central_down,
    )


def _central_answers(uploader: _Uploader) -> tuple[bool, str | None]:
    """Whether central takes a connection now, and the device's error: all a run that sent nothing,
    its failed events waiting out their backoff, can learn of central, and whether it counts as
    contact (see :attr:`DeviceReport.succeeded`). A connection that does not get through
    (:data:`CONNECTION_TROUBLE`) is no error of the run: no event was due, and the run that next
    sends one records why it fails. A session central refuses (a privilege its schema step needs,
    a table it cannot make) is contact, and its one line the error: taken for no contact, with no
    error, the device went "offline" with central up, and its record cleared the refusal that
    ``sync status`` showed."""
    try:
        uploader.session_or_connect()
    except CentralBusy:  # a lock wait of its schema step, cut by its lock_timeout: central answered
        return True, None
    except CONNECTION_TROUBLE:
        return False, None
    except psycopg.Error as exc:
        return True, _one_line(exc, uploader.options.central_url, "connect to")
    return True, None


def download_into_store(conn: sqlite3.Connection, session: CentralSession, since: int, central: UUID) -> int:
    """Pull project status snapshots of ``central`` (the session's) changed or deleted after
    ``since`` into the store; returns the new cursor.

    A download from 0 replaces the store's snapshots with its first page (an empty one too):
    they may be another central's, whose projects this one may not have.

    A page whose record of deletions starts after ``since`` (:attr:`DownloadPage.record_start`: a
    central from before tombstones, a trigger restored, old tombstones deleted) starts again from 0:
    a project deleted before that start has no tombstone, and a store going on from its cursor kept
    it for good. That start is checked on every page, not once before the download: a run restoring
    a trigger between the two was missed. A start this download has already seen on a page from 0
    is no news (that page came after it), however many pages later its row comes."""
    replace_for = central if since == 0 else None
    seen_start: int | None = None
    while True:
        page = session.download_updates(since)
        if since == 0:
            seen_start = page.record_start
        elif page.record_start > since and page.record_start != seen_start:
            since, replace_for = 0, central
            continue
        updates = page.updates
        if updates or replace_for is not None:
            device_store.save_remote_status(conn, [u.store_row() for u in updates], replace_for=replace_for)
        if not updates:
            return since
        since, replace_for = updates[-1].seq, None


def _lag_seconds(oldest_pending_ms: float | None) -> float | None:
    """How far behind central this device was: age of its oldest unsynced event; None when no
    unsynced event has a numeric time (none is unsynced, or the app wrote their times as text)."""
    if oldest_pending_ms is None:
        return None
    return max(0.0, (device_store.now_ms() - oldest_pending_ms) / 1000)
