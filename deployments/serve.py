"""Serve every deployment declared in ``prefect.yaml`` from one long-running process.

``prefect.yaml`` is the single source of truth: ``prefect deploy`` reads it for work-pool
deployments, and this module reads the same entries to serve them in-process, so
``flowyard up`` needs no work pool. Run as ``python -m deployments.serve [prefect.yaml]``.

SIGTERM or SIGINT to this process lets every flow run it is executing stop gracefully first
(run-agent-queue checkpoints its agents and hands their tasks back): Prefect's runner alone
would SIGKILL its flow-run processes as it exits. Signal this process, not its process group
(``flowyard down`` does): a flow-run process must get SIGTERM once, from here.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import re
import signal
import sys
import time
from contextlib import suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil
import yaml
from pydantic import BaseModel, Field, model_validator

from tasks.agent_process import AgentLimits
from tasks.errors import UserError, exit_on_user_error
from tasks.prefect_runtime import HEARTBEAT_SECONDS

if TYPE_CHECKING:
    from prefect.runner import Runner
    from prefect.schedules import Schedule

_ENV_TEMPLATE = re.compile(r"\{\{\s*\$(?P<var>[A-Z_][A-Z0-9_]*)\s*\}\}")


class ScheduleSpec(BaseModel):
    cron: str | None = None
    interval: float | None = Field(default=None, gt=0, description="seconds")
    timezone: str | None = None
    active: bool = True

    @model_validator(mode="after")
    def _one_kind(self) -> ScheduleSpec:
        if (self.cron is None) == (self.interval is None):
            raise ValueError("a schedule needs exactly one of 'cron' or 'interval'")
        return self

    def to_schedule(self) -> Schedule:
        """The Prefect schedule, interval or cron: the validator lets exactly one of them through."""
        from prefect.schedules import Cron, Interval

        if self.interval is not None:
            return Interval(self.interval, timezone=self.timezone, active=self.active)
        assert self.cron is not None
        return Cron(self.cron, timezone=self.timezone, active=self.active)


class DeploymentSpec(BaseModel):
    name: str
    entrypoint: str = Field(pattern=r"^flows/[a-z_]+\.py:[a-z_]+$")
    description: str | None = None
    tags: list[str] = Field(default_factory=list)
    parameters: dict[str, Any] = Field(default_factory=dict)
    schedules: list[ScheduleSpec] = Field(default_factory=list)
    concurrency_limit: int | None = None

    def resolved_parameters(self) -> dict[str, Any]:
        """Parameters with ``"{{ $VAR }}"`` values taken from the environment, as ``prefect deploy`` does."""
        resolved = {}
        for key, value in self.parameters.items():
            match = _ENV_TEMPLATE.fullmatch(value) if isinstance(value, str) else None
            if match and match["var"] not in os.environ:
                raise UserError(
                    f"deployment {self.name}: parameter {key} needs ${match['var']}; serve it through `flowyard up`"
                )
            resolved[key] = os.environ[match["var"]] if match else value
        return resolved

    def load_flow(self) -> Any:
        """Import the flow object named by ``entrypoint`` (``flows/x.py:fn`` → ``flows.x.fn``)."""
        path, attr = self.entrypoint.split(":")
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        return getattr(module, attr)


def read_deployments(prefect_yaml: Path) -> list[DeploymentSpec]:
    if not prefect_yaml.exists():
        raise UserError(f"{prefect_yaml} not found; run from the flowyard project directory")
    document = yaml.safe_load(prefect_yaml.read_text()) or {}
    return [DeploymentSpec.model_validate(entry) for entry in document.get("deployments", [])]


def to_deployment(spec: DeploymentSpec) -> Any:
    """The spec as a Prefect deployment whose parameter schema refuses names the flow does not take.

    Prefect enforces a deployment's parameter schema when it creates a run, but the schema it
    makes allows any other property: a run started over the REST API with a misspelt parameter
    (``{"max_agent": 2}``) was created, then crashed in the serve process on Prefect's
    ``SignatureMismatchError``, its state saying only "Process exited with status code: 1". With
    ``additionalProperties: false`` the API refuses it (409, naming the parameter) and no run is made.
    """
    from prefect.utilities.callables import ParameterSchema

    class ClosedParameterSchema(ParameterSchema):
        additionalProperties: bool = False  # noqa: N815 (JSON Schema's own name)

    schedules = [s.to_schedule() for s in spec.schedules]
    deployment = spec.load_flow().to_deployment(
        name=spec.name,
        description=spec.description,
        tags=spec.tags,
        parameters=spec.resolved_parameters(),
        schedules=schedules,
        concurrency_limit=spec.concurrency_limit,
    )
    schema = deployment._parameter_openapi_schema  # registered with model_dump(exclude_unset=True)
    deployment._parameter_openapi_schema = ClosedParameterSchema(
        **schema.model_dump(exclude_unset=True), additionalProperties=False
    )
    return deployment


_LIMITS = AgentLimits()
FLOW_RUNS_STOP_SECONDS = _LIMITS.checkpoint_wait_seconds + 2 * _LIMITS.grace_seconds + 20.0
"""How long the worker waits for its flow runs to stop: a run-agent-queue run with default
limits asks its agents for a checkpoint, gives them the grace period after SIGTERM, SIGKILLs
and waits again (``Fleet.shutdown``), then reports its state, all within this."""


def terminate_flow_runs() -> list[psutil.Process]:
    """SIGTERM each flow-run process of this worker (its children) once; return them."""
    runs = psutil.Process().children()
    for run in runs:
        with suppress(psutil.NoSuchProcess):
            run.terminate()
    return runs


async def flow_runs_ended(runs: list[psutil.Process], timeout: float) -> None:
    """Wait up to ``timeout`` seconds for ``runs`` to end, yielding to the event loop: the loop
    copies each run's output pipes and reaps it, and a run whose console pipe is full blocks on
    its next log line (its agents' output, its stop sequence) until the loop copies it on."""
    deadline = time.monotonic() + timeout
    while any(_running(run) for run in runs) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)


