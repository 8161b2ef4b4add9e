"""The agent queue on the real embedded PostgreSQL, each test in a fresh database."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import psutil
import psycopg
import pytest
from alembic import command
from psycopg import sql

from tasks import agent_queue as queue
from tasks.agent_execution import Recovery, _reported_outcome, recover_stale_tasks
from tasks.agent_process import REFERENCE_TEMPLATE, AgentLimits, agent_mark
from tasks.db import connection
from tasks.errors import ServerReadOnly, UserError
from tasks.process_group import group_members, spawn_group, terminate_group
from tasks.state import migration_config, state_url
from tests.conftest import Role, run_cli
from tests.outage_support import outage_proxy
from tests.process_support import started_together


@pytest.fixture()
def qdb(fresh_db: str) -> str:
    return state_url(fresh_db)


def _new(
    title: str, priority: str = "medium", blocked_by: tuple[int, ...] = (), **kw: object
) -> queue.NewTask:
    return queue.NewTask(title=title, agent_type="reference", priority=priority, blocked_by=blocked_by, **kw)  # type: ignore[arg-type]


def test_a_worker_claims_only_the_agent_types_it_has(qdb: str) -> None:
    custom = queue.create_task(qdb, queue.NewTask(title="custom", agent_type="coder", priority="critical"))
    plain = queue.create_task(qdb, _new("plain"))
    assert [t.id for t in queue.claim_ready(qdb, "w1", 10, ["reference"])] == [plain]
    assert queue.get_task(qdb, custom).status == "pending"
    waiting = queue.waiting_for_agents(qdb, ["reference"])
    assert list(waiting) == [custom] and "no 'coder' agent in this run" in waiting[custom]
    assert [t.id for t in queue.claim_ready(qdb, "w2", 10, ["reference", "coder"])] == [custom]
    assert queue.waiting_for_agents(qdb, ["reference"]) == {}


def test_a_task_its_dependency_holds_up_is_not_said_to_wait_for_an_agent(qdb: str) -> None:
    """A 'coder' task behind a failed dependency is blocked, whatever agents a run has: telling the
    user to run one with a 'coder' agent hid the failure, which queue run counts."""
    failed = queue.create_task(qdb, _new("build"))
    queue.claim_ready(qdb, "w1", 1)
    queue.fail_task(qdb, failed, "w1", "broken")
    custom = queue.create_task(qdb, queue.NewTask(title="custom", agent_type="coder", blocked_by=(failed,)))
    assert list(queue.unrunnable(qdb).blocked) == [custom]
    assert queue.waiting_for_agents(qdb, ["reference"]) == {}


def test_claims_follow_priority_then_age_and_only_ready_tasks(qdb: str) -> None:
    low = queue.create_task(qdb, _new("low", "low"))
    first = queue.create_task(qdb, _new("first"))
    crit = queue.create_task(qdb, _new("crit", "critical"))
    blocked = queue.create_task(qdb, _new("blocked", "critical", (first,)))
    draft = queue.create_task(qdb, _new("draft", "critical", draft=True))
    claimed = queue.claim_ready(qdb, "w1", 10)
    assert [t.id for t in claimed] == [crit, first, low]
    assert all(t.status == "in_progress" and t.worker == "w1" for t in claimed)
    assert queue.claim_ready(qdb, "w2", 10) == []
    assert queue.record_checkpoint(qdb, first, "w1", 0, {"step": 7})
    attempt = queue.start_attempt(qdb, first, "w1", None)
    assert attempt.number == 1 and attempt.checkpoint == {"attempt": 0, "kind": "agent", "state": {"step": 7}}
    assert queue.finish_attempt(qdb, attempt.run_id, "w1", "completed", result={"ok": 1}) == "completed"
    assert [t.id for t in queue.claim_ready(qdb, "w2", 10)] == [blocked]
    assert queue.get_task(qdb, draft).status == "draft"
    queue.submit_task(qdb, draft)
    assert [t.id for t in queue.claim_ready(qdb, "w2", 10)] == [draft]


def test_transitions_and_their_errors(qdb: str) -> None:
    task_id = queue.create_task(qdb, _new("x"))
    with pytest.raises(UserError, match=r"cannot retry task \d+: it is pending"):
        queue.retry_task(qdb, task_id)
    queue.cancel_task(qdb, task_id)
    assert queue.get_task(qdb, task_id).status == "cancelled"
    queue.retry_task(qdb, task_id)
    assert queue.get_task(qdb, task_id).status == "pending"
    with pytest.raises(UserError, match="no agent task 999999"):
        queue.cancel_task(qdb, 999999)
    with pytest.raises(UserError, match=r"unknown dependency task id\(s\) \[424242\]"):
        queue.create_task(qdb, _new("y", blocked_by=(424242,)))


@pytest.mark.parametrize("number", [float("nan"), float("inf"), float("-inf")])
def test_a_payload_postgresql_cannot_store_is_refused_in_one_line(qdb: str, number: float) -> None:
    """json.loads reads NaN and Infinity (and 1e999 as Infinity); jsonb refuses them with a
    multi-line error naming neither the task nor the fix."""
    refused = r"^the payload of task 'x' holds NaN, Infinity or a number beyond"
    with pytest.raises(UserError, match=refused) as raised:
        queue.create_task(qdb, _new("x", payload={"metrics": {"loss": [number]}}))
    assert "\n" not in str(raised.value)
    assert queue.list_tasks(qdb) == [], "nothing was created"


def _nested(levels: int) -> dict[str, Any]:
    value: Any = 1
    for _ in range(levels - 1):
        value = [value]
    return {"deep": value}


def test_a_payload_nested_too_deeply_is_refused_in_one_line(qdb: str) -> None:
    """Nested near Python's recursion limit, a payload was a RecursionError traceback when psycopg
    encoded it; now the limit is a fixed one, named in the message, and one level less is stored."""
    for levels in (queue.MAX_PAYLOAD_DEPTH + 1, 5_000):
        with pytest.raises(UserError) as raised:
            queue.create_task(qdb, _new("deep", payload=_nested(levels)))
        assert str(raised.value) == (
            f"the payload of task 'deep' nests objects or arrays {levels} levels deep; "
            f"at most {queue.MAX_PAYLOAD_DEPTH} are accepted: flatten it"
        )
    assert queue.list_tasks(qdb) == [], "nothing was created"
    task_id = queue.create_task(qdb, _new("deep", payload=_nested(queue.MAX_PAYLOAD_DEPTH)))
    assert queue.get_task(qdb, task_id).payload == _nested(queue.MAX_PAYLOAD_DEPTH)


def test_review_holds_dependents_until_approved(qdb: str) -> None:
    reviewed = queue.create_task(qdb, _new("needs review", requires_review=True))
    after = queue.create_task(qdb, _new("after", blocked_by=(reviewed,)))
    queue.claim_ready(qdb, "w", 5)
    run_id = queue.start_attempt(qdb, reviewed, "w", None).run_id
    assert queue.finish_attempt(qdb, run_id, "w", "completed", result={}) == "review"
    assert queue.claim_ready(qdb, "w", 5) == []
    queue.approve_task(qdb, reviewed)
    assert [t.id for t in queue.claim_ready(qdb, "w", 5)] == [after]


def test_failed_dependency_blocks_with_a_reason(qdb: str) -> None:
    dep = queue.create_task(qdb, _new("build"))
    child = queue.create_task(qdb, _new("deploy", blocked_by=(dep,)))
    queue.claim_ready(qdb, "w", 5)
    queue.fail_task(qdb, dep, "w", "compiler exploded")
    grandchild = queue.create_task(qdb, _new("announce", blocked_by=(child,)))
    assert queue.unrunnable(qdb).blocked == {
        child: f"not run: dependency #{dep} 'build' is failed",
        grandchild: f"not run: dependency #{child} 'deploy' is blocked",
    }
    assert queue.get_task(qdb, child).blocked_reason.startswith("not run: dependency")
    queue.retry_task(qdb, dep)
    assert [queue.get_task(qdb, t).blocked_reason for t in (child, grandchild)] == [None, None]
    assert queue.unrunnable(qdb) == queue.Unrunnable(blocked={}, waiting={})


def test_a_reason_quoting_a_title_stored_with_control_characters_stays_on_one_line(qdb: str) -> None:
    """A title stored before flowyard refused control characters (or by hand) is quoted as is
    in its dependents' reason: the listing's note cut it at the newline, dropping the
    dependency's status, and the run's warning and artifact split there."""
    dep = queue.create_task(qdb, _new("build"))
    child = queue.create_task(qdb, _new("deploy", blocked_by=(dep,)))
    with connection(qdb) as conn:
        conn.execute("UPDATE flowyard.agent_tasks SET title = %s WHERE id = %s", ("two\nlines\x1b[31m", dep))
    queue.claim_ready(qdb, "w", 5)
    queue.fail_task(qdb, dep, "w", "first line\tof\x1b[2J an error\nsecond")
    reason = f"not run: dependency #{dep} 'two\\nlines\\x1b[31m' is failed"
    assert queue.unrunnable(qdb).blocked == {child: reason}
    assert queue.get_task(qdb, child).note == reason
    assert queue.get_task(qdb, child).blocked_reason == f"not run: dependency #{dep} 'two\nlines\x1b[31m' is failed"
    assert queue.get_task(qdb, dep).note == "first line\\tof\\x1b[2J an error … (1 more lines)"


def test_a_draft_or_review_dependency_makes_its_dependents_wait_with_a_reason(qdb: str) -> None:
    draft = queue.create_task(qdb, _new("spec", draft=True))
    reviewed = queue.create_task(qdb, _new("design", requires_review=True))
    queue.claim_ready(qdb, "w", 1)
    run_id = queue.start_attempt(qdb, reviewed, "w", None).run_id
    assert queue.finish_attempt(qdb, run_id, "w", "completed", result={}) == "review"
    child = queue.create_task(qdb, _new("build", blocked_by=(draft, reviewed)))
    grandchild = queue.create_task(qdb, _new("ship", blocked_by=(child,)))
    assert queue.unrunnable(qdb) == queue.Unrunnable(
        blocked={},
        waiting={
            child: f"not run: dependency #{draft} 'spec' is draft (submit it with `flowyard queue submit "
            f"{draft}`), #{reviewed} 'design' is in review (approve it with `flowyard queue approve {reviewed}`)",
            grandchild: f"not run: dependency #{child} 'build' is waiting",
        },
    )
    assert queue.get_task(qdb, grandchild).note == f"not run: dependency #{child} 'build' is waiting"
    queue.submit_task(qdb, draft)
    assert queue.get_task(qdb, child).note == (
        f"not run: dependency #{reviewed} 'design' is in review (approve it with `flowyard queue approve {reviewed}`)"
    )
    queue.approve_task(qdb, reviewed)
    assert [queue.get_task(qdb, t).note for t in (child, grandchild)] == ["", ""]
    assert queue.unrunnable(qdb) == queue.Unrunnable(blocked={}, waiting={})


def test_cancelling_a_dependency_blocks_its_dependents_at_once(qdb: str) -> None:
    """The reason is written by the cancel itself, not only at the next queue run's end, so
    ``queue list`` shows why the dependent will not run as soon as the dependency is cancelled."""
    dep = queue.create_task(qdb, _new("build"))
    child = queue.create_task(qdb, _new("deploy", blocked_by=(dep,)))
    queue.cancel_task(qdb, dep)
    assert queue.get_task(qdb, child).note == f"not run: dependency #{dep} 'build' is cancelled"


def test_a_task_created_after_a_dependency_it_cannot_run_on_says_so_at_once(qdb: str) -> None:
    """A task created with ``--after`` a cancelled, failed or draft task was listed as plain
    ``pending``, with no reason, until the next queue run's end: ``queue list`` looked as if it
    would run next."""
    cancelled = queue.create_task(qdb, _new("build"))
    queue.cancel_task(qdb, cancelled)
    draft = queue.create_task(qdb, _new("spec", draft=True))
    blocked = queue.create_task(qdb, _new("deploy", blocked_by=(cancelled,)))
    waiting = queue.create_task(qdb, _new("write", blocked_by=(draft,)))
    assert queue.get_task(qdb, blocked).note == f"not run: dependency #{cancelled} 'build' is cancelled"
    assert queue.get_task(qdb, waiting).note == (
        f"not run: dependency #{draft} 'spec' is draft (submit it with `flowyard queue submit {draft}`)"
    )
    ready = queue.create_task(qdb, _new("test", blocked_by=(draft,), draft=True))
    assert queue.get_task(qdb, ready).note == "", "a draft is not run anyway: no reason, as before"


def test_a_cancelled_task_does_not_keep_a_dependency_reason_that_went_stale(qdb: str) -> None:
    """A blocked task, cancelled, kept its "not run: dependency … is failed" note, which ``queue list``
    went on showing after that dependency was retried and completed: the task is cancelled because
    someone cancelled it, and a dependency it never waited for since says nothing of it."""
    dep = queue.create_task(qdb, _new("build"))
    child = queue.create_task(qdb, _new("deploy", blocked_by=(dep,)))
    queue.cancel_task(qdb, dep)
    assert queue.get_task(qdb, child).note == f"not run: dependency #{dep} 'build' is cancelled"
    queue.cancel_task(qdb, child)
    queue.retry_task(qdb, dep)
    assert (queue.get_task(qdb, child).status, queue.get_task(qdb, child).note) == ("cancelled", "")
    queue.retry_task(qdb, child)
    assert queue.get_task(qdb, child).note == "", "its dependency is pending, it can run after it"


def test_a_task_cancelled_as_a_draft_is_a_draft_again_when_retried(qdb: str) -> None:
    """It went back as ``pending`` and was run, though nobody had submitted it."""
    draft = queue.create_task(qdb, _new("spec", draft=True))
    child = queue.create_task(qdb, _new("build", blocked_by=(draft,)))
    queue.cancel_task(qdb, draft)
    assert queue.retry_task(qdb, draft) == "draft"
    assert queue.get_task(qdb, draft).status == "draft" and queue.claim_ready(qdb, "w", 5) == []
    assert queue.get_task(qdb, child).note.startswith(f"not run: dependency #{draft} 'spec' is draft")
    assert queue.submit_task(qdb, draft) == "pending"
    queue.cancel_task(qdb, draft)
    assert queue.retry_task(qdb, draft) == "pending", "cancelled while pending: pending again"


def test_a_task_cancelled_in_review_runs_again_from_its_checkpoint_when_retried(qdb: str) -> None:
    """Cancelling in review rejects the result, and a retry is how the work is redone: put back in
    ``review`` (as a cancelled draft goes back to ``draft``), it could only be approved."""
    reviewed = queue.create_task(qdb, _new("design", requires_review=True))
    child = queue.create_task(qdb, _new("build", blocked_by=(reviewed,)))
    [task] = queue.claim_ready(qdb, "w", 1)
    attempt = queue.start_attempt(qdb, task.id, "w", None)
    assert queue.record_checkpoint(qdb, task.id, "w", attempt.number, {"step": 3})
    assert queue.finish_attempt(qdb, attempt.run_id, "w", "completed", result={"design": "done"}) == "review"
    queue.cancel_task(qdb, reviewed)
    assert queue.retry_task(qdb, reviewed) == "pending"
    assert [t.id for t in queue.claim_ready(qdb, "w", 5)] == [reviewed], "the task waiting for it does not run"
    again = queue.get_task(qdb, reviewed)
    assert (again.status, again.attempts) == ("in_progress", 1)
    assert again.last_checkpoint == {"attempt": 1, "kind": "agent", "state": {"step": 3}}, "handed back to the agent"
    assert queue.get_task(qdb, child).status == "pending"


_CLAIMER = textwrap.dedent(
    """
    import json, sys
    from tasks import agent_queue as queue
    url, name = sys.argv[1], sys.argv[2]
    print("ready", flush=True)
    sys.stdin.readline()  # start line: both workers claim from the same instant
    got = []
    while True:
        batch = queue.claim_ready(url, name, 3)
        if not batch:
            break
        got += [t.id for t in batch]
    print(json.dumps(got))
    """
)


def test_two_worker_processes_never_claim_the_same_task(qdb: str) -> None:
    ids = {
        queue.create_task(qdb, _new(f"t{i}", ("critical", "high", "medium", "low")[i % 4]))
        for i in range(300)
    }
    workers = started_together(_CLAIMER, [qdb, "w0"], [qdb, "w1"])
    claims = [json.loads(w.communicate(timeout=300)[0]) for w in workers]
    assert all(w.returncode == 0 for w in workers)
    assert claims[0] and claims[1], "both workers claimed concurrently"
    assert not set(claims[0]) & set(claims[1])
    assert set(claims[0]) | set(claims[1]) == ids
    owners = {t.id: t.worker for t in queue.list_tasks(qdb, "in_progress")}
    assert all(owners[i] == "w0" for i in claims[0]) and all(owners[i] == "w1" for i in claims[1])


def _dead_worker_id() -> str:
    """The worker id of a process that has exited (its pid and start time name no live process)."""
    return subprocess.run(
        [sys.executable, "-c", "from tasks.agent_queue import new_worker_id; print(new_worker_id())"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


def test_a_worker_in_another_pid_namespace_of_this_host_is_not_judged_dead() -> None:
    """A container on the same kernel (host networking) has this host's name but its own process
    ids: its worker's pid names another process here, or none, and it was judged dead, its live
    tasks handed to a second agent. Its liveness cannot be told from here: None, the lease decides."""
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("needs util-linux's unshare to start a process in a PID namespace of its own")
    as_user = [] if os.geteuid() == 0 else ["--user", "--map-root-user"]
    other = subprocess.run(
        [unshare, *as_user, "--pid", "--fork", "--mount-proc", sys.executable, "-c",
         "from tasks.agent_queue import new_worker_id; print(new_worker_id())"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    host, pid, _, _ = other.rsplit(":", 3)
    assert pid == "1", "the worker is its namespace's first process, which here is another one"
    assert host.split("~")[0] == socket.gethostname() and host != queue.process_space()
    assert queue.worker_alive(other) is None
    assert queue.worker_alive(queue.new_worker_id()) is True


def test_tasks_of_a_dead_worker_are_recovered_and_their_agents_ended(qdb: str) -> None:
    """The agent's group and its child that left the group go; an agent of the same task id run
    by another worker (another queue database) is left alone."""
    gone = _dead_worker_id()
    assert queue.worker_alive(gone) is False
    assert queue.worker_alive(queue.new_worker_id()) is True
    task_id = queue.create_task(qdb, _new("orphaned"))
    queue.claim_ready(qdb, gone, 1)
    queue.start_attempt(qdb, task_id, gone, None)
    agent, children = _reference_agent(task_id, agent_mark(gone, task_id))
    other = agent_mark(queue.new_worker_id(), task_id)
    bystander, _ = _reference_agent(task_id, other)
    try:
        queue.set_agent_pgid(qdb, task_id, gone, 1, agent.pid)
        assert recover_stale_tasks(qdb, AgentLimits(lease_seconds=3600)) == Recovery([task_id], {}, [])
        agent.wait(timeout=30)
        assert group_members(agent.pid) == []
        assert not [p for p in children if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]
        assert bystander.poll() is None, "another worker's agent of a task with the same id runs on"
        task = queue.get_task(qdb, task_id)
        assert task.status == "pending" and task.worker is None and "is gone" in task.error
    finally:
        terminate_group(bystander.pid, 0.0, other)


_SLOW_TO_STOP = """
import signal, sys, time

