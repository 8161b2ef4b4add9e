"""Agent processes for real: the reference agent as a subprocess in its own process group."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import psutil
import pytest

from tasks import agent_queue as queue
from tasks.agent_process import (
    ENVELOPE_FILE,
    REFERENCE_TEMPLATE,
    AgentJob,
    AgentLimits,
    AgentOutcome,
    AgentProcess,
    AgentTemplate,
    check_drain,
    resolve_workdir,
)
from tasks.agent_protocol import AgentMessage, CheckpointMessage, LogMessage
from tasks.db import connection
from tasks.errors import UserError
from tasks.process_group import group_members, terminate_group
from tasks.state import state_url

DEFAULT_LIMITS = AgentLimits()


def _job(tmp_path: Path, payload: dict[str, Any], checkpoint: dict[str, Any] | None = None) -> AgentJob:
    return AgentJob(7, 1, "t", "task", "", payload, checkpoint, tmp_path / "work", queue.new_worker_id())


def _run(
    job: AgentJob, template: AgentTemplate = REFERENCE_TEMPLATE, limits: AgentLimits = DEFAULT_LIMITS
) -> tuple[Any, list[tuple[str, AgentMessage]], AgentProcess]:
    seen: list[tuple[str, AgentMessage]] = []
    process = AgentProcess(job, template, on_message=lambda s, m: seen.append((s, m)), limits=limits)
    return process.run(), seen, process


@contextmanager
def _run_in_thread(process: AgentProcess, wait_seconds: float) -> Iterator[list[AgentOutcome]]:
    """Run the attempt in a thread and wait up to ``wait_seconds`` (only so that an attempt that
    never ends cannot hang the suite); yields its outcome, none if it is still running, in which
    case its group is ended on the way out."""
    result: list[AgentOutcome] = []
    runner = threading.Thread(target=lambda: result.append(process.run()), daemon=True)
    runner.start()
    runner.join(wait_seconds)
    try:
        yield result
    finally:
        if runner.is_alive() and process.pgid is not None:
            terminate_group(process.pgid, 0)
            runner.join(60)


def _child_pids(messages: list[AgentMessage]) -> list[int]:
    """The pids the reference agent reports for the children it spawned (``spawn_child``,
    ``detach_child``)."""
    return [
        int(m.message.rsplit(" ", 1)[1])
        for m in messages
        if isinstance(m, LogMessage) and m.message.startswith("spawned child")
    ]


BOTH_CHILDREN = {"spawn_child": True, "detach_child": True}
"""A child in the agent's group and one in a session of its own (``setsid``, Node's ``detached``)."""


def _any_alive(pids: list[int]) -> bool:
    return any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie" for p in pids)


def test_workdir_must_stay_inside_the_output_dir(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    assert resolve_workdir(out, "a/b", 1) == (out / "a" / "b").resolve()
    assert resolve_workdir(out, "", 3) == (out / "task-3").resolve()
    for escape in ("../elsewhere", "a/../../x", str(tmp_path / "abs")):
        with pytest.raises(UserError, match="outside the agent output directory"):
            resolve_workdir(out, escape, 1)


@pytest.mark.parametrize("shared", [".", "./", "a/..", "logs", "logs/", "logs/sub", "a/../logs/x", "custom-logs"])
def test_workdir_cannot_be_the_output_dir_itself_or_the_logs_dir(tmp_path: Path, shared: str) -> None:
    """Such an agent would write into the directory every task shares, or among the task logs."""
    out = tmp_path / "out"
    (out / "a").mkdir(parents=True)
    logs = out / "custom-logs" if shared == "custom-logs" else None
    with pytest.raises(UserError) as raised:
        resolve_workdir(out, shared, 4, logs_dir=logs)
    assert str(raised.value).startswith(f"working directory {shared!r} of task 4 resolves to ")
    assert str(raised.value).endswith(
        "; give the task a directory of its own in the output directory (an empty workdir is task-<id>)"
    )
    assert "\n" not in str(raised.value)
    assert resolve_workdir(out, "logs", 4, logs_dir=tmp_path / "logs") == (out / "logs").resolve()
    assert resolve_workdir(out, "logs-of-mine", 4) == (out / "logs-of-mine").resolve()


def test_symlink_escape_is_rejected(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "secret").mkdir()
    (out / "link").symlink_to(tmp_path / "secret")
    with pytest.raises(UserError, match=r"resolves to .*secret"):
        resolve_workdir(out, "link/sub", 1)


def test_a_symlink_loop_is_refused_in_one_line(tmp_path: Path) -> None:
    """Path resolution raises RuntimeError on a loop; the task is refused like any other bad workdir."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "loop").symlink_to(out / "loop")
    with pytest.raises(UserError) as raised:
        resolve_workdir(out, "loop/sub", 5)
    assert str(raised.value) == (
        f"working directory 'loop/sub' of task 5 ({out / 'loop' / 'sub'}) runs into a symlink loop; "
        "remove the loop or give the task another directory"
    )


@pytest.mark.parametrize("delivery", ["stdin", "argv", "env"])
def test_task_reaches_the_agent_by_every_delivery(tmp_path: Path, delivery: str) -> None:
    template = REFERENCE_TEMPLATE.model_copy(update={"delivery": delivery})
    outcome, seen, _ = _run(_job(tmp_path, {"steps": 2}), template)
    assert outcome.outcome == "completed", outcome
    assert outcome.result["steps"] == 2
    assert outcome.checkpoint["step"] == 2
    assert (tmp_path / "work" / "result.txt").read_text().strip() == outcome.result["digest"]
    assert [m.state["step"] for _, m in seen if isinstance(m, CheckpointMessage)] == [1, 2]


