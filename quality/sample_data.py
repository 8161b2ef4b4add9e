"""Entity tables with deliberately injected defects, generated inside PostgreSQL.

The demo and the benchmark need users/projects/agents/tasks with a known sprinkling of
bad rows (bad emails, null and duplicate ids, future timestamps, unknown statuses,
dangling foreign keys, outliers). ``generate_series`` builds them server-side, so a
million rows per table takes seconds and never passes through Python.
"""

from __future__ import annotations

import psycopg
from psycopg import sql

_DDL = {
    "users": """id uuid, email text, username text, display_name text, role text, status text,
                version integer, created_at timestamptz, updated_at timestamptz""",
    "projects": """id uuid, name text, owner_id uuid, type text, status text, visibility text,
                   version integer, created_at timestamptz, updated_at timestamptz""",
    "agents": """id uuid, project_id uuid, type text, name text, status text, temperature double precision,
                 version integer, created_at timestamptz, updated_at timestamptz""",
    "tasks": """id uuid, project_id uuid, agent_id uuid, type text, title text, status text, priority text,
                complexity text, actual_hours numeric, version integer, created_at timestamptz,
                updated_at timestamptz""",
}

# Every g-th generated row carries a defect; the comments name the rule it breaks.
_FILL = {
    "users": """
        SELECT CASE WHEN g %% 200 = 0 THEN NULL                                  -- not_null_id
                    WHEN g %% 500 = 1 AND g > 1 THEN CAST(md5('u' || (g - 1)) AS uuid)  -- unique_id
                    ELSE CAST(md5('u' || g) AS uuid) END,
               CASE WHEN g %% 50 = 0 THEN 'user' || g || '-at-example' ELSE 'user' || g || '@example.com' END,
               'user' || g, 'User ' || g,
               CASE WHEN g %% 97 = 0 THEN 'root' ELSE (ARRAY['admin','developer','viewer','guest'])[g %% 4 + 1] END,
               (ARRAY['active','inactive','suspended','deleted'])[g %% 4 + 1],
               CASE WHEN g %% 125 = 0 THEN 0 ELSE 1 + g %% 3 END,
               CASE WHEN g %% 333 = 0 THEN now() + interval '365 days' ELSE now() - g * interval '1 minute' END,
               now()
        FROM generate_series(1, %(rows)s) AS g""",
    "projects": """
        SELECT CAST(md5('p' || g) AS uuid), 'project ' || g,
               CASE WHEN g %% 60 = 0 THEN CAST(md5('ghost' || g) AS uuid) ELSE CAST(md5('u' || (g %% 199 + 1)) AS uuid) END,
               (ARRAY['web','mobile','api','ml','data'])[g %% 5 + 1],
               CASE WHEN g %% 40 = 0 THEN 'deleted' ELSE (ARRAY['planning','active','paused','completed','archived'])[g %% 5 + 1] END,
               (ARRAY['private','team','organization','public'])[g %% 4 + 1],
               1, now() - g * interval '1 minute', now()
        FROM generate_series(1, %(rows)s) AS g""",
    "agents": """
        SELECT CAST(md5('a' || g) AS uuid), CAST(md5('p' || (g %% 1000 + 1)) AS uuid),
               CASE WHEN g %% 45 = 0 THEN 'Robot'
                    ELSE (ARRAY['ProjectManagerAgent','RequirementsAgent','ArchitectAgent','BackendAgent',
                                'FrontendAgent','DatabaseAgent','DevOpsAgent','TestingAgent',
                                'DocumentationAgent'])[g %% 9 + 1] END,
               'agent ' || g, (ARRAY['idle','running','paused','completed'])[g %% 4 + 1],
               CASE WHEN g %% 80 = 0 THEN 1.5 ELSE (g %% 10) / 10.0 END,
               1, now() - g * interval '1 minute', now()
        FROM generate_series(1, %(rows)s) AS g""",
    "tasks": """
        SELECT CAST(md5('t' || g) AS uuid),
               CASE WHEN g %% 70 = 0 THEN CAST(md5('ghost' || g) AS uuid) ELSE CAST(md5('p' || (g %% 1000 + 1)) AS uuid) END,
               CAST(md5('a' || (g %% 1000 + 1)) AS uuid),
               (ARRAY['epic','story','task','subtask','bug','spike'])[g %% 6 + 1], 'task ' || g,
               CASE WHEN g %% 55 = 0 THEN 'blocked' ELSE (ARRAY['todo','in_progress','review','done'])[g %% 4 + 1] END,
               (ARRAY['critical','high','medium','low'])[g %% 4 + 1], (ARRAY['XS','S','M','L','XL'])[g %% 5 + 1],
               CASE WHEN g %% 150 = 0 THEN 5000 ELSE g %% 40 END,
               1, now() - g * interval '1 minute', now()
        FROM generate_series(1, %(rows)s) AS g""",
}


def create_entity_tables(conn: psycopg.Connection, schema: str = "public") -> None:
    """(Re)create the four entity tables, empty, with the indexes the checks' joins use."""
    conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
    for table, columns in _DDL.items():
        ref = sql.SQL("{}.{}").format(sql.Identifier(schema), sql.Identifier(table))
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {} CASCADE").format(ref))
        conn.execute(sql.SQL("CREATE TABLE {} ({})").format(ref, sql.SQL(columns)))
        conn.execute(sql.SQL("CREATE INDEX ON {} (id)").format(ref))


def fill_entity_tables(conn: psycopg.Connection, rows: int, schema: str = "public") -> None:
    """Insert ``rows`` generated rows with injected defects into each entity table, then analyze."""
    for table, select in _FILL.items():
        ref = sql.SQL("{}.{}").format(sql.Identifier(schema), sql.Identifier(table))
        conn.execute(sql.SQL("INSERT INTO {} {}").format(ref, sql.SQL(select)), {"rows": rows})
        conn.execute(sql.SQL("ANALYZE {}").format(ref))


DEMO_SCHEMA = "quality_demo"


def demo_parameters(demo_url: str) -> dict[str, object]:
    """``flowyard demo``: entity tables with injected defects in the demo database, then check them."""
    from tasks.db import connection

    with connection(demo_url) as conn:
        create_entity_tables(conn, DEMO_SCHEMA)
        fill_entity_tables(conn, 2000, DEMO_SCHEMA)
    return {"database_url": demo_url, "table_schema": DEMO_SCHEMA}
