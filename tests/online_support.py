"""Shared helpers of the online-migration tests: a small live schema, dumps, checksums, phase runs."""

from __future__ import annotations

import subprocess
from typing import Any

from psycopg import sql

from tasks.db import connect
from tasks.embedded_pg import BIN_DIR
from tasks.online_catalog import snapshot
from tasks.online_phases import PhaseReport, RunOptions, run_phase
from tasks.online_plan import Phase, Plan, build_plan
from tasks.online_spec import parse_spec
from tasks.online_state import active_migration, begin_migration, current_version_schema, target_key

BASE_SCHEMA = """
CREATE TABLE customers (id int PRIMARY KEY, name text NOT NULL);
CREATE TABLE orders (
    id bigint PRIMARY KEY,
    customer_id int,
    amount int NOT NULL DEFAULT 1,
    note text,
    status text NOT NULL DEFAULT 'new',
    legacy text
);
CREATE INDEX orders_note_idx ON orders (note);
CREATE TABLE archive (id int PRIMARY KEY, payload text);
INSERT INTO customers SELECT g, 'customer ' || g FROM generate_series(1, 50) g;
INSERT INTO orders SELECT g, 1 + g % 50, g % 700 + 1, 'note ' || g, (ARRAY['new', 'paid'])[1 + g % 2], 'x'
FROM generate_series(1, %(rows)s) g;
INSERT INTO archive SELECT g, 'old ' || g FROM generate_series(1, 20) g;
"""


WIDEN_AMOUNT: dict[str, Any] = {
    "alter_column": {
        "table": "orders",
        "column": "amount",
        "type": "bigint",
        "up": "amount::bigint",
        "down": "amount::int",
    }
}
"""The int -> bigint change through a shadow column, used by several tests."""


def make_schema(url: str, rows: int = 3000) -> None:
    with connect(url, autocommit=True) as conn:
        for statement in BASE_SCHEMA.strip().split(";\n"):
            if statement.strip():
                conn.execute(statement.replace("%(rows)s", str(int(rows))))


def schema_dump(url: str) -> str:
    """pg_dump --schema-only, the reference for "exactly the prior schema"."""
    out = subprocess.run(
        [str(BIN_DIR / "pg_dump"), "--schema-only", "--no-owner", "--dbname", url],
        capture_output=True,
        text=True,
        check=True,
    )
    return "\n".join(
        line for line in out.stdout.splitlines() if not line.startswith(("--", "\\restrict", "\\unrestrict"))
    )


def checksum(url: str, select: str, search_path: str = "public") -> tuple[int, str]:
    """Row count and md5 of the rows of ``select`` (ordered by its first column)."""
    with connect(url, autocommit=True) as conn:
        conn.execute(sql.SQL("SET search_path = {}").format(sql.Identifier(search_path)))
        row = conn.execute(
            sql.SQL(
                "SELECT count(*), md5(coalesce(string_agg(q::text, '|' ORDER BY q::text), '')) FROM ({}) q"
            ).format(
                sql.SQL(select)  # type: ignore[arg-type]
            )
        ).fetchone()
    return int(row[0]), row[1]


def plan_for(url: str, state: str, spec: dict[str, Any], schema: str = "public") -> Plan:
    with connect(url) as conn:
        snap = snapshot(conn, schema)
    return build_plan(parse_spec(spec), snap, current_version_schema(state, target_key(url), schema))


def run(url: str, state: str, plan: Plan, phase: Phase, options: RunOptions | None = None) -> PhaseReport:
    record = (
        begin_migration(state, target_key(url), plan, None)
        if phase == "start"
        else active_migration(state, target_key(url), plan.schema_name)
    )
    assert record is not None
    return run_phase(url, state, record, phase, options or RunOptions())
