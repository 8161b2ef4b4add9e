"""prefect.yaml is the single source of truth for served deployments."""

from __future__ import annotations

import pytest

from deployments.serve import DeploymentSpec, read_deployments, to_deployment
from tasks.errors import UserError
from tests.conftest import ROOT


def test_every_declared_deployment_loads_its_flow():
    specs = read_deployments(ROOT / "prefect.yaml")
    names = {spec.name for spec in specs}
    assert {"deploy-migrations", "bulk-migrate", "online-migrate", "quality-check", "sync-devices"} <= names
    agent_queue = {"run-agent-queue", "agent-task-create", "agent-task-list", "agent-task-cancel", "agent-task-retry"}
    assert agent_queue <= names
    for spec in specs:
        flow = spec.load_flow()
        assert flow.name == spec.name, "deployment and flow share a name, so API triggers read naturally"


def test_the_agent_drain_runs_one_at_a_time_every_minute():
    """Overlapping drains would run up to twice max_agents agents."""
    specs = {spec.name: spec for spec in read_deployments(ROOT / "prefect.yaml")}
    drain, sync = specs["run-agent-queue"], specs["sync-devices"]
    assert [s.interval for s in drain.schedules] == [60] and drain.concurrency_limit == 1
    assert to_deployment(drain).concurrency_limit == 1
    assert [s.interval for s in sync.schedules] == [300]


def test_env_templates_resolve_like_prefect_deploy(monkeypatch):
    spec = DeploymentSpec(
        name="x", entrypoint="flows/x.py:x", parameters={"database_url": "{{ $DEMO_URL }}", "n": 3, "s": "plain"}
    )
    monkeypatch.delenv("DEMO_URL", raising=False)
    with pytest.raises(UserError, match=r"parameter database_url needs \$DEMO_URL"):
        spec.resolved_parameters()
    monkeypatch.setenv("DEMO_URL", "postgresql://u@h/demo")
    assert spec.resolved_parameters() == {"database_url": "postgresql://u@h/demo", "n": 3, "s": "plain"}


def test_schedule_needs_exactly_one_kind():
    with pytest.raises(ValueError, match="exactly one of 'cron' or 'interval'"):
        DeploymentSpec(name="x", entrypoint="flows/x.py:x", schedules=[{"cron": "* * * * *", "interval": 5}])
