"""``flowyard demo``: run each pipeline once through the Prefect REST API, as a user would.

Each pipeline contributes a :class:`DemoStep`. The demo works in a ``flowyard_demo``
database, recreated on every run so the demo is repeatable.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import typer

from deployments.agents_demo import agent_queue_demo_parameters
from deployments.bulk_demo import bulk_demo_parameters
from deployments.online_demo import online_demo_parameters
from deployments.runtime import DEMO_DATABASE, PROJECT_DIR, demo_database_url, ensure_prefect
from deployments.trigger import run_deployment
from quality.sample_data import demo_parameters
from tasks.db import drop_database
from tasks.errors import UserError
from tasks.sample_devices import demo_sync_parameters
from tasks.settings import Settings


@dataclass(frozen=True)
class DemoStep:
    title: str
    flow_name: str
    deployment: str
    parameters: Callable[[str], dict[str, Any]]
    """Builds the run's parameters from the demo database URL (and may prepare data there)."""


def _deploy_migrations_parameters(demo_url: str) -> dict[str, Any]:
    return {
        "database_url": demo_url,
        "migrations_dir": str(PROJECT_DIR / "deployments" / "demo_assets" / "migrations"),
        "validation_queries": ["SELECT count(*) >= 0 FROM accounts"],
    }


DEMO_STEPS: list[DemoStep] = [
    DemoStep("versioned migrations", "deploy-migrations", "deploy-migrations", _deploy_migrations_parameters),
    DemoStep("device sync", "sync-devices", "sync-devices", demo_sync_parameters),
    DemoStep("online schema change", "online-migrate", "online-migrate", online_demo_parameters),
    DemoStep("data quality", "quality-check", "quality-check", demo_parameters),
    DemoStep("agent task queue", "run-agent-queue", "run-agent-queue", agent_queue_demo_parameters),
    DemoStep("bulk copy", "bulk-migrate", "bulk-migrate", bulk_demo_parameters),
]


def run_demo(settings: Settings) -> None:
    state = ensure_prefect(settings)
    drop_database(state, DEMO_DATABASE)
    demo_url = demo_database_url(state)
    ui = f"http://127.0.0.1:{settings.prefect_port}"
    failed = []
    for step in DEMO_STEPS:
        typer.echo(f"▶ {step.title}: {step.flow_name}/{step.deployment}")
        outcome = run_deployment(
            settings.prefect_api_url, step.flow_name, step.deployment, step.parameters(demo_url)
        )
        typer.echo(f"  {outcome.state} {outcome.name}  {ui}/runs/flow-run/{outcome.id}")
        if outcome.state != "COMPLETED":
            failed.append(f"{step.title} ({outcome.state}: {outcome.message})")
    typer.echo(
        f"\nOpen the Prefect UI at {ui}: Deployments lists every pipeline; Runs and Artifacts show the results."
    )
    if failed:
        raise UserError("demo steps failed: " + "; ".join(failed))