def stop(*_):
    time.sleep(6)  # longer than the default grace period (5 s), well inside the run's
    open(sys.argv[1], "w").write("stopped cleanly")
    sys.exit(0)

signal.signal(signal.SIGTERM, stop)
print("ready", flush=True)
time.sleep(600)
"""


def test_recovery_gives_a_leftover_agent_the_runs_grace_period(qdb: str, tmp_path: Path) -> None:
    """An agent a dead worker left gets the run's ``grace_seconds`` to stop after SIGTERM (say to
    write its last checkpoint), as the run's own agents do, not the default 5 s."""
    gone = _dead_worker_id()
    task_id = queue.create_task(qdb, _new("slow to stop"))
    queue.claim_ready(qdb, gone, 1)
    queue.start_attempt(qdb, task_id, gone, None)
    marker = tmp_path / "stopped"
    mark = agent_mark(gone, task_id)
    agent = spawn_group(
        [sys.executable, "-c", _SLOW_TO_STOP, str(marker)], env={**os.environ, **mark}, stdout=subprocess.PIPE
    )
    try:
        assert agent.stdout is not None and agent.stdout.readline() == b"ready\n"
        assert recover_stale_tasks(qdb, AgentLimits(lease_seconds=3600, grace_seconds=120)) == Recovery([task_id], {}, [])
        assert agent.wait(timeout=60) == 0, "the agent ended on its own, not by SIGKILL"
        assert marker.read_text() == "stopped cleanly"
    finally:
        terminate_group(agent.pid, 0.0, mark)


