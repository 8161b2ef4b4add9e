"""The agent-queue controls as flows (``agent-task-*``): real Prefect server, real queue in PostgreSQL."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowFilter, FlowFilterName

from flows.agent_queue_controls import (
    agent_task_approve,
    agent_task_cancel,
    agent_task_create,
    agent_task_list,
    agent_task_retry,
    agent_task_submit,
)
from flows.run_agent_queue import run_agent_queue
from tasks import agent_queue as queue
from tasks.errors import UserError
from tasks.state import state_url
from tests.conftest import flow_run_artifacts

pytestmark = pytest.mark.usefixtures("prefect_api")


def test_create_stores_priority_dependencies_and_payload(fresh_db: str) -> None:
    build = agent_task_create("build", database_url=fresh_db)
    deploy = agent_task_create(
        "deploy",
        priority="critical",
        task_type="story",
        blocked_by=[build["id"]],
        payload={"steps": 3},
        requires_review=True,
        database_url=fresh_db,
    )
    assert json.loads(json.dumps(deploy)) == deploy, "the result is plain JSON"
    stored = queue.get_task(state_url(fresh_db), deploy["id"])
    assert (stored.priority, stored.type, stored.status) == ("critical", "story", "pending")
    assert stored.blocked_by == (build["id"],) and stored.payload == {"steps": 3} and stored.requires_review
    assert (
        deploy["blocked_by"] == [build["id"]]
        and datetime.fromisoformat(deploy["created_at"]) == stored.created_at
    )


def test_list_returns_the_tasks_and_publishes_them_as_a_table(fresh_db: str) -> None:
    first = agent_task_create("first", database_url=fresh_db)["id"]
    second = agent_task_create("second", blocked_by=[first], draft=True, database_url=fresh_db)["id"]
    state = agent_task_list(database_url=fresh_db, return_state=True)
    assert [(t["id"], t["status"]) for t in state.result()] == [(first, "pending"), (second, "draft")]
    [artifact] = [a for a in flow_run_artifacts(state) if a.key == "agent-tasks"]
    rows = json.loads(artifact.data)
    assert [(r["id"], r["title"], r["after"]) for r in rows] == [
        (first, "first", ""),
        (second, "second", str(first)),
    ]
    assert [t["id"] for t in agent_task_list(status="draft", database_url=fresh_db)] == [second]


def test_cancel_then_retry_moves_the_task_through_the_queue(fresh_db: str) -> None:
    url = state_url(fresh_db)
    task_id = agent_task_create("flaky", database_url=fresh_db)["id"]
    assert agent_task_cancel(task_id, database_url=fresh_db)["status"] == "cancelled"
    assert queue.get_task(url, task_id).status == "cancelled"
    assert agent_task_retry(task_id, database_url=fresh_db)["status"] == "pending"
    [claimed] = queue.claim_ready(url, "test-worker", 1)
    queue.fail_task(url, claimed.id, "test-worker", "agent crashed")
    assert queue.get_task(url, task_id).status == "failed"
    retried = agent_task_retry(task_id, database_url=fresh_db)
    assert retried["status"] == "pending" and retried["error"] is None
    assert [t.id for t in queue.claim_ready(url, "test-worker", 1)] == [task_id], "ready to run again"


def test_a_draft_is_submitted_and_a_reviewed_task_approved_through_the_flows(tmp_path: Path, fresh_db: str) -> None:
    """A task created by the ``agent-task-create`` flow as a draft or with ``requires_review`` can be
    released and accepted by flows too: there were none, so from the UI, a REST trigger or an
    automation such a task and its dependents waited for someone with the CLI."""
    url = state_url(fresh_db)
    spec = agent_task_create("spec", payload={"steps": 1}, requires_review=True, database_url=fresh_db)["id"]
    build = agent_task_create("build", payload={"steps": 1}, blocked_by=[spec], draft=True, database_url=fresh_db)
    assert agent_task_submit(build["id"], database_url=fresh_db)["status"] == "pending"
    kw = {"max_agents": 1, "database_url": fresh_db, "output_dir": str(tmp_path / "agents")}
    first = run_agent_queue(**kw)
    assert queue.get_task(url, spec).status == "review" and build["id"] in first["waiting"]
    approved = agent_task_approve(spec, database_url=fresh_db)
    assert approved["status"] == "completed" and approved["finished_at"] is not None
    assert queue.get_task(url, build["id"]).blocked_reason is None, "its dependent is ready at once"
    assert run_agent_queue(**kw)["outcomes"] == {build["id"]: "completed"}
    with pytest.raises(UserError, match=rf"^cannot approve task {spec}: it is completed \(possible from: review\)$"):
        agent_task_approve(spec, database_url=fresh_db)
    with pytest.raises(UserError, match=rf"^cannot submit task {spec}: it is completed \(possible from: draft\)$"):
        agent_task_submit(spec, database_url=fresh_db)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda url: agent_task_cancel(999999, database_url=url), "no agent task 999999; list tasks with"),
        (lambda url: agent_task_retry(999999, database_url=url), "no agent task 999999; list tasks with"),
        (
            lambda url: agent_task_cancel(0, database_url=url),
            "no agent task 0: task ids are positive integers; list tasks with `flowyard queue list`",
        ),
        (
            lambda url: agent_task_create("x", priority="urgent", database_url=url),
            "unknown priority 'urgent'; use one of critical, high",
        ),
        (
            lambda url: agent_task_create("x", blocked_by=[999999], database_url=url),
            "unknown dependency task id(s) [999999]",
        ),
        (
            lambda url: agent_task_list(status="done", database_url=url),
            "unknown status 'done'; use one of draft",
        ),
        (
            lambda url: agent_task_create("x", workdir="a/..", database_url=url),
            "working directory 'a/..' resolves to ",
        ),
        (
            lambda url: agent_task_create("x", payload={"blob": [b"\x00\xff"]}, database_url=url),
            "the payload of task 'x' holds a bytes value, which JSON has no type for; give text (bytes as base64",
        ),
        (
            lambda url: agent_task_create("x", agent_type="", database_url=url),
            "the agent type of task 'x' is empty; ",
        ),
        (
            lambda url: agent_task_create("x", agent_type="coder ", database_url=url),
            "the agent type of task 'x' 'coder ' starts or ends with a space; name the agent template",
        ),
        (
            lambda url: agent_task_create("x", agent_type="coder\u200b", database_url=url),
            "the agent type of task 'x' 'coder\\u200b' holds the invisible character U+200B (ZERO WIDTH SPACE); "
            "name the agent template",
        ),
        (
            lambda url: agent_task_create("x", agent_type="c" * 64, database_url=url),
            "the agent type of task 'x' has 64 characters; at most 63 are accepted: name the agent template",
        ),
        (
            lambda url: agent_task_create("x", blocked_by=[0, -3, 0], database_url=url),
            "no dependency task -3, 0: task ids are positive integers; list tasks with `flowyard queue list`",
        ),
    ],
    ids=[
        "cancel-unknown-id",
        "retry-unknown-id",
        "cancel-id-zero",
        "bad-priority",
        "unknown-dependency",
        "bad-status",
        "workdir-is-the-output-dir",
        "bytes-in-the-payload",
        "empty-agent-type",
        "agent-type-with-a-trailing-space",
        "agent-type-with-a-zero-width-space",
        "agent-type-too-long",
        "dependency-id-below-1",
    ],
)
def test_bad_input_fails_the_run_with_one_line(fresh_db: str, call, message: str) -> None:
    with pytest.raises(UserError) as raised:
        call(fresh_db)
    assert str(raised.value).startswith(message) and "\n" not in str(raised.value)
    assert queue.list_tasks(state_url(fresh_db)) == [], "nothing was created"


def test_retrying_a_pending_task_says_which_states_allow_it(fresh_db: str) -> None:
    task_id = agent_task_create("fine", database_url=fresh_db)["id"]
    with pytest.raises(
        UserError, match=rf"^cannot retry task {task_id}: it is pending \(possible from: failed"
    ):
        agent_task_retry(task_id, database_url=fresh_db)


def test_retrying_a_task_a_failed_dependency_holds_up_says_so(fresh_db: str) -> None:
    """The user retries the dependent after seeing its dependency fail: "it is pending" alone read as
    if it would run next, while it waits for the dependency, which is the one to retry."""
    url = state_url(fresh_db)
    build = agent_task_create("build", database_url=fresh_db)["id"]
    deploy = agent_task_create("deploy", blocked_by=[build], database_url=fresh_db)["id"]
    [claimed] = queue.claim_ready(url, "test-worker", 1)
    queue.fail_task(url, claimed.id, "test-worker", "boom")
    queue.unrunnable(url)
    with pytest.raises(UserError) as raised:
        agent_task_retry(deploy, database_url=fresh_db)
    assert str(raised.value) == (
        f"cannot retry task {deploy}: it is pending (possible from: failed, cancelled); "
        f"it waits for its dependencies (not run: dependency #{build} 'build' is failed)"
    )
    assert agent_task_retry(build, database_url=fresh_db)["status"] == "pending"


@pytest.mark.parametrize(
    ("control", "parameters", "message"),
    [
        (
            agent_task_cancel,
            {"task_id": ""},
            'agent-task-cancel: parameter task_id is "": Input should be a valid integer, unable to parse string '
            "as an integer; give a value of type int",
        ),
        (
            agent_task_retry,
            {"task_id": None},
            "agent-task-retry: parameter task_id is null: Input should be a valid integer; give a value of type int",
        ),
        (
            agent_task_create,
            {"title": "x", "requires_review": None, "blocked_by": ["one"]},
            'agent-task-create: parameter blocked_by.0 is "one": Input should be a valid integer, unable to parse '
            "string as an integer; give a value of type list[int] | None; parameter requires_review is null: "
            "Input should be a valid boolean; give a value of type bool",
        ),
        (
            run_agent_queue,
            {"max_agents": "", "max_tasks": 0},
            'run-agent-queue: parameter max_agents is "": Input should be a valid integer, unable to parse string '
            "as an integer; give a value of type int",
        ),
        (
            agent_task_cancel,
            {"task_id": True},
            "agent-task-cancel: parameter task_id is true: true or false is not a number; give a value of type int",
        ),
    ],
    ids=[
        "cancel-blank-id",
        "retry-null-id",
        "create-bad-dependency-and-null-flag",
        "run-blank-max-agents",
        "cancel-true-as-id",
    ],
)
def test_a_parameter_of_the_wrong_type_fails_the_run_in_one_line(
    fresh_db: str, control, parameters: dict[str, object], message: str
) -> None:
    """The UI or a REST caller can send "" or null for any field (the served deployments' schema
    check does not cover a flow called from a script or deployed without it): Prefect failed the
    run with "Flow run received invalid parameters:" and a list on the following lines, naming
    neither the value nor the type wanted."""
    state = control(**parameters, database_url=fresh_db, return_state=True)
    assert state.is_failed(), state
    assert state.message.endswith(f"UserError: {message}") and "\n" not in state.message, state.message
    assert queue.list_tasks(state_url(fresh_db)) == [], "nothing was created"


def test_a_blank_optional_parameter_is_its_default(fresh_db: str) -> None:
    """The UI's form sends "" for a field left blank: for a parameter whose default is None that is
    the default, as it already was for run-agent-queue's directories. `status` "" was refused as an
    unknown status, `blocked_by` "" as not a list. A blank `database_url` stays an error: an unset
    variable in a template must not send the run to the default database."""
    task_id = agent_task_create("blank", blocked_by="", payload="", database_url=fresh_db)["id"]
    assert queue.get_task(state_url(fresh_db), task_id).blocked_by == ()
    assert queue.get_task(state_url(fresh_db), task_id).payload == {}
    assert [t["id"] for t in agent_task_list(status="", database_url=fresh_db)] == [task_id]
    refused = agent_task_list(status="", database_url="", return_state=True)
    assert refused.is_failed() and "database_url is empty; give a postgresql:// URL" in (refused.message or ""), (
        refused.message
    )


def _runs_of(flow_name: str) -> int:
    with get_client(sync_client=True) as client:
        return client.count_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])))


def test_text_postgresql_cannot_store_is_one_line_before_prefect_creates_the_run(fresh_db: str) -> None:
    """A NUL made Prefect's client retry the server's 500 (jsonb refuses \\u0000) for minutes, then
    raise a traceback; a surrogate raised UnicodeEncodeError. Dict keys are text too. NaN in a
    payload was recorded as null in the run's parameters (and refused only by the body)."""
    before = _runs_of("agent-task-create")
    with pytest.raises(UserError) as refused:
        agent_task_create("a\x00b", database_url=fresh_db)
    assert str(refused.value) == (
        'agent-task-create: parameter title is "a\\u0000b": a NUL character (\\u0000), which PostgreSQL'
        " cannot store; remove it"
    )
    with pytest.raises(UserError) as refused:
        agent_task_create("ok", payload={"files": ["x", "\ud800"], "k\x00": 1}, database_url=fresh_db)
    assert str(refused.value) == (
        'agent-task-create: parameter payload has the key "k\\u0000": a NUL character (\\u0000), which'
        " PostgreSQL cannot store; rename the key; "
        'parameter payload.files.1 is "\\ud800": a surrogate (\\ud800, half of a character in UTF-16), which'
        " is not UTF-8 text; remove it"
    )
    with pytest.raises(UserError) as refused:  # JSON has no NaN: the run's record said null
        agent_task_create("ok", payload={"loss": [1.5, float("nan")]}, database_url=fresh_db)
    assert str(refused.value) == (
        "agent-task-create: parameter payload.loss.1 is NaN: not a finite number, which JSON cannot hold (the"
        " flow run would record null); give a finite number"
    )
    assert _runs_of("agent-task-create") == before, "no flow run was created"
    assert queue.list_tasks(state_url(fresh_db)) == []
    assert agent_task_create("ok \U0001f600", database_url=fresh_db)["title"] == "ok \U0001f600"
