"""prefect.yaml is the single source of truth for served deployments."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from deployments.serve import DeploymentSpec, read_deployments, to_deployment
from tasks import agent_queue as queue
from tasks.agent_process import agent_mark
from tasks.errors import UserError
from tasks.process_group import marked_pids
from tasks.state import state_url
from tests.conftest import ROOT
from tests.serve_support import serve_only_agent_queue, served_agent_queue_run


def test_every_declared_deployment_loads_its_flow():
    specs = read_deployments(ROOT / "prefect.yaml")
    names = {spec.name for spec in specs}
    assert {"deploy-migrations", "bulk-migrate", "online-migrate", "quality-check", "sync-devices"} <= names
    agent_queue = {
        "run-agent-queue",
        "agent-task-create",
        "agent-task-list",
        "agent-task-cancel",
        "agent-task-retry",
        "agent-task-submit",
        "agent-task-approve",
    }
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


CHATTY_AGENT = textwrap.dedent(
    """
    import json, signal, sys, threading, time
    json.loads(sys.stdin.readline())  # the task envelope
    out = threading.Lock()
    state = {"step": 0}
    noise = "chatter " + "x" * 1016

    def write(stream, line):
        with out:
            stream.write(line + "\\n")
            stream.flush()

    def checkpoint():
        write(sys.stdout, json.dumps({"kind": "checkpoint", "state": state}))

    def answer_checkpoint_requests():
        for line in sys.stdin:
            if json.loads(line).get("command") == "checkpoint":
                for _ in range(256):  # 256 KiB before the answer: more than a pipe holds
                    write(sys.stderr, noise)
                state["answered"] = True
                checkpoint()

    threading.Thread(target=answer_checkpoint_requests, daemon=True).start()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while True:
        state["step"] += 1
        if state["step"] <= 5:
            checkpoint()
        for _ in range(20):
            write(sys.stderr, noise)
            time.sleep(0.01)
    """
)
"""An agent writing ~100 KiB of stderr a second while it runs, and 256 KiB more when asked for a
checkpoint, before its answer: every line goes through the flow run's log to its console. It
checkpoints on its own for its first five steps only: the first checkpoint after the request ends
flowyard's wait for one, and a later step's, written while the answer's noise went out through a
slow pipe, ended the wait before the answer (and the agent's exit on SIGTERM lost it)."""


def _wait_chatting(url: str, task_id: int) -> queue.AgentTask:
    """Wait until the chatty agent has written well over a pipe's 64 KiB (five steps)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        task = queue.get_task(url, task_id)
        if task.worker and task.last_checkpoint and task.last_checkpoint["state"]["step"] >= 5:
            return task
        time.sleep(0.2)
    raise AssertionError(f"task {task_id} never got running: {queue.get_task(url, task_id)}")


def test_sigterm_lets_a_chatty_agent_checkpoint_before_the_server_exits(
    tmp_path: Path, fresh_db: str, prefect_api: str
) -> None:
    """The server keeps copying its flow runs' output while they stop: with the copying stalled,
    a run logging its agent's output filled its console pipe and blocked, and the agent's answer
    to the checkpoint request never reached the queue."""
    url = state_url(fresh_db)
    task_id = queue.create_task(url, queue.NewTask(title="chatty", agent_type="chatty"))
    parameters = {
        "database_url": url,
        "output_dir": str(tmp_path / "agents"),
        "max_agents": 1,
        "grace_seconds": 2,
        "agents": {"chatty": {"argv": [sys.executable, "-c", CHATTY_AGENT]}},
    }
    # at INFO, as under `flowyard up`: the agent's output and the stop sequence reach the console
    with served_agent_queue_run(tmp_path, prefect_api, parameters, {"PREFECT_LOGGING_LEVEL": "INFO"}) as (server, _):
        running = _wait_chatting(url, task_id)
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=120) == 0
    assert running.worker is not None
    assert marked_pids(agent_mark(running.worker, task_id)) == [], "no agent process survives the server"
    task = queue.get_task(url, task_id)
    assert task.status == "pending" and task.worker is None, task
    assert task.last_checkpoint is not None and task.last_checkpoint["kind"] == "graceful_shutdown"
    assert task.last_checkpoint["state"].get("answered") is True, "the agent's answer to the checkpoint request"


def test_a_signal_while_the_server_starts_ends_it_cleanly(tmp_path: Path, prefect_api: str) -> None:
    """Before its runner has started the server runs no flow run: it exits 0 at once."""
    argv = [sys.executable, "-m", "deployments.serve", str(serve_only_agent_queue(tmp_path))]
    with subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, start_new_session=True) as server:
        assert server.stdout is not None and server.stdout.readline().startswith(b"serving ")
        server.send_signal(signal.SIGINT)
        assert server.wait(timeout=60) == 0
