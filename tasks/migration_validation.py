"""Post-migration validation: the user's SQL checks and the integrity checks, compared with before the run.

Each validation query must return one row with one truthy value (``SELECT count(*) > 0 FROM
accounts``); it runs in a read-only transaction so a check cannot change the data. Integrity
problems (NULLs in NOT NULL columns, foreign-key orphans, invalid indexes, from
:mod:`tasks.integrity`) fail the run only when the run introduced them: a problem that was
already there before is reported, not blamed on the migration.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import psycopg

from tasks.db import connection
from tasks.errors import UserError, first_line
from tasks.integrity import IntegrityReport, Problem, check_integrity


@dataclass(frozen=True)
class QueryCheck:
    query: str
    passed: bool
    detail: str


@dataclass(frozen=True)
class Validation:
    queries: list[QueryCheck]
    integrity: IntegrityReport
    new_problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(q.passed for q in self.queries) and not self.new_problems

    def failures(self) -> list[str]:
        failed = [f"{q.query!r}: {q.detail}" for q in self.queries if not q.passed]
        return failed + [f"{p.check} in {p.table}: {p.detail} ({p.count})" for p in self.new_problems]


class ValidationFailed(UserError):
    """The migrated database did not pass its checks."""


def check_query(conn: psycopg.Connection, query: str) -> QueryCheck:
    """Run one validation query read-only; it passes when it returns a single truthy value."""
    try:
        with conn.transaction():
            conn.execute("SET TRANSACTION READ ONLY")
            rows = conn.execute(query).fetchall()
    except psycopg.Error as exc:
        return QueryCheck(query, False, f"error: {first_line(exc)}")
    if len(rows) != 1 or len(rows[0]) != 1:
        shape = f"{len(rows)} row(s) of {len(rows[0]) if rows else 0} column(s)"
        return QueryCheck(query, False, f"must return one row with one value, got {shape}")
    return QueryCheck(query, bool(rows[0][0]), f"returned {rows[0][0]!r}")


def introduced(before: IntegrityReport, after: IntegrityReport) -> list[Problem]:
    """Problems that are new after the run, or grew (more rows affected than before)."""
    old = {(p.check, p.table, p.detail): p.count for p in before.problems}
    return [p for p in after.problems if p.count > old.get((p.check, p.table, p.detail), 0)]


def validate(url: str, queries: list[str], before: IntegrityReport) -> Validation:
    with connection(url, autocommit=True) as conn:
        checks = [check_query(conn, q) for q in queries]
        after = check_integrity(conn)
    return Validation(checks, after, introduced(before, after))


def require_valid(validation: Validation) -> None:
    if not validation.ok:
        raise ValidationFailed("post-migration validation failed: " + "; ".join(validation.failures()))
