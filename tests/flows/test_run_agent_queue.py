"""run-agent-queue end to end: real Prefect server, real PostgreSQL, real agent subprocesses."""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, suppress
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from prefect.client.schemas.objects import State, StateType
from psycopg import sql

from flows.run_agent_queue import run_agent_queue
from tasks import agent_queue as queue
from tasks import services
from tasks.agent_execution import run_log_line
from tasks.agent_metrics import agent_metrics
from tasks.agent_process import DEFAULT_TEMPLATES, ENVELOPE_FILE, INLINE_ENVELOPE_LIMIT, agent_mark
from tasks.agent_protocol import parse_line
from tasks.cancel_watch import CancelWatch
from tasks.db import connection
from tasks.errors import UserError, control_character, printable
from tasks.prefect_runtime import SERVE
from tasks.process_group import group_members, marked_pids
from tasks.state import state_url
from tests.conftest import ROOT, Role, flow_run_artifacts, recorded_task_runs
from tests.fs_support import fill_up, immutable, small_tmpfs
from tests.outage_support import outage_proxy
from tests.process_support import GUARD_SECONDS, Told, until_its_sessions_end
from tests.serve_support import served_agent_queue_run

pytestmark = pytest.mark.usefixtures("prefect_api")


@pytest.fixture()
def qdb(fresh_db: str) -> str:
    return state_url(fresh_db)


def _new(title: str, payload: dict[str, Any], blocked_by: tuple[int, ...] = (), **kw: Any) -> queue.NewTask:
    return queue.NewTask(title=title, agent_type="reference", payload=payload, blocked_by=blocked_by, **kw)


def _runs(url: str) -> list[dict[str, Any]]:
    with connection(url) as conn:
        rows = conn.execute(
            "SELECT task_id, attempt, outcome, started_at, finished_at FROM flowyard.agent_runs ORDER BY id"
        ).fetchall()
    return [dict(zip(("task_id", "attempt", "outcome", "started", "finished"), r, strict=True)) for r in rows]


def _digest(task_id: int, steps: int) -> str:
    """The reference agent's uninterrupted SHA-256 chain (the oracle for resumed runs)."""
    digest = hashlib.sha256(str(task_id).encode()).hexdigest()
    for step in range(1, steps + 1):
        digest = hashlib.sha256(f"{digest}:{task_id}:{step}".encode()).hexdigest()
    return digest


def _kw(tmp_path: Path, url: str, **extra: Any) -> dict[str, Any]:
    return {"database_url": url, "output_dir": str(tmp_path / "agents"), **extra}


def test_dependencies_run_in_dag_order_and_logs_are_written(
    tmp_path: Path, qdb: str, prefect_api: str
) -> None:
    step = {"steps": 2, "sleep": 0.2}
    a = queue.create_task(qdb, _new("a", step, priority="low"))
    b = queue.create_task(qdb, _new("b", step, (a,), priority="critical"))
    c = queue.create_task(qdb, _new("c", step, (a,)))
    d = queue.create_task(qdb, _new("d", {**step, "artifact": True}, (b, c), priority="critical"))
    free = queue.create_task(qdb, _new("free", step, priority="low"))
    state = run_agent_queue(max_agents=3, return_state=True, **_kw(tmp_path, qdb))
    summary = state.result()
    assert summary["outcomes"] == {t: "completed" for t in (a, b, c, d, free)}
    runs = {r["task_id"]: r for r in _runs(qdb)}
    for child, deps in ((b, (a,)), (c, (a,)), (d, (b, c))):
        assert all(runs[child]["started"] >= runs[dep]["finished"] for dep in deps), (child, deps)
    assert queue.get_task(qdb, d).result["digest"] == _digest(d, 2)
    log = [
        json.loads(line) for line in (tmp_path / "agents" / "logs" / f"{d}.jsonl").read_text().splitlines()
    ]
    assert [r["state"]["step"] for r in log if r["kind"] == "checkpoint"] == [1, 2]
    assert {"artifact", "result", "progress"} <= {r["kind"] for r in log}
    found = {a.key: a for a in flow_run_artifacts(state)}
    assert {f"reference-agent-{d}", "agent-metrics"} <= set(found)
    assert _digest(d, 2) in str(found[f"reference-agent-{d}"].data)
    metrics = {m["agent_type"]: m for m in summary["metrics"]}
    assert metrics["reference"]["tasks_completed"] == 5 and metrics["reference"]["error_rate"] == 0.0
    # The DAG shows in the UI: each dependent's task run waited for its dependencies' runs, also
    # where a dependency's agent was done (its slot free, the dependent claimed) while Prefect
    # was still ending its task run.
    task_runs = {int(r.name.split("-")[1]): r for r in recorded_task_runs(state, "agent-", 5)}
    for child, deps in ((b, (a,)), (c, (a,)), (d, (b, c))):
        waited = {str(i.id) for i in task_runs[child].task_inputs.get("wait_for", [])}
        assert waited == {str(task_runs[dep].id) for dep in deps}, (child, deps)


@contextmanager
def _run_logs_at_info() -> Iterator[None]:
    """The tests run Prefect at WARNING; agent output reaches the run log at INFO, as under
    ``flowyard up``."""
    import logging

    task_runs = logging.getLogger("prefect.task_runs")
    previous = task_runs.level
    task_runs.setLevel(logging.INFO)
    try:
        yield
    finally:
        task_runs.setLevel(previous)


def test_every_agent_message_reaches_the_prefect_run_log(tmp_path: Path, qdb: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    ids = [queue.create_task(qdb, _new(f"logged {i}", {"steps": 2, "sleep": 0.1})) for i in range(2)]
    with _run_logs_at_info():
        state = run_agent_queue(max_agents=2, return_state=True, **_kw(tmp_path, qdb))
        APILogWorker.drain_all(timeout=30)
    assert set(state.result()["outcomes"].values()) == {"completed"}
    log_filter = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[state.state_details.flow_run_id]))
    with get_client(sync_client=True) as client:
        run_log = "\n".join(record.message for record in client.read_logs(log_filter=log_filter))
    for task_id in ids:
        messages = [
            json.loads(line) for line in (tmp_path / "agents" / "logs" / f"{task_id}.jsonl").read_text().splitlines()
        ]
        assert [m["kind"] for m in messages].count("checkpoint") == 2
        for m in messages:  # every line of the file is in the run log, as its task and stream show it
            fields = {k: v for k, v in m.items() if k not in ("ts", "task_id", "attempt", "stream")}
            assert run_log_line(task_id, m["stream"], parse_line(json.dumps(fields)))[1] in run_log, m
        assert f'"digest":"{_digest(task_id, 2)}"' in run_log


def test_concurrency_limit_is_respected(tmp_path: Path, qdb: str) -> None:
    ids = [queue.create_task(qdb, _new(f"t{i}", {"steps": 2, "sleep": 0.4})) for i in range(6)]
    run_agent_queue(max_agents=2, **_kw(tmp_path, qdb))
    runs = _runs(qdb)
    assert sorted(r["task_id"] for r in runs) == ids
    events = sorted([(r["started"], 1) for r in runs] + [(r["finished"], -1) for r in runs])
    level, peak = 0, 0
    for _, delta in events:
        level += delta
        peak = max(peak, level)
    assert peak == 2, f"at most 2 agents at once, and the limit was used: peak {peak}"


def test_a_retry_waits_out_its_delay_without_holding_an_agent_slot(tmp_path: Path, qdb: str) -> None:
    """A task's slot is freed as soon as its attempt is recorded, before Prefect ends its task run,
    also after an attempt Prefect will retry: that one kept its slot through the retry delay, and
    with one agent the ready task waited behind it while the slot idled. The ready task runs in the
    delay now, and the retry waits for the slot: never two agents at once."""
    crashy = queue.create_task(qdb, _new("crashy", {"steps": 2, "crash_after": 1}, priority="critical"))
    other = queue.create_task(qdb, _new("other", {"steps": 1}, priority="low"))
    summary = run_agent_queue(max_agents=1, **_kw(tmp_path, qdb))
    assert summary["outcomes"] == {crashy: "completed", other: "completed"}
    runs = sorted(_runs(qdb), key=lambda r: r["started"])
    assert [(r["task_id"], r["attempt"]) for r in runs] == [(crashy, 1), (other, 1), (crashy, 2)]
    assert all(later["started"] >= earlier["finished"] for earlier, later in itertools.pairwise(runs))


def test_agent_crash_is_retried_from_its_checkpoint(tmp_path: Path, qdb: str) -> None:
    task_id = queue.create_task(qdb, _new("crashy", {"steps": 4, "crash_after": 2}))
    state = run_agent_queue(max_agents=1, return_state=True, **_kw(tmp_path, qdb))
    assert state.result()["outcomes"] == {task_id: "completed"}
    task = queue.get_task(qdb, task_id)
    assert task.attempts == 2
    assert _task_run_results(state, tasks=1) == [
        {
            "task_id": task_id,
            "attempt": 2,
            "outcome": "completed",
            "result": task.result,
            "checkpoint": {"step": 4, "digest": _digest(task_id, 4)},
        }
    ]
    assert task.result == {"digest": _digest(task_id, 4), "steps": 4, "resumed_from": 2}
    assert [(r["attempt"], r["outcome"]) for r in _runs(qdb)] == [(1, "failed"), (2, "completed")]
    history = queue.checkpoint_history(qdb, task_id)
    assert [(h["attempt"], h["state"]["step"]) for h in history] == [(1, 1), (1, 2), (2, 3), (2, 4)]
    metrics = {m["agent_type"]: m for m in state.result()["metrics"]}["reference"]
    # one task, completed: its crashed first attempt is an attempt, not a failed task
    assert (metrics["tasks_completed"], metrics["tasks_failed"], metrics["error_rate"]) == (1, 0, 0.0)
    assert metrics["attempts"] == 2


LARGE_CHECKPOINT_AGENT = textwrap.dedent(
    """
    import json, os, sys

    text = os.environ["FLOWYARD_TASK"]
    if text.startswith("@"):  # too large for the variable: the envelope is in that file
        with open(text[1:]) as file:
            text = file.read()
    checkpoint = json.loads(text)["checkpoint"]
    if checkpoint is None:
        print(json.dumps({"kind": "checkpoint", "state": {"notes": "n" * 200_000}}), flush=True)
        sys.exit(3)
    print(json.dumps({"kind": "result", "data": {"resumed_with": len(checkpoint["state"]["notes"])}}))
    """
)


def test_a_checkpoint_too_large_for_the_environment_is_handed_back_on_retry(tmp_path: Path, qdb: str) -> None:
    """A 200 kB checkpoint cannot ride in FLOWYARD_TASK (Linux: 128 KiB per variable), so the
    retry gets it through a file instead of failing to start for good."""
    task_id = queue.create_task(qdb, queue.NewTask(title="large checkpoint", agent_type="large"))
    agents = {"large": {"argv": [sys.executable, "-c", LARGE_CHECKPOINT_AGENT], "delivery": "env"}}
    summary = run_agent_queue(max_agents=1, agents=agents, retries=1, **_kw(tmp_path, qdb))
    assert summary["outcomes"] == {task_id: "completed"}
    assert queue.get_task(qdb, task_id).result == {"resumed_with": 200_000}
    assert [(r["attempt"], r["outcome"]) for r in _runs(qdb)] == [(1, "failed"), (2, "completed")]


PHASE_AGENT = textwrap.dedent(
    """
    import json, sys

    checkpoint = json.loads(sys.stdin.readline())["checkpoint"]
    if checkpoint is None:  # first attempt: a checkpoint, then a crash
        print(json.dumps({"kind": "checkpoint", "state": {"phase": "built", "files": 3}}), flush=True)
        sys.exit(3)
    # resumed: the last phase needs no checkpoint of its own
    print(json.dumps({"kind": "result", "data": {"resumed_from": checkpoint["state"]["phase"]}}))
    """
)


def test_the_task_runs_result_keeps_the_checkpoint_its_attempt_resumed_from(tmp_path: Path, qdb: str) -> None:
    """The Prefect result of ``run-agent`` is the task's outcome and last checkpoint. An attempt
    that resumed and finished without a checkpoint of its own left ``checkpoint: None`` there,
    though the task's last checkpoint is the one it was handed back."""
    task_id = queue.create_task(qdb, queue.NewTask(title="phases", agent_type="phases"))
    agents = {"phases": {"argv": [sys.executable, "-c", PHASE_AGENT]}}
    state = run_agent_queue(max_agents=1, agents=agents, retries=1, return_state=True, **_kw(tmp_path, qdb))
    assert state.result()["outcomes"] == {task_id: "completed"}
    task = queue.get_task(qdb, task_id)
    assert task.result == {"resumed_from": "built"}
    assert task.last_checkpoint == {"attempt": 1, "kind": "agent", "state": {"phase": "built", "files": 3}}
    (result,) = _task_run_results(state, tasks=1)
    assert (result["attempt"], result["outcome"]) == (2, "completed")
    assert result["checkpoint"] == task.last_checkpoint["state"], result