def _open_attempts(url: str, task_id: int) -> list[int]:
    with connection(url) as conn:
        rows = conn.execute(
            "SELECT attempt FROM flowyard.agent_runs WHERE task_id = %s AND outcome IS NULL ORDER BY id", (task_id,)
        ).fetchall()
    return [row[0] for row in rows]


@pytest.mark.parametrize("then_retried", [False, True], ids=["cancelled", "cancelled-then-retried"])
def test_a_dead_workers_attempt_of_a_cancelled_task_is_ended_and_closed(qdb: str, then_retried: bool) -> None:
    """A worker killed while it stopped the agent of a cancelled task (or a task cancelled after its
    worker died) never closed the attempt. The next run's recovery ends what that agent left (here
    its reaper missed it) and closes the attempt as interrupted, also once the task was retried,
    instead of leaving it open for good; the task itself stays where the user put it."""
    gone = _dead_worker_id()
    task_id = queue.create_task(qdb, _new("cancelled under a dead worker"))
    queue.claim_ready(qdb, gone, 1)
    queue.start_attempt(qdb, task_id, gone, None)
    agent, children = _reference_agent(task_id, agent_mark(gone, task_id))
    try:
        queue.cancel_task(qdb, task_id)
        if then_retried:
            queue.retry_task(qdb, task_id)  # allowed: the attempt's worker is dead
        assert recover_stale_tasks(qdb, AgentLimits(lease_seconds=3600)) == Recovery([], {}, []), "a cancelled or pending task is not handed back"
        assert group_members(agent.pid) == [], "the agent left by the dead worker is ended"
        assert not [p for p in children if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]
        agent.wait(timeout=30)
        assert _open_attempts(qdb, task_id) == []
        with connection(qdb) as conn:
            outcomes = conn.execute("SELECT outcome FROM flowyard.agent_runs WHERE task_id = %s", (task_id,))
            assert [row[0] for row in outcomes] == ["interrupted"]
        task = queue.get_task(qdb, task_id)
        assert task.status == ("pending" if then_retried else "cancelled")
        assert (task.worker, task.agent_pgid) == (None, None), "no hold of the dead worker is left"
    finally:
        terminate_group(agent.pid, 0.0, agent_mark(gone, task_id))


def test_a_cancelled_task_lets_go_of_its_worker_once_its_attempt_is_closed(qdb: str) -> None:
    """`queue cancel` of a running task: the worker stops the agent, records its graceful_shutdown
    checkpoint and closes the attempt, but the task went on naming that worker and the agent's
    process group (in `agent-task-list`'s JSON), long after both were gone."""
    task_id = queue.create_task(qdb, _new("long"))
    queue.claim_ready(qdb, "w", 1)
    attempt = queue.start_attempt(qdb, task_id, "w", None)
    queue.set_agent_pgid(qdb, task_id, "w", attempt.number, 424242)
    queue.cancel_task(qdb, task_id)
    assert queue.heartbeat(qdb, task_id, "w", attempt.number) is False, "told to stop its agent"
    assert queue.record_checkpoint(qdb, task_id, "w", attempt.number, None, "graceful_shutdown"), "held while stopping"
    assert queue.finish_attempt(qdb, attempt.run_id, "w", "interrupted") is None, "no longer its task"
    task = queue.get_task(qdb, task_id)
    assert (task.status, task.worker, task.agent_pgid) == ("cancelled", None, None)
    assert task.last_checkpoint is not None and task.last_checkpoint["kind"] == "graceful_shutdown"
    assert _open_attempts(qdb, task_id) == []


def test_an_attempt_started_again_by_its_worker_closes_the_one_it_supersedes(qdb: str) -> None:
    """A start whose answer was lost with the connection is made again (``riding_out``), and an
    attempt whose end could not be written is followed by its retry: the earlier attempt stayed
    open for good beside its successor. Cancelled, the task could not be retried ("its cancelled
    attempt 1 is still stopping its agent") though no agent ran. The new start closes it as
    superseded; an open attempt of another worker is left to recovery, which ends its agent too."""
    worker, gone = queue.new_worker_id(), _dead_worker_id()
    other = queue.create_task(qdb, _new("another worker's"))
    queue.claim_ready(qdb, gone, 1)
    queue.start_attempt(qdb, other, gone, None)
    queue.cancel_task(qdb, other)
    queue.retry_task(qdb, other)  # allowed: its worker is dead
    task_id = queue.create_task(qdb, _new("started twice"))
    assert [t.id for t in queue.claim_ready(qdb, worker, 2)] == [other, task_id]
    queue.start_attempt(qdb, other, worker, None)
    assert _open_attempts(qdb, other) == [1, 2], "the dead worker's attempt is recovery's to close"
    queue.start_attempt(qdb, task_id, worker, None)
    second = queue.start_attempt(qdb, task_id, worker, None)  # the first one's answer was lost
    assert _open_attempts(qdb, task_id) == [2]
    queue.cancel_task(qdb, task_id)
    queue.finish_attempt(qdb, second.run_id, worker, "interrupted", error="cancelled")
    assert queue.retry_task(qdb, task_id) == "pending"
    with connection(qdb) as conn:
        rows = conn.execute(
            "SELECT attempt, outcome, error FROM flowyard.agent_runs WHERE task_id = %s ORDER BY id", (task_id,)
        ).fetchall()
    assert rows == [
        (1, "interrupted", "superseded by attempt 2, started by the same worker"),
        (2, "interrupted", "cancelled"),
    ]


def _reference_agent(task_id: int, mark: dict[str, str]) -> tuple[subprocess.Popen[bytes], list[int]]:
    """A long reference agent with a child in its group and one out of it, started with ``mark``
    as a worker would; returns it once both children are reported, with their pids."""
    payload = {"steps": 1000, "sleep": 0.1, "spawn_child": True, "detach_child": True}
    agent = spawn_group(
        [*REFERENCE_TEMPLATE.argv, json.dumps({"task_id": task_id, "payload": payload})],
        env={**os.environ, **mark},
        stdout=subprocess.PIPE,
        stdin=subprocess.PIPE,
    )
    assert agent.stdout is not None
    children: list[int] = []
    while len(children) < 2:
        message = json.loads(agent.stdout.readline())
        if message.get("message", "").startswith("spawned child"):
            children.append(int(message["message"].rsplit(" ", 1)[1]))
    return agent, children


