"""Entity rows with hand-placed defects, and the expected rule outcomes computed from them in plain Python.

The expectations here never call flowyard's quality code: each rule is re-stated as a
Python predicate over the injected rows, and the score is the seed's formula applied to
those predicates.
"""

from __future__ import annotations

import datetime as dt
import re
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest

NOW = dt.datetime.now(dt.UTC)
EMAIL = re.compile(r"^[^\s@]+@[^\s@]+\.[^\s@]+$")
WEIGHT = {"critical": 10, "high": 5, "medium": 2, "low": 1}
INFINITY = "infinity"


def uid(i: int) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_OID, f"row-{i}"))


@dataclass
class UserRow:
    id: str | None
    email: str | None
    username: str
    role: str
    status: str
    version: int | None
    created_at: Any  # datetime, None or "infinity"


def injected_users() -> list[UserRow]:
    roles, statuses = (
        ["admin", "developer", "viewer", "guest"],
        ["active", "inactive", "suspended", "deleted"],
    )
    rows = [
        UserRow(
            uid(i),
            f"user{i}@example.com",
            f"user{i}",
            roles[i % 4],
            statuses[i % 4],
            1,
            NOW - dt.timedelta(hours=i),
        )
        for i in range(40)
    ]
    rows[3].id = rows[17].id = None
    rows[6].id = rows[5].id  # one duplicated id: two unexpected rows
    rows[8].email, rows[9].email, rows[10].email, rows[11].email = "nope", "a@b", "x y@z.com", None
    rows[12].created_at = NOW + dt.timedelta(days=10)
    rows[13].created_at = NOW + dt.timedelta(days=400)
    rows[14].created_at = None
    rows[15].created_at = INFINITY
    rows[16].version, rows[17].version, rows[20].version = 0, -1, None
    rows[18].role = "root"
    rows[19].username = "ab"
    rows[21].status = "banned"
    return rows


@dataclass
class Expected:
    counts: dict[str, int]
    score: float
    rows: int
    samples: dict[str, set[Any]] = field(default_factory=dict)


def user_rules(rows: list[UserRow], now: dt.datetime) -> dict[str, tuple[str, Any]]:
    """rule name -> (severity, predicate): the users suite restated independently of quality/."""
    ids = Counter(r.id for r in rows if r.id is not None)
    return {
        "not_null_id": ("critical", lambda r: r.id is None),
        "unique_id": ("critical", lambda r: r.id is not None and ids[r.id] > 1),
        "valid_timestamps": (
            "high",
            lambda r: r.created_at is None or r.created_at == INFINITY or r.created_at > now,
        ),
        "version_consistency": ("medium", lambda r: r.version is not None and r.version < 1),
        "valid_email": ("high", lambda r: r.email is not None and not EMAIL.match(r.email)),
        "username_length": ("low", lambda r: not 3 <= len(r.username) <= 30),
        "valid_role": ("medium", lambda r: r.role not in ("admin", "developer", "viewer", "guest")),
        "valid_user_status": (
            "medium",
            lambda r: r.status not in ("active", "inactive", "suspended", "deleted"),
        ),
    }


def expected_for_users(rows: list[UserRow], now: dt.datetime = NOW) -> Expected:
    rules = user_rules(rows, now)
    counts = {name: sum(1 for r in rows if pred(r)) for name, (_, pred) in rules.items()}
    scores = [max(0, 100 - sum(WEIGHT[sev] for sev, pred in rules.values() if pred(r))) for r in rows]
    samples = {
        "valid_email": {r.email for r in rows if rules["valid_email"][1](r)},
        "valid_role": {r.role for r in rows if rules["valid_role"][1](r)},
    }
    return Expected(counts, sum(scores) / len(scores) if scores else 100.0, len(rows), samples)


def insert_users(conn: psycopg.Connection, rows: list[UserRow], schema: str = "public") -> None:
    """Insert rows into an entity-shaped users table ('infinity' goes in as text, cast by PostgreSQL)."""
    conn.execute(psycopg.sql.SQL("SET search_path TO {}").format(psycopg.sql.Identifier(schema)))
    with conn.cursor() as cur:
        cur.executemany(
            """INSERT INTO users (id, email, username, display_name, role, status, version, created_at, updated_at)
               VALUES (%s, %s, %s, %s, %s, %s, %s, CAST(CAST(%s AS text) AS timestamptz), now())""",
            [
                (
                    r.id,
                    r.email,
                    r.username,
                    r.username.title(),
                    r.role,
                    r.status,
                    r.version,
                    r.created_at.isoformat() if isinstance(r.created_at, dt.datetime) else r.created_at,
                )
                for r in rows
            ],
        )
    conn.execute("SET search_path TO DEFAULT")


@pytest.fixture()
def entity_db(fresh_db: str) -> str:
    """A fresh database holding the four (empty) entity tables."""
    from quality.sample_data import create_entity_tables

    with psycopg.connect(fresh_db, autocommit=True) as conn:
        create_entity_tables(conn)
    return fresh_db