def test_protocol_garbage_is_kept_as_log_lines(tmp_path: Path) -> None:
    outcome, seen, _ = _run(_job(tmp_path, {"steps": 2, "garbage": True}))
    assert outcome.outcome == "completed"
    raw = [m.message for _, m in seen if isinstance(m, LogMessage) and m.level == "raw"]
    assert "garbage line 0 {not json" in raw
    assert json.dumps({"kind": "progress", "percent": "lots"}) in raw


def test_resume_from_checkpoint_gives_the_uninterrupted_digest(tmp_path: Path) -> None:
    whole, _, _ = _run(_job(tmp_path, {"steps": 4}))
    crashed, seen, _ = _run(_job(tmp_path, {"steps": 4, "crash_after": 2}))
    assert crashed.outcome == "failed" and crashed.exit_code == 3
    assert "crashing after step 2" in crashed.error
    resumed, _, _ = _run(_job(tmp_path, {"steps": 4, "crash_after": 2}, {"state": crashed.checkpoint}))
    assert resumed.outcome == "completed"
    assert resumed.result["resumed_from"] == 2
    assert resumed.result["digest"] == whole.result["digest"]


BY_FILE_TEMPLATES = {
    "argv": REFERENCE_TEMPLATE.model_copy(update={"delivery": "argv"}),
    "env": REFERENCE_TEMPLATE.model_copy(update={"delivery": "env"}),
    "placeholder": REFERENCE_TEMPLATE.model_copy(update={"argv": [*REFERENCE_TEMPLATE.argv, "{task_json}"]}),
}


@pytest.mark.parametrize("carrier", sorted(BY_FILE_TEMPLATES))
def test_a_checkpoint_too_large_for_argv_or_env_is_handed_back_through_a_file(tmp_path: Path, carrier: str) -> None:
    """Linux refuses to start a program with an argument or environment string over 128 KiB: an
    envelope that large goes through a file in the working directory, so the attempt starts and
    the task resumes from its checkpoint instead of failing for good."""
    template = BY_FILE_TEMPLATES[carrier]
    whole, _, _ = _run(_job(tmp_path, {"steps": 3}), template)
    crashed, _, _ = _run(_job(tmp_path, {"steps": 3, "crash_after": 1}), template)
    large = {**crashed.checkpoint, "notes": "n" * 200_000}
    resumed, _, _ = _run(_job(tmp_path, {"steps": 3, "crash_after": 1}, {"state": large}), template)
    assert resumed.outcome == "completed", resumed
    assert resumed.result["resumed_from"] == 1
    assert resumed.result["digest"] == whole.result["digest"]


ENV_TEMPLATE = REFERENCE_TEMPLATE.model_copy(update={"delivery": "env"})
LARGE = {"blob": "x" * 200_000}
"""A payload that makes the envelope too large for ``FLOWYARD_TASK``: it goes through ENVELOPE_FILE."""


def _stop_at_first_checkpoint(process: AgentProcess, stream: str, message: AgentMessage) -> None:
    if isinstance(message, CheckpointMessage):
        process.request_stop("test shutdown")


def _fail_at_first_checkpoint(process: AgentProcess, stream: str, message: AgentMessage) -> None:
    if isinstance(message, CheckpointMessage):
        raise RuntimeError("the database refused the checkpoint")


ENDINGS: dict[str, tuple[dict[str, Any], AgentLimits, Any]] = {
    "completed": ({"steps": 1}, DEFAULT_LIMITS, None),
    "failed": ({"steps": 1, "crash_after": 1}, DEFAULT_LIMITS, None),
    "timeout": ({"steps": 1000, "sleep": 0.1}, AgentLimits(timeout_seconds=1.0, grace_seconds=0.5), None),
    "interrupted": ({"steps": 1000, "sleep": 0.1}, AgentLimits(grace_seconds=0.5), _stop_at_first_checkpoint),
    "callback error": ({"steps": 1000, "sleep": 0.1}, AgentLimits(grace_seconds=0.5), _fail_at_first_checkpoint),
}


@pytest.mark.parametrize("ending", sorted(ENDINGS))
def test_the_envelope_file_is_removed_when_the_attempt_ends(tmp_path: Path, ending: str) -> None:
    """However the attempt ends, the file holding a large envelope (payload and checkpoint, which
    may be private) does not outlive it in the agent's working directory."""
    payload, limits, callback = ENDINGS[ending]
    job = _job(tmp_path, {**payload, **LARGE})
    seen: list[AgentMessage] = []

    def on_message(stream: str, message: AgentMessage) -> None:
        seen.append(message)
        if callback is not None:
            callback(process, stream, message)

    process = AgentProcess(job, ENV_TEMPLATE, on_message=on_message, limits=limits)
    try:
        outcome = process.run().outcome
    except RuntimeError:
        outcome = "callback error"
    assert outcome == ending
    assert any(isinstance(m, CheckpointMessage) for m in seen), "the agent read its envelope and ran"
    assert not (job.workdir / ENVELOPE_FILE).exists()
    assert not (job.workdir / ENVELOPE_FILE).is_symlink()


def test_a_leftover_envelope_file_does_not_stop_the_next_attempt(tmp_path: Path) -> None:
    """A worker killed outright leaves the file (or an agent left a symlink there): the next
    attempt replaces it, never writing through the link, and removes its own at the end."""
    workdir = tmp_path / "work"
    workdir.mkdir()
    outside = tmp_path / "outside.txt"
    outside.write_text("not flowyard's\n")
    for leftover in ("file", "symlink"):
        path = workdir / ENVELOPE_FILE
        if leftover == "file":
            path.write_text("the envelope of an attempt whose worker was killed")
        else:
            path.symlink_to(outside)
        outcome, _, _ = _run(_job(tmp_path, {"steps": 1, **LARGE}), ENV_TEMPLATE)
        assert outcome.outcome == "completed", (leftover, outcome)
        assert not path.exists() and not path.is_symlink()
    assert outside.read_text() == "not flowyard's\n"