def test_retry_waits_for_a_cancelled_attempt_whose_worker_is_alive(qdb: str) -> None:
    """A cancelled attempt's open run blocks a retry while its worker lives (its agent may still
    run), and no longer once that worker is dead (its reaper ended the agent)."""
    gone = _dead_worker_id()
    for worker, refused in ((queue.new_worker_id(), True), (gone, False)):
        task_id = queue.create_task(qdb, _new(f"run by {worker}"))
        [claimed] = queue.claim_ready(qdb, worker, 1)
        queue.start_attempt(qdb, claimed.id, worker, None)
        queue.cancel_task(qdb, task_id)
        assert queue.heartbeat(qdb, task_id, worker, 1) is False, "the cancelled attempt must stop"
        if refused:
            stopping = rf"^cannot retry task {task_id} yet: its cancelled attempt 1"
            with pytest.raises(UserError, match=stopping):
                queue.retry_task(qdb, task_id)
            assert queue.get_task(qdb, task_id).status == "cancelled"
        else:
            queue.retry_task(qdb, task_id)
            task = queue.get_task(qdb, task_id)
            assert task.status == "pending" and task.worker is None


def _heartbeat_age(url: str, task_id: int, seconds: float) -> None:
    """Make the task's last heartbeat ``seconds`` old, as a worker silent that long leaves it."""
    with connection(url) as conn:
        conn.execute(
            "UPDATE flowyard.agent_tasks SET heartbeat_at = now() - make_interval(secs => %s) WHERE id = %s",
            (seconds, task_id),
        )


@pytest.mark.parametrize(
    ("lease", "silent", "refused"),
    [(20.0, 60.0, False), (600.0, 300.0, True), (None, 60.0, True), (None, 150.0, False)],
)
def test_retry_judges_a_cancelled_attempt_by_the_lease_its_worker_ran_with(
    qdb: str, lease: float | None, silent: float, refused: bool
) -> None:
    """Silent for longer than its own worker's lease, the attempt counts as gone (not only past
    the default 120 s); silent for less, it may still be stopping its agent. The worker runs on
    another host, so only the heartbeat can tell. An attempt recorded before attempts had a lease
    (None here) is judged by the default one."""
    elsewhere = "another-host:4242:1700000000:cafe0001"
    assert queue.worker_alive(elsewhere) is None
    task_id = queue.create_task(qdb, _new("elsewhere"))
    queue.claim_ready(qdb, elsewhere, 1)
    queue.start_attempt(qdb, task_id, elsewhere, None, lease_seconds=lease or queue.DEFAULT_LEASE_SECONDS)
    if lease is None:
        with connection(qdb) as conn:
            conn.execute("UPDATE flowyard.agent_runs SET lease_seconds = NULL WHERE task_id = %s", (task_id,))
    queue.cancel_task(qdb, task_id)
    _heartbeat_age(qdb, task_id, silent)
    if refused:
        with pytest.raises(UserError, match=rf"^cannot retry task {task_id} yet: its cancelled attempt 1"):
            queue.retry_task(qdb, task_id)
        assert queue.get_task(qdb, task_id).status == "cancelled"
    else:
        queue.retry_task(qdb, task_id)
        assert queue.get_task(qdb, task_id).status == "pending"


def test_a_task_retried_by_hand_and_claimed_again_by_a_worker_that_died_before_starting_it_is_resumed(
    qdb: str,
) -> None:
    """`queue retry` of a task its run gave up on, claimed again by the same worker (a run still
    draining), which died before it started the new attempt: recovery hands the task back. The
    attempt that gave up belongs to the earlier claim, so it does not fail the task again (it did:
    worker and attempt number matched). A last attempt of the current claim still does."""
    gone = _dead_worker_id()
    task_id = queue.create_task(qdb, _new("retried by hand"))
    queue.claim_ready(qdb, gone, 1)
    attempt = queue.start_attempt(qdb, task_id, gone, None)
    assert queue.finish_attempt(qdb, attempt.run_id, gone, "failed", error="disk on fire", final=True) == "in_progress"
    queue.fail_task(qdb, task_id, gone, "disk on fire")
    queue.retry_task(qdb, task_id)
    assert [t.id for t in queue.claim_ready(qdb, gone, 1)] == [task_id]
    assert recover_stale_tasks(qdb, AgentLimits(lease_seconds=3600)) == Recovery([task_id], {}, [])
    task = queue.get_task(qdb, task_id)
    assert (task.status, task.worker, task.attempts) == ("pending", None, 1) and "is gone" in (task.error or "")
    queue.claim_ready(qdb, gone, 1)
    attempt = queue.start_attempt(qdb, task_id, gone, None)
    queue.finish_attempt(qdb, attempt.run_id, gone, "failed", error="disk still on fire", final=True)
    recovery = recover_stale_tasks(qdb, AgentLimits(lease_seconds=3600))
    assert recovery.resumed == [] and recovery.failed[task_id].startswith(
        "attempt 2, the last of its run, failed: disk still on fire"
    )


@pytest.mark.parametrize("started", [False, True], ids=["claimed", "attempt-started"])
def test_recovery_judges_a_silent_worker_by_the_lease_it_claimed_with(qdb: str, started: bool) -> None:
    """A worker on another host (only its heartbeat can tell) that claimed with a 600 s lease,
    silent for 300 s, may still run: a run with a 20 s lease leaves its task alone, also before it
    started the attempt. Silent past its own lease, it is gone even for a run with a longer one."""
    elsewhere = "another-host:4242:1700000000:cafe0002"
    task_id = queue.create_task(qdb, _new("long lease"))
    queue.claim_ready(qdb, elsewhere, 1, lease_seconds=600)
    if started:
        queue.start_attempt(qdb, task_id, elsewhere, None, lease_seconds=600)
    _heartbeat_age(qdb, task_id, 300)
    assert recover_stale_tasks(qdb, AgentLimits(lease_seconds=20)) == Recovery([], {}, [])
    task = queue.get_task(qdb, task_id)
    assert (task.status, task.worker) == ("in_progress", elsewhere)
    _heartbeat_age(qdb, task_id, 700)
    assert recover_stale_tasks(qdb, AgentLimits(lease_seconds=3600)) == Recovery([task_id], {}, [])
    assert queue.get_task(qdb, task_id).status == "pending"


def test_recovery_judges_an_open_attempt_of_a_cancelled_task_by_the_lease_it_started_with(qdb: str) -> None:
    """A worker on another host that started an attempt with a 600 s lease, silent for 300 s
    since its task was cancelled, may still be stopping the agent: a run with a 20 s lease leaves
    the attempt open. Silent past its own lease, the attempt is closed even by a run with a longer
    one; the task stays cancelled either way."""
    elsewhere = "another-host:4242:1700000000:cafe0003"
    task_id = queue.create_task(qdb, _new("cancelled elsewhere"))
    queue.claim_ready(qdb, elsewhere, 1, lease_seconds=600)
    queue.start_attempt(qdb, task_id, elsewhere, None, lease_seconds=600)
    queue.cancel_task(qdb, task_id)
    _heartbeat_age(qdb, task_id, 300)
    assert recover_stale_tasks(qdb, AgentLimits(lease_seconds=20)) == Recovery([], {}, [])
    assert _open_attempts(qdb, task_id) == [1], "the attempt may still be stopping its agent"
    _heartbeat_age(qdb, task_id, 700)
    assert recover_stale_tasks(qdb, AgentLimits(lease_seconds=3600)) == Recovery([], {}, [])
    assert _open_attempts(qdb, task_id) == []
    assert queue.get_task(qdb, task_id).status == "cancelled"


def test_a_queue_from_before_claims_were_counted_is_upgraded_in_place(fresh_db: str) -> None:
    """A state database at agents_0003 keeps its tasks and attempts through the upgrade, and a
    task whose worker died after its run's last attempt failed is still failed by recovery."""
    gone = _dead_worker_id()
    command.upgrade(migration_config(fresh_db), "agents_0003")
    with connection(fresh_db) as conn:
        conn.execute(
            "INSERT INTO flowyard.agent_tasks (title, status, agent_type, attempts, worker, heartbeat_at) "
            "VALUES ('from before', 'in_progress', 'reference', 1, %s, now())",
            (gone,),
        )
        conn.execute(
            "INSERT INTO flowyard.agent_runs (task_id, attempt, agent_type, worker, finished_at, outcome, error, final) "
            "SELECT id, 1, 'reference', %s, now(), 'failed', 'disk on fire', true FROM flowyard.agent_tasks",
            (gone,),
        )
    url = state_url(fresh_db)
    [task] = queue.list_tasks(url)
    assert (task.title, task.status, task.attempts, task.worker) == ("from before", "in_progress", 1, gone)
    recovery = recover_stale_tasks(url, AgentLimits(lease_seconds=3600))
    assert recovery.failed[task.id].startswith("attempt 1, the last of its run, failed: disk on fire")