NAN_CHECKPOINT_AGENT = textwrap.dedent(
    """
    import json

    print(json.dumps({"kind": "checkpoint", "state": {"step": 1, "loss": float("nan")}}), flush=True)
    print(json.dumps({"kind": "checkpoint", "state": {"step": 2, "loss": 0.5}}), flush=True)
    print(json.dumps({"kind": "result", "data": {"ok": True}}), flush=True)
    """
)


def test_a_checkpoint_holding_nan_is_kept_as_a_raw_log_line(tmp_path: Path, qdb: str) -> None:
    """Python's json.dumps writes NaN, which PostgreSQL refuses: the line is protocol garbage, kept
    in the log, and the task goes on instead of failing on the database's error."""
    task_id = queue.create_task(qdb, queue.NewTask(title="nan", agent_type="nan"))
    agents = {"nan": {"argv": [sys.executable, "-c", NAN_CHECKPOINT_AGENT]}}
    summary = run_agent_queue(max_agents=1, agents=agents, retries=0, **_kw(tmp_path, qdb))
    assert summary["outcomes"] == {task_id: "completed"}
    assert queue.get_task(qdb, task_id).result == {"ok": True}
    assert [h["state"] for h in queue.checkpoint_history(qdb, task_id)] == [{"step": 2, "loss": 0.5}]
    log_file = tmp_path / "agents" / "logs" / f"{task_id}.jsonl"
    log = [json.loads(line) for line in log_file.read_text().splitlines()]
    raw = [r["message"] for r in log if r.get("level") == "raw"]
    assert raw == ['{"kind": "checkpoint", "state": {"step": 1, "loss": NaN}}']


NUL_AGENT = textwrap.dedent(
    """
    import json
    import sys

    def say(**message):
        print(json.dumps(message), flush=True)

    say(kind="checkpoint", state={"step": 1, "bytes": "a\\x00b"})
    say(kind="checkpoint", state={"step": 2})
    sys.stdout.write("binary \\x00 junk\\n")
    say(kind="result", data={"out": "a\\x00b"})
    say(kind="result", data={"ok": True})
    """
)


def test_a_checkpoint_or_result_holding_a_nul_character_is_kept_as_a_raw_log_line(
    tmp_path: Path, qdb: str
) -> None:
    """``\\u0000`` is valid JSON that PostgreSQL cannot store: such a checkpoint failed the task at
    once, and such a result every attempt after the agent had done its work, each on the database's
    multi-line error. Now they are protocol garbage like NaN, and the task goes on."""
    task_id = queue.create_task(qdb, queue.NewTask(title="nul", agent_type="nul"))
    agents = {"nul": {"argv": [sys.executable, "-c", NUL_AGENT]}}
    summary = run_agent_queue(max_agents=1, agents=agents, retries=0, **_kw(tmp_path, qdb))
    assert summary["outcomes"] == {task_id: "completed"}
    assert queue.get_task(qdb, task_id).result == {"ok": True}
    assert [h["state"] for h in queue.checkpoint_history(qdb, task_id)] == [{"step": 2}]
    log_file = tmp_path / "agents" / "logs" / f"{task_id}.jsonl"
    log = [json.loads(line) for line in log_file.read_text().splitlines()]
    raw = [r["message"] for r in log if r.get("level") == "raw"]
    assert [json.loads(m)["kind"] if m.startswith("{") else m for m in raw] == [
        "checkpoint",
        "binary \x00 junk",  # not JSON at all: logged as it came, as before
        "result",
    ]


NAN_EVERYWHERE_AGENT = textwrap.dedent(
    """
    import json

    def say(**message):
        print(json.dumps(message), flush=True)

    say(kind="log", message="epoch 1", loss=float("nan"))
    say(kind="progress", percent=50, eta=float("inf"))
    say(kind="artifact", key="losses", type="table", data=[{"epoch": 1, "loss": float("nan")}])
    say(kind="artifact", key="summary", type="markdown", data="# done")
    say(kind="result", data={"ok": True})
    """
)


def _strict_json(line: str) -> Any:
    def refuse(token: str) -> None:
        raise ValueError(f"{token} is not JSON")

    return json.loads(line, parse_constant=refuse)


def test_nan_in_any_agent_message_reaches_neither_the_logs_nor_an_artifact(tmp_path: Path, qdb: str) -> None:
    """Log extras and artifact data holding NaN or Infinity are protocol garbage like such a
    checkpoint: kept as raw log lines, the task's .jsonl log stays JSON, and no artifact is made of
    them (rather than one whose numbers silently became null)."""
    task_id = queue.create_task(qdb, queue.NewTask(title="nan", agent_type="nan"))
    agents = {"nan": {"argv": [sys.executable, "-c", NAN_EVERYWHERE_AGENT]}}
    state = run_agent_queue(max_agents=1, agents=agents, retries=0, return_state=True, **_kw(tmp_path, qdb))
    assert state.result()["outcomes"] == {task_id: "completed"}
    log_file = tmp_path / "agents" / "logs" / f"{task_id}.jsonl"
    log = [_strict_json(line) for line in log_file.read_text().splitlines()]
    raw = [r["message"] for r in log if r.get("level") == "raw"]
    assert [_strict_json(line.replace("NaN", "null").replace("Infinity", "null")) for line in raw] == [
        {"kind": "log", "message": "epoch 1", "loss": None},
        {"kind": "progress", "percent": 50, "eta": None},
        {"kind": "artifact", "key": "losses", "type": "table", "data": [{"epoch": 1, "loss": None}]},
    ]
    assert {a.key for a in flow_run_artifacts(state)} >= {"summary"}
    assert "losses" not in {a.key for a in flow_run_artifacts(state)}


def _task_run_results(flow_state: Any, tasks: int) -> list[Any]:
    """The persisted results of a flow run's completed ``run-agent`` task runs (one per queue
    task, retries included), read back through the API once all ``tasks`` are recorded."""
    runs = recorded_task_runs(flow_state, "agent-", tasks)
    return [r.state.result() for r in runs if r.state.is_completed()]


def test_failed_dependency_stops_dependents_and_says_why(tmp_path: Path, qdb: str) -> None:
    bad = queue.create_task(qdb, _new("bad", {"fail": "cannot reach repo"}))
    child = queue.create_task(qdb, _new("child", {"steps": 1}, (bad,)))
    summary = run_agent_queue(max_agents=2, retries=1, **_kw(tmp_path, qdb))
    assert summary["outcomes"][bad].startswith("failed")
    assert child not in summary["outcomes"]
    assert summary["blocked"] == {child: f"not run: dependency #{bad} 'bad' is failed"}
    task = queue.get_task(qdb, child)
    assert task.status == "pending" and task.attempts == 0 and "'bad' is failed" in task.blocked_reason
    # the agent's own error, not Prefect's "Task run encountered an exception AgentFailed: …"
    assert queue.get_task(qdb, bad).error == f"task {bad} attempt 1: agent exited with code 1: cannot reach repo (not retryable)"
    # The reference agent reports this error as not retryable: one attempt, despite retries=1.
    assert queue.get_task(qdb, bad).attempts == 1
    metrics = {m["agent_type"]: m for m in summary["metrics"]}
    assert metrics["reference"]["tasks_failed"] == 1 and metrics["reference"]["error_rate"] == 1.0


RETRY_ELSEWHERE_AGENT = textwrap.dedent(
    """
    import os, sys, time

    sys.path.insert(0, os.environ["FLOWYARD_ROOT"])
    from tasks import agent_queue as queue

    url, dependency = os.environ["QUEUE_URL"], int(os.environ["DEPENDENCY"])
    if os.environ.get("IN_RETRY_DELAY"):  # its failed attempt is recorded: a person cancels it meanwhile
        open(os.environ["IN_RETRY_DELAY"], "w").close()  # ready: the dependency's agent may fail now
        while queue.get_task(url, dependency).error is None:
            time.sleep(0.02)
        queue.cancel_task(url, dependency)
    while queue.get_task(url, dependency).status not in ("failed", "cancelled"):
        time.sleep(0.05)
    # a person retries the failed (or cancelled) dependency, and another worker completes it
    queue.retry_task(url, dependency)
    queue.claim_ready(url, "other-worker", 1, ["fails"])
    attempt = queue.start_attempt(url, dependency, "other-worker", None)
    queue.finish_attempt(url, attempt.run_id, "other-worker", "completed", result={"by": "other"})
    """
)


def test_a_dependency_that_failed_in_the_run_then_completed_elsewhere_lets_its_dependent_run(
    tmp_path: Path, qdb: str
) -> None:
    """The dependency's failed task run was the dependent's ``wait_for``: Prefect then left the
    dependent NotReady without running it, and the run failed a task whose dependency had
    completed. The database says when a task is ready; only completed runs become DAG edges."""
    dependency = queue.create_task(qdb, queue.NewTask(title="flaky", agent_type="fails", priority="critical"))
    helper = queue.create_task(qdb, queue.NewTask(title="retry it elsewhere", agent_type="elsewhere"))
    dependent = queue.create_task(
        qdb, queue.NewTask(title="after", agent_type="ok", blocked_by=(dependency,))
    )
    env = {
        "FLOWYARD_ROOT": str(Path(__file__).resolve().parents[2]),
        "QUEUE_URL": qdb,
        "DEPENDENCY": str(dependency),
    }
    agents = {
        "fails": {"argv": [sys.executable, "-c", "raise SystemExit(3)"]},
        "elsewhere": {"argv": [sys.executable, "-c", RETRY_ELSEWHERE_AGENT], "env": env},
        "ok": {"argv": [sys.executable, "-c", 'print(\'{"kind": "result", "data": {"ran": true}}\')']},
    }
    summary = run_agent_queue(max_agents=2, agents=agents, retries=0, **_kw(tmp_path, qdb))
    assert summary["outcomes"][dependency].startswith("failed")
    assert summary["outcomes"][helper] == summary["outcomes"][dependent] == "completed"
    assert queue.get_task(qdb, dependent).result == {"ran": True}


def test_a_dependency_completed_elsewhere_during_its_retry_delay_lets_the_worker_run_its_dependent(
    tmp_path: Path, qdb: str
) -> None:
    """The dependency's first attempt fails; in Prefect's retry delay it is cancelled, retried and
    completed by another worker, and the run claims its dependent. The loop waited for the
    dependency's task run inside that claim, and the retry waited for a slot the claim held: the
    worker hung for good. The retry of a task completed elsewhere starts no agent and takes no slot.

    Only a claim made within Prefect's 1 s retry delay can hang: a machine slow enough to claim the
    dependent after the retry ran passed the test without it: it is skipped unless the retry's
    ``Retrying`` state, which Prefect sets as the delay ends, comes after the claim (the dependent's
    ``started_at``)."""
    dependency = queue.create_task(qdb, queue.NewTask(title="flaky", agent_type="fails", priority="critical"))
    helper = queue.create_task(qdb, queue.NewTask(title="retry it elsewhere", agent_type="elsewhere"))
    dependent = queue.create_task(
        qdb, queue.NewTask(title="after", agent_type="ok", blocked_by=(dependency,))
    )
    ready = tmp_path / "helper ready"
    env = {
        "FLOWYARD_ROOT": str(ROOT),
        "QUEUE_URL": qdb,
        "DEPENDENCY": str(dependency),
        "IN_RETRY_DELAY": str(ready),
    }
    fail_once_ready = (  # fails once the helper is ready to act in the retry delay
        "import os, sys, time\nwhile not os.path.exists(sys.argv[1]): time.sleep(0.02)\nsys.exit(3)"
    )
    agents = {
        "fails": {"argv": [sys.executable, "-c", fail_once_ready, str(ready)]},
        "elsewhere": {"argv": [sys.executable, "-c", RETRY_ELSEWHERE_AGENT], "env": env},
        "ok": {"argv": [sys.executable, "-c", 'print(\'{"kind": "result", "data": {"ran": true}}\')']},
    }
    start = [sys.executable, "-c", _WORKER, qdb, str(tmp_path / "agents"), "2", json.dumps(agents)]
    worker = subprocess.Popen(start, cwd=ROOT)
    try:
        assert worker.wait(timeout=GUARD_SECONDS) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    assert queue.get_task(qdb, dependency).result == {"by": "other"}
    assert queue.get_task(qdb, helper).status == "completed"
    assert queue.get_task(qdb, dependent).result == {"ran": True}
    # the retry here started no attempt: its first one failed, and the other worker's completed
    attempts = [(r["attempt"], r["outcome"]) for r in _runs(qdb) if r["task_id"] == dependency]
    assert attempts == [(1, "failed"), (2, "completed")]
    claimed_at = queue.get_task(qdb, dependent).started_at
    retried_at = _retry_started_at(qdb, dependency)
    assert claimed_at is not None
    if retried_at <= claimed_at:  # a machine too slow for the window: nothing was proved, say so
        pytest.skip(f"the retry started at {retried_at:%H:%M:%S.%f}, before the dependent's claim at {claimed_at:%H:%M:%S.%f}")