def test_a_directory_in_the_envelope_files_place_is_a_one_line_error(tmp_path: Path) -> None:
    """An agent left a directory under the envelope file's name: the attempt fails in one line
    saying what to remove (a raw OSError before), and no agent is started."""
    job = _job(tmp_path, {"steps": 1, **LARGE})
    job.workdir.mkdir(parents=True)
    (job.workdir / ENVELOPE_FILE).mkdir()
    with pytest.raises(UserError, match=r"cannot write the envelope of task \d+ to .*remove what is in its place") as err:
        _run(job, ENV_TEMPLATE)
    assert "\n" not in str(err.value)
    assert (job.workdir / ENVELOPE_FILE).is_dir()


REPLACING_AGENT = textwrap.dedent(
    """
    import json, os

    path = os.environ["FLOWYARD_TASK"].removeprefix("@")
    with open(path) as file:
        task = json.load(file)
    os.unlink(path)
    with open(path, "w") as file:
        file.write("the agent's own notes")
    print(json.dumps({"kind": "result", "data": {"payload_keys": sorted(task["payload"])}}), flush=True)
    """
)


def test_a_file_the_agent_put_in_the_envelope_files_place_is_left_alone(tmp_path: Path) -> None:
    """Only the file flowyard wrote is removed: whatever the agent made at that path is its own."""
    template = AgentTemplate(argv=[sys.executable, "-c", REPLACING_AGENT], delivery="env")
    job = _job(tmp_path, LARGE)
    outcome, _, _ = _run(job, template)
    assert outcome.outcome == "completed" and outcome.result == {"payload_keys": ["blob"]}, outcome
    assert (job.workdir / ENVELOPE_FILE).read_text() == "the agent's own notes"


def test_timeout_kills_the_whole_process_group(tmp_path: Path) -> None:
    limits = AgentLimits(timeout_seconds=1.0, grace_seconds=0.5, checkpoint_wait_seconds=0.5)
    job = _job(tmp_path, {"steps": 100, "sleep": 0.2, **BOTH_CHILDREN, "ignore_term": True})
    outcome, seen, process = _run(job, limits=limits)
    assert outcome.outcome == "timeout"
    assert outcome.killed, "the agent ignores SIGTERM, so SIGKILL must have ended it"
    child_pids = _child_pids([m for _, m in seen])
    assert len(child_pids) == 2, "the agent spawned both children"
    assert group_members(process.pgid) == []
    assert not _any_alive(child_pids)


QUIET_AGENT = ["sh", "-c", "exec >/dev/null 2>&1 </dev/null; sleep 600"]
"""An agent that hands its output elsewhere (a wrapper's ``exec >log 2>&1``) and keeps running."""


@pytest.mark.parametrize("stop", ["timeout", "cancel"])
def test_an_agent_that_closed_its_pipes_is_still_timed_out_and_cancelled(tmp_path: Path, stop: str) -> None:
    """The end of both pipes is not the end of the agent: its timeout, heartbeat and cancel checks
    go on until it exits, and the stop ends its whole group."""
    beats: list[float] = []
    cancelled = stop == "cancel"

    def keep_going() -> bool:
        """The heartbeat: for ``cancel``, the second one finds the task cancelled."""
        beats.append(time.monotonic())
        return not (cancelled and len(beats) >= 2)

    limits = AgentLimits(
        timeout_seconds=60.0 if cancelled else 1.0,
        grace_seconds=0.5,
        checkpoint_wait_seconds=0.5,
        heartbeat_seconds=0.5,
        lease_seconds=5.0,
    )
    process = AgentProcess(
        _job(tmp_path, {}),
        AgentTemplate(argv=QUIET_AGENT, delivery="env"),
        on_message=lambda s, m: None,
        limits=limits,
        keep_going=keep_going,
    )
    with _run_in_thread(process, wait_seconds=30) as result:
        assert result, "run() did not return: the attempt waited on an agent nobody stops"
        assert result[0].outcome == ("interrupted" if cancelled else "timeout"), result[0]
        assert len(beats) >= (2 if cancelled else 1), "the heartbeat went on after the pipes closed"
        assert group_members(process.pgid) == []


NON_READING_AGENT = textwrap.dedent(
    """
    import json, subprocess, sys, time

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    print(json.dumps({"kind": "log", "message": f"spawned child {child.pid}"}), flush=True)
    time.sleep(600)  # never reads stdin
    """
)


def test_a_timeout_ends_an_agent_that_never_reads_its_large_stdin_envelope(tmp_path: Path) -> None:
    """An envelope larger than the pipe buffer keeps its writer blocked for good when the agent does
    not read stdin: the stop sequence must neither wait for that writer nor block asking for a
    checkpoint through the full pipe, but end the whole group."""
    seen: list[AgentMessage] = []
    template = AgentTemplate(argv=[sys.executable, "-c", NON_READING_AGENT])
    limits = AgentLimits(timeout_seconds=1.0, grace_seconds=0.5, checkpoint_wait_seconds=0.5)
    job = _job(tmp_path, {"blob": "x" * 200_000})
    process = AgentProcess(job, template, on_message=lambda s, m: seen.append(m), limits=limits)
    with _run_in_thread(process, wait_seconds=60) as result:
        assert result, "run() did not return: the stop sequence never ended the agent"
        assert result[0].outcome == "timeout"
        assert _child_pids(seen), "the agent spawned a child"
        assert group_members(process.pgid) == []
        assert not _any_alive(_child_pids(seen))


