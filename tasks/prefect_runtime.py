"""The Prefect side of the runtime: a Prefect API server whose database is PostgreSQL, and the
process that serves flowyard's deployments.

Prefect's default SQLite database gives "database is locked" under concurrent task runs,
so the server always gets ``PREFECT_API_DATABASE_CONNECTION_URL`` pointing at a
``prefect`` database on the same PostgreSQL server flowyard uses.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Mapping
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import httpx
from psycopg import sql
from psycopg.conninfo import timeout_from_conninfo

from tasks import services
from tasks.db import (
    connection,
    ensure_database,
    mask_url,
    one_row,
    query_options,
    refuse_read_only,
    sqlalchemy_url,
    tls_version,
    validate_postgres_url,
    with_database,
)
from tasks.errors import UserError
from tasks.file_lock import exclusive
from tasks.settings import Settings

if TYPE_CHECKING:
    from prefect.events.schemas.automations import AutomationCore

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


HEARTBEAT_ENV = "PREFECT_FLOWS_HEARTBEAT_FREQUENCY"
HEARTBEAT_SECONDS = 30
"""Seconds between a flowyard flow run's heartbeat events: Prefect's minimum. Its default, 180 s,
would leave a killed run Running for 9 minutes under a window of three missed heartbeats. The cost
is one event per run every 30 s, from a thread that does not hold up the flow's end
(``tasks/flow_heartbeat.py``)."""

ZOMBIE_AUTOMATION = "flowyard: crash flow runs whose heartbeats stopped"


def prefect_client_env(settings: Settings) -> dict[str, str]:
    """Environment that points Prefect clients (flows, CLI, serve) at flowyard's server, with
    flowyard's heartbeat frequency: one in the environment is overridden, since a run that beats
    less often than :func:`keep_zombie_automation`'s window would be marked Crashed while alive."""
    return {
        "PREFECT_API_URL": settings.prefect_api_url,
        "PREFECT_HOME": str(settings.home_dir / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true",
        HEARTBEAT_ENV: str(HEARTBEAT_SECONDS),
    }


def use_flowyard_api(settings: Settings) -> None:
    """Point this process's Prefect client at flowyard's server (never an ephemeral SQLite one).

    Prefect creates its home directory at import without parents, and warns if it cannot; on a
    machine where flowyard has not run yet the parents are missing."""
    os.environ.update(prefect_client_env(settings))
    (settings.home_dir / "prefect").mkdir(parents=True, exist_ok=True)


def zombie_automation(window_seconds: int) -> AutomationCore:
    """Prefect's documented zombie-flow automation ("detect zombie flows") with flowyard's window:
    after each heartbeat of a flow run, another heartbeat or a final state is expected within
    ``window_seconds``; if none comes, the run is set Crashed. Not forced: Prefect refuses to crash
    a run already final, so a heartbeat sent as a run finished cannot crash it afterwards."""
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    heartbeat = "prefect.flow-run.heartbeat"
    return AutomationCore(
        name=ZOMBIE_AUTOMATION,
        description=(
            f"Set by flowyard (FLOWYARD_ZOMBIE_WINDOW_SECONDS, 0 removes it): marks a flow run Crashed "
            f"when it sent no heartbeat for {window_seconds} s (flowyard's runs send one every {HEARTBEAT_SECONDS} s)."
        ),
        enabled=True,
        trigger=EventTrigger(
            after={heartbeat},
            expect={heartbeat, *(f"prefect.flow-run.{end}" for end in ("Completed", "Failed", "Cancelled", "Crashed"))},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=window_seconds),
        ),
        actions=[
            ChangeFlowRunState(
                name=None,  # the state type's own name: Crashed
                state=StateType.CRASHED,
                force=False,
                message=(
                    f"no heartbeat for {window_seconds} s: the flow run's process is gone (killed, out of "
                    f"memory, or its host lost); marked by the automation {ZOMBIE_AUTOMATION!r}"
                ),
            )
        ],
    )