def _running(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def graceful_runner(limit: int) -> Runner:
    """A Prefect runner whose SIGTERM handler (installed by ``Runner.start``, and used for SIGINT
    here too) stops the flow runs first, then shuts the runner down. Further SIGTERM/SIGINT are
    ignored from the first one on, so none cuts the wait short."""
    from prefect.runner import Runner

    class GracefulRunner(Runner):
        def handle_sigterm(self, *args: Any, **kwargs: Any) -> None:
            """Signal the flow runs and return at once: the handler runs on the thread of the
            event loop, which must go on copying the runs' output while they stop. Before the
            runner has started it runs no flow run, so it exits at once as Prefect's does."""
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, signal.SIG_IGN)
            if not self.started:
                sys.exit(0)
            self._logger.info("Signal received, stopping the flow runs, then the runner...")
            self._scheduled_run_poller.stopping = True  # no flow run starts while these stop
            self.execute_in_background(self._stop_after, terminate_flow_runs())

        async def _stop_after(self, runs: list[psutil.Process]) -> None:
            """Stop the runner once ``runs`` have ended, with ``astop``: Prefect's handler calls
            ``stop()``, which on the loop's thread only makes that coroutine. Its end ends
            ``start``, and with it ``main``: the process exits 0."""
            await flow_runs_ended(runs, FLOW_RUNS_STOP_SECONDS)
            await self.astop()

    # Every flow-run process it starts heartbeats as flowyard's CLI runs do, also when this module
    # is run by hand, with an environment that does not say so.
    runner = GracefulRunner(limit=limit, heartbeat_seconds=HEARTBEAT_SECONDS)
    signal.signal(signal.SIGINT, runner.handle_sigterm)
    return runner


def main() -> None:
    """What ``prefect.serve`` does, with :func:`graceful_runner`'s runner."""
    prefect_yaml = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("prefect.yaml")
    specs = read_deployments(prefect_yaml)
    runner = graceful_runner(limit=8)
    for spec in specs:
        runner.add_deployment(to_deployment(spec))
    print(f"serving {', '.join(spec.name for spec in specs)} from {prefect_yaml}", flush=True)
    asyncio.run(runner.start())


if __name__ == "__main__":
    exit_on_user_error(main, "flowyard serve")