def test_an_exception_in_a_callback_ends_the_group_and_propagates(tmp_path: Path) -> None:
    """A callback that raises (the database refusing a checkpoint) fails the attempt, and Prefect
    then starts another agent: the old one's group, SIGTERM-proof child included, must be gone."""
    seen: list[AgentMessage] = []

    def on_message(stream: str, message: AgentMessage) -> None:
        seen.append(message)
        if isinstance(message, CheckpointMessage):
            raise RuntimeError("the database refused the checkpoint")

    job = _job(tmp_path, {"steps": 1000, "sleep": 0.1, **BOTH_CHILDREN, "ignore_term": True})
    limits = AgentLimits(grace_seconds=0.5)
    process = AgentProcess(job, REFERENCE_TEMPLATE, on_message=on_message, limits=limits)
    with pytest.raises(RuntimeError, match="refused the checkpoint"):
        process.run()
    assert _pidfds() == [], "the descriptor watching the agent's exit was closed"
    assert len(_child_pids(seen)) == 2, "the agent spawned both children"
    assert group_members(process.pgid) == []
    assert not _any_alive(_child_pids(seen))


def _pidfds() -> list[str]:
    """This process's open pidfds (what the pump watches an agent's exit with, on Linux)."""
    fds = []
    for fd in os.listdir("/proc/self/fd"):
        with suppress(OSError):
            if os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[pidfd]":
                fds.append(fd)
    return fds


BAD_TABLE_AGENT = textwrap.dedent(
    """
    import json, os, subprocess, sys, time

    def say(**message):
        print(json.dumps(message), flush=True)

    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    say(kind="log", message=f"group {os.getpgid(0)}")
    say(kind="artifact", key="scores", type="table", data="not rows")
    time.sleep(0.5)
    say(kind="result", data={"after_the_artifact": True})
    """
)


@pytest.mark.usefixtures("prefect_api")
def test_a_table_artifact_of_the_wrong_shape_is_logged_and_the_agent_runs_on(
    tmp_path: Path, fresh_db: str
) -> None:
    """Prefect refuses the table; that must neither fail the attempt nor leave the agent's group
    (here a sleeping child) running."""
    from flows.run_agent_queue import run_agent_queue

    url = state_url(fresh_db)
    task_id = queue.create_task(url, queue.NewTask(title="bad table", agent_type="tabler"))
    agents = {"tabler": {"argv": [sys.executable, "-c", BAD_TABLE_AGENT]}}
    summary = run_agent_queue(max_agents=1, database_url=url, output_dir=str(tmp_path), agents=agents)
    assert summary["outcomes"] == {task_id: "completed"}
    assert queue.get_task(url, task_id).result == {"after_the_artifact": True}
    log = [json.loads(line) for line in (tmp_path / "logs" / f"{task_id}.jsonl").read_text().splitlines()]
    assert [(r["stream"], r["level"], r["message"]) for r in log if r.get("level") == "warning"] == [
        (
            "flowyard",
            "warning",
            "artifact 'scores' not published: table data must be a list of row objects, "
            "a list of row lists or an object of column lists",
        )
    ]
    pgid = next(int(r["message"].split()[1]) for r in log if r.get("message", "").startswith("group "))
    assert group_members(pgid) == []


UNSTORABLE_CHECKPOINT_AGENT = textwrap.dedent(
    """
    import json, os, subprocess, sys, time

    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    print(json.dumps({"kind": "log", "message": f"group {os.getpgid(0)}"}), flush=True)
    print(json.dumps({"kind": "checkpoint", "state": {"refused": True}}), flush=True)
    time.sleep(600)
    """
)


@pytest.mark.usefixtures("prefect_api")
def test_a_checkpoint_the_database_refuses_fails_the_attempt_and_closes_it(
    tmp_path: Path, fresh_db: str
) -> None:
    """The database refuses the checkpoint (here a CHECK constraint the test adds), so the write in
    the message callback raises: the attempt must be closed as failed with a one-line reason (never
    left open) and its group ended, the agent's leftover child too."""
    from flows.run_agent_queue import run_agent_queue

    url = state_url(fresh_db)
    with connection(url) as conn:
        conn.execute(
            "ALTER TABLE flowyard.agent_checkpoints ADD CONSTRAINT refuses CHECK (NOT state ? 'refused')"
        )
    task_id = queue.create_task(url, queue.NewTask(title="refused checkpoint", agent_type="refused"))
    agents = {"refused": {"argv": [sys.executable, "-c", UNSTORABLE_CHECKPOINT_AGENT]}}
    summary = run_agent_queue(max_agents=1, database_url=url, output_dir=str(tmp_path), agents=agents, retries=0)
    assert summary["outcomes"][task_id].startswith("failed")
    with connection(url) as conn:
        runs = conn.execute(
            "SELECT outcome, finished_at IS NOT NULL, error FROM flowyard.agent_runs WHERE task_id = %s", (task_id,)
        ).fetchall()
    assert [(outcome, closed) for outcome, closed, _ in runs] == [("failed", True)]
    assert runs[0][2] == (
        'new row for relation "agent_checkpoints" violates check constraint "refuses"'
    )
    log = [json.loads(line) for line in (tmp_path / "logs" / f"{task_id}.jsonl").read_text().splitlines()]
    pgid = next(int(r["message"].split()[1]) for r in log if r.get("message", "").startswith("group "))
    assert group_members(pgid) == []


def test_leftover_children_die_with_a_finished_agent(tmp_path: Path) -> None:
    """Its group's and the one that left the group (a session of its own), which also holds the
    agent's stderr: the attempt ends when the agent does, not at its timeout."""
    limits = AgentLimits(timeout_seconds=60.0)  # the old code's way out of an endless wait
    outcome, seen, process = _run(_job(tmp_path, {"steps": 1, **BOTH_CHILDREN}), limits=limits)
    assert outcome.outcome == "completed", outcome
    assert group_members(process.pgid) == []
    child_pids = _child_pids([m for _, m in seen])
    assert len(child_pids) == 2 and not _any_alive(child_pids)


UNMARKED_CHILD_AGENT = textwrap.dedent(
    """
    import json, subprocess, sys

    # its own session and an empty environment: no group, no mark leads to it
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], env={}, start_new_session=True)
    print(json.dumps({"kind": "log", "message": f"spawned child {child.pid}"}), flush=True)
    """
)


