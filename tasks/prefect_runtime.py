"""The Prefect side of the runtime: a Prefect API server whose database is PostgreSQL, and the
process that serves flowyard's deployments.

Prefect's default SQLite database gives "database is locked" under concurrent task runs,
so the server always gets ``PREFECT_API_DATABASE_CONNECTION_URL`` pointing at a
``prefect`` database on the same PostgreSQL server flowyard uses.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import httpx
from psycopg import sql

from tasks import services
from tasks.db import (
    connection,
    ensure_database,
    mask_url,
    one_row,
    refuse_read_only,
    validate_postgres_url,
    with_database,
)
from tasks.errors import UserError
from tasks.settings import Settings

SERVER = "prefect-server"
SERVE = "deployments"

# Prefect's task-run recorder writes every task-run state event in its own transaction by
# default (batch size 1): 20-28 ms of server CPU per task run, the largest single cost of an
# agent-queue task (docs/agents.md). Batching up to 50 events, flushed at least every second,
# about halves it. The price: a task run reaches the API up to ~1 s after the client moved
# it, so whatever reads task runs right after a flow must wait for them (tests do). Flow runs
# are not affected. Values already in the environment win.
TASK_RUN_RECORDER_BATCHING = {
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE": "50",
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_FLUSH_INTERVAL": "1",
}


def prefect_client_env(settings: Settings) -> dict[str, str]:
    """Environment that points Prefect clients (flows, CLI, serve) at flowyard's server."""
    return {
        "PREFECT_API_URL": settings.prefect_api_url,
        "PREFECT_HOME": str(settings.home_dir / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true",
    }


def use_flowyard_api(settings: Settings) -> None:
    """Point this process's Prefect client at flowyard's server (never an ephemeral SQLite one).

    Prefect creates its home directory at import without parents, and warns if it cannot; on a
    machine where flowyard has not run yet the parents are missing."""
    os.environ.update(prefect_client_env(settings))
    (settings.home_dir / "prefect").mkdir(parents=True, exist_ok=True)


def api_healthy(api_url: str) -> bool:
    try:
        return httpx.get(f"{api_url}/health", timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


def prefect_database_url(settings: Settings, state_url: str) -> str:
    """Prefect's own database: ``FLOWYARD_PREFECT_DATABASE`` on the state database's server."""
    return with_database(validate_postgres_url(state_url), settings.prefect_database)


def server_database_url(settings: Settings, state_url: str) -> str:
    """:func:`prefect_database_url` (created if missing, refused if unusable) for the server's SQLAlchemy."""
    ensure_database(state_url, settings.prefect_database)
    url = prefect_database_url(settings, state_url)
    require_usable_prefect_database(url, settings.prefect_database)
    return url.replace("postgresql://", "postgresql+asyncpg://", 1)


RUNNING_SERVER_FAILS = (
    "the Prefect server already running on it fails flow runs on each session it opens until then; restart "
    "it afterwards (flowyard down, then flowyard up), since those sessions keep the setting"
)


def require_writable_prefect_database(settings: Settings, state_url: str) -> None:
    """Refuse, in :func:`require_usable_prefect_database`'s words, a Prefect database a server that
    runs already can no longer write in: a DBA's ``default_transaction_read_only`` set since it
    started reaches each session it opens from then on (its pool's, once recycled or ended), while
    ``/health`` still answers: ``flowyard up`` and ``status`` said it was healthy, and every flow
    run failed on 503s. One new session, as the server opens them; the start-up checks (another
    role's schema, CREATE) are not asked again: the server is migrated and runs."""
    url = prefect_database_url(settings, state_url)
    with connection(url) as conn:
        refuse_read_only(conn, url, RUNNING_SERVER_FAILS)


# Prefect's migrations name no schema: its tables go where the session's search_path puts them,
# ``public`` unless the role's or the database's search_path names a schema before it.
_PREFECT_DATABASE_FIT = """
SELECT to_regclass('alembic_version') IS NOT NULL
       AND NOT has_table_privilege('alembic_version', 'UPDATE'),
       to_regclass('alembic_version') IS NULL
       AND NOT coalesce(has_schema_privilege(current_schema(), 'CREATE'), false),
       current_user, coalesce(current_schema(), 'public')
"""


def require_usable_prefect_database(url: str, database: str) -> None:
    """Refuse a Prefect database the server could not work in, before it starts; else it dies at
    start-up, or runs and fails every write, and only its log says why.

    On a server several people share, the database may hold another role's Prefect: the server
    dies on its migrations table. Or it is a DBA's, empty, with CREATE granted on the database
    but not on its ``public`` schema (PostgreSQL 15 on) or the one the role's search_path names
    first, where Prefect's migrations create its tables: the server died with "permission denied
    for schema public", naming neither role nor fix. A DBA's ``default_transaction_read_only`` on
    flowyard's role or the database (a freeze, a reporting role) reaches the server's sessions
    too (Prefect pins only their isolation level): on a fresh database the server died at its
    first migration; on one migrated before, it started, answered healthy, and every flow run
    then failed on 503s from its API (``flowyard up`` said all was running)."""
    with connection(url) as conn:
        foreign, no_create, role, schema = one_row(conn, _PREFECT_DATABASE_FIT)
        where = f"database {database} ({mask_url(url)})"
        if foreign:
            raise UserError(
                f"{where} holds another role's Prefect schema; set "
                "FLOWYARD_PREFECT_DATABASE to a database of your own, or connect as that role"
            )
        refuse_read_only(conn, url, "the Prefect server, which writes every run's state there, was not started")
        if no_create:
            role_sql, schema_sql = (sql.Identifier(name).as_string(conn) for name in (role, schema))
            raise UserError(
                f"{where} lets role {role} create no tables in schema {schema}, where Prefect keeps its "
                f"own; have the schema's owner run GRANT CREATE ON SCHEMA {schema_sql} TO {role_sql}, or set "
                "FLOWYARD_PREFECT_DATABASE to a database of your own"
            )


def server_service(settings: Settings, state_url: str) -> services.Service:
    """``prefect server start`` on flowyard's PostgreSQL, with the task-run recorder batching."""
    env = {
        **TASK_RUN_RECORDER_BATCHING,
        **os.environ,
        **prefect_client_env(settings),
        "PREFECT_API_DATABASE_CONNECTION_URL": server_database_url(settings, state_url),
        "PREFECT_SERVER_API_HOST": "127.0.0.1",
        "PREFECT_SERVER_API_PORT": str(settings.prefect_port),
    }
    argv = [
        sys.executable,
        "-m",
        "prefect",
        "server",
        "start",
        "--host",
        "127.0.0.1",
        "--port",
        str(settings.prefect_port),
    ]
    return services.Service(SERVER, argv, env, ready=lambda: api_healthy(settings.prefect_api_url))


def serve_service(
    settings: Settings, project_dir: Path, extra_env: Mapping[str, str], ready: Callable[[], bool]
) -> services.Service:
    """The process that serves every deployment declared in ``prefect.yaml``.

    ``extra_env`` carries the values that ``{{ $VAR }}`` parameters in prefect.yaml refer to;
    ``ready`` says when the deployments are registered, so callers can trigger them at once.
    """
    env = {**os.environ, **prefect_client_env(settings), **extra_env, "PYTHONPATH": str(project_dir)}
    argv = [sys.executable, "-m", "deployments.serve", str(project_dir / "prefect.yaml")]
    return services.Service(SERVE, argv, env, ready=ready, cwd=project_dir)