def _retry_started_at(url: str, task_id: int) -> datetime:
    """When the task's retry in the flow run of its first attempt started: its ``Retrying`` state,
    which Prefect sets as the retry delay ends, just before the retry runs."""
    from prefect.client.orchestration import get_client

    with connection(url) as conn:
        row = conn.execute(
            "SELECT flow_run_id FROM flowyard.agent_runs WHERE task_id = %s AND attempt = 1", (task_id,)
        ).fetchone()
    assert row is not None
    [task_run] = recorded_task_runs(_flow_run_state(row[0]), f"agent-{task_id}-", 1)
    with get_client(sync_client=True) as client:
        states = client.read_task_run_states(task_run.id)
    [retrying] = [state for state in states if state.name == "Retrying"]
    return retrying.timestamp


def test_the_run_artifact_escapes_control_characters_in_an_agents_error(tmp_path: Path, qdb: str) -> None:
    """A tab or a terminal escape in an agent's error is escaped in the run's artifact, as `queue run`
    prints it, and kept raw in the returned outcome."""
    task_id = queue.create_task(qdb, _new("bad", {"fail": "bad\tinput \x1b[31mred\x1b[0m"}))
    state = run_agent_queue(retries=0, return_state=True, **_kw(tmp_path, qdb))
    outcome = state.result()["outcomes"][task_id]
    assert "bad\tinput \x1b[31mred" in outcome
    rows = _table({a.key: a for a in flow_run_artifacts(state)}["agent-queue-run"])
    assert rows == [{"task_id": task_id, "outcome": printable(outcome)}]
    assert "bad\\tinput \\x1b[31mred" in rows[0]["outcome"] and control_character(rows[0]["outcome"]) is None


def test_workdir_escape_fails_the_task_with_a_clear_error(tmp_path: Path, qdb: str) -> None:
    task_id = queue.create_task(qdb, _new("escape", {"steps": 1}, workdir="../../etc"))
    summary = run_agent_queue(max_agents=1, **_kw(tmp_path, qdb))
    assert "outside the agent output directory" in summary["outcomes"][task_id]
    task = queue.get_task(qdb, task_id)
    assert task.status == "failed" and task.attempts == 0


def test_a_workdir_through_a_symlink_loop_fails_the_task_once_without_retries(tmp_path: Path, qdb: str) -> None:
    """A symlink loop in the run's output directory (one ``queue create`` could not see: it checks
    against the default directory) fails the task at once with one line, as any workdir the run
    refuses: it burned every retry on a RuntimeError from path resolution."""
    out = tmp_path / "agents"
    out.mkdir()
    (out / "loop").symlink_to(out / "loop")
    task_id = queue.create_task(qdb, _new("looped", {"steps": 1}, workdir="loop/sub"))
    state = run_agent_queue(max_agents=1, retries=2, return_state=True, **_kw(tmp_path, qdb))
    (task_run,) = recorded_task_runs(state, "agent-", 1)
    assert task_run.run_count == 1
    task = queue.get_task(qdb, task_id)
    assert task.status == "failed" and task.attempts == 0
    outcome = state.result()["outcomes"][task_id]
    assert f"working directory 'loop/sub' of task {task_id} (" in outcome and ") runs into a symlink loop; " in outcome
    assert "\n" not in outcome


@pytest.mark.parametrize("workdir", [".", "logs"])
def test_a_workdir_shared_with_all_tasks_or_the_logs_fails_the_task(tmp_path: Path, qdb: str, workdir: str) -> None:
    """A task created past the CLI's check (or before it existed) still never runs its agent in the
    output directory itself or among the task logs."""
    task_id = queue.create_task(qdb, _new("shared", {"steps": 1}, workdir=workdir))
    summary = run_agent_queue(max_agents=1, **_kw(tmp_path, qdb))
    assert f"working directory {workdir!r} of task {task_id} resolves to" in summary["outcomes"][task_id]
    task = queue.get_task(qdb, task_id)
    assert task.status == "failed" and task.attempts == 0
    assert not (tmp_path / "agents" / "result.txt").exists()
    assert not (tmp_path / "agents" / "logs" / "result.txt").exists()


@pytest.mark.parametrize("lease", [0.0, 5.0, 14.9])
def test_a_lease_live_workers_could_not_keep_fails_the_run_before_anything_is_claimed(
    tmp_path: Path, qdb: str, lease: float
) -> None:
    """Heartbeats come every 5 s: with a shorter lease (or one without room for a late heartbeat),
    which this run's tasks are judged by, other runs would take them for abandoned ones and start
    them again."""
    task_id = queue.create_task(qdb, _new("untouched", {"steps": 1}))
    with pytest.raises(UserError) as raised:
        run_agent_queue(max_agents=1, lease_seconds=lease, **_kw(tmp_path, qdb))
    assert str(raised.value) == (
        f"the lease must be at least 15 seconds (3 heartbeats of 5 s), not {lease:g} (--lease / lease_seconds): "
        "with a shorter one, other runs take this run's live tasks for abandoned ones"
    )
    task = queue.get_task(qdb, task_id)
    assert (task.status, task.attempts) == ("pending", 0) and _runs(qdb) == []


def test_a_lease_of_nan_is_refused_before_the_flow_run_is_created(tmp_path: Path, qdb: str) -> None:
    """The body refused it, but only once Prefect had recorded the run with a lease of null."""
    task_id = queue.create_task(qdb, _new("untouched", {"steps": 1}))
    with pytest.raises(UserError) as raised:
        run_agent_queue(max_agents=1, lease_seconds=float("nan"), **_kw(tmp_path, qdb))
    assert str(raised.value) == (
        "run-agent-queue: parameter lease_seconds is NaN: not a finite number, which JSON cannot hold (the flow"
        " run would record null); give a finite number"
    )
    task = queue.get_task(qdb, task_id)
    assert (task.status, task.attempts) == ("pending", 0) and _runs(qdb) == []


def test_an_attempt_records_the_lease_its_worker_runs_with(tmp_path: Path, qdb: str) -> None:
    task_id = queue.create_task(qdb, _new("leased", {"steps": 1}))
    run_agent_queue(max_agents=1, lease_seconds=45.0, **_kw(tmp_path, qdb))
    with connection(qdb) as conn:
        leases = conn.execute("SELECT lease_seconds FROM flowyard.agent_runs WHERE task_id = %s", (task_id,))
        assert [row[0] for row in leases] == [45.0]


def test_a_run_analyses_queue_tables_that_were_never_analysed_before_it_claims(tmp_path: Path, qdb: str) -> None:
    """Without statistics the planner sorted every pending task for each claim: the run gives the
    tables theirs before its first claim (here it claims none)."""
    queue.create_task(qdb, _new("waits", {"steps": 1}))
    run_agent_queue(max_agents=1, **_kw(tmp_path, qdb, max_tasks=0))
    with connection(qdb) as conn:
        analysed = conn.execute(
            "SELECT relname FROM pg_stat_user_tables WHERE schemaname = 'flowyard' "
            "AND relname IN ('agent_tasks', 'agent_task_blocks') AND last_analyze IS NOT NULL ORDER BY relname"
        ).fetchall()
    assert analysed == [("agent_task_blocks",), ("agent_tasks",)]


def test_a_worker_on_an_older_server_runs_the_dag_with_its_retry_and_says_why_it_may_not_analyse(
    tmp_path: Path, older_limited_role: Role, older_db: str
) -> None:
    """The queue on the oldest major flowyard is tested on (14-17; below 17 no MAINTAIN privilege),
    its state reached the way a DBA sets a worker up: a role granted the queue tables, which owns
    neither them nor the database. Dependencies run in order, the crash is retried from its
    checkpoint, and the tables it may not analyse are named with the fix that server has."""
    qdb = state_url(older_db)
    crashy = queue.create_task(qdb, _new("crashy", {"steps": 2, "crash_after": 1}))
    after = queue.create_task(qdb, _new("after", {"steps": 1}, (crashy,)))
    role = sql.Identifier(older_limited_role.name)
    with connection(qdb) as conn:
        conn.execute(sql.SQL("GRANT USAGE ON SCHEMA flowyard TO {}").format(role))
        conn.execute(sql.SQL("GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA flowyard TO {}").format(role))
        conn.execute(sql.SQL("GRANT USAGE ON ALL SEQUENCES IN SCHEMA flowyard TO {}").format(role))
        maintain = conn.info.server_version >= 170000
    told = Told("could not analyse")
    logger = logging.getLogger("prefect.flow_runs")
    logger.addHandler(told)
    try:
        summary = run_agent_queue(max_agents=2, **_kw(tmp_path, older_limited_role.url(qdb)))
    finally:
        logger.removeHandler(told)
    assert summary["outcomes"] == {crashy: "completed", after: "completed"}
    runs = _runs(qdb)
    assert [(r["task_id"], r["attempt"], r["outcome"]) for r in runs] == [
        (crashy, 1, "failed"), (crashy, 2, "completed"), (after, 1, "completed")
    ]  # fmt: skip
    assert runs[2]["started"] >= runs[1]["finished"]
    assert queue.get_task(qdb, crashy).result == {"digest": _digest(crashy, 2), "steps": 2, "resumed_from": 1}
    fix = "GRANT MAINTAIN ON TABLE" if maintain else "run the worker as their owner (before PostgreSQL 17"
    assert told.message.startswith("could not analyse flowyard.agent_task_blocks, flowyard.agent_tasks: role ")
    assert fix in told.message


def test_a_drain_without_the_tasks_agent_type_leaves_it_for_one_that_has_it(tmp_path: Path, qdb: str) -> None:
    """The scheduled drain knows only the built-in agents: it must not fail a task of another type."""
    task_id = queue.create_task(qdb, queue.NewTask(title="custom", agent_type="coder", payload={"steps": 1}))
    summary = run_agent_queue(max_agents=1, **_kw(tmp_path, qdb))
    assert task_id not in summary["outcomes"] and "no 'coder' agent" in summary["waiting"][task_id]
    task = queue.get_task(qdb, task_id)
    assert task.status == "pending" and task.attempts == 0
    coder = DEFAULT_TEMPLATES["reference"].model_dump()
    summary = run_agent_queue(max_agents=1, agents={"coder": coder}, **_kw(tmp_path, qdb))
    assert summary["outcomes"][task_id] == "completed" and summary["waiting"] == {}


def test_an_agent_that_cannot_start_fails_its_attempt_at_once(tmp_path: Path, qdb: str) -> None:
    missing = str(tmp_path / "no-such-agent")
    task_id = queue.create_task(qdb, queue.NewTask(title="missing", agent_type="ghost"))
    summary = run_agent_queue(max_agents=1, agents={"ghost": {"argv": [missing]}}, **_kw(tmp_path, qdb))
    message = f"cannot start agent {missing!r} for task {task_id}: No such file or directory"
    assert summary["outcomes"][task_id] == f"failed: {message}"
    task = queue.get_task(qdb, task_id)
    assert task.status == "failed" and task.attempts == 1
    assert task.error == message, "one sentence: no 'UserError: ' before it, the path named once"
    assert [(r["attempt"], r["outcome"]) for r in _runs(qdb)] == [(1, "failed")]
    assert _runs(qdb)[0]["finished"] is not None


def _wait_running(url: str, task_id: int, min_step: int = 1, timeout: float = 120.0) -> queue.AgentTask:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        task = queue.get_task(url, task_id)
        if task.agent_pgid and task.last_checkpoint and task.last_checkpoint["state"]["step"] >= min_step:
            return task
        time.sleep(0.2)
    raise AssertionError(f"task {task_id} never got running: {queue.get_task(url, task_id)}")


def _assert_gracefully_stopped(url: str, task_id: int, pgid: int) -> None:
    assert group_members(pgid) == [], "no process of the agent's group survives"
    task = queue.get_task(url, task_id)
    assert task.status == "pending" and task.worker is None, task
    kinds = [h["kind"] for h in queue.checkpoint_history(url, task_id)]
    assert kinds[-1] == "graceful_shutdown"
    assert task.last_checkpoint["kind"] == "graceful_shutdown"
    assert task.last_checkpoint["state"]["step"] >= 1