def test_an_attempt_ends_even_when_an_unreachable_process_holds_the_agents_pipes(tmp_path: Path) -> None:
    """A descendant that left the group with a cleared environment cannot be found, so it is not
    ended; but the attempt is, soon after the agent exits, saying why it stopped reading."""
    seen: list[AgentMessage] = []
    template = AgentTemplate(argv=[sys.executable, "-c", UNMARKED_CHILD_AGENT])
    process = AgentProcess(_job(tmp_path, {}), template, on_message=lambda s, m: seen.append(m))
    result: list[Any] = []
    runner = threading.Thread(target=lambda: result.append(process.run()), daemon=True)
    runner.start()
    runner.join(120)  # only keeps an endless wait from hanging the suite
    try:
        assert result, "run() did not return: it waited for the held pipes for good"
        assert result[0].outcome == "completed", result[0]
        notes = [m.message for m in seen if isinstance(m, LogMessage) and "stopped reading" in m.message]
        assert len(notes) == 1 and "FLOWYARD_WORKER" in notes[0], notes
        assert _any_alive(_child_pids(seen)), "nothing could find the child (the limit this test pins down)"
    finally:
        for pid in _child_pids(seen):
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        runner.join(60)


def test_shutdown_asks_for_a_checkpoint_then_ends_the_group(tmp_path: Path) -> None:
    seen: list[AgentMessage] = []
    job = _job(tmp_path, {"steps": 1000, "sleep": 0.1})
    process = AgentProcess(job, REFERENCE_TEMPLATE, on_message=lambda s, m: seen.append(m))
    result: list[Any] = []
    runner = threading.Thread(target=lambda: result.append(process.run()))
    runner.start()
    while not any(isinstance(m, CheckpointMessage) for m in seen):
        runner.join(0.05)
    before = sum(isinstance(m, CheckpointMessage) for m in seen)
    process.shutdown("test shutdown")
    runner.join()
    outcome = result[0]
    assert outcome.outcome == "interrupted" and outcome.error == "test shutdown"
    assert sum(isinstance(m, CheckpointMessage) for m in seen) > before
    assert group_members(process.pgid) == []


ANSWERING_AGENT = textwrap.dedent(
    """
    import json, signal, sys, threading, time
    json.loads(sys.stdin.readline())  # the task envelope

    def checkpoint(at):
        print(json.dumps({"kind": "checkpoint", "state": {"at": at}}), flush=True)

    def on_sigterm(*_):
        checkpoint("sigterm")
        sys.exit(0)

    def answer_checkpoint_requests():
        for _ in sys.stdin:
            checkpoint("request")

    signal.signal(signal.SIGTERM, on_sigterm)
    threading.Thread(target=answer_checkpoint_requests, daemon=True).start()
    checkpoint("start")
    while True:
        time.sleep(0.05)
    """
)


def test_a_stop_takes_the_answer_to_its_checkpoint_request_then_one_written_on_sigterm(tmp_path: Path) -> None:
    """docs/agents.md: the stop goes on to SIGTERM after a checkpoint answers its request, and one
    the agent writes while it exits is the attempt's last (its graceful_shutdown checkpoint)."""
    seen: list[AgentMessage] = []
    template = AgentTemplate(argv=[sys.executable, "-c", ANSWERING_AGENT])
    limits = AgentLimits(checkpoint_wait_seconds=60)  # room on a loaded machine: the answer ends the wait early
    process = AgentProcess(_job(tmp_path, {}), template, on_message=lambda s, m: seen.append(m), limits=limits)
    result: list[AgentOutcome] = []
    runner = threading.Thread(target=lambda: result.append(process.run()))
    runner.start()
    while runner.is_alive() and not any(isinstance(m, CheckpointMessage) for m in seen):
        runner.join(0.05)
    process.shutdown("test shutdown")
    runner.join()
    outcome = result[0]
    assert [m.state for m in seen if isinstance(m, CheckpointMessage)] == [
        {"at": "start"},
        {"at": "request"},
        {"at": "sigterm"},
    ]
    assert (outcome.outcome, outcome.killed) == ("interrupted", False)
    assert outcome.checkpoint == {"at": "sigterm"}
    assert group_members(process.pgid) == []


def test_a_checkpoint_being_handled_as_a_stop_begins_is_not_taken_for_its_answer(tmp_path: Path) -> None:
    """The stop's wait for an answer ended on the checkpoint whose handling it began during (the
    event was set after the message was handed on): the agent, answering a second later, was
    SIGTERMed before it answered (a failure of the test above on a loaded machine)."""
    seen: list[AgentMessage] = []
    stopping = threading.Event()
    limits = AgentLimits(checkpoint_wait_seconds=60)
    process: AgentProcess

    def on_message(stream: str, message: AgentMessage) -> None:
        seen.append(message)
        if isinstance(message, LogMessage) and message.message.startswith("stopping agent"):
            stopping.set()
        elif isinstance(message, CheckpointMessage) and message.state == {"at": "start"}:
            process.request_stop("test shutdown")  # the stop begins while "start" is being handled
            stopping.wait(30)
            time.sleep(0.2)  # past the stop's clearing of what it waits on

    slow_answer = ANSWERING_AGENT.replace('checkpoint("request")', 'time.sleep(1); checkpoint("request")')
    template = AgentTemplate(argv=[sys.executable, "-c", slow_answer])
    process = AgentProcess(_job(tmp_path, {}), template, on_message=on_message, limits=limits)
    outcome = process.run()
    assert [m.state for m in seen if isinstance(m, CheckpointMessage)] == [
        {"at": "start"},
        {"at": "request"},
        {"at": "sigterm"},
    ]
    assert (outcome.outcome, outcome.killed, outcome.checkpoint) == ("interrupted", False, {"at": "sigterm"})