def _old_checkpoints(url: str, title: str, history: list[tuple[int, str, dict[str, Any]]]) -> None:
    """A task as older flowyard left it: pending, its checkpoint ``history`` (attempt, kind, state)
    stored and the last one its ``last_checkpoint``."""
    attempt, kind, state = history[-1]
    last = {"attempt": attempt, "kind": kind, "state": state}
    with connection(url) as conn:
        conn.execute(
            "INSERT INTO flowyard.agent_tasks (title, status, agent_type, attempts, last_checkpoint) "
            "VALUES (%s, 'pending', 'reference', %s, %s)",
            (title, attempt, json.dumps(last)),
        )
        for attempt, kind, state in history:
            conn.execute(
                "INSERT INTO flowyard.agent_checkpoints (task_id, attempt, kind, state) "
                "SELECT id, %s, %s, %s FROM flowyard.agent_tasks WHERE title = %s",
                (attempt, kind, json.dumps(state), title),
            )


def test_an_empty_shutdown_checkpoint_of_older_flowyard_is_not_handed_back(fresh_db: str) -> None:
    """Older flowyard recorded a stop before the agent saved any state as a ``graceful_shutdown``
    checkpoint with the state ``{}``, and the next attempt was handed it: the agent took an empty
    state for a resume. The upgrade makes those null, so the next attempt gets none; a ``{}`` the
    agent saved itself is still its checkpoint."""
    command.upgrade(migration_config(fresh_db), "agents_0005")
    _old_checkpoints(fresh_db, "stopped early", [(1, "graceful_shutdown", {}), (2, "graceful_shutdown", {})])
    _old_checkpoints(fresh_db, "saved empty", [(1, "agent", {}), (1, "graceful_shutdown", {})])
    _old_checkpoints(
        fresh_db,
        "resumed later",
        [(1, "graceful_shutdown", {}), (2, "agent", {"step": 2}), (2, "graceful_shutdown", {"step": 2})],
    )
    url = state_url(fresh_db)
    tasks = {t.title: t.id for t in queue.claim_ready(url, "w1", 10)}
    handed = {title: queue.start_attempt(url, task_id, "w1", None).checkpoint for title, task_id in tasks.items()}
    assert handed == {
        "stopped early": None,
        "saved empty": {"attempt": 1, "kind": "graceful_shutdown", "state": {}},
        "resumed later": {"attempt": 2, "kind": "graceful_shutdown", "state": {"step": 2}},
    }
    history = {title: [(h["kind"], h["state"]) for h in queue.checkpoint_history(url, t)] for title, t in tasks.items()}
    assert history == {
        "stopped early": [("graceful_shutdown", None), ("graceful_shutdown", None)],
        "saved empty": [("agent", {}), ("graceful_shutdown", {})],
        "resumed later": [("graceful_shutdown", None), ("agent", {"step": 2}), ("graceful_shutdown", {"step": 2})],
    }
    assert queue.get_task(url, tasks["stopped early"]).checkpoint_label == "graceful_shutdown@2"
    command.downgrade(migration_config(fresh_db), "agents_0005")  # older flowyard copies a state with dict()
    assert [h["state"] for h in queue.checkpoint_history(url, tasks["stopped early"])] == [{}, {}]
    assert queue.get_task(url, tasks["stopped early"]).last_checkpoint == {
        "attempt": 2,
        "kind": "graceful_shutdown",
        "state": {},
    }


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"title": "two\nlines"}, "the title 'two\\nlines' holds the control character '\\n'; give a one-line title"),
        ({"title": " "}, "the title must have 1 to 200 characters, not only spaces"),
        ({"title": " \n"}, "the title must have 1 to 200 characters, not only spaces"),
        ({"title": "x" * 201}, "the title has 201 characters, at most 200; shorten it and put the rest in the description"),
        ({"workdir": "out/a\nb"}, "the working directory 'out/a\\nb' holds the control character '\\n'; name a directory"),
        ({"priority": "urgent"}, "unknown priority 'urgent'; use one of critical, high, medium, low"),
        ({"type": "chore"}, "unknown task type 'chore'; use one of epic, story, task, subtask, bug, spike"),
    ],
)
def test_a_task_built_in_python_is_checked_like_one_from_the_cli(fields: dict[str, str], message: str) -> None:
    """Only ``NewTask.from_input`` (the CLI and the flow) checked these: a task built directly, as
    the demo and a user's script do, was stored with a title that split ``queue list``'s row, or
    failed at the table's constraint with its name instead of the choices."""
    with pytest.raises(UserError) as raised:
        queue.NewTask(**{"title": "ok", "agent_type": "reference", **fields})  # type: ignore[arg-type]
    assert str(raised.value).startswith(message)


def test_spaces_around_a_title_are_not_stored_nor_counted(qdb: str) -> None:
    """A title pasted with spaces or a trailing newline (``"$(cat title.txt)"``) was stored with
    them, and they counted against its 200 characters."""
    padded = queue.create_task(qdb, queue.NewTask(title=f"  \t{'x' * 200}\n", agent_type="reference"))
    assert queue.get_task(qdb, padded).title == "x" * 200


@pytest.mark.parametrize("agent_type", ["", "   ", "\t\n"])
def test_a_task_without_an_agent_type_is_refused_in_one_line(qdb: str, agent_type: str) -> None:
    """No worker has a template for it: it would wait in the queue for good."""
    with pytest.raises(UserError) as raised:
        queue.create_task(qdb, queue.NewTask(title="x", agent_type=agent_type))
    assert str(raised.value) == (
        "the agent type of task 'x' is empty; name the agent template that runs it, such as 'reference' "
        "(--agent-type / agent_type)"
    )
    assert queue.list_tasks(qdb) == [], "nothing was created"


@pytest.mark.parametrize(
    ("agent_type", "shown"),
    [("\ufeffcoder", "U+FEFF (ZERO WIDTH NO-BREAK SPACE)"), ("co\u200bder", "U+200B (ZERO WIDTH SPACE)"),
     ("coder\u2066", "U+2066 (LEFT-TO-RIGHT ISOLATE)"), ("co\xadder", "U+00AD (SOFT HYPHEN)")],
)
def test_an_agent_type_with_an_invisible_character_is_refused_naming_its_code_point(
    qdb: str, agent_type: str, shown: str
) -> None:
    """A zero-width space or byte order mark pasted with the name was stored: the task showed as
    ``coder`` in every listing and waited for good, since no template named ``coder`` runs it."""
    with pytest.raises(UserError) as raised:
        queue.create_task(qdb, queue.NewTask(title="x", agent_type=agent_type))
    assert str(raised.value) == (
        f"the agent type of task 'x' {agent_type!r} holds the invisible character {shown}; name the agent "
        "template that runs it, such as 'reference' (--agent-type / agent_type)"
    )
    assert queue.list_tasks(qdb) == [], "nothing was created"


def test_an_agent_type_over_63_characters_is_refused_in_one_line(qdb: str) -> None:
    """An agent type had no limit: a description given as the type was stored, and the task waited
    for a template nobody writes, its type spilling over ``queue list``'s column."""
    with pytest.raises(UserError) as raised:
        queue.create_task(qdb, queue.NewTask(title="x", agent_type="a" * 64))
    assert str(raised.value) == (
        "the agent type of task 'x' has 64 characters; at most 63 are accepted: name the agent template "
        "that runs it, such as 'reference' (--agent-type / agent_type)"
    )
    assert queue.list_tasks(qdb) == [], "nothing was created"
    assert queue.get_task(qdb, queue.create_task(qdb, queue.NewTask(title="x", agent_type="a" * 63))).agent_type


def _claim_and_complete(url: str, worker: str, start: threading.Barrier, told: dict[str, str]) -> None:
    """A worker's side of the race, as :mod:`tasks.agent_execution` runs it: claim, start an
    attempt, complete it. ``told["worker"]`` says how far it got (``completed``: it was told its
    task completed)."""
    start.wait()
    told["worker"] = _how_far(url, worker)


def _how_far(url: str, worker: str) -> str:
    claimed = queue.claim_ready(url, worker, 1)
    if not claimed:
        return "not claimed"
    [task] = claimed
    try:
        attempt = queue.start_attempt(url, task.id, worker, None)
    except queue.TaskNotHeld:
        return "not held"
    return str(queue.finish_attempt(url, attempt.run_id, worker, "completed", result={"done": True}))


def _after_the_race(url: str, task_id: int) -> tuple[queue.AgentTask, int, str | None, list[tuple[str, str]]]:
    """What a race left of a task: the task, its claims, the status it was cancelled from and its
    runs' ``(outcome, worker)`` in order."""
    task = queue.get_task(url, task_id)
    with connection(url) as conn:
        claims, cancelled_from = conn.execute(
            "SELECT claims, cancelled_from FROM flowyard.agent_tasks WHERE id = %s", (task_id,)
        ).fetchone()
        runs = conn.execute(
            "SELECT outcome, worker FROM flowyard.agent_runs WHERE task_id = %s ORDER BY id", (task_id,)
        ).fetchall()
    return task, claims, cancelled_from, runs


