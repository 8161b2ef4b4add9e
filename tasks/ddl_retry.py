"""Run DDL (or any lock-taking work) with a short lock_timeout, retrying on lock timeouts.

Why: a DDL statement waiting for a lock sits in PostgreSQL's lock queue, and every
application write that arrives after it queues behind it. With a short ``lock_timeout``
(default 200 ms) the waiting statement gives up quickly, the queue drains, and we retry
later with exponential backoff and jitter until a deadline. Writers are never stalled for
longer than about the lock timeout. Every pipeline that changes a live schema uses this.

Autovacuum is the most common holder of a conflicting lock on a table that was just
backfilled. PostgreSQL cancels a (non-wraparound) autovacuum that blocks a lock waiter, but
only after ``deadlock_timeout`` (1 s by default, far beyond our lock timeout), so the DDL
would time out and retry while autovacuum keeps the lock. Each attempt therefore lowers its
own ``deadlock_timeout`` below the lock timeout when the role may set it.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import psycopg
from psycopg import sql

from tasks.errors import UserError

T = TypeVar("T")
Statement = str | sql.SQL | sql.Composed  # what psycopg's execute() takes


@dataclass(frozen=True)
class LockPolicy:
    """How long one attempt may wait for a lock and run, and how long to keep retrying."""

    lock_timeout_ms: int = 200
    statement_timeout_ms: int = 10_000
    deadline_seconds: float = 300.0
    base_backoff_seconds: float = 0.05
    max_backoff_seconds: float = 5.0
    deadlock_timeout_ms: int | None = 50
    """Set for each attempt, so a blocking autovacuum is cancelled before ``lock_timeout``; needs
    superuser or ``GRANT SET ON PARAMETER deadlock_timeout`` (PostgreSQL 15+), else left alone.
    ``None`` keeps the server's setting."""


@dataclass
class RetryStats:
    """What it took: attempts made, lock timeouts survived, seconds spent."""

    attempts: int = 0
    lock_timeouts: int = 0
    seconds: float = 0.0


class LockRetryDeadline(UserError):
    """The lock could not be taken before the deadline."""


class CancelledByRequest(psycopg.errors.QueryCanceled):
    """A statement cancelled by a cancel request (another session's ``pg_cancel_backend``, a
    client's cancel), not by a ``statement_timeout``.

    Both raise SQLSTATE 57014 and only PostgreSQL's message tells them apart, which ``lc_messages``
    translates (a German server says "storniere Anfrage wegen Benutzeraufforderung"), so advice
    chosen by the English text told a cancelled backfill batch to take smaller batches. What the
    attempt knows does not depend on the language: it ran under no limit, or for less time than the
    limit as the client measures it (from before the statement is sent to after its error arrives,
    so never less than the server's own statement clock), and the limit cannot have fired then,
    unless the work's own SQL set a shorter one (:class:`OwnStatementTimeout`)."""


class OwnStatementTimeout(psycopg.errors.QueryCanceled):
    """A statement cancelled by a ``statement_timeout`` the work's own SQL set (a migration's
    ``raw_sql`` running ``SET [LOCAL] statement_timeout = '100ms'`` before a slower statement),
    shorter than the policy's: it fires before the policy's limit could, as a cancel would."""


def _timeout_message(conn: psycopg.Connection) -> str | None:
    """PostgreSQL's message for a statement_timeout, in this session's ``lc_messages`` language,
    from one provoked on purpose (1 ms on a sleep, in a transaction of its own); None where none
    can be (``pg_sleep`` revoked). Where the work's SQL set a shorter limit, the clock cannot tell
    its timeout from a cancel, and the limit itself is gone: a ``SET LOCAL``, or a ``SET`` in the
    attempt's transaction, is undone by its rollback. The message is what is left."""
    try:
        with conn.transaction():
            conn.execute("SET LOCAL statement_timeout = 1")
            conn.execute("SELECT pg_catalog.pg_sleep(1)")
    except psycopg.errors.QueryCanceled as probe:
        return probe.diag.message_primary
    except psycopg.Error:  # pg_sleep revoked: told by the clock alone, as a cancel
        pass
    return None


def _cancel_cause(
    conn: psycopg.Connection, policy: LockPolicy, exc: psycopg.errors.QueryCanceled, seconds: float
) -> type[psycopg.errors.QueryCanceled] | None:
    """What cancelled an attempt that ran ``seconds`` under ``policy``: None for the policy's own
    statement_timeout, which it ran long enough to meet; else a cancel request, or a shorter limit
    the work's SQL set (only then is the server asked, :func:`_timeout_message`)."""
    if policy.statement_timeout_ms != 0 and seconds * 1000 >= policy.statement_timeout_ms:
        return None
    if exc.diag.message_primary == _timeout_message(conn):
        return OwnStatementTimeout
    return CancelledByRequest