def test_a_stop_requested_before_the_agent_starts_keeps_it_from_starting(tmp_path: Path) -> None:
    """A shutdown can reach an attempt the fleet holds before its agent is spawned. With a grace
    period of 0 the stop sequence gave up at once on an agent not yet started, and every later
    stop (timeout, cancel) found that sequence spent: the agent then ran its course unstopped."""
    limits = AgentLimits(grace_seconds=0.0)
    process = AgentProcess(
        _job(tmp_path, {"steps": 1000, "sleep": 0.1}), REFERENCE_TEMPLATE, on_message=lambda s, m: None, limits=limits
    )
    process.request_stop("graceful_shutdown: test")
    with _run_in_thread(process, wait_seconds=30) as result:
        assert result, "run() did not return: the agent started and ran on after the stop"
        assert (result[0].outcome, result[0].exit_code, result[0].error) == (
            "interrupted",
            None,
            "graceful_shutdown: test",
        )
        assert process.pgid is None, "no agent was started"


def test_an_agent_that_cannot_start_is_a_user_error(tmp_path: Path) -> None:
    template = AgentTemplate(argv=[str(tmp_path / "no-such-agent")])
    with pytest.raises(UserError, match="cannot start agent"):
        _run(_job(tmp_path, {}), template)


def test_failed_agent_reports_its_error_and_stderr(tmp_path: Path) -> None:
    outcome, _, _ = _run(_job(tmp_path, {"fail": "no such repository"}))
    assert outcome.outcome == "failed"
    assert "no such repository" in outcome.error and "code 1" in outcome.error
    outcome, _, _ = _run(_job(tmp_path, {"fail": True}))
    assert outcome.outcome == "failed" and "failing as the payload's fail asks" in outcome.error
    template = AgentTemplate(
        argv=[sys.executable, "-c", "import sys; sys.stderr.write('boom\\n'); sys.exit(4)"]
    )
    outcome, seen, _ = _run(_job(tmp_path, {}), template)
    assert outcome.outcome == "failed" and "boom" in outcome.error and outcome.exit_code == 4
    assert ("stderr", LogMessage(kind="log", level="stderr", message="boom")) in seen
    assert os.environ.get("FLOWYARD_TASK_ID") is None


LONG_LINE_AGENT = textwrap.dedent(
    """
    import json, sys, time
    line = json.dumps({"kind": "checkpoint", "state": {"blob": "x" * (8 << 20)}}) + "\\n"
    head, tail = line[:-100], line[-100:]
    for start in range(0, len(head), 300_000):  # many reads without a newline, each flushed
        sys.stdout.write(head[start:start + 300_000])
        sys.stdout.flush()
    # the line's end, the next message and half of one more in one write, then the rest
    sys.stdout.write(tail + json.dumps({"kind": "result", "data": {"n": 1}}) + "\\n" + '{"kind": "log", ')
    sys.stdout.flush()
    time.sleep(0.2)
    sys.stdout.write('"message": "after"}\\n')
    """
)


def test_a_checkpoint_line_of_megabytes_read_in_many_chunks_is_taken_whole(tmp_path: Path) -> None:
    """A line arriving over many reads is kept until its newline; the reader looks for the newline
    in each new chunk only (splitting the whole buffer per 64 KiB read made an 8 MB line take
    1.7 s and a 32 MB one 25 s; docs/benchmarks.md). The line's end, the next whole line and a
    part of a third in one read must still come out as three messages, in order."""
    template = AgentTemplate(argv=[sys.executable, "-c", LONG_LINE_AGENT])
    outcome, seen, _ = _run(_job(tmp_path, {}), template)
    assert outcome.outcome == "completed" and outcome.result == {"n": 1}
    assert outcome.checkpoint == {"blob": "x" * (8 << 20)}
    kinds = [m.kind for s, m in seen if s == "stdout"]
    assert kinds == ["checkpoint", "result", "log"]
    assert [m.message for s, m in seen if s == "stdout" and isinstance(m, LogMessage)] == ["after"]


FLOODING_AGENT = textwrap.dedent(
    """
    import json, os
    head = b'{"kind": "checkpoint", "state": {"blob": "'
    os.write(1, head)
    for _ in range(72):  # 72 MiB with no newline, over the 64 MiB a line may have
        os.write(1, b"x" * (1 << 20))
        os.write(2, b"e" * (1 << 20))
    os.write(1, b'"}}\\n' + json.dumps({"kind": "result", "data": {"n": 1}}).encode() + b"\\n")
    """
)


def test_a_line_over_64_mib_is_cut_and_the_output_after_it_is_kept(tmp_path: Path) -> None:
    """An agent writing without a newline grew the worker's memory without end (the whole line
    held, then copied several times once it ended). A line over 64 MiB keeps its first 64 KiB for
    the logs, the rest is dropped, a warning says how long it was, and it is taken as no message
    (a checkpoint that size is not stored); the lines after it are read as usual, on both streams."""
    template = AgentTemplate(argv=[sys.executable, "-c", FLOODING_AGENT])
    outcome, seen, _ = _run(_job(tmp_path, {}), template)
    assert (outcome.outcome, outcome.result, outcome.checkpoint) == ("completed", {"n": 1}, None)
    size = len('{"kind": "checkpoint", "state": {"blob": "') + (72 << 20) + len('"}}')
    stdout = [m for s, m in seen if s == "stdout"]
    assert [m.kind for m in stdout] == ["log", "result"]
    assert isinstance(stdout[0], LogMessage) and stdout[0].level == "raw"
    assert stdout[0].message == ('{"kind": "checkpoint", "state": {"blob": "' + "x" * (64 << 10))[: 64 << 10]
    (stderr,) = [m.message for s, m in seen if s == "stderr"]
    assert stderr == "e" * (64 << 10)
    warnings = [m.message for s, m in seen if s == "flowyard" and isinstance(m, LogMessage) and m.level == "warning"]
    assert sorted(warnings) == [  # the streams' ends may come in either order
        f"a checkpoint line of {size:,} bytes was cut to its first 65,536 bytes and kept as a raw log line, not taken "
        "as a checkpoint: a line over 67,108,864 bytes is not read; keep large data in files in the working directory",
        f"a stderr line of {72 << 20:,} bytes was cut to its first 65,536 bytes (lines over 67,108,864 bytes are not "
        "kept whole)",
    ]