def test_a_cancel_racing_a_claim_and_its_attempt_is_told_what_the_task_ends_as(qdb: str) -> None:
    """Two connections at once, many times: a worker claiming a task and running it to completion,
    and a cancel of that task. Whoever is told it won is right: a cancelled task was never reported
    completed to its worker, nor run past a cancel that came before its attempt; a refused cancel
    means the task completed. Each side's transition happens once (one claim, at most one
    attempt), and a cancelled task holds no worker once its worker has let go of it."""
    worker = queue.new_worker_id()
    seen: Counter[tuple[str, str]] = Counter()
    for _ in range(150):
        task_id = queue.create_task(qdb, _new("raced"))
        start = threading.Barrier(2)
        told: dict[str, str] = {}
        claimer = threading.Thread(target=_claim_and_complete, args=(qdb, worker, start, told))
        claimer.start()
        start.wait()
        try:
            told["cancel"] = queue.cancel_task(qdb, task_id)
        except UserError as refused:
            told["cancel"] = str(refused)
        claimer.join()
        task, claims, cancelled_from, runs = _after_the_race(qdb, task_id)
        outcome = (told["worker"], told["cancel"] if told["cancel"] == "cancelled" else "refused")
        seen[outcome] += 1
        assert claims == (0 if told["worker"] == "not claimed" else 1), (outcome, claims)
        assert len(runs) == (0 if told["worker"] in ("not claimed", "not held") else 1), (outcome, runs)
        if told["cancel"] == "cancelled":
            assert told["worker"] in ("not claimed", "not held", "None"), outcome
            assert (task.status, task.worker, task.agent_pgid) == ("cancelled", None, None), (outcome, task)
            assert cancelled_from == ("pending" if told["worker"] == "not claimed" else "in_progress"), outcome
        else:
            assert told["cancel"].startswith(f"cannot cancel task {task_id}: it is completed"), outcome
            assert (told["worker"], task.status, runs) == ("completed", "completed", [("completed", worker)]), outcome
    assert len(seen) > 1, f"the race never went more than one way: {seen}"


def _failed_or_cancelled(url: str, end: str) -> int:
    """A task that ran once and ended ``end`` (failed, or cancelled as pending after its failure was
    retried), with its worker gone from it: what ``queue retry`` takes."""
    task_id = queue.create_task(url, _new("retried"))
    [task] = queue.claim_ready(url, "setup", 1)
    attempt = queue.start_attempt(url, task.id, "setup", None)
    queue.finish_attempt(url, attempt.run_id, "setup", "failed", error="broke", final=True)
    queue.fail_task(url, task_id, "setup", "broke")
    if end == "cancelled":
        queue.retry_task(url, task_id)
        queue.cancel_task(url, task_id)
    return task_id


def _tell(told: dict[str, str], side: str, start: threading.Barrier, action: Callable[[], object]) -> None:
    """One side of a race: ``told[side]`` is what it was told, the task's new status or why not."""
    start.wait()
    try:
        told[side] = str(action())
    except UserError as refused:
        told[side] = str(refused)


@pytest.mark.parametrize("end", ["failed", "cancelled"])
def test_a_retry_racing_a_cancel_and_a_claim_leaves_one_consistent_task(qdb: str, end: str) -> None:
    """Three connections at once, many times: ``queue retry`` of a failed (or cancelled) task, a
    ``queue cancel`` of it and a worker claiming and running it. Whatever the order, the task ends
    in one state each side was told of: cancelled (no worker, no error, from the status the
    retry left), or pending with nobody on it, or completed by the worker that claimed it; the
    retry is never refused, a cancel is refused only for a status it cannot cancel, and claims,
    attempts and ``agent_runs`` rows agree (one more of each only for a claim that ran)."""
    worker = queue.new_worker_id()
    seen: Counter[tuple[str, str, str]] = Counter()
    for _ in range(150):
        task_id = _failed_or_cancelled(qdb, end)
        start = threading.Barrier(3)
        told: dict[str, str] = {}
        racers = [
            threading.Thread(target=_tell, args=(told, "worker", start, partial(_how_far, qdb, worker))),
            threading.Thread(target=_tell, args=(told, "cancel", start, partial(queue.cancel_task, qdb, task_id))),
        ]
        for racer in racers:
            racer.start()
        _tell(told, "retry", start, partial(queue.retry_task, qdb, task_id))
        for racer in racers:
            racer.join()
        task, claims, cancelled_from, runs = _after_the_race(qdb, task_id)
        cancelled = told["cancel"] == "cancelled"
        outcome = (told["worker"], "cancelled" if cancelled else told["cancel"].split(": ")[-1], told["retry"])
        seen[outcome] += 1
        assert told["retry"] == "pending", outcome
        claimed = told["worker"] != "not claimed"
        ran = told["worker"] not in ("not claimed", "not held")
        assert claims == 1 + claimed, (outcome, claims)
        assert runs[0] == ("failed", "setup") and len(runs) == 1 + ran == task.attempts, (outcome, runs, task)
        assert task.error is None, (outcome, task)
        if cancelled:
            assert told["worker"] in ("not claimed", "not held", "None"), outcome
            assert (task.status, task.worker, task.agent_pgid) == ("cancelled", None, None), (outcome, task)
            assert cancelled_from == ("in_progress" if claimed else "pending"), outcome
            assert all(run_worker == worker and run_outcome for run_outcome, run_worker in runs[1:]), (outcome, runs)
        elif ran:
            refused = (f"cannot cancel task {task_id}: it is completed", f"cannot cancel task {task_id}: it is {end}")
            assert told["cancel"].startswith(refused), outcome
            assert (told["worker"], task.status, runs[1:]) == ("completed", "completed", [("completed", worker)]), outcome
        else:
            assert told["cancel"].startswith(f"cannot cancel task {task_id}: it is {end}"), outcome
            assert (task.status, task.worker, task.agent_pgid) == ("pending", None, None), (outcome, task)
            queue.cancel_task(qdb, task_id)  # out of the next round's claims
    assert len(seen) > 1, f"the race never went more than one way: {seen}"


def test_after_a_database_restart_one_failed_statement_clears_every_dead_pooled_connection(qdb: str) -> None:
    """The queue keeps idle connections for reuse; a restart of the server kills them all, and each
    failed its next statement in turn, so a caller waiting out the outage met one failure per pooled
    connection after the server was back. The first failure drops the rest."""
    task_id = queue.create_task(qdb, _new("t"))
    with outage_proxy(qdb) as proxy:
        url = state_url(proxy.url)
        opened = [queue._connection(url) for _ in range(3)]
        for context in opened:  # three connections at once: all go back to the pool
            context.__enter__()
        for context in opened:
            context.__exit__(None, None, None)
        with proxy.outage(0.1):
            pass
        with pytest.raises(psycopg.OperationalError):
            queue.get_task(url, task_id)  # the one dead connection this call took
        assert queue.get_task(url, task_id).title == "t"


def _row_versions(url: str) -> dict[int, str]:
    """{task id: xmin}: the transaction that last wrote each row."""
    with connection(url) as conn:
        return {int(i): str(x) for i, x in conn.execute("SELECT id, xmin::text FROM flowyard.agent_tasks")}


def test_reasons_that_do_not_change_are_not_rewritten(qdb: str) -> None:
    """A ``create --after``, ``cancel`` or run's end rewrites only the reasons it changes: every
    held-up row was cleared and written again, one dependency level per statement, which took
    seconds per operation behind a chain a thousand deep."""
    root = queue.create_task(qdb, _new("root"))
    chain = [root]
    for n in range(20):
        chain.append(queue.create_task(qdb, _new(f"link {n}", blocked_by=(chain[-1],))))
    other = queue.create_task(qdb, _new("unrelated"))
    queue.cancel_task(qdb, root)
    before = _row_versions(qdb)
    tail = queue.create_task(qdb, _new("tail", blocked_by=(chain[-1],)))
    queue.cancel_task(qdb, other)
    assert queue.unrunnable(qdb).blocked[tail] == f"not run: dependency #{chain[-1]} 'link 19' is blocked"
    after = _row_versions(qdb)
    assert [t for t in chain[1:] if after[t] != before[t]] == []


def _ready_plan(url: str) -> list[dict[str, Any]]:
    """The nodes of the plan the claim of one task gets (``EXPLAIN``: nothing is claimed) that pick
    the ready tasks: the ``ready`` CTE's."""
    params = (["reference"], ["reference"], [], 1, "w-plan", 120.0)
    with connection(url) as conn:
        row = conn.execute(sql.SQL("EXPLAIN (FORMAT JSON) ") + queue._CLAIM, params).fetchone()
    assert row is not None

    def nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
        return [plan, *(node for child in plan.get("Plans", []) for node in nodes(child))]

    ready = [n for n in nodes(row[0][0]["Plan"]) if n.get("Subplan Name") == "CTE ready"]
    assert len(ready) == 1
    return nodes(ready[0])


