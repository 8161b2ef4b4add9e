"""Trigger deployments over the Prefect REST API and wait for their final state.

This is the same call a scheduler, a CI job or another service makes:
``POST /api/deployments/{id}/create_flow_run`` with parameters, then polling the run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import httpx

from tasks.errors import UserError

TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


@dataclass(frozen=True)
class FlowRunOutcome:
    id: str
    name: str
    state: str
    message: str | None


def _read_deployment(api_url: str, flow_name: str, deployment_name: str) -> httpx.Response:
    return httpx.get(f"{api_url}/deployments/name/{flow_name}/{deployment_name}", timeout=10)


def deployment_exists(api_url: str, flow_name: str, deployment_name: str) -> bool:
    try:
        return _read_deployment(api_url, flow_name, deployment_name).status_code == 200
    except httpx.HTTPError:
        return False


def deployment_id(api_url: str, flow_name: str, deployment_name: str) -> str:
    response = _read_deployment(api_url, flow_name, deployment_name)
    if response.status_code == 404:
        raise UserError(
            f"deployment {flow_name}/{deployment_name} not found at {api_url}; is `flowyard up` running?"
        )
    response.raise_for_status()
    return str(response.json()["id"])


def create_flow_run(api_url: str, flow_name: str, deployment_name: str, parameters: dict[str, Any]) -> str:
    """Create a flow run of a deployment; returns the flow run id. Text PostgreSQL cannot store
    (a NUL character, a surrogate) and NaN or ±Infinity are refused in one line before any
    request: the server's 500 for the text was retried for minutes, and httpx raised a ValueError
    traceback for the numbers (:func:`tasks.flow_parameters.unstorable_parameters`). Imported here:
    it imports Prefect, which `flowyard up` (importing this module) does without."""
    from tasks.flow_parameters import unstorable_parameters

    problems = unstorable_parameters(parameters)
    if problems:
        raise UserError(f"{flow_name}: {problems}")
    dep_id = deployment_id(api_url, flow_name, deployment_name)
    response = httpx.post(
        f"{api_url}/deployments/{dep_id}/create_flow_run", json={"parameters": parameters}, timeout=10
    )
    if response.status_code == 409 or response.status_code == 422:
        raise UserError(f"Prefect refused the parameters for {flow_name}/{deployment_name}: {_detail(response)}")
    response.raise_for_status()
    return str(response.json()["id"])


def _detail(response: httpx.Response) -> str:
    """What the API says is wrong: its JSON ``detail`` (a 409's sentence, a 422's list), else the body."""
    try:
        body = response.json()
    except ValueError:
        return response.text
    detail = body.get("detail") if isinstance(body, dict) else None
    return detail if isinstance(detail, str) else response.text


def wait_for_flow_run(api_url: str, flow_run_id: str, timeout: float = 600.0) -> FlowRunOutcome:
    """Poll the run until it reaches a terminal state (or ``timeout`` seconds pass)."""
    deadline = time.monotonic() + timeout
    while True:
        run = httpx.get(f"{api_url}/flow_runs/{flow_run_id}", timeout=10).json()
        state = run.get("state") or {}
        if state.get("type") in TERMINAL or time.monotonic() > deadline:
            return FlowRunOutcome(run["id"], run["name"], state.get("type", "UNKNOWN"), state.get("message"))
        time.sleep(1.0)


def run_deployment(
    api_url: str, flow_name: str, deployment_name: str, parameters: dict[str, Any], timeout: float = 600.0
) -> FlowRunOutcome:
    return wait_for_flow_run(
        api_url, create_flow_run(api_url, flow_name, deployment_name, parameters), timeout
    )
