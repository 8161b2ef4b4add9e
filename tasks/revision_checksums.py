"""Checksums of applied revision files, kept in the target database, so an edited applied revision is refused.

An applied revision that is edited afterwards no longer describes the database: a fresh
environment built from the files would differ from this one. flowyard records the SHA-256
of every revision file it applies in ``flowyard.applied_revisions`` of the *target*
database, so a restore from backup restores the checksums with the schema they describe.
Revisions applied before flowyard managed the database are adopted (recorded as they are)
on the first deploy.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import psycopg

from tasks.db import connection, one_row

_CREATE = (
    "CREATE SCHEMA IF NOT EXISTS flowyard",
    """
    CREATE TABLE IF NOT EXISTS flowyard.applied_revisions (
        revision    text PRIMARY KEY,
        filename    text NOT NULL,
        sha256      text NOT NULL,
        applied_at  timestamptz NOT NULL DEFAULT now(),
        seconds     double precision
    )
    """,
)


@dataclass(frozen=True)
class EditedRevision:
    revision: str
    filename: str
    recorded: str
    actual: str

    def describe(self) -> str:
        return f"{self.revision} ({self.filename}: recorded {self.recorded[:12]}, now {self.actual[:12]})"


def file_checksum(path: str | Path) -> str:
    """SHA-256 of the file with line endings normalised, so a CRLF checkout is not an "edit"."""
    return hashlib.sha256(Path(path).read_bytes().replace(b"\r\n", b"\n")).hexdigest()


def stored_checksums(conn: psycopg.Connection) -> dict[str, str]:
    """Recorded checksums by revision; empty when the table does not exist (nothing is created)."""
    if one_row(conn, "SELECT to_regclass('flowyard.applied_revisions')")[0] is None:
        return {}
    return dict(conn.execute("SELECT revision, sha256 FROM flowyard.applied_revisions").fetchall())


def edited_revisions(conn: psycopg.Connection, applied: Iterable[tuple[str, str]]) -> list[EditedRevision]:
    """Applied ``(revision, path)`` pairs whose file no longer matches the recorded checksum."""
    recorded = stored_checksums(conn)
    edited = []
    for revision, path in applied:
        actual = file_checksum(path)
        if revision in recorded and recorded[revision] != actual:
            edited.append(EditedRevision(revision, Path(path).name, recorded[revision], actual))
    return edited


def record(url: str, revision: str, path: str | Path, seconds: float | None) -> None:
    """Record (or refresh) the checksum of a revision that was just applied."""
    with connection(url) as conn:
        for statement in _CREATE:
            conn.execute(statement)
        conn.execute(
            """
            INSERT INTO flowyard.applied_revisions (revision, filename, sha256, seconds)
            VALUES (%s, %s, %s, %s)
            ON CONFLICT (revision) DO UPDATE
            SET filename = EXCLUDED.filename, sha256 = EXCLUDED.sha256,
                applied_at = now(), seconds = EXCLUDED.seconds
            """,
            (revision, Path(path).name, file_checksum(path), seconds),
        )


def adopt(url: str, applied: Iterable[tuple[str, str]]) -> list[str]:
    """Record applied revisions that have no checksum yet (applied before flowyard); returns them."""
    with connection(url) as conn:
        known = stored_checksums(conn)
    adopted = [(rev, path) for rev, path in applied if rev not in known]
    for revision, path in adopted:
        record(url, revision, path, None)
    return [rev for rev, _ in adopted]


def forget(url: str, revision: str) -> None:
    """Drop the checksum of a revision that was downgraded."""
    with connection(url) as conn:
        if stored_checksums(conn):
            conn.execute("DELETE FROM flowyard.applied_revisions WHERE revision = %s", (revision,))
