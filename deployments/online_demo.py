"""The online-migrate demo step: a small live table, changed without downtime, completing unattended."""

from __future__ import annotations

from typing import Any

from flows.online_migrate import DEMO_MIGRATION
from tasks.db import connection


def online_demo_parameters(demo_url: str) -> dict[str, Any]:
    """Create ``demo_orders`` (50k rows) in the demo database; the run completes through a health gate."""
    with connection(demo_url) as conn:
        conn.execute("DROP TABLE IF EXISTS demo_orders")
        conn.execute("CREATE TABLE demo_orders (id bigint PRIMARY KEY, amount int NOT NULL, note text)")
        conn.execute(
            "INSERT INTO demo_orders SELECT g, g % 1000, 'order ' || g FROM generate_series(1, 50000) g"
        )
    return {
        "database_url": demo_url,
        "migration_file": DEMO_MIGRATION,
        "health_query": "SELECT count(*) = 50000 FROM demo_orders",
        "health_checks": 2,
        "health_interval_seconds": 1.0,
    }