REAL_TIME_SIGNAL_AGENT = textwrap.dedent(
    """
    import json, os, signal
    print(json.dumps({"kind": "error", "message": "lost the lock"}), flush=True)
    os.kill(os.getpid(), signal.SIGRTMIN + 1)
    """
)


def test_an_agent_ended_by_a_real_time_signal_fails_with_its_own_error(tmp_path: Path) -> None:
    """Python's ``signal.Signals`` names no real-time signal but SIGRTMIN and SIGRTMAX: an agent
    ended by SIGRTMIN+1 (their default action ends a process) made the attempt raise "35 is not a
    valid Signals", which became its error in place of the agent's own and of how it ended."""
    template = AgentTemplate(argv=[sys.executable, "-c", REAL_TIME_SIGNAL_AGENT])
    outcome, _, _ = _run(_job(tmp_path, {}), template)
    number = int(signal.SIGRTMIN) + 1
    assert outcome.outcome == "failed" and outcome.exit_code == -number
    assert outcome.error == f"agent exited on signal {number}: lost the lock"


NOT_UTF8_AGENT = textwrap.dedent(
    """
    import sys
    out = sys.stdout.buffer
    out.write(b'{"kind": "checkpoint", "state": {"step": 0}}\\n')
    out.write(b'{"kind": "checkpoint", "state": {"step": 1, "file": "caf\\xe9"}}\\n')
    out.write(b'{"kind": "result", "data": {"file": "caf\\xe9"}}\\n')
    out.write(b'{"kind": "error", "message": "no caf\\xe9"}\\n')
    """
)


def test_a_checkpoint_or_result_line_that_is_not_utf8_is_kept_as_a_raw_log_line(tmp_path: Path) -> None:
    """JSON text is UTF-8. A checkpoint or result line in another encoding (a file name in
    Latin-1 from a shell or Node agent) was taken with its bytes replaced by U+FFFD: the task
    stored, and handed back on resume, a state the agent never wrote. Like any line that is not
    JSON, it is a raw log line now, shown with the replacement characters. An error line is only
    shown, so it still fails the attempt, with U+FFFD in its message."""
    template = AgentTemplate(argv=[sys.executable, "-c", NOT_UTF8_AGENT])
    outcome, seen, _ = _run(_job(tmp_path, {}), template)
    assert outcome.outcome == "failed" and outcome.error == "agent exited with code 0: no caf\ufffd"
    assert outcome.checkpoint == {"step": 0} and outcome.result is None
    raw = [m.message for s, m in seen if s == "stdout" and isinstance(m, LogMessage) and m.level == "raw"]
    assert raw == [
        '{"kind": "checkpoint", "state": {"step": 1, "file": "caf\ufffd"}}',
        '{"kind": "result", "data": {"file": "caf\ufffd"}}',
    ]
    # each followed by why it was not taken: the agent took both for saved, and the run said nothing
    fix = "JSON text must be UTF-8: escape such characters as \\uXXXX or encode the data (as base64, for instance)"
    shown = [(s, m.message) for s, m in seen if isinstance(m, LogMessage) and (m.level == "raw" or s == "flowyard")]
    assert shown[-4:] == [
        ("stdout", raw[0]),
        ("flowyard", f"a checkpoint line was kept as a raw log line, not taken as a checkpoint: it is not UTF-8 (byte 0xe9 at offset 56); {fix}"),
        ("stdout", raw[1]),
        ("flowyard", f"a result line was kept as a raw log line, not taken as a result: it is not UTF-8 (byte 0xe9 at offset 40); {fix}"),
    ]  # fmt: skip


def test_reference_agent_starts_without_the_heavy_standard_modules(tmp_path: Path) -> None:
    """Its start-up is part of every task's overhead: the exact interpreter flags of the
    template, importing the agent, must leave json, re, enum, typing, threading and signal
    (each several ms of CPU) unloaded."""
    *interpreter, boot = REFERENCE_TEMPLATE.argv
    assert boot.endswith("serve()")
    probe = boot.removesuffix("serve()") + "print(' '.join(sys.modules))"
    loaded = set(subprocess.run([*interpreter, probe], capture_output=True, text=True, check=True).stdout.split())
    assert "tasks.reference_agent" in loaded
    assert loaded.isdisjoint({"json", "re", "enum", "typing", "threading", "signal", "site", "hashlib"})


@pytest.mark.parametrize(
    ("limits", "message"),
    [
        ({"timeout_seconds": float("inf")}, "the agent timeout (--timeout / timeout_seconds) inf is out of range; give 1 to 31536000 seconds"),
        ({"timeout_seconds": 365 * 86_400 + 1.0}, "the agent timeout (--timeout / timeout_seconds) 31536001.0 is out of range"),
        ({"grace_seconds": float("inf")}, "the grace period (--grace / grace_seconds) inf is out of range; give 0 to 31536000 seconds"),
        ({"grace_seconds": float("nan")}, "the grace period (--grace / grace_seconds) nan is out of range"),
        ({"checkpoint_wait_seconds": float("inf")}, "the checkpoint wait (--checkpoint-wait / checkpoint_wait_seconds) inf is out of range; give 0 to 31536000 seconds"),
        ({"checkpoint_wait_seconds": -0.5}, "the checkpoint wait (--checkpoint-wait / checkpoint_wait_seconds) -0.5 is out of range"),
    ],
)  # fmt: skip
def test_limits_past_a_year_are_refused(limits: dict[str, float], message: str) -> None:
    """An infinite timeout never stops a hung agent; an infinite grace period never SIGKILLs one
    that ignores SIGTERM, so a shutdown waits for good."""
    with pytest.raises(UserError) as raised:
        AgentLimits(**limits)
    assert str(raised.value).startswith(message)
    assert AgentLimits(timeout_seconds=365 * 86_400, grace_seconds=365 * 86_400).grace_seconds == 365 * 86_400


