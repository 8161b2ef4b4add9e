"""Database-wide advisory locks with a bounded wait.

Used wherever two runs must never overlap on one database or schema (deploys, online
migrations, per-device sync). The lock is session-level and lives exactly as long as the
dedicated connection that holds it, so a crashed holder releases it automatically.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg

from tasks.db import connect, mask_url, one_row
from tasks.errors import UserError


class LockTimeout(UserError):
    """Another run held the lock for longer than the caller was willing to wait."""


def lock_holder(conn: psycopg.Connection, name: str) -> tuple[int, str, Any] | None:
    """The session holding advisory lock ``name``: (pid, application name, since), or None."""
    return conn.execute(
        """
        SELECT a.pid, a.application_name, a.backend_start
        FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
        WHERE l.locktype = 'advisory' AND l.granted
          AND ((l.classid::bigint << 32) | l.objid::bigint) = hashtextextended(%s, 0)
        LIMIT 1
        """,
        (name,),
    ).fetchone()


def _holder(conn: psycopg.Connection, name: str) -> str:
    row = lock_holder(conn, name)
    return f"pid {row[0]} ({row[1] or 'unknown app'}, since {row[2]:%H:%M:%S})" if row else "another session"


@contextmanager
def advisory_lock(url: str, name: str, timeout_seconds: float = 30.0) -> Iterator[psycopg.Connection]:
    """Hold the advisory lock ``name`` on the database at ``url``, waiting up to ``timeout_seconds``.

    Yields the connection that holds the lock. Raises :class:`LockTimeout`, naming the holder,
    when the wait runs out.
    """
    conn = connect(url, autocommit=True, application_name=f"flowyard lock {name}")
    try:
        deadline = time.monotonic() + timeout_seconds
        delay = 0.05
        while not one_row(conn, "SELECT pg_try_advisory_lock(hashtextextended(%s, 0))", (name,))[0]:
            if time.monotonic() >= deadline:
                raise LockTimeout(
                    f"{name!r} on {mask_url(url)} is held by {_holder(conn, name)}; waited {timeout_seconds:g}s. "
                    "Wait for that run to finish, or raise the lock timeout"
                )
            time.sleep(min(delay * random.uniform(0.5, 1.5), max(deadline - time.monotonic(), 0)))
            delay = min(delay * 2, 1.0)
        yield conn
        conn.execute("SELECT pg_advisory_unlock(hashtextextended(%s, 0))", (name,))
    finally:
        conn.close()