def _children(logs: Path, task_id: int) -> list[int]:
    lines = [json.loads(x) for x in (logs / f"{task_id}.jsonl").read_text().splitlines()]
    return [
        int(r["message"].rsplit(" ", 1)[1]) for r in lines if r.get("message", "").startswith("spawned child")
    ]


LONG = {"steps": 1000, "sleep": 0.1, "spawn_child": True, "detach_child": True}
"""A reference-agent payload that runs until stopped, with a child process in its group and one
that left it (a session of its own, as ``setsid`` or Node's ``detached`` does)."""


def _running_with_children(tmp_path: Path, qdb: str, task_id: int) -> tuple[queue.AgentTask, list[int]]:
    """Wait until the long task's agent has checkpointed; return the task and its children's pids."""
    running = _wait_running(qdb, task_id)
    children = _children(tmp_path / "agents" / "logs", task_id)
    assert len(children) == 2, "the agent spawned both children before its first checkpoint"
    return running, children


def _shorten(qdb: str, task_id: int, steps: int) -> None:
    """Make a long task finish right after it resumes (same task, same checkpoint)."""
    with connection(qdb) as conn:
        conn.execute(
            "UPDATE flowyard.agent_tasks SET payload = jsonb_build_object('steps', %s::int) WHERE id = %s",
            (steps, task_id),
        )


_WORKER = textwrap.dedent(
    """
    import json, sys
    from flows.run_agent_queue import run_agent_queue
    max_agents = int(sys.argv[3]) if len(sys.argv) > 3 else 2
    agents = json.loads(sys.argv[4]) if len(sys.argv) > 4 else None
    run_agent_queue(
        max_agents=max_agents,
        database_url=sys.argv[1],
        output_dir=sys.argv[2],
        grace_seconds=float(sys.argv[5]) if len(sys.argv) > 5 else 2,
        agents=agents,
    )
    """
)


def test_sigterm_to_the_worker_checkpoints_and_leaves_no_orphans(tmp_path: Path, qdb: str) -> None:
    task_id = queue.create_task(qdb, _new("long", LONG))
    stubborn = queue.create_task(qdb, _new("stubborn", {**LONG, "ignore_term": True}))
    worker = subprocess.Popen([sys.executable, "-c", _WORKER, qdb, str(tmp_path / "agents")], cwd=ROOT)
    running = [_wait_running(qdb, t) for t in (task_id, stubborn)]
    children = [pid for t in (task_id, stubborn) for pid in _children(tmp_path / "agents" / "logs", t)]
    worker.send_signal(signal.SIGTERM)
    worker.wait(timeout=120)
    for task in running:
        _assert_gracefully_stopped(qdb, task.id, task.agent_pgid)
    assert len(children) == 4 and not _alive(children)
    _assert_stopped_run_published(_flow_run_of(qdb, task_id), {task_id: "interrupted", stubborn: "interrupted"})
    summary = run_agent_queue(max_agents=2, **_kw(tmp_path, qdb, max_tasks=0))
    assert summary["outcomes"] == {}
    queue.cancel_task(qdb, stubborn)
    resumed_from = queue.get_task(qdb, task_id).last_checkpoint["state"]["step"]
    _shorten(qdb, task_id, resumed_from + 2)
    summary = run_agent_queue(max_agents=2, **_kw(tmp_path, qdb))
    assert summary["outcomes"] == {task_id: "completed"}
    assert queue.get_task(qdb, task_id).result["resumed_from"] == resumed_from


def _wait_for_the_reasons_lock(url: str) -> None:
    """Until a session of database ``url`` waits for the advisory lock of the tasks' reasons, which
    the test holds: the stopped worker is in its summary (:func:`queue.unrunnable`) and no further."""
    deadline = time.monotonic() + 60
    with connection(url, autocommit=True) as conn:
        while not conn.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted").fetchone()[0]:
            assert time.monotonic() < deadline, "the stopped worker never reached its summary"
            time.sleep(0.05)


def test_a_second_sigterm_waits_for_the_stopped_runs_summary(tmp_path: Path, qdb: str) -> None:
    """A second SIGTERM landing while the stopped worker published its summary raised in the middle
    of it: no ``agent-metrics`` nor ``agent-queue-run`` artifact, and the database session cut short
    mid-statement (``error ignored in rollback``). The test holds the lock the summary's first
    statement takes, so the second signal lands there for sure; the worker then ends as after one."""
    task_id = queue.create_task(qdb, _new("long", LONG))
    errors = tmp_path / "worker.err"
    with errors.open("wb") as stderr:
        worker = subprocess.Popen(
            [sys.executable, "-c", _WORKER, qdb, str(tmp_path / "agents")], cwd=ROOT, stderr=stderr
        )
    running = _wait_running(qdb, task_id)
    with connection(qdb) as summary_lock:
        summary_lock.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (queue._REASONS_LOCK,))
        worker.send_signal(signal.SIGTERM)
        _wait_for_the_reasons_lock(qdb)
        worker.send_signal(signal.SIGTERM)
        with pytest.raises(subprocess.TimeoutExpired):
            worker.wait(timeout=2)  # the summary waits for the lock, and the worker for the summary
    assert worker.wait(timeout=120) == -signal.SIGTERM
    _assert_gracefully_stopped(qdb, task_id, running.agent_pgid)
    assert [r["outcome"] for r in _runs(qdb)] == ["interrupted"]
    _assert_stopped_run_published(_flow_run_of(qdb, task_id), {task_id: "interrupted"})
    log = errors.read_text()
    assert "Traceback" not in log and "error ignored" not in log and "not published" not in log, log


def _served_run(tmp_path: Path, qdb: str, api: str) -> AbstractContextManager[tuple[subprocess.Popen[bytes], str]]:
    """``deployments.serve`` serving only run-agent-queue (a real runner process), and one run of it."""
    return served_agent_queue_run(tmp_path, api, _kw(tmp_path, qdb, grace_seconds=2, max_agents=1))


def _wait_pending(url: str, task_id: int) -> None:
    deadline = time.monotonic() + 60
    while queue.get_task(url, task_id).status != "pending" and time.monotonic() < deadline:
        time.sleep(0.2)