@pytest.mark.parametrize("timeout", [1e-300, 1e-9, 0.5, 0.0, -5.0, float("nan")])
def test_a_timeout_under_a_second_is_refused(timeout: float) -> None:
    """A timeout of 1e-9 (or 1e-300) was accepted: every agent was stopped as it started and the
    task burned all its retries. A grace period or checkpoint wait of 0 stays accepted."""
    with pytest.raises(UserError) as raised:
        AgentLimits(timeout_seconds=timeout)
    assert str(raised.value) == (
        f"the agent timeout (--timeout / timeout_seconds) {timeout} is out of range; give 1 to 31536000 seconds"
    )
    assert AgentLimits(timeout_seconds=1.0, grace_seconds=0.0, checkpoint_wait_seconds=0.0).timeout_seconds == 1.0


@pytest.mark.parametrize("field", ["grace_seconds", "checkpoint_wait_seconds"])
@pytest.mark.parametrize("seconds", [1e-300, 1e-6, 0.0009])
def test_a_grace_period_or_checkpoint_wait_under_a_millisecond_is_refused(field: str, seconds: float) -> None:
    """Above 0 but under 1 ms, a grace period or checkpoint wait acted as 0 (the stop's first look
    at the process table takes longer), while the run looked as if it gave the agent time."""
    what = {
        "grace_seconds": "the grace period (--grace / grace_seconds)",
        "checkpoint_wait_seconds": "the checkpoint wait (--checkpoint-wait / checkpoint_wait_seconds)",
    }[field]
    with pytest.raises(UserError) as raised:
        AgentLimits(**{field: seconds})
    assert str(raised.value) == (
        f"{what} {seconds} is out of range; give 0 (no wait) or 0.001 to 31536000 seconds: a shorter wait acts as 0"
    )
    assert getattr(AgentLimits(**{field: 0.001}), field) == 0.001
    assert getattr(AgentLimits(**{field: 0.0}), field) == 0.0


@pytest.mark.parametrize("retries", [-1, 101, 10**12])
def test_retries_outside_0_to_100_are_refused(retries: int) -> None:
    with pytest.raises(UserError) as raised:
        check_drain(1, retries)
    assert str(raised.value) == f"retries (--retries / retries) {retries} is out of range; give 0 to 100"
    check_drain(1, 100)


def test_an_agent_that_exited_in_time_is_not_timed_out_by_the_handling_of_its_output(tmp_path: Path) -> None:
    """The deadline is the agent's, not flowyard's: an agent that wrote its result and exited 0
    while flowyard was still handling a line (a 50 MB log line written to the ``.jsonl`` file and
    the run log took seconds) was stopped as "timeout after 1s" once that handling ended, and
    each retry failed alike. Here the handling of the result waits for the agent's exit and then
    past the deadline."""
    agent = 'import json; print(json.dumps({"kind": "result", "data": {"done": True}}), flush=True)'
    template = AgentTemplate(argv=[sys.executable, "-c", agent])
    process: AgentProcess

    def slow_handling(stream: str, message: AgentMessage) -> None:
        if message.kind == "result":
            assert process.pgid is not None
            os.waitid(os.P_PID, process.pgid, os.WEXITED | os.WNOWAIT)  # exited, not reaped
            time.sleep(1.5)  # past the 1 s timeout

    process = AgentProcess(_job(tmp_path, {}), template, on_message=slow_handling, limits=AgentLimits(timeout_seconds=1))
    outcome = process.run()
    assert (outcome.outcome, outcome.exit_code, outcome.error) == ("completed", 0, None)
    assert outcome.result == {"done": True}


MISSHAPEN_AGENT = textwrap.dedent(
    """
    import json
    for line in (
        {"kind": "checkpoint", "state": [1, 2, 3]},
        {"kind": "result", "data": "done"},
        {"kind": "log", "level": "raw", "message": json.dumps({"kind": "result", "data": 1})},
    ):
        print(json.dumps(line), flush=True)
    print("a stray print", flush=True)
    """
)


def test_a_checkpoint_or_result_of_the_wrong_shape_is_kept_as_a_raw_line_with_a_warning(tmp_path: Path) -> None:
    """A checkpoint whose state is not an object, or a result whose data is not, was kept as a raw
    log line in silence: the next attempt resumed from an older checkpoint and the task completed
    with ``{}``, while the agent took both for saved. The run now says why each was not taken; a
    stray print, or an agent's own log message at level ``raw``, draws no warning."""
    template = AgentTemplate(argv=[sys.executable, "-c", MISSHAPEN_AGENT])
    outcome, seen, _ = _run(_job(tmp_path, {}), template)
    assert (outcome.outcome, outcome.checkpoint, outcome.result) == ("completed", None, {})
    warnings = [m.message for s, m in seen if s == "flowyard" and isinstance(m, LogMessage) and m.level == "warning"]
    assert warnings == [
        "a checkpoint line was kept as a raw log line, not taken as a checkpoint: state: Input should be a valid dictionary",
        "a result line was kept as a raw log line, not taken as a result: data: Input should be a valid dictionary",
    ]
    first = next(n for n, (s, m) in enumerate(seen) if s == "flowyard" and isinstance(m, LogMessage) and m.level == "warning")
    stream, line = seen[first - 1]
    assert stream == "stdout" and isinstance(line, LogMessage) and '"checkpoint"' in line.message, "it follows its line"
