"""The benchmark table of issue 3, shared by the bulk-copy bench and the machine reference:
``events(id bigint pk, user_id int, kind text, payload jsonb, created_at timestamptz,
amount numeric(12,2))``, and the raw binary COPY pipe that copies it."""

from __future__ import annotations

import psycopg
from psycopg import sql

from tasks.copy_pipe import pipe_binary

EVENTS_DDL = (
    "CREATE TABLE events (id bigint PRIMARY KEY, user_id int, kind text, payload jsonb,"
    " created_at timestamptz, amount numeric(12,2))"
)
EVENTS_COLUMNS = ["id", "user_id", "kind", "payload", "created_at", "amount"]


def seed(url: str, rows: int) -> None:
    """Create and fill ``events`` with ``rows`` deterministic rows."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(EVENTS_DDL)
        conn.execute(
            """
            INSERT INTO events
            SELECT g, (g::bigint * 7919) %% 100000, (ARRAY['view', 'click', 'purchase', 'signup'])[1 + g %% 4],
                   jsonb_build_object('page', '/p/' || (g %% 1000), 'ref', md5(g::text), 'n', g %% 97),
                   '2025-01-01'::timestamptz + g * interval '1 second', round((g %% 100000) / 7.0, 2)
            FROM generate_series(1, %s) g
            """,
            (rows,),
        )
        conn.execute("VACUUM ANALYZE events")


def raw_pipe(source: str, target: str) -> None:
    """The practical limit: one binary ``COPY TO STDOUT`` → ``COPY FROM STDIN`` pipe into a table
    without its key, then the primary key (flowyard's copies end in the same state)."""
    with psycopg.connect(source) as src, psycopg.connect(target) as tgt:
        tgt.execute(EVENTS_DDL.replace(" PRIMARY KEY", ""))
        pipe_binary(src, sql.SQL("SELECT * FROM events"), tgt, sql.Identifier("events"), EVENTS_COLUMNS)
        tgt.execute("ALTER TABLE events ADD PRIMARY KEY (id)")