def keep_zombie_automation(settings: Settings) -> None:
    """Make the server's :func:`zombie_automation` match ``settings``: created if missing, updated
    if its definition changed (its enabled switch is the user's: one disabled in the UI stays
    disabled), removed when the window is 0. Under a lock: two commands at once on a new server
    would both find none and create two.

    Only on a server flowyard started (its pid file): a Prefect server found on flowyard's port
    is someone else's, whose own clients may beat every 180 s (Prefect's default) and whose
    live runs the window would crash."""
    if services.running_pid(settings.run_dir, SERVER) is None:
        return
    from prefect.client.orchestration import get_client

    window = settings.zombie_window_seconds
    wanted = zombie_automation(window) if window else None
    lock = services.lock_file(settings.run_dir, "zombie-automation")
    with exclusive(lock), get_client(sync_client=True) as client:
        found = client.read_automations_by_name(ZOMBIE_AUTOMATION)
        if wanted is None:
            for automation in found:
                client.delete_automation(automation.id)
        elif not found:
            client.create_automation(wanted)
        elif _definition(found[0]) != _definition(wanted):
            client.update_automation(found[0].id, wanted.model_copy(update={"enabled": found[0].enabled}))


def _definition(automation: AutomationCore) -> dict[str, Any]:
    """What flowyard sets of an automation (its sets compared as sets, not in an order)."""
    return automation.model_dump(include={"description", "trigger", "actions"})