@pytest.mark.parametrize("before", ["never-analysed", "analysed-empty"])
def test_a_queue_filled_since_it_was_analysed_is_analysed_so_claims_walk_the_ready_index(
    qdb: str, before: str
) -> None:
    """A queue filled at once (a bulk insert, many ``queue create``) before its tables ever had
    statistics, or since they were analysed empty (a new install's first drain), had each claim
    sort every pending task: the planner took them for almost none. Analysed before a run's
    first claim, the claim takes the first ready tasks off the ready index, in its order; a queue
    analysed since is left alone."""
    with connection(qdb) as conn:  # autovacuum must not get to them first
        for table in ("agent_tasks", "agent_task_blocks"):
            name = sql.Identifier("flowyard", table)
            conn.execute(sql.SQL("ALTER TABLE {} SET (autovacuum_enabled = false)").format(name))
    if before == "analysed-empty":
        assert queue.analyse_if_stale(qdb).analysed == ["flowyard.agent_task_blocks", "flowyard.agent_tasks"]
    with connection(qdb) as conn:
        conn.execute(
            "INSERT INTO flowyard.agent_tasks (title, agent_type, priority) "
            "SELECT 'bulk ' || g, 'reference', (ARRAY['critical', 'high', 'medium', 'low'])[1 + g % 4] "
            "FROM generate_series(1, 3000) g"
        )
        conn.execute(
            "INSERT INTO flowyard.agent_task_blocks (blocker_id, blocked_id) "
            "SELECT id, id + 1 FROM flowyard.agent_tasks WHERE id % 10 = 1"
        )
        conn.execute("SELECT pg_stat_force_next_flush()")  # what the run reads, as the inserting session ends
    assert any(n["Node Type"] == "Sort" for n in _ready_plan(qdb)), "the planner no longer misjudges such a queue"
    assert queue.analyse_if_stale(qdb).analysed == ["flowyard.agent_task_blocks", "flowyard.agent_tasks"]
    plan = _ready_plan(qdb)
    assert not any(n["Node Type"] == "Sort" for n in plan)
    assert any(n["Node Type"] == "Index Scan" and n.get("Index Name") == "agent_tasks_ready" for n in plan)
    assert queue.analyse_if_stale(qdb) == queue.Statistics([], [], None)
    assert [t.priority for t in queue.claim_ready(qdb, "w1", 2, ["reference"])] == ["critical", "critical"]


def _never_analysed(url: str) -> list[str]:
    with connection(url) as conn:
        rows = conn.execute(
            "SELECT relname FROM pg_stat_user_tables WHERE schemaname = 'flowyard' "
            "AND relname IN ('agent_tasks', 'agent_task_blocks') AND last_analyze IS NULL ORDER BY relname"
        ).fetchall()
    return [row[0] for row in rows]


def test_a_role_that_may_not_analyse_the_queue_tables_is_told_what_to_do(limited_role: Role, qdb: str) -> None:
    """A worker whose role does not own the queue tables (nor, on PostgreSQL 17+, has MAINTAIN on
    them): the server skipped them with a warning, and the run said it had analysed them, every
    run, while its claims stayed slow. Only the tables the role may analyse are analysed; the others
    are named, with what to do."""
    role = sql.Identifier(limited_role.name)
    with connection(qdb) as conn:
        for table in ("agent_tasks", "agent_task_blocks"):  # autovacuum must not get to them first
            name = sql.Identifier("flowyard", table)
            conn.execute(sql.SQL("ALTER TABLE {} SET (autovacuum_enabled = false)").format(name))
        conn.execute(sql.SQL("GRANT USAGE ON SCHEMA flowyard TO {}").format(role))
        conn.execute(sql.SQL("GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA flowyard TO {}").format(role))
        maintain = conn.info.server_version >= 170000
    worker_url = limited_role.url(qdb)
    statistics = queue.analyse_if_stale(worker_url)
    both = ["flowyard.agent_task_blocks", "flowyard.agent_tasks"]
    assert (statistics.analysed, statistics.not_permitted) == ([], both)
    assert statistics.advice is not None and "\n" not in statistics.advice
    quoted = f'"{limited_role.name}"'  # as SQL takes it
    assert statistics.advice.startswith(f"could not analyse {', '.join(both)}: role {quoted} may not;")
    assert "autovacuum" in statistics.advice
    if not maintain:
        assert statistics.advice.endswith("the database owner or a superuser may)")
        return
    assert statistics.advice.endswith(f"GRANT MAINTAIN ON TABLE {', '.join(both)} TO {quoted}")
    assert _never_analysed(qdb) == ["agent_task_blocks", "agent_tasks"]
    with connection(qdb) as conn:
        conn.execute(sql.SQL("GRANT MAINTAIN ON TABLE flowyard.agent_tasks TO {}").format(role))
    statistics = queue.analyse_if_stale(worker_url)
    assert (statistics.analysed, statistics.not_permitted) == (["flowyard.agent_tasks"], ["flowyard.agent_task_blocks"])
    assert _never_analysed(qdb) == ["agent_task_blocks"]


def test_a_late_end_of_an_attempt_recovery_closed_leaves_it_closed(qdb: str) -> None:
    """A worker silent past its lease whose attempt another run's recovery closed (interrupted, the
    task handed on and running again elsewhere), back to write its agent's end: that end rewrote the
    closed attempt as completed (a finished attempt the task never got, in the metrics) and
    dropped why it was closed, and its run reported the task completed. It changes nothing now, that
    run reports the task released, and the new holder's attempts end as usual, also when an end is
    written twice."""
    silent = "another-host:4242:1700000000:cafe0009"
    task_id = queue.create_task(qdb, _new("handed on"))
    queue.claim_ready(qdb, silent, 1, lease_seconds=15)
    first = queue.start_attempt(qdb, task_id, silent, None, lease_seconds=15)
    _heartbeat_age(qdb, task_id, 60)
    assert recover_stale_tasks(qdb, AgentLimits(lease_seconds=15)) == Recovery([task_id], {}, [])
    queue.claim_ready(qdb, "w2", 1)
    second = queue.start_attempt(qdb, task_id, "w2", None)
    assert queue.finish_attempt(qdb, first.run_id, silent, "completed", result={"late": True}, final=True) is None
    assert queue.finish_attempt(qdb, first.run_id, silent, "failed", error="late", final=True) is None
    with connection(qdb) as conn:
        runs = conn.execute(
            "SELECT attempt, worker, outcome, error, final FROM flowyard.agent_runs ORDER BY id"
        ).fetchall()
    assert runs == [
        (1, silent, "interrupted", f"recovered: worker {silent} is gone", False),
        (2, "w2", None, None, False),
    ]
    task = queue.get_task(qdb, task_id)
    assert (task.status, task.worker, task.result) == ("in_progress", "w2", None)
    # the silent worker's run does not report the task completed: it is another's now
    assert _reported_outcome(qdb, first.run_id, "completed") == "released"
    # an end tried again after its answer was lost still finds its attempt holding the task
    for _ in range(2):
        assert queue.finish_attempt(qdb, second.run_id, "w2", "failed", error="boom") == "in_progress"
    third = queue.start_attempt(qdb, task_id, "w2", None)
    assert queue.finish_attempt(qdb, third.run_id, "w2", "completed", result={"ok": 1}) == "completed"
    assert _reported_outcome(qdb, third.run_id, "completed") == "completed"



def test_a_reasons_pass_waits_its_turn_past_the_lock_timeout(qdb: str) -> None:
    """Queue statements give up on a lock after :data:`queue.LOCK_WAIT_SECONDS`, but the reasons
    pass's own advisory lock is its turn, not a DBA's lock: a ``queue create --after`` or ``cancel``
    behind a long pass (a chain thousands deep, at a run's end) must wait for it, not fail."""
    with (
        connection(qdb) as other_pass,
        connection(qdb, autocommit=True) as watch,
        ThreadPoolExecutor(1) as pool,
    ):
        other_pass.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (queue._REASONS_LOCK,))
        waiting = pool.submit(queue.unrunnable, qdb)
        while not waiting.done() and not watch.execute(
            "SELECT EXISTS (SELECT FROM pg_locks WHERE locktype = 'advisory' AND NOT granted)"
        ).fetchone()[0]:
            threading.Event().wait(0.01)
        threading.Event().wait(queue.LOCK_WAIT_SECONDS + 0.5)  # past the lock timeout, still its turn to come
        assert not waiting.done(), waiting.exception()
        other_pass.commit()
        assert waiting.result() == queue.Unrunnable(blocked={}, waiting={}, cancelled_only=())