def backoff_seconds(retry: int, policy: LockPolicy) -> float:
    """Exponential backoff with full jitter in [0.5, 1.5) x, capped at ``max_backoff_seconds``."""
    return min(policy.base_backoff_seconds * 2**retry, policy.max_backoff_seconds) * random.uniform(0.5, 1.5)


def _may_set_deadlock_timeout(conn: psycopg.Connection) -> sql.Composable:
    """A boolean SQL expression: may the current role set ``deadlock_timeout`` (a superuser-only setting)?"""
    if conn.info.server_version >= 150000:
        return sql.SQL("has_parameter_privilege('deadlock_timeout', 'SET')")
    return sql.SQL("(SELECT rolsuper FROM pg_roles WHERE rolname = current_user)")


def set_timeouts(conn: psycopg.Connection, policy: LockPolicy, *, local: bool) -> None:
    """Apply the policy's lock, statement and deadlock timeouts to the transaction (``local``) or session."""
    query: sql.SQL | sql.Composed = sql.SQL(
        "SELECT set_config('lock_timeout', %(lock)s, %(local)s), set_config('statement_timeout', %(stmt)s, %(local)s)"
    )
    if policy.deadlock_timeout_ms is not None:
        query += sql.SQL(
            ", CASE WHEN {} THEN set_config('deadlock_timeout', %(deadlock)s, %(local)s) END"
        ).format(_may_set_deadlock_timeout(conn))
    conn.execute(
        query,
        {
            "lock": f"{policy.lock_timeout_ms}ms",
            "stmt": f"{policy.statement_timeout_ms}ms",
            "deadlock": f"{policy.deadlock_timeout_ms}ms",
            "local": local,
        },
    )


def with_lock_retry(
    conn: psycopg.Connection,
    work: Callable[[psycopg.Connection], T],
    policy: LockPolicy,
    *,
    transactional: bool = True,
    what: str = "DDL",
    on_retry: Callable[[int, float], None] | None = None,
) -> tuple[T, RetryStats]:
    """Call ``work(conn)`` under the policy's timeouts, retrying whole attempts on SQLSTATE 55P03.

    ``conn`` must be in autocommit mode. With ``transactional`` each attempt is one transaction
    (``SET LOCAL`` timeouts); without it the timeouts are set on the session, for statements such
    as ``CREATE INDEX CONCURRENTLY`` that cannot run in a transaction block. A statement cancelled
    by request rather than by the policy's statement_timeout raises :class:`CancelledByRequest`,
    one cancelled by a shorter statement_timeout the work's own SQL set :class:`OwnStatementTimeout`.
    """
    if not conn.autocommit:
        raise ValueError("with_lock_retry needs an autocommit connection")
    stats = RetryStats()
    started = time.monotonic()
    while True:
        stats.attempts += 1
        attempt_started = time.monotonic()
        try:
            if transactional:
                with conn.transaction():
                    set_timeouts(conn, policy, local=True)
                    result = work(conn)
            else:
                set_timeouts(conn, policy, local=False)
                result = work(conn)
            stats.seconds = time.monotonic() - started
            return result, stats
        except psycopg.errors.QueryCanceled as exc:
            cause = _cancel_cause(conn, policy, exc, time.monotonic() - attempt_started)
            if cause is None:
                raise
            raise cause(*exc.args, info=exc.pgresult, encoding=conn.info.encoding) from exc
        except psycopg.errors.LockNotAvailable:
            stats.lock_timeouts += 1
            elapsed = time.monotonic() - started
            if elapsed >= policy.deadline_seconds:
                raise LockRetryDeadline(
                    f"{what}: could not take its lock within {policy.lock_timeout_ms} ms in {stats.attempts} attempts "
                    f"over {elapsed:.0f}s; a long transaction holds a conflicting lock (see pg_stat_activity / "
                    "pg_blocking_pids) — end it or raise the retry deadline"
                ) from None
            pause = min(backoff_seconds(stats.lock_timeouts - 1, policy), policy.deadline_seconds - elapsed)
            if on_retry is not None:
                on_retry(stats.lock_timeouts, pause)
            time.sleep(max(pause, 0.0))


def execute_with_lock_retry(
    conn: psycopg.Connection,
    statements: Sequence[Statement],
    policy: LockPolicy,
    *,
    transactional: bool = True,
    what: str = "DDL",
    on_retry: Callable[[int, float], None] | None = None,
) -> RetryStats:
    """Run ``statements`` (one transaction unless ``transactional`` is False) with lock retries."""

    def run(c: psycopg.Connection) -> None:
        for statement in statements:
            c.execute(statement)

    _, stats = with_lock_retry(conn, run, policy, transactional=transactional, what=what, on_retry=on_retry)
    return stats