def api_healthy(api_url: str) -> bool:
    try:
        return httpx.get(f"{api_url}/health", timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


def prefect_database_url(settings: Settings, state_url: str) -> str:
    """Prefect's own database: ``FLOWYARD_PREFECT_DATABASE`` on the state database's server."""
    return with_database(validate_postgres_url(state_url), settings.prefect_database)


def server_database(settings: Settings, state_url: str) -> tuple[str, dict[str, str]]:
    """:func:`prefect_database_url` (created if missing, refused if unusable) for the server's
    SQLAlchemy, and the environment that carries the URL's libpq options (:func:`asyncpg_target`).
    Those are refused before anything is created, as the server would die on them at start."""
    url = prefect_database_url(settings, state_url)
    target = asyncpg_target(url)
    ensure_database(state_url, settings.prefect_database)
    require_usable_prefect_database(url, settings.prefect_database)
    return target


_ASYNCPG_KEYWORDS = {
    name: name
    for name in ("host", "port", "user", "password", "passfile", "service", "krbsrvname", "gsslib", "target_session_attrs")
} | {"sslmode": "ssl"}
"""libpq's options that ``asyncpg.connect`` takes as a keyword (its name here) with libpq's values:
SQLAlchemy's asyncpg dialect hands every query parameter of the URL to it as a keyword, and one it
has not (``sslmode``) killed the Prefect server at start ("unexpected keyword argument")."""

_APPLICATION_NAME = "PREFECT_SERVER_DATABASE_SQLALCHEMY_CONNECT_ARGS_APPLICATION_NAME"
_SERVER_ENV = {
    "application_name": _APPLICATION_NAME,
    "connect_timeout": "PREFECT_SERVER_DATABASE_CONNECTION_TIMEOUT",
    "sslrootcert": "PGSSLROOTCERT",
    "sslcert": "PGSSLCERT",
    "sslkey": "PGSSLKEY",
    "sslcrl": "PGSSLCRL",
    "sslnegotiation": "PGSSLNEGOTIATION",
    "ssl_min_protocol_version": "PGSSLMINPROTOCOLVERSION",
    "ssl_max_protocol_version": "PGSSLMAXPROTOCOLVERSION",
}
"""libpq's options that reach the server's asyncpg sessions only through its environment: Prefect's
settings (it passes its own connect ``timeout``, which overrides the URL's) and the libpq variables
asyncpg reads when not given the keyword."""

_SERVER_SPELLING: dict[str, Callable[[str], str]] = {
    # as psycopg reads it for flowyard (at least 2 s; 0: 130 s)
    "connect_timeout": lambda value: str(timeout_from_conninfo({"connect_timeout": value})),
    "ssl_min_protocol_version": tls_version,
    "ssl_max_protocol_version": tls_version,
}
"""How an option of :data:`_SERVER_ENV` is spelt for the server where libpq's spelling is not
asyncpg's or Prefect's."""

_SESSION_SETTINGS = {
    "application_name": _APPLICATION_NAME,
    "search_path": "PREFECT_SERVER_DATABASE_SQLALCHEMY_CONNECT_ARGS_SEARCH_PATH",
}
"""The settings of a URL's ``options`` (``-c name=value``) Prefect applies to its sessions
(``server_settings``), with the setting it takes them from."""

_ONE_URL = "one URL serves flowyard's sessions and the Prefect server's"


def asyncpg_target(url: str) -> tuple[str, dict[str, str]]:
    """``url`` (``postgresql://``, validated) for SQLAlchemy's asyncpg dialect, and the Prefect
    server's environment for the URL's libpq options asyncpg takes no keyword for
    (:data:`_SERVER_ENV`, :data:`_SESSION_SETTINGS`). Any other option is refused in one line: the
    server would die on it, and flowyard's own sessions keep the URL as it is."""
    base, _, query = url.partition("?")
    kept: dict[str, str] = {}  # the last of a repeated option wins, as in libpq
    env: dict[str, str] = {}
    for name, value in query_options(query):
        if name in _ASYNCPG_KEYWORDS:
            kept[_ASYNCPG_KEYWORDS[name]] = value
        elif name in _SERVER_ENV:
            env[_SERVER_ENV[name]] = _SERVER_SPELLING.get(name, str)(value)
        elif name == "options":
            env.update(_session_settings(value))
        else:
            takes = ", ".join([*_ASYNCPG_KEYWORDS, *_SERVER_ENV, "options"])
            raise UserError(
                f"the Prefect server cannot take libpq's option {name} of FLOWYARD_DATABASE_URL ({_ONE_URL}; "
                f"its driver, asyncpg, has no such option); remove it from the URL (the server takes {takes})"
            )
    query = "&".join(f"{keyword}={quote(value, safe='')}" for keyword, value in kept.items())
    return sqlalchemy_url(base, driver="asyncpg") + (f"?{query}" if query else ""), env


def _session_settings(options: str) -> dict[str, str]:
    """The Prefect server's environment for a libpq ``options`` value, split as PostgreSQL splits it
    (blanks, a backslash escaping the next character): ``-c name=value``, ``-cname=value`` or
    ``--name=value`` of :data:`_SESSION_SETTINGS`; another setting or switch is refused."""
    env: dict[str, str] = {}
    tokens = iter(re.sub(r"\\(.)", r"\1", token) for token in re.findall(r"(?:\\.|[^\s\\])+", options))
    for token in tokens:
        setting = next(tokens, "") if token == "-c" else token[2:] if token.startswith(("-c", "--")) else ""
        name, equals, value = setting.partition("=")
        name = name.replace("-", "_")  # as PostgreSQL reads -c and -- names
        if not equals or name not in _SESSION_SETTINGS:
            raise UserError(
                f"the Prefect server cannot take {f'the setting {name}' if equals else repr(token)} of the options "
                f"of FLOWYARD_DATABASE_URL ({_ONE_URL}; it applies only -c {' and -c '.join(_SESSION_SETTINGS)}); "
                "remove it from the URL, and set a setting for the role instead (ALTER ROLE ... SET name = value)"
            )
        env[_SESSION_SETTINGS[name]] = value
    return env


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
    """``prefect server start`` on flowyard's PostgreSQL (its URL's libpq options in asyncpg's and
    Prefect's forms, :func:`asyncpg_target`), with the task-run recorder batching."""
    database_url, database_env = server_database(settings, state_url)
    env = {
        **TASK_RUN_RECORDER_BATCHING,
        **os.environ,
        **prefect_client_env(settings),
        **database_env,
        "PREFECT_API_DATABASE_CONNECTION_URL": database_url,
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