def test_a_locked_queue_table_hangs_neither_a_worker_nor_a_command(qdb: str) -> None:
    """A DBA's ``LOCK TABLE`` (``VACUUM FULL``, ``ALTER TABLE``) on a queue table held every queue
    statement for as long as it lasted: a worker's heartbeat stopped the loop reading its agents'
    output, and ``queue list`` hung without a word. Now a statement waits for the lock timeout: a
    worker takes it as the database away for now (riding it out, its agent running on for up to the
    lease), and a command fails in one line naming the session holding the lock and its statement."""
    task_id = queue.create_task(qdb, _new("under lock"))
    queue.claim_ready(qdb, "w1", 1)
    attempt = queue.start_attempt(qdb, task_id, "w1", None)
    with connection(qdb) as dba:
        dba.execute("LOCK TABLE flowyard.agent_tasks IN ACCESS EXCLUSIVE MODE")
        holder = dba.info.backend_pid
        with pytest.raises(queue.QueueLocked) as beat:
            queue.heartbeat(qdb, task_id, "w1", attempt.number)
        assert queue.unreachable(beat.value)
        listed = run_cli("queue", "list", "--database-url", qdb)
    assert queue.heartbeat(qdb, task_id, "w1", attempt.number) is True  # the lock released
    assert listed.returncode == UserError.exit_code and listed.stdout == ""
    [line] = listed.stderr.splitlines()
    assert line.startswith("flowyard: error: the agent queue's tables are locked (canceling statement due to lock timeout)")
    assert f": held by pid {holder} (user " in line
    assert line.endswith(
        "its query: LOCK TABLE flowyard.agent_tasks IN ACCESS EXCLUSIVE MODE); try again once that session is done "
        f"(or end that session: SELECT pg_terminate_backend({holder}))"
    )


@pytest.mark.parametrize("isolation", ["serializable", "repeatable read"])
def test_a_dbas_default_isolation_leaves_two_workers_claiming_as_one(qdb: str, isolation: str) -> None:
    """A DBA's ``ALTER DATABASE … SET default_transaction_isolation`` (common in shops that want
    serializable everywhere) made every claim racing another worker's fail with a serialization
    failure (SQLSTATE 40001), which a worker rides out as if the database were away: the queue's
    statements are written for READ COMMITTED, and each session now pins it."""
    with connection(qdb, autocommit=True) as conn:
        conn.execute(
            sql.SQL("ALTER DATABASE {} SET default_transaction_isolation = {}").format(
                sql.Identifier(conn.info.dbname), sql.Literal(isolation)
            )
        )
    test_two_worker_processes_never_claim_the_same_task(qdb)


def _read_only(url: str, target: sql.Composable) -> None:
    """``ALTER <target> SET default_transaction_read_only = on``, as a DBA freezing writes does."""
    with connection(url, autocommit=True) as conn:
        conn.execute(sql.SQL("ALTER {} SET default_transaction_read_only = on").format(target))


def test_a_read_only_queue_database_is_one_line_naming_the_setting_and_its_fix(qdb: str) -> None:
    """A state database a DBA made read-only: ``queue create`` was a traceback ending in
    ``ReadOnlySqlTransaction: cannot execute INSERT in a read-only transaction``, and a worker's
    claim the same from inside its flow. Both say where the setting is and how to reset it."""
    before = run_cli("queue", "create", "before the freeze", "--database-url", qdb)  # this process pools none
    task_id = int(before.stdout)
    with connection(qdb) as conn:
        database, role = conn.info.dbname, conn.info.user
    _read_only(qdb, sql.SQL("ROLE {} IN DATABASE {}").format(sql.Identifier(role), sql.Identifier(database)))
    created = run_cli("queue", "create", "frozen", "--database-url", qdb)
    assert created.returncode == UserError.exit_code and created.stdout == ""
    [line] = created.stderr.splitlines()
    assert line.startswith(f"flowyard: error: {qdb} accepts no writes (cannot execute INSERT in a read-only transaction)")
    assert f'(pg_settings.source: database user); run ALTER ROLE "{role}" IN DATABASE "{database}" RESET' in line
    with pytest.raises(ServerReadOnly) as claim:
        queue.claim_ready(qdb, "w1", 1)
    assert not queue.unreachable(claim.value), "no outage to ride out for the lease"
    assert queue.get_task(qdb, task_id).status == "pending"


def test_a_read_only_database_without_the_queue_schema_is_one_line(fresh_db: str) -> None:
    """Read-only before flowyard's schema was made: Alembic's ``CREATE SCHEMA`` failed as a
    SQLAlchemy traceback."""
    with connection(fresh_db) as conn:
        database = conn.info.dbname
    _read_only(fresh_db, sql.SQL("DATABASE {}").format(sql.Identifier(database)))
    listed = run_cli("queue", "list", "--database-url", fresh_db)
    assert listed.returncode == UserError.exit_code and listed.stdout == ""
    [line] = listed.stderr.splitlines()
    assert line.startswith(f"flowyard: error: {fresh_db} accepts no writes (cannot execute CREATE SCHEMA")
    assert f'(pg_settings.source: database); run ALTER DATABASE "{database}" RESET default_transaction_read_only' in line


@pytest.mark.parametrize(
    "hold",
    ["SELECT id FROM flowyard.agent_tasks WHERE id = %s FOR UPDATE", "UPDATE flowyard.agent_tasks SET title = title WHERE id = %s"],
)
def test_a_row_lock_on_a_task_names_the_session_holding_it(qdb: str, hold: str) -> None:
    """A DBA's ``SELECT ... FOR UPDATE`` (or ``UPDATE``) of a task left open in psql: ``queue cancel``
    gave up after the lock timeout saying the queue's *tables* were locked, naming no one (only
    table locks were looked up), and a worker's heartbeat called the state database unreachable.
    Both now name the session holding the row (pid, user, application, its query) and how to end it."""
    task_id = queue.create_task(qdb, _new("row locked"))
    queue.claim_ready(qdb, "w1", 1)
    attempt = queue.start_attempt(qdb, task_id, "w1", None)
    with connection(qdb) as dba:
        dba.execute("SET application_name = 'dba-psql'")
        dba.execute(hold, (task_id,))
        holder, user = dba.info.backend_pid, dba.info.user
        held_by = (
            f"a row of flowyard.agent_tasks is locked (canceling statement due to lock timeout): held by pid {holder} "
            f"(user {user}, application 'dba-psql', idle in transaction, in a transaction for "
        )
        query = f"its query: {hold.replace('%s', '$1')})"  # as the server shows it
        with pytest.raises(queue.QueueLocked) as beat:
            queue.heartbeat(qdb, task_id, "w1", attempt.number)
        assert queue.unreachable(beat.value)
        assert beat.value.lock.startswith(held_by) and beat.value.lock.endswith(query)
        assert beat.value.end_it == f"end that session: SELECT pg_terminate_backend({holder})"
        cancelled = run_cli("queue", "cancel", str(task_id), "--database-url", qdb)
    assert cancelled.returncode == UserError.exit_code and cancelled.stdout == ""
    [line] = cancelled.stderr.splitlines()
    assert line.startswith(f"flowyard: error: {held_by}")
    assert line.endswith(f"{query}; try again once that session is done (or end that session: SELECT pg_terminate_backend({holder}))")
    assert queue.cancel_task(qdb, task_id) == "cancelled"  # the lock released


def test_a_row_lock_names_its_holder_to_a_statement_queued_behind_another_waiter(qdb: str) -> None:
    """A DBA holds a task's row and a second session (another worker, a ``queue cancel``) waits
    for it: a third statement on the row queues behind that waiter, on its tuple lock, and the
    server's error names no row then. A worker's heartbeat (and ``queue cancel``) said the queue's
    *tables* were locked, held by the waiter (its tuple lock taken for a table lock), and to end
    it: the DBA's session, the one to end, went unnamed."""
    task_id = queue.create_task(qdb, _new("row locked twice"))
    queue.claim_ready(qdb, "w1", 1)
    attempt = queue.start_attempt(qdb, task_id, "w1", None)
    # the DBA's session ends first, whatever fails: the waiter then gets the row and its thread ends
    with (
        ThreadPoolExecutor(1) as pool,
        connection(qdb) as waiter,
        connection(qdb) as dba,
        connection(qdb, autocommit=True) as watch,
    ):
        dba.execute("SET application_name = 'dba-psql'")
        dba.execute("SELECT id FROM flowyard.agent_tasks WHERE id = %s FOR UPDATE", (task_id,))
        holder, second = dba.info.backend_pid, waiter.info.backend_pid
        waiting = pool.submit(waiter.execute, "UPDATE flowyard.agent_tasks SET title = title WHERE id = %s", (task_id,))
        while not watch.execute("SELECT %s = ANY(pg_blocking_pids(%s))", (holder, second)).fetchone()[0]:
            threading.Event().wait(0.01)
        held_by = (
            f"a row of flowyard.agent_tasks is locked (canceling statement due to lock timeout): held by pid {holder} "
            f"(user {dba.info.user}, application 'dba-psql', idle in transaction, in a transaction for "
        )
        with pytest.raises(queue.QueueLocked) as beat:
            queue.heartbeat(qdb, task_id, "w1", attempt.number)
        assert queue.unreachable(beat.value)
        assert beat.value.lock.startswith(held_by) and beat.value.lock.endswith("FOR UPDATE)")
        assert beat.value.end_it == f"end that session: SELECT pg_terminate_backend({holder})"
        cancelled = run_cli("queue", "cancel", str(task_id), "--database-url", qdb)
        dba.commit()
        waiting.result()
    assert cancelled.returncode == UserError.exit_code and cancelled.stdout == ""
    [line] = cancelled.stderr.splitlines()
    assert line.startswith(f"flowyard: error: {held_by}")
    assert line.endswith(f"; try again once that session is done (or end that session: SELECT pg_terminate_backend({holder}))")
    assert queue.cancel_task(qdb, task_id) == "cancelled"  # the locks released