def _alive(pids: list[int]) -> bool:
    return any(psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie" for pid in pids)


def test_cancelling_the_flow_run_through_the_api_checkpoints_and_leaves_no_orphans(
    tmp_path: Path, qdb: str, prefect_api: str
) -> None:
    from deployments.trigger import wait_for_flow_run

    task_id = queue.create_task(qdb, _new("long", LONG))
    with _served_run(tmp_path, qdb, prefect_api) as (_, run_id):
        running, children = _running_with_children(tmp_path, qdb, task_id)
        response = httpx.post(
            f"{prefect_api}/flow_runs/{run_id}/set_state",
            json={"state": {"type": "CANCELLING", "message": "cancelled by test"}, "force": True},
            timeout=10,
        )
        assert response.status_code in (200, 201), response.text
        outcome = wait_for_flow_run(prefect_api, run_id, timeout=120)
        assert outcome.state == "CANCELLED", outcome
        _wait_pending(qdb, task_id)
        _assert_gracefully_stopped(qdb, task_id, running.agent_pgid)
        assert not _alive(children)
        _assert_stopped_run_published(run_id, {task_id: "interrupted"})


def _assert_reaped(task: queue.AgentTask, children: list[int]) -> None:
    """The worker died without cleaning up: its reaper ends the agent group and the children."""
    assert task.agent_pgid is not None
    deadline = time.monotonic() + 60
    while (group_members(task.agent_pgid) or _alive(children)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert group_members(task.agent_pgid) == [] and not _alive(children), "no orphan survives the worker"


def _assert_reaped_then_resumed(tmp_path: Path, qdb: str, task: queue.AgentTask, children: list[int]) -> None:
    """The worker died without cleaning up: its reaper ended the agent group, and the next
    run hands the task back and resumes it from its last checkpoint."""
    _assert_reaped(task, children)
    step = queue.get_task(qdb, task.id).last_checkpoint["state"]["step"]
    _shorten(qdb, task.id, step + 1)
    summary = run_agent_queue(max_agents=1, **_kw(tmp_path, qdb))
    assert summary["recovered"] == [task.id] and summary["outcomes"] == {task.id: "completed"}
    assert queue.get_task(qdb, task.id).result["resumed_from"] == step


def _ignores_sigterm(pid: int) -> bool:
    """Whether ``pid`` ignores SIGTERM now: the serving worker does while its flow runs stop."""
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    ignored = int(next(line.split()[1] for line in status if line.startswith("SigIgn:")), 16)
    return bool(ignored >> (signal.SIGTERM - 1) & 1)


def _signal_again_while_stopping(first: signal.Signals) -> Callable[[subprocess.Popen[bytes], Path], None]:
    """Signal the serving worker, then SIGINT and SIGTERM it again while its flow run stops."""

    def stop(server: subprocess.Popen[bytes], run_dir: Path) -> None:
        server.send_signal(first)
        while server.poll() is None and not _ignores_sigterm(server.pid):
            time.sleep(0.05)
        server.send_signal(signal.SIGINT)
        server.send_signal(signal.SIGTERM)

    return stop


def _flowyard_down(server: subprocess.Popen[bytes], run_dir: Path) -> None:
    """What ``flowyard down`` does to the deployment server it started."""
    services.pid_file(run_dir, SERVE).write_text(str(server.pid))
    assert services.stop(run_dir, SERVE)


@pytest.mark.parametrize(
    "stop",
    [
        _signal_again_while_stopping(signal.SIGTERM),
        _signal_again_while_stopping(signal.SIGINT),
        _flowyard_down,
    ],
    ids=["sigterm", "sigint", "flowyard-down"],
)
def test_stopping_the_serving_worker_checkpoints_and_leaves_no_orphans(
    tmp_path: Path, qdb: str, prefect_api: str, stop: Callable[[subprocess.Popen[bytes], Path], None]
) -> None:
    """The serving worker lets its flow run stop the agents gracefully before it exits, even
    when the agent ignores SIGTERM (so the flow run's stop lasts the whole grace period)."""
    task_id = queue.create_task(qdb, _new("stubborn", {**LONG, "ignore_term": True}))
    with _served_run(tmp_path, qdb, prefect_api) as (server, _):
        running, children = _running_with_children(tmp_path, qdb, task_id)
        stop(server, tmp_path)
        server.wait(timeout=120)
        _assert_gracefully_stopped(qdb, task_id, running.agent_pgid)
        assert not _alive(children)


def test_sigkill_to_the_worker_leaves_no_orphans_and_the_task_resumes(tmp_path: Path, qdb: str) -> None:
    task_id = queue.create_task(qdb, _new("long", LONG))
    worker = subprocess.Popen([sys.executable, "-c", _WORKER, qdb, str(tmp_path / "agents")], cwd=ROOT)
    running, children = _running_with_children(tmp_path, qdb, task_id)
    worker.kill()
    worker.wait(timeout=60)
    assert queue.get_task(qdb, task_id).status == "in_progress", "SIGKILL left no chance to clean up"
    [killed_run] = queue.worker_flow_runs(qdb, running.worker)
    assert _flow_run_state(killed_run).type == StateType.RUNNING, "nothing told Prefect the worker died"
    _assert_reaped_then_resumed(tmp_path, qdb, running, children)
    crashed = _flow_run_state(killed_run)
    assert crashed.type == StateType.CRASHED and crashed.message is not None
    assert crashed.message.startswith(f"worker {running.worker} is gone; flow run ")


def _flow_run_state(flow_run_id: uuid.UUID) -> State:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        state = client.read_flow_run(flow_run_id).state
    assert state is not None
    return state


TERM_ONCE_AGENT = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path

    sys.path.insert(0, sys.argv[2])
    from _signal import SIG_DFL, SIGTERM, signal
    from _thread import start_new_thread

    from tasks.reference_agent import ReferenceAgent, read_envelope

    told = Path(sys.argv[1])

    def stuck(signum, frame):  # the worker's SIGTERM: not obeyed, told, and nothing more is written
        signal(SIGTERM, SIG_DFL)  # the next one, the reaper's once the worker is gone, ends the agent
        told.touch()
        time.sleep(600)

    agent = ReferenceAgent(read_envelope(sys.argv[:1]))
    signal(SIGTERM, stuck)
    start_new_thread(agent.listen, ())
    sys.exit(agent.run())
    """
)
"""The reference agent, but stuck from the first SIGTERM on (the worker's graceful stop), which
it tells by the file ``argv[1]``: it neither exits nor writes (a write to the dead worker's pipe
would end it), and only the next SIGTERM, the reaper's once the worker is dead, ends it. Its
worker, given a grace period no test outlasts, waits for it until the test kills the worker."""


def test_sigkill_during_the_workers_graceful_shutdown_leaves_no_orphans_and_the_task_resumes(
    tmp_path: Path, qdb: str
) -> None:
    """SIGTERM starts the graceful stop, and SIGKILL lands while the worker waits out the grace
    period of an agent that ignores its SIGTERM: the reaper ends the agent, and the next run closes
    the attempt once, as interrupted, and resumes the task from its last checkpoint. The agent says
    when the worker's SIGTERM came, and the worker's grace period outlasts the test: it was 2 s
    after a log line, a window a slow phase of the machine could miss (the worker then killed the
    agent and released the task itself before the test's SIGKILL)."""
    told = tmp_path / "the worker's SIGTERM came"
    agents = {"reference": {"argv": [sys.executable, "-c", TERM_ONCE_AGENT, str(told), str(ROOT)]}}
    task_id = queue.create_task(qdb, _new("stubborn", LONG))
    start = [sys.executable, "-c", _WORKER, qdb, str(tmp_path / "agents"), "1", json.dumps(agents), "3600"]
    worker = subprocess.Popen(start, cwd=ROOT)
    try:
        running, children = _running_with_children(tmp_path, qdb, task_id)
        worker.send_signal(signal.SIGTERM)
        _wait_for_file(told)
    finally:
        worker.kill()
        worker.wait(timeout=60)
    log = (tmp_path / "agents" / "logs" / f"{task_id}.jsonl").read_text()
    assert "stopping agent (graceful_shutdown" in log and "sent SIGKILL" not in log
    assert queue.get_task(qdb, task_id).status == "in_progress", "killed before it released the task"
    _assert_reaped_then_resumed(tmp_path, qdb, running, children)
    assert [(r["attempt"], r["outcome"]) for r in _runs(qdb)] == [(1, "interrupted"), (2, "completed")]


def test_a_worker_killed_while_stopping_a_cancelled_task_leaves_no_attempt_open(tmp_path: Path, qdb: str) -> None:
    """SIGKILL to the worker right after `queue cancel`, before it stopped the agent and closed the
    attempt: the retry (allowed, the worker is dead) resumes from the last checkpoint, and the
    next run's recovery closes the killed attempt as interrupted instead of leaving it open for
    good, so each attempt is counted once."""
    task_id = queue.create_task(qdb, _new("long", LONG))
    worker = subprocess.Popen([sys.executable, "-c", _WORKER, qdb, str(tmp_path / "agents")], cwd=ROOT)
    running, children = _running_with_children(tmp_path, qdb, task_id)
    queue.cancel_task(qdb, task_id)
    worker.kill()
    worker.wait(timeout=60)
    assert [r["outcome"] for r in _runs(qdb)] == [None], "killed before it closed the cancelled attempt"
    _assert_reaped(running, children)
    queue.retry_task(qdb, task_id)
    step = queue.get_task(qdb, task_id).last_checkpoint["state"]["step"]
    _shorten(qdb, task_id, step + 1)
    summary = run_agent_queue(max_agents=1, **_kw(tmp_path, qdb))
    assert summary["outcomes"] == {task_id: "completed"} and summary["recovered"] == []
    assert queue.get_task(qdb, task_id).result["resumed_from"] == step
    assert [(r["attempt"], r["outcome"]) for r in _runs(qdb)] == [(1, "interrupted"), (2, "completed")]
    metrics = {m["agent_type"]: m for m in summary["metrics"]}["reference"]
    assert (metrics["attempts"], metrics["interrupted"], metrics["tasks_completed"]) == (1, 1, 1)


LINGERING_AGENT = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path

    gates = Path(sys.argv[1])

    def linger(instant):  # for as long as the test holds the agent at this instant (see KILL_INSTANTS)
        while (gates / instant).exists():
            time.sleep(0.02)

    task = json.loads(sys.stdin.readline())
    start = task["checkpoint"]["state"]["step"] if task["checkpoint"] else 0
    linger("agent started, no checkpoint yet")
    for step in range(start + 1, task["payload"]["steps"] + 1):
        time.sleep(0.2)
        print(json.dumps({"kind": "checkpoint", "state": {"step": step}}), flush=True)
        if step >= 2:
            linger("checkpointed")
    print(json.dumps({"kind": "result", "data": {"resumed_from": start}}), flush=True)
    linger("result sent, not yet completed")  # the task is completed only once the agent has exited
    """
)


def _current_attempt_lines(logs: Path, task: queue.AgentTask, kind: str) -> bool:
    path = logs / f"{task.id}.jsonl"
    lines = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
    return any(r["attempt"] == task.attempts and r["kind"] == kind for r in lines)


KILL_INSTANTS: list[tuple[str, Callable[[queue.AgentTask, Path], bool]]] = [
    ("claimed", lambda t, logs: True),
    ("agent started, no checkpoint yet", lambda t, logs: bool(t.agent_pgid) and not _current_attempt_lines(logs, t, "checkpoint")),
    ("checkpointed", lambda t, logs: (t.last_checkpoint or {}).get("attempt") == t.attempts and t.last_checkpoint["state"]["step"] >= 2),
    ("result sent, not yet completed", lambda t, logs: _current_attempt_lines(logs, t, "result")),
]  # fmt: skip
"""Instants of a worker's life to SIGKILL it at, each seen on an in-progress task. A
:data:`LINGERING_AGENT` stays at an instant while a file of its name is in its gates directory:
it slept into a 1 s window there, which a slow phase of the machine could miss (the worker's agents
then went past it, or the worker ended first), failing the test."""


def _kill_at(url: str, worker: subprocess.Popen[bytes], logs: Path, instant: Callable[[queue.AgentTask, Path], bool]) -> None:
    """Poll the queue until a task the worker holds is at ``instant``, then SIGKILL the worker (only
    its own process: its agents and its reaper are left to fend for themselves). Tasks a killed
    worker left in progress do not count: they are the next worker's to recover."""

    def held(task: queue.AgentTask) -> bool:
        return task.worker is not None and task.worker.split(":")[1] == str(worker.pid)

    deadline = time.monotonic() + GUARD_SECONDS
    while not any(held(t) and instant(t, logs) for t in queue.list_tasks(url, "in_progress")):
        assert worker.poll() is None, "the worker ended before the instant came"
        assert time.monotonic() < deadline, "the instant never came"
        time.sleep(0.05)
    worker.kill()
    worker.wait(timeout=60)
    until_its_sessions_end(url)  # a checkpoint's COMMIT it sent may land after the kill


def test_sigkill_at_any_instant_then_two_recovering_workers_complete_each_task_once(tmp_path: Path, qdb: str) -> None:
    """A worker SIGKILLed after a claim, after spawning an agent, after a checkpoint and between an
    agent's result and the task's completion, each time restarted; then two workers started
    together recover and finish. Each task completes exactly once, by one of them, resuming from
    its last checkpoint; every killed attempt is closed once as interrupted; no agent process of
    any worker survives."""
    gates = tmp_path / "gates"
    gates.mkdir()
    agents = {"linger": {"argv": [sys.executable, "-c", LINGERING_AGENT, str(gates)]}}
    ids = [queue.create_task(qdb, queue.NewTask(title=f"t{i}", agent_type="linger", payload={"steps": 8})) for i in range(2)]
    start = [sys.executable, "-c", _WORKER, qdb, str(tmp_path / "agents"), "2", json.dumps(agents)]
    logs = tmp_path / "agents" / "logs"
    for name, instant in KILL_INSTANTS:
        (gates / name).touch()  # the worker's agents stay at the instant until it is killed
        _kill_at(qdb, subprocess.Popen(start, cwd=ROOT), logs, instant)
        (gates / name).unlink()
    resume_from = {t: (queue.get_task(qdb, t).last_checkpoint or {"state": {"step": 0}})["state"]["step"] for t in ids}
    killed_runs = len(_runs(qdb))
    pair = [subprocess.Popen(start, cwd=ROOT) for _ in range(2)]
    assert [w.wait(timeout=300) for w in pair] == [0, 0]
    runs = _runs(qdb)
    assert all(r["outcome"] == "interrupted" for r in runs[:killed_runs]), runs
    assert sorted(r["task_id"] for r in runs[killed_runs:]) == ids, "the pair ran each task once, never both"
    assert all(r["outcome"] == "completed" for r in runs[killed_runs:]), runs
    assert len({(r["task_id"], r["attempt"]) for r in runs}) == len(runs)
    for task_id in ids:
        task = queue.get_task(qdb, task_id)
        assert task.status == "completed" and task.result == {"resumed_from": resume_from[task_id]}
        steps = [h["state"]["step"] for h in queue.checkpoint_history(qdb, task_id)]
        assert steps == list(range(1, 9)), "each checkpoint recorded once, every attempt resumed from the last"
    metrics = {m.agent_type: m for m in agent_metrics(qdb)}["linger"]
    assert (metrics.tasks_completed, metrics.attempts, metrics.interrupted) == (2, 2, killed_runs)
    with connection(qdb) as conn:
        workers = [row[0] for row in conn.execute("SELECT DISTINCT worker FROM flowyard.agent_runs")]
    assert [pid for w in workers for pid in marked_pids(agent_mark(w))] == [], "no agent process survives"


def test_cancelling_a_running_task_stops_its_agent_and_retry_resumes(tmp_path: Path, qdb: str) -> None:
    task_id = queue.create_task(qdb, _new("long", LONG))
    worker = subprocess.Popen([sys.executable, "-c", _WORKER, qdb, str(tmp_path / "agents")], cwd=ROOT)
    running = _wait_running(qdb, task_id)
    queue.cancel_task(qdb, task_id)
    assert worker.wait(timeout=120) == 0, "the worker carries on and ends normally"
    assert group_members(running.agent_pgid) == []
    task = queue.get_task(qdb, task_id)
    assert task.status == "cancelled" and task.last_checkpoint["kind"] == "graceful_shutdown"
    assert (task.worker, task.agent_pgid) == (None, None), "the stopped agent's worker lets go of it"
    step = task.last_checkpoint["state"]["step"]
    assert [r["outcome"] for r in _runs(qdb)] == ["interrupted"]
    queue.retry_task(qdb, task_id)
    _shorten(qdb, task_id, step + 1)
    assert run_agent_queue(max_agents=1, **_kw(tmp_path, qdb))["outcomes"] == {task_id: "completed"}
    assert queue.get_task(qdb, task_id).result["resumed_from"] == step


def _flow_run_of(url: str, task_id: int) -> str:
    """The flow run executing a task, as its attempt recorded it."""
    with connection(url) as conn:
        row = conn.execute(
            "SELECT flow_run_id FROM flowyard.agent_runs WHERE task_id = %s ORDER BY id LIMIT 1", (task_id,)
        ).fetchone()
    assert row is not None and row[0], f"task {task_id} has no attempt with a flow run"
    return str(row[0])


def test_cancelling_an_in_process_run_through_the_api_checkpoints_and_ends_cancelled(
    tmp_path: Path, qdb: str, prefect_api: str
) -> None:
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelling

    from deployments.trigger import wait_for_flow_run

    task_id = queue.create_task(qdb, _new("long", LONG))
    # ``flowyard queue run`` calls the flow in the terminal's process: no runner around it.
    worker = subprocess.Popen(
        [sys.executable, "-m", "deployments.cli", "queue", "run", "--max-agents", "1", "--grace", "2",
         "--output-dir", str(tmp_path / "agents")],
        cwd=ROOT,
        env={**os.environ, "FLOWYARD_DATABASE_URL": qdb},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    running, children = _running_with_children(tmp_path, qdb, task_id)
    run_id = _flow_run_of(qdb, task_id)
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(run_id, Cancelling(message="cancelled by test"), force=True)
    _, err = worker.communicate()
    assert worker.returncode == 2 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == (
        f"flowyard: error: queue run cancelled: cancelled through the Prefect API; tasks [{task_id}] are back in the queue"
    )
    outcome = wait_for_flow_run(prefect_api, run_id)
    assert outcome.state == "CANCELLED" and f"tasks [{task_id}] are back in the queue" in outcome.message
    _assert_gracefully_stopped(qdb, task_id, running.agent_pgid)
    assert not _alive(children)
    assert [r["outcome"] for r in _runs(qdb)] == ["interrupted"]
    _assert_stopped_run_published(run_id, {task_id: "interrupted"})


def _assert_stopped_run_published(run_id: str, outcomes: dict[int, str]) -> None:
    """A stopped run published its metrics and its tasks' outcomes, as a finished run does."""
    found = {a.key: a for a in flow_run_artifacts(_flow_run_state(uuid.UUID(run_id)))}
    assert {"agent-metrics", "agent-queue-run"} <= set(found), sorted(found)
    assert {r["agent_type"] for r in _table(found["agent-metrics"])} == {"reference"}
    assert {r["task_id"]: r["outcome"] for r in _table(found["agent-queue-run"])} == outcomes


def _table(artifact: Any) -> list[dict[str, Any]]:
    """The rows of a table artifact (Prefect stores its data as JSON text)."""
    data = json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data
    return list(data)


class _CancelOnceCompleted(CancelWatch):
    """The run's own watch, asking the API on every call, over a real cancellation through the API
    that is sent only once ``task_id`` completed in the queue (the run's loop blocks until then):
    the agent finished as the cancel came, before the loop settled its task run, deterministically.
    ``then`` runs right after the cancellation is sent."""

    def __init__(self, url: str, task_id: int, then: Callable[[], None] = lambda: None) -> None:
        super().__init__(interval=0.0)
        self._url, self._task_id, self._then = url, task_id, then
        self._sent = False

    def requested(self) -> bool:
        if not self._sent:
            from prefect.client.orchestration import get_client
            from prefect.context import FlowRunContext
            from prefect.states import Cancelling

            _wait_status(self._url, self._task_id, "completed")
            context = FlowRunContext.get()
            assert context is not None and context.flow_run is not None
            with get_client(sync_client=True) as client:
                client.set_flow_run_state(context.flow_run.id, Cancelling(message="cancelled by test"), force=True)
            self._then()
            self._sent = True
        return super().requested()


def test_a_task_that_completed_as_the_cancel_came_keeps_its_outcome(
    tmp_path: Path, qdb: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cancelled run left out a task whose agent completed after the loop's last settling: it
    was neither back in the queue nor in the run's outcomes, message or artifact."""
    task_id = queue.create_task(qdb, _new("short", {"steps": 2, "sleep": 0.2}))
    monkeypatch.setattr("flows.run_agent_queue.CancelWatch", lambda: _CancelOnceCompleted(qdb, task_id))
    state = run_agent_queue(max_agents=1, return_state=True, **_kw(tmp_path, qdb))
    assert state.is_cancelled(), state
    assert state.message.endswith(f"tasks [] are back in the queue; task {task_id} completed"), state
    _assert_stopped_run_published(str(state.state_details.flow_run_id), {task_id: "completed"})


def test_a_cancelled_run_that_cannot_publish_its_summary_still_ends_cancelled(
    tmp_path: Path, qdb: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Publishing a stopped run's summary is best effort: its failure must not turn the
    cancellation into a failed run."""
    task_id = queue.create_task(qdb, _new("short", {"steps": 1}))

    def lose_the_attempts_table() -> None:  # what the metrics read: gone as the summary is built
        with connection(qdb) as conn:
            conn.execute("ALTER TABLE flowyard.agent_runs RENAME TO agent_runs_away")

    monkeypatch.setattr(
        "flows.run_agent_queue.CancelWatch", lambda: _CancelOnceCompleted(qdb, task_id, lose_the_attempts_table)
    )
    try:
        state = run_agent_queue(max_agents=1, return_state=True, **_kw(tmp_path, qdb))
    finally:
        with connection(qdb) as conn:
            conn.execute("ALTER TABLE IF EXISTS flowyard.agent_runs_away RENAME TO agent_runs")
    assert state.is_cancelled() and "tasks [] are back in the queue" in state.message, state


def _live_agent_groups(worker: subprocess.Popen[bytes], task_id: int) -> set[int]:
    """Process groups of the worker's live children (its agents, not theirs) that carry the
    task's ``FLOWYARD_TASK_ID``: one per live agent of that task."""
    groups = set()
    for proc in psutil.Process(worker.pid).children():
        try:
            live = proc.status() != psutil.STATUS_ZOMBIE
            if live and proc.environ().get("FLOWYARD_TASK_ID") == str(task_id):
                groups.add(os.getpgid(proc.pid))
        except (psutil.Error, ProcessLookupError):
            continue
    return groups


@contextmanager
def _agent_census(worker: subprocess.Popen[bytes], task_id: int) -> Iterator[list[set[int]]]:
    """Sample the process table until the block ends: every set of live agent groups of the task seen."""
    import threading

    seen: list[set[int]] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set() and worker.poll() is None:
            with suppress(psutil.NoSuchProcess):
                seen.append(_live_agent_groups(worker, task_id))
            done.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield seen
    finally:
        done.set()
        sampler.join()


def _wait_status(url: str, task_id: int, status: str) -> None:
    while queue.get_task(url, task_id).status != status:
        time.sleep(0.2)


def test_cancel_then_retry_of_a_running_task_never_runs_two_agents(tmp_path: Path, qdb: str) -> None:
    """``queue cancel ID; queue retry ID`` while the agent runs: the retry waits until the
    cancelled agent has stopped, and the same worker (kept busy by another task) then runs the
    task again from its graceful_shutdown checkpoint, never beside the first agent. The worker
    has room for a third agent, so nothing but the fix keeps it from claiming the task again."""
    task_id = queue.create_task(qdb, _new("long", LONG))
    keeper = queue.create_task(qdb, _new("keeper", LONG))
    worker = subprocess.Popen([sys.executable, "-c", _WORKER, qdb, str(tmp_path / "agents"), "3"], cwd=ROOT)
    with _agent_census(worker, task_id) as census:
        running = _wait_running(qdb, task_id)
        _wait_running(qdb, keeper)
        step = queue.get_task(qdb, task_id).last_checkpoint["state"]["step"]
        with connection(qdb) as conn:  # the next attempt finishes on its own, a few steps on
            conn.execute(
                "UPDATE flowyard.agent_tasks SET payload = %s WHERE id = %s",
                (json.dumps({"steps": step + 30, "sleep": 0.1}), task_id),
            )
        queue.cancel_task(qdb, task_id)  # then the retry at once: the agent's stop takes longer
        refusals = []
        while True:
            try:
                queue.retry_task(qdb, task_id)  # what `flowyard queue retry` calls
                break
            except UserError as exc:
                refusals.append(str(exc))
                time.sleep(0.1)
        _wait_status(qdb, task_id, "completed")
        queue.cancel_task(qdb, keeper)
        assert worker.wait(timeout=120) == 0
    assert max(len(groups) for groups in census) == 1, "never two live agents of one task"
    assert {frozenset(g) for g in census if g} >= {frozenset({running.agent_pgid})}
    assert refusals and all("\n" not in r for r in refusals)
    stopping = f"cannot retry task {task_id} yet: its cancelled attempt 1 is still stopping"
    assert refusals[0].startswith(stopping)
    runs = [(r["attempt"], r["outcome"]) for r in _runs(qdb) if r["task_id"] == task_id]
    assert runs == [(1, "interrupted"), (2, "completed")]
    history = queue.checkpoint_history(qdb, task_id)
    graceful = next(h for h in history if h["kind"] == "graceful_shutdown")
    assert graceful["attempt"] == 1
    assert queue.get_task(qdb, task_id).result["resumed_from"] == graceful["state"]["step"]


def test_a_reclaimed_attempt_never_overwrites_the_new_holders_checkpoint(tmp_path: Path, qdb: str) -> None:
    """A worker whose claim lapsed (its task recovered and claimed by another worker) stops its
    agent, and neither its agent's checkpoints nor its graceful_shutdown one reach the task."""
    task_id = queue.create_task(qdb, _new("long", LONG))
    worker = subprocess.Popen([sys.executable, "-c", _WORKER, qdb, str(tmp_path / "agents")], cwd=ROOT)
    running = _wait_running(qdb, task_id)
    assert running.worker is not None
    # What recover_stale_tasks does to a worker silent for longer than the lease, then another
    # worker's whole attempt, through the same queue functions run-agent uses.
    assert queue.release_task(qdb, task_id, running.worker, "recovered: lease expired")
    [claimed] = queue.claim_ready(qdb, "worker-b", 1)
    attempt = queue.start_attempt(qdb, claimed.id, "worker-b", None)
    assert attempt.number == 2
    assert queue.record_checkpoint(qdb, task_id, "worker-b", 2, {"step": 999, "by": "worker-b"})
    done = queue.finish_attempt(qdb, attempt.run_id, "worker-b", "completed", result={"ok": True})
    assert done == "completed"
    assert worker.wait(timeout=120) == 0
    assert group_members(running.agent_pgid) == []
    task = queue.get_task(qdb, task_id)
    assert task.status == "completed" and task.result == {"ok": True}
    assert task.last_checkpoint == {"attempt": 2, "kind": "agent", "state": {"step": 999, "by": "worker-b"}}
    assert "graceful_shutdown" not in [h["kind"] for h in queue.checkpoint_history(qdb, task_id)]
    assert [(r["attempt"], r["outcome"]) for r in _runs(qdb)] == [(1, "interrupted"), (2, "completed")]


def test_cancelling_a_task_during_its_retry_delay_reports_it_cancelled(tmp_path: Path, qdb: str) -> None:
    """``queue cancel ID`` between a failed attempt and Prefect's retry: the run reports the task
    cancelled, not failed (a failure would make ``queue run`` exit 1), and no attempt starts. The
    failed attempt frees the one slot and a gated task is claimed into it, so the retry waits for
    the slot until the test lets that agent complete: the cancel lands there, not in a 1 s delay
    polled every 20 ms, which a slow phase of the machine could miss."""
    import threading

    agent = tmp_path / "failing_agent.py"
    agent.write_text("import sys\nprint('disk on fire', file=sys.stderr)\nsys.exit(3)\n")
    ready, go = tmp_path / "ready", tmp_path / "go"
    task_id = queue.create_task(qdb, queue.NewTask(title="flaky", agent_type="flaky", priority="critical"))
    gated = queue.create_task(qdb, queue.NewTask(title="holds the slot", agent_type="gated", priority="low"))

    def cancel_while_the_retry_waits() -> None:
        _wait_for_file(ready)  # the gated agent holds the slot: the retry has none
        queue.cancel_task(qdb, task_id)
        go.touch()

    canceller = threading.Thread(target=cancel_while_the_retry_waits, daemon=True)
    canceller.start()
    agents = {
        "flaky": {"argv": [sys.executable, str(agent)]},
        "gated": {"argv": [sys.executable, "-c", GATED_AGENT, str(ready), str(go)]},
    }
    summary = run_agent_queue(max_agents=1, retries=2, agents=agents, **_kw(tmp_path, qdb))
    canceller.join()
    assert summary["outcomes"] == {task_id: "cancelled", gated: "completed"}
    task = queue.get_task(qdb, task_id)
    assert task.status == "cancelled" and task.attempts == 1
    assert [(r["task_id"], r["outcome"]) for r in _runs(qdb)] == [(task_id, "failed"), (gated, "completed")]


def test_a_task_cancelled_while_its_agent_runs_is_reported_cancelled(tmp_path: Path, qdb: str) -> None:
    """``queue cancel`` of a running task: the run stopped its agent and reported the task
    ``interrupted``, which ``queue run`` and the run's artifact give for a task back in the queue
    to resume next run, though it was cancelled. Its attempt is still recorded as interrupted."""
    import threading

    task_id = queue.create_task(qdb, _new("long", {"steps": 1000, "sleep": 0.1}))
    canceller = threading.Thread(
        target=lambda: (_wait_running(qdb, task_id), queue.cancel_task(qdb, task_id)), daemon=True
    )
    canceller.start()
    summary = run_agent_queue(max_agents=1, **_kw(tmp_path, qdb))
    canceller.join()
    assert summary["outcomes"] == {task_id: "cancelled"}
    assert queue.get_task(qdb, task_id).status == "cancelled"
    assert [r["outcome"] for r in _runs(qdb)] == ["interrupted"]


GATED_AGENT = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path

    ready, go = Path(sys.argv[1]), Path(sys.argv[2])
    print(json.dumps({"kind": "checkpoint", "state": {"step": 1}}), flush=True)
    ready.touch()
    while not go.exists():  # the test says when the agent completes
        time.sleep(0.02)
    print(json.dumps({"kind": "result", "data": {"done": True}}), flush=True)
    """
)


def _wait_for_file(path: Path) -> None:
    deadline = time.monotonic() + GUARD_SECONDS
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never came"
        time.sleep(0.02)


def test_an_agent_completing_as_its_task_is_cancelled_leaves_task_and_attempt_agreeing(
    tmp_path: Path, qdb: str
) -> None:
    """``queue cancel`` committed just before the agent completes, no heartbeat between them to stop
    it: the attempt was recorded ``completed`` (a finished attempt in the metrics, its result never
    taken) beside a ``cancelled`` task. The cancel was told to the user and the task's dependents,
    so the task stays cancelled and its attempt is ``interrupted``, as an agent the cancel stopped;
    its last checkpoint is kept for ``queue retry``."""
    ready, go = tmp_path / "ready", tmp_path / "go"
    task_id = queue.create_task(qdb, queue.NewTask(title="done as cancelled", agent_type="gated"))
    agents = {"gated": {"argv": [sys.executable, "-c", GATED_AGENT, str(ready), str(go)]}}

    def cancel_then_complete() -> None:
        _wait_for_file(ready)
        queue.cancel_task(qdb, task_id)
        go.touch()

    canceller = threading.Thread(target=cancel_then_complete, daemon=True)
    canceller.start()
    summary = run_agent_queue(max_agents=1, agents=agents, **_kw(tmp_path, qdb))
    canceller.join()
    assert summary["outcomes"] == {task_id: "cancelled"}
    task = queue.get_task(qdb, task_id)
    assert (task.status, task.worker, task.result) == ("cancelled", None, None)
    assert task.last_checkpoint == {"attempt": 1, "kind": "agent", "state": {"step": 1}}
    with connection(qdb) as conn:
        runs = conn.execute("SELECT outcome, error FROM flowyard.agent_runs WHERE task_id = %s", (task_id,)).fetchall()
    assert [outcome for outcome, _ in runs] == ["interrupted"], runs
    assert [error for _, error in runs] == [queue.CANCELLED_AS_IT_COMPLETED]
    metrics = {m["agent_type"]: m for m in summary["metrics"]}["gated"]
    assert (metrics["tasks_completed"], metrics["attempts"], metrics["interrupted"]) == (0, 0, 1)


LATE_FAILURE_AGENT = textwrap.dedent(
    """
    import os, sys

    sys.path.insert(0, sys.argv[3])
    from tasks import agent_queue as queue
    from tasks.db import connection

    url, how = sys.argv[1], sys.argv[2]
    task_id, worker = int(os.environ["FLOWYARD_TASK_ID"]), os.environ["FLOWYARD_WORKER"]
    if how == "recovered":  # another run's recovery, this worker silent past its lease, then another claim
        queue.release_task(url, task_id, worker, f"recovered: worker {worker} is gone")
        queue.claim_ready(url, "elsewhere", 1)
    else:
        queue.cancel_task(url, task_id)
    if how.startswith("retried"):  # its heartbeats held up past the lease (a lock), so `queue retry` went ahead
        with connection(url) as conn:
            conn.execute("UPDATE flowyard.agent_tasks SET heartbeat_at = now() - interval '1 day' WHERE id = %s", (task_id,))
        queue.retry_task(url, task_id)
    if how == "retried, claimed":
        queue.claim_ready(url, "elsewhere", 1)
    print("disk on fire", file=sys.stderr)
    sys.exit(3)
    """
)


@pytest.mark.parametrize("retries", [0, 1], ids=["final", "not-final"])
@pytest.mark.parametrize(
    ("how", "reported", "left"),
    [
        ("recovered", "released", ("in_progress", "elsewhere")),
        ("cancelled", "cancelled", ("cancelled", None)),
        ("retried", "released", ("pending", None)),
        ("retried, claimed", "released", ("in_progress", "elsewhere")),
    ],
)
def test_a_late_failure_of_an_attempt_no_longer_holding_its_task_is_not_retried_nor_reported_failed(
    tmp_path: Path, qdb: str, retries: int, how: str, reported: str, left: tuple[str, str | None]
) -> None:
    """An agent that failed after its attempt lost the task (another run's recovery closed it and
    handed the task on, or the user cancelled it): the run raised the failure, so Prefect retried
    an attempt of a task no longer its worker's, and after its last attempt the run reported
    ``failed`` a task running elsewhere or cancelled. It is reported as a late completed end is.
    So is one whose task was cancelled and retried while the attempt was still open (pending again,
    or claimed by another worker): the attempt's end, not a recovery's, closed it, and the run
    reported ``failed`` a task back in the queue. The attempt keeps its failure; the task is left
    where the retry (and the other claim) put it."""
    task_id = queue.create_task(qdb, queue.NewTask(title="late", agent_type="late"))
    agents = {"late": {"argv": [sys.executable, "-c", LATE_FAILURE_AGENT, qdb, how, str(ROOT)]}}
    kw = {**_kw(tmp_path, qdb), "max_tasks": 1}  # a task retried to pending is not claimed again
    state = run_agent_queue(max_agents=1, agents=agents, retries=retries, return_state=True, **kw)
    assert state.result()["outcomes"] == {task_id: reported}
    [run] = recorded_task_runs(state, "agent-", 1)
    assert (run.state.is_completed(), run.run_count) == (True, 1), run.state
    assert (run.state.result()["attempt"], run.state.result()["outcome"]) == (1, reported)
    task = queue.get_task(qdb, task_id)
    assert (task.status, task.worker, task.attempts) == (*left, 1)
    closed = "interrupted" if how == "recovered" else "failed"
    assert [(r["attempt"], r["outcome"]) for r in _runs(qdb)] == [(1, closed)]


def test_a_task_waiting_for_a_draft_dependency_says_why_without_failing(tmp_path: Path, qdb: str) -> None:
    draft = queue.create_task(qdb, _new("draft dep", {"steps": 1}, draft=True))
    child = queue.create_task(qdb, _new("needs draft", {"steps": 1}, (draft,)))
    summary = run_agent_queue(max_agents=1, **_kw(tmp_path, qdb))
    assert summary["outcomes"] == {} and summary["blocked"] == {}
    assert summary["waiting"] == {
        child: f"not run: dependency #{draft} 'draft dep' is draft (submit it with `flowyard queue submit {draft}`)"
    }
    assert queue.get_task(qdb, child).status == "pending"


@pytest.mark.parametrize("parameter", ["logs_dir", "output_dir"])
def test_a_directory_that_is_a_file_fails_the_run_before_anything_is_claimed(
    tmp_path: Path, qdb: str, parameter: str
) -> None:
    in_the_way = tmp_path / "afile"
    in_the_way.write_text("hi\n")
    task_id = queue.create_task(qdb, _new("untouched", {"steps": 1}))
    kw = {**_kw(tmp_path, qdb), parameter: str(in_the_way)}
    with pytest.raises(UserError) as raised:
        run_agent_queue(max_agents=1, **kw)
    assert str(raised.value) == f"{parameter} {in_the_way} cannot be used as a directory: File exists; pass a directory path"
    task = queue.get_task(qdb, task_id)
    assert (task.status, task.attempts) == ("pending", 0) and _runs(qdb) == []


@pytest.mark.parametrize("parameter", ["logs_dir", "output_dir"])
def test_a_directory_that_cannot_be_written_fails_the_run_before_anything_is_claimed(
    tmp_path: Path, qdb: str, parameter: str
) -> None:
    """A directory that exists but takes no new file (immutable here; read-only mounts alike)
    passed the run's mkdir, and each claimed task failed: in output_dir, its task-<id> directory
    could not be made (an attempt used); in logs_dir, its <id>.jsonl could not be opened, a
    PermissionError traceback that burned every retry."""
    locked = tmp_path / "locked"
    locked.mkdir()
    task_id = queue.create_task(qdb, _new("untouched", {"steps": 1}))
    kw = {**_kw(tmp_path, qdb), "logs_dir": str(tmp_path / "logs"), parameter: str(locked)}
    with immutable(locked), pytest.raises(UserError) as raised:
        run_agent_queue(max_agents=1, **kw)
    assert str(raised.value) == (
        f"{parameter} {locked} cannot be written: Operation not permitted; pass a writable directory path"
    )
    task = queue.get_task(qdb, task_id)
    assert (task.status, task.attempts) == ("pending", 0) and _runs(qdb) == []


def test_an_attempt_whose_log_cannot_be_opened_is_closed_as_failed(tmp_path: Path, qdb: str) -> None:
    """Once, in one line: a retry meets the same directory in the log's place (it was Python's
    IsADirectoryError, retried until the task failed)."""
    task_id = queue.create_task(qdb, _new("unloggable", {"steps": 1}))
    log = tmp_path / "agents" / "logs" / f"{task_id}.jsonl"
    log.mkdir(parents=True)  # in the log file's way
    summary = run_agent_queue(max_agents=1, retries=2, **_kw(tmp_path, qdb))
    assert summary["outcomes"][task_id] == (
        f"failed: cannot write the log of task {task_id} to {log}: Is a directory; "
        "remove what is in its place and retry the task"
    )
    [run] = _runs(qdb)
    assert run["outcome"] == "failed" and run["finished"] is not None


HOLD_GIVING_UP = 7_001
"""Advisory lock a test holds so that a worker's ``fail_task`` waits inside PostgreSQL."""


@contextmanager
def _give_up_held(url: str) -> Iterator[Callable[[], int | None]]:
    """Make the statement that fails a task (in_progress → failed) wait for an advisory lock this
    test holds, a trigger in the test's own database standing in for a slow commit: a worker can
    then be SIGKILLed at the instant between its last attempt's failure and the task's failure.
    Yields a function giving the backend pid of the waiting statement (None while none waits);
    that backend is terminated on exit, so the killed worker's statement never commits."""
    with connection(url) as conn:
        conn.execute(
            """
            CREATE FUNCTION public.hold_giving_up() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN PERFORM pg_advisory_xact_lock(%s); RETURN NEW; END $$
            """.replace("%s", str(HOLD_GIVING_UP))
        )
        conn.execute(
            "CREATE TRIGGER hold_giving_up BEFORE UPDATE ON flowyard.agent_tasks FOR EACH ROW "
            "WHEN (OLD.status = 'in_progress' AND NEW.status = 'failed') EXECUTE FUNCTION public.hold_giving_up()"
        )
    with connection(url, autocommit=True) as holder:  # each look at pg_stat_activity a fresh one
        holder.execute("SELECT pg_advisory_lock(%s)", (HOLD_GIVING_UP,))

        def waiting() -> int | None:
            row = holder.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock' AND wait_event = 'advisory'"
            ).fetchone()
            return None if row is None else int(row[0])

        try:
            yield waiting
        finally:
            if (pid := waiting()) is not None:
                holder.execute("SELECT pg_terminate_backend(%s, 60000)", (pid,))
            holder.execute("DROP TRIGGER hold_giving_up ON flowyard.agent_tasks")
            holder.execute("DROP FUNCTION public.hold_giving_up()")
            holder.execute("SELECT pg_advisory_unlock(%s)", (HOLD_GIVING_UP,))


def test_a_worker_killed_after_the_last_retry_failed_leaves_the_task_failed(tmp_path: Path, qdb: str) -> None:
    """SIGKILL between the failure of a run's last allowed attempt (recorded) and the task's
    failure: the next run's recovery fails the task with that attempt's error instead of
    handing it back with a fresh set of retries, so a run's retries mean at most retries + 1
    attempts. `queue retry`, a person's decision, still gives it a full set."""
    agents = {"broken": {"argv": [sys.executable, "-c", "import sys; print('disk on fire', file=sys.stderr); sys.exit(3)"]}}
    task_id = queue.create_task(qdb, queue.NewTask(title="broken", agent_type="broken"))
    start = [sys.executable, "-c", _WORKER, qdb, str(tmp_path / "agents"), "1", json.dumps(agents)]
    with _give_up_held(qdb) as waiting:
        worker = subprocess.Popen(start, cwd=ROOT)  # retries=2: three attempts
        while waiting() is None:
            assert worker.poll() is None, "the worker ended before failing the task"
            time.sleep(0.05)
        worker.kill()
        worker.wait(timeout=60)
    assert [(r["attempt"], r["outcome"]) for r in _runs(qdb)] == [(1, "failed"), (2, "failed"), (3, "failed")]
    assert queue.get_task(qdb, task_id).status == "in_progress", "killed before the task was failed"
    summary = run_agent_queue(max_agents=1, retries=2, agents=agents, **_kw(tmp_path, qdb))
    task = queue.get_task(qdb, task_id)
    assert (task.status, task.attempts, task.worker) == ("failed", 3, None)
    assert task.error.startswith("attempt 3, the last of its run, failed: agent exited with code 3: disk on fire")
    assert "worker" in task.error and "is gone" in task.error
    assert summary["recovered"] == [] and summary["outcomes"] == {task_id: f"failed: {task.error}"}
    assert len(_runs(qdb)) == 3, "no attempt beyond the run's retries"
    queue.retry_task(qdb, task_id)
    summary = run_agent_queue(max_agents=1, retries=1, agents=agents, **_kw(tmp_path, qdb))
    assert summary["outcomes"][task_id].startswith("failed")
    assert queue.get_task(qdb, task_id).attempts == 5, "queue retry gives a fresh set of retries"


def _after_first_checkpoint(url: str, task_id: int, then: Callable[[], None]) -> threading.Thread:
    """A thread that runs ``then`` once task ``task_id`` has recorded its first checkpoint."""

    def wait_then() -> None:
        deadline = time.monotonic() + 120
        while not queue.checkpoint_history(url, task_id) and time.monotonic() < deadline:
            time.sleep(0.05)
        then()

    thread = threading.Thread(target=wait_then, daemon=True)
    thread.start()
    return thread


def test_a_database_restart_mid_run_neither_stops_the_agents_nor_loses_what_they_report(
    tmp_path: Path, qdb: str
) -> None:
    """The state database went away for a few seconds (a restart, a failover) while agents ran: the
    next heartbeat's connection error killed every agent, the attempts failed as configuration
    errors (``cannot connect to ...``, a UserError: not retried), and the run crashed with a
    traceback, its tasks left ``in_progress`` for the next run. The agents need no database to
    work: they run on, a checkpoint and the end of an attempt wait for the database to be back, and
    nothing is run twice."""
    with outage_proxy(qdb) as proxy:
        short = queue.create_task(qdb, _new("ends during the outage", {"steps": 3, "sleep": 0.5}))
        long = queue.create_task(qdb, _new("runs through it", {"steps": 14, "sleep": 0.5}))

        def restart() -> None:
            with proxy.outage(4):
                pass

        cutter = _after_first_checkpoint(qdb, short, restart)
        summary = run_agent_queue(max_agents=2, **_kw(tmp_path, proxy.url))
        cutter.join(60)
    assert summary["outcomes"] == {short: "completed", long: "completed"}
    for task_id, steps in ((short, 3), (long, 14)):
        task = queue.get_task(qdb, task_id)
        assert (task.status, task.attempts, task.result["digest"]) == ("completed", 1, _digest(task_id, steps))
        assert task.result["resumed_from"] == 0, "the agent ran on: nothing started again"
    assert sorted((r["task_id"], r["outcome"]) for r in _runs(qdb)) == [(short, "completed"), (long, "completed")]


LOCKED_OUTPUT_AGENT = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path

    go, wrote = Path(sys.argv[1]), Path(sys.argv[2])
    while not go.exists():
        time.sleep(0.02)
    print(json.dumps({"kind": "checkpoint", "state": {"step": 1}}), flush=True)
    line = json.dumps({"kind": "log", "level": "info", "message": "x" * 1000})
    for _ in range(200):  # 200 kB: more than a pipe holds, so the worker must read as it goes
        print(line, flush=True)
    wrote.touch()
    print(json.dumps({"kind": "result", "data": {"ok": True}}), flush=True)
    """
)


def _locking_while_it_writes(
    qdb: str, task_id: int, tmp_path: Path, lock: str, params: tuple[object, ...] = ()
) -> tuple[threading.Thread, list[int]]:
    """A thread that, once the agent of ``task_id`` (a :data:`LOCKED_OUTPUT_AGENT`) runs, takes
    ``lock`` in a session of its own, lets the agent write (``go``) and holds the lock until the
    agent has written all its output (``wrote``); and the list its session's pid is put in."""
    go, wrote = tmp_path / "go", tmp_path / "wrote"
    holder: list[int] = []

    def lock_while_it_writes() -> None:
        while not queue.get_task(qdb, task_id).agent_pgid:
            time.sleep(0.02)
        with connection(qdb) as dba:
            dba.execute(lock, params)
            holder.append(dba.info.backend_pid)
            go.touch()
            while not wrote.exists():  # the agent wrote all its output while the lock was held
                time.sleep(0.02)

    locker = threading.Thread(target=lock_while_it_writes, daemon=True)
    locker.start()
    return locker, holder


def test_a_lock_held_on_the_queue_table_does_not_stop_the_agents_output_being_read(tmp_path: Path, qdb: str) -> None:
    """A DBA's ``LOCK TABLE flowyard.agent_tasks`` while an agent runs: the worker's write of the
    agent's checkpoint (and its heartbeats) waited for the lock, in the loop that reads the agent's
    output, so the agent blocked on a full pipe until the lock was released, its timeout and a
    cancel unseen. The checkpoint is kept and written once the lock is gone; the output flows on."""
    go, wrote = tmp_path / "go", tmp_path / "wrote"
    task_id = queue.create_task(qdb, queue.NewTask(title="chatty", agent_type="chatty"))
    agents = {"chatty": {"argv": [sys.executable, "-c", LOCKED_OUTPUT_AGENT, str(go), str(wrote)]}}

    locker, _ = _locking_while_it_writes(qdb, task_id, tmp_path, "LOCK TABLE flowyard.agent_tasks IN ACCESS EXCLUSIVE MODE")
    summary = run_agent_queue(max_agents=1, agents=agents, **_kw(tmp_path, qdb))
    locker.join()
    assert summary["outcomes"] == {task_id: "completed"}
    task = queue.get_task(qdb, task_id)
    assert (task.status, task.result, task.last_checkpoint) == (
        "completed", {"ok": True}, {"attempt": 1, "kind": "agent", "state": {"step": 1}}
    )


def test_a_row_lock_on_a_running_task_is_told_in_its_log_naming_the_session(tmp_path: Path, qdb: str) -> None:
    """A DBA's ``SELECT ... FOR UPDATE`` of a running task left open in psql: the worker's checkpoint
    write gave up after the lock timeout and its log said the state database was unreachable,
    naming no one. It says it waits on a lock, held by that session (and how to end it), then that
    the lock was released; the agent runs on and the attempt ends as usual."""
    go, wrote = tmp_path / "go", tmp_path / "wrote"
    task_id = queue.create_task(qdb, queue.NewTask(title="chatty", agent_type="chatty"))
    agents = {"chatty": {"argv": [sys.executable, "-c", LOCKED_OUTPUT_AGENT, str(go), str(wrote)]}}
    locker, holder = _locking_while_it_writes(
        qdb, task_id, tmp_path, "SELECT id FROM flowyard.agent_tasks WHERE id = %s FOR UPDATE", (task_id,)
    )
    summary = run_agent_queue(max_agents=1, agents=agents, **_kw(tmp_path, qdb))
    locker.join()
    assert summary["outcomes"] == {task_id: "completed"}
    assert queue.get_task(qdb, task_id).last_checkpoint == {"attempt": 1, "kind": "agent", "state": {"step": 1}}
    log = tmp_path / "agents" / "logs" / f"{task_id}.jsonl"
    said = [r["message"] for r in map(json.loads, log.read_text().splitlines()) if r["stream"] == "flowyard"]
    [waiting] = [line for line in said if line.startswith(("waiting on a lock", "the state database is unreachable"))]
    assert waiting.startswith(
        "waiting on a lock: a row of flowyard.agent_tasks is locked (canceling statement due to lock timeout): "
        f"held by pid {holder[0]} (user "
    )
    assert waiting.endswith(
        "its query: SELECT id FROM flowyard.agent_tasks WHERE id = $1 FOR UPDATE); the agent runs on; its checkpoint "
        f"is written once it can be (end that session: SELECT pg_terminate_backend({holder[0]}))"
    )
    assert any(line.startswith("the lock was released, after ") for line in said)


def test_a_row_lock_met_by_the_runs_end_is_told_in_the_run_log_naming_the_session(tmp_path: Path, qdb: str) -> None:
    """A psql session holding the row of a task whose reason the run's end rewrites (its dependency
    just failed): the run's end waited on it without a word, for up to the lease, then failed. The
    run log says it waits on a lock held by that session, and the run ends once it is released."""
    bad = queue.create_task(qdb, _new("bad", {"fail": "cannot reach repo"}))
    child = queue.create_task(qdb, _new("child", {"steps": 1}, (bad,)))
    told = Told("waiting on a lock: a row of flowyard.agent_tasks is locked")
    locked, holder = threading.Event(), []

    def hold_the_childs_row_until_told() -> None:
        with connection(qdb) as dba:
            dba.execute("SELECT id FROM flowyard.agent_tasks WHERE id = %s FOR UPDATE", (child,))
            holder.append(dba.info.backend_pid)
            locked.set()
            told.seen.wait(120)  # a guard: without the line, the run gives up after its lease

    locker = threading.Thread(target=hold_the_childs_row_until_told, daemon=True)
    locker.start()
    locked.wait()
    logger = logging.getLogger("prefect.flow_runs")
    logger.addHandler(told)
    try:
        summary = run_agent_queue(max_agents=1, retries=0, lease_seconds=15, **_kw(tmp_path, qdb))
    finally:
        logger.removeHandler(told)
        locker.join()
    assert told.seen.is_set()
    assert f"held by pid {holder[0]} (user " in told.message
    assert told.message.endswith(f"waiting for it for up to the lease (15s) (end that session: SELECT pg_terminate_backend({holder[0]}))")
    assert summary["outcomes"][bad].startswith("failed")
    assert summary["blocked"] == {child: f"not run: dependency #{bad} 'bad' is failed"}


def test_a_full_disk_for_the_agents_logs_fails_the_attempt_naming_the_log_and_stops_the_agent(
    tmp_path: Path, qdb: str
) -> None:
    """The logs directory's disk full (ENOSPC) when the agent's log is written: the attempt failed
    with ``OSError: [Errno 28] No space left on device``, naming neither the log nor its disk, was
    retried to the same end, and the log's close raised the error again over the first. It fails in
    one line naming the log and the cause, without a retry; the agent is stopped, the log closed."""
    task_id = queue.create_task(qdb, _new("chatty", {"steps": 100, "sleep": 0.05}))
    with small_tmpfs(tmp_path / "logs") as logs:
        fill_up(logs)
        summary = run_agent_queue(max_agents=1, retries=2, logs_dir=str(logs), **_kw(tmp_path, qdb))
        fds = Path("/proc/self/fd")
        assert [fd for fd in fds.iterdir() if str(logs) in str(fd.resolve())] == [], "the log is closed"
    error = (
        f"cannot write the log of task {task_id} to {logs}/{task_id}.jsonl: No space left on device (disk full); "
        "make room for it (or pass another --logs-dir / logs_dir), then retry the task"
    )
    assert summary["outcomes"] == {task_id: f"failed: {error}"}
    task = queue.get_task(qdb, task_id)
    assert (task.status, task.error) == ("failed", error)
    assert [r["outcome"] for r in _runs(qdb)] == ["failed"]
    with connection(qdb) as conn:
        [worker] = [row[0] for row in conn.execute("SELECT DISTINCT worker FROM flowyard.agent_runs")]
    assert marked_pids(agent_mark(worker)) == [], "no agent process survives"


@pytest.mark.parametrize("what", ["working directory", "envelope"])
def test_a_full_disk_for_the_agents_output_fails_the_attempt_in_one_line_naming_the_path(
    tmp_path: Path, qdb: str, what: str
) -> None:
    """The output directory's disk full when an attempt makes the agent's working directory, or
    writes the file of an envelope too large for the environment: the task failed saying the
    directory "cannot be used as a directory ... pass a directory path", or to remove what is in the
    envelope file's place, and a partly written envelope file was left on the full disk. It fails in
    one line naming the path and the full disk, without a retry (each would meet the same disk); no
    agent is started and nothing is left there."""
    output = tmp_path / "agents"
    output.mkdir()
    agents = {"bulky": {"argv": list(DEFAULT_TEMPLATES["reference"].argv), "delivery": "env"}}
    payload = {"steps": 1, "blob": "x" * (INLINE_ENVELOPE_LIMIT + 1)}  # the envelope goes through a file
    with small_tmpfs(output / "full", inodes=2 if what == "working directory" else None) as full:  # 2: root, filler
        fill_up(full)
        task_id = queue.create_task(
            qdb, queue.NewTask(title="bulky", agent_type="bulky", payload=payload, workdir="full/work")
        )
        summary = run_agent_queue(
            max_agents=1, retries=2, agents=agents, logs_dir=str(tmp_path / "logs"), **_kw(tmp_path, qdb)
        )
        workdir = output / "full" / "work"
        assert not (workdir / ENVELOPE_FILE).exists(), "no partly written envelope is left on the full disk"
    named = (
        f"the working directory of task {task_id} {workdir}"
        if what == "working directory"
        else f"the envelope of task {task_id} to {workdir / ENVELOPE_FILE}"
    )
    error = (
        f"cannot write {named}: No space left on device (disk full); make room for it "
        "(or pass another --output-dir / output_dir), then retry the task"
    )
    assert summary["outcomes"] == {task_id: f"failed: {error}"}
    task = queue.get_task(qdb, task_id)
    assert (task.status, task.error, task.worker) == ("failed", error, None)
    assert [r["outcome"] for r in _runs(qdb)] == ["failed"]
    with connection(qdb) as conn:
        [worker] = [row[0] for row in conn.execute("SELECT DISTINCT worker FROM flowyard.agent_runs")]
    assert marked_pids(agent_mark(worker)) == [], "no agent process was started"
