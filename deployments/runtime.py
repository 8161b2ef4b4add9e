"""Bring flowyard's local runtime up and down: embedded PostgreSQL, Prefect server, deployment server."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from deployments.cli_logging import console_without_tracebacks
from deployments.serve import read_deployments
from deployments.trigger import deployment_exists
from tasks import services
from tasks.db import ensure_database, mask_url, with_database
from tasks.embedded_pg import EmbeddedPostgres
from tasks.errors import UserError
from tasks.prefect_runtime import (
    SERVE,
    SERVER,
    api_healthy,
    keep_zombie_automation,
    require_writable_prefect_database,
    serve_service,
    server_service,
    use_flowyard_api,
)
from tasks.settings import Settings
from tasks.state import state_url

PROJECT_DIR = Path(__file__).resolve().parent.parent
DEMO_DATABASE = "flowyard_demo"


@dataclass(frozen=True)
class RuntimeStatus:
    database: str
    embedded_running: bool | None
    prefect_pid: int | None
    prefect_healthy: bool
    serve_pid: int | None
    prefect_unusable: str | None = None
    """Why a server that answers ``/health`` fails every flow run (:func:`unusable_reason`)."""


def embedded(settings: Settings) -> EmbeddedPostgres:
    return EmbeddedPostgres(settings.pgdata, settings.pg_port)


def ensure_prefect(settings: Settings, *, keep_automation: bool = False) -> str:
    """Start what is missing of PostgreSQL and the Prefect server; point this process at it. A
    server that runs already is refused when its database no longer takes writes (its start
    checked that only once).

    A server started here gets flowyard's zombie-flow automation (:func:`keep_zombie_automation`);
    one running already only when ``keep_automation`` (``flowyard up``), not at every command:
    the check is an API round trip or two per command for a definition that changes only with a
    setting."""
    url = state_url()
    running = api_healthy(settings.prefect_api_url)
    if running:
        require_writable_prefect_database(settings, url)
    else:
        services.start(server_service(settings, url), settings.run_dir)
    use_flowyard_api(settings)
    if keep_automation or not running:
        keep_zombie_automation(settings)
    return url


def prepare_flow_run(settings: Settings) -> str:
    """Before a CLI command runs a flow in this process: start what is missing of flowyard's
    PostgreSQL and Prefect server, point Prefect at it, and keep tracebacks off the console
    (the command prints the run's error as one line; the Prefect UI keeps the traceback).
    Returns flowyard's state database URL."""
    url = ensure_prefect(settings)
    console_without_tracebacks()
    return url


def demo_database_url(state: str) -> str:
    """The demo database next to flowyard's state database (created if missing).

    Deployments whose defaults change a database point there, never at flowyard's own state.
    """
    ensure_database(state, DEMO_DATABASE)
    return with_database(state, DEMO_DATABASE)


def up(settings: Settings) -> str:
    url = ensure_prefect(settings, keep_automation=True)
    demo_env = {"FLOWYARD_DEMO_DATABASE_URL": demo_database_url(url)}
    specs = read_deployments(PROJECT_DIR / "prefect.yaml")

    def all_registered() -> bool:
        # Flow and deployment share a name (tests/deployments/test_serve.py holds that).
        return all(deployment_exists(settings.prefect_api_url, spec.name, spec.name) for spec in specs)

    services.start(serve_service(settings, PROJECT_DIR, demo_env, all_registered), settings.run_dir)
    return url


def down(settings: Settings) -> list[str]:
    """Stop the deployment server, the Prefect server, then the embedded PostgreSQL."""
    stopped = [name for name in (SERVE, SERVER) if services.stop(settings.run_dir, name)]
    if settings.database_url is None and embedded(settings).stop():
        stopped.append("embedded-postgres")
    return stopped


def status(settings: Settings) -> RuntimeStatus:
    server = embedded(settings)
    database = settings.database_url or server.url("flowyard")
    healthy = api_healthy(settings.prefect_api_url)
    return RuntimeStatus(
        database=mask_url(database),
        embedded_running=None if settings.database_url else server.is_running(),
        prefect_pid=services.running_pid(settings.run_dir, SERVER),
        prefect_healthy=healthy,
        serve_pid=services.running_pid(settings.run_dir, SERVE),
        prefect_unusable=unusable_reason(settings, database) if healthy else None,
    )


def unusable_reason(settings: Settings, database: str) -> str | None:
    """:func:`require_writable_prefect_database`'s refusal, or None: ``status`` reports it rather
    than failing, and neither starts nor migrates anything."""
    try:
        require_writable_prefect_database(settings, database)
    except UserError as refused:
        return str(refused)
    return None
