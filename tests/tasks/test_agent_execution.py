"""A fleet's graceful shutdown, against the real queue in PostgreSQL."""

from __future__ import annotations

import json
import logging
import sys
import threading
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tasks import agent_queue as queue
from tasks.agent_execution import AgentSetup, Fleet, TaskLog, _Bookkeeping, fleet, run_agent
from tasks.agent_process import (
    DEFAULT_TEMPLATES,
    REFERENCE_TEMPLATE,
    AgentJob,
    AgentLimits,
    AgentOutcome,
    AgentProcess,
    AgentTemplate,
)
from tasks.agent_protocol import parse_line
from tasks.db import connection
from tasks.errors import LINE_LIMIT, UserError
from tasks.state import state_url
from tests.fs_support import fill_up, small_tmpfs


def test_a_shutdown_reports_back_in_the_queue_only_the_tasks_that_are(fresh_db: str, tmp_path: Path) -> None:
    """Every attempt the fleet held was reported "back in the queue" (the Cancelled state's message,
    the log), also one whose agent had finished as the stop came and whose task was completed."""
    url = state_url(fresh_db)
    limits = AgentLimits(grace_seconds=0.0)
    setup = AgentSetup(url, queue.new_worker_id(), tmp_path, tmp_path / "logs", DEFAULT_TEMPLATES, limits)
    finished, stopped = (
        queue.create_task(url, queue.NewTask(title=title, agent_type="reference")) for title in ("finished", "stopped")
    )
    queue.claim_ready(url, setup.worker, 2)
    runs = {t: queue.start_attempt(url, t, setup.worker, None).run_id for t in (finished, stopped)}
    fleet = Fleet(setup, max_agents=2)
    try:
        for task_id in runs:
            job = AgentJob(task_id, 1, "t", "task", "", {}, None, tmp_path / f"task-{task_id}", setup.worker)
            fleet.add(task_id, AgentProcess(job, REFERENCE_TEMPLATE, on_message=lambda s, m: None, limits=limits))
        result: list[list[int]] = []
        shutdown = threading.Thread(target=lambda: result.append(fleet.shutdown("graceful_shutdown: test")))
        shutdown.start()
        # As the stop reaches them, one attempt's agent has just completed, the other is interrupted:
        # each attempt's own bookkeeping settles its task, as run_agent does.
        queue.finish_attempt(url, runs[finished], setup.worker, "completed", result={})
        interrupted = AgentOutcome("interrupted", None, error="graceful_shutdown: test")
        with TaskLog(setup.logs_dir, stopped, 1, logging.getLogger("test")) as log:
            _Bookkeeping(setup, stopped, 1, log).finish(runs[stopped], interrupted, final=False)
        for task_id in runs:
            fleet.remove(task_id)
        shutdown.join(60)
    finally:
        fleet.reaper.close()
    assert result == [[stopped]]
    assert (queue.get_task(url, finished).status, queue.get_task(url, stopped).status) == ("completed", "pending")


def test_a_claimed_task_holds_its_agent_slot_until_freed_and_freeing_wakes_the_loop(
    fresh_db: str, tmp_path: Path
) -> None:
    """The flow claims only into free slots. A slot is freed twice for most tasks (by the attempt
    that needs it no more, then by its task run's end): the second must not free another."""
    url = state_url(fresh_db)
    setup = AgentSetup(url, queue.new_worker_id(), tmp_path, tmp_path / "logs", DEFAULT_TEMPLATES)
    for title in ("one", "two"):
        queue.create_task(url, queue.NewTask(title=title, agent_type="reference"))
    fleet = Fleet(setup, max_agents=2)
    try:
        one, two = queue.claim_ready(url, setup.worker, 2)
        fleet.claimed(one)
        fleet.claimed(two)
        assert fleet.busy_slots() == 2
        woke = threading.Event()

        def wait() -> None:
            fleet.wait_for_slot(timeout=600)
            woke.set()

        waiter = threading.Thread(target=wait)
        waiter.start()
        fleet.free_slot(one.id)
        waiter.join(600)
        assert woke.is_set() and fleet.busy_slots() == 1
        fleet.free_slot(one.id)
        assert fleet.busy_slots() == 1
        fleet.free_slot(two.id)
        assert fleet.busy_slots() == 0
    finally:
        fleet.reaper.close()


def test_a_graceful_shutdown_before_any_checkpoint_hands_the_next_attempt_no_checkpoint(
    fresh_db: str, tmp_path: Path
) -> None:
    """A stop that came before the agent saved any state recorded the state ``{}``, and the next
    attempt's envelope handed the agent that record instead of ``null``: an agent resuming from
    ``checkpoint.state`` looked there for what it never saved. The stop is still recorded."""
    url = state_url(fresh_db)
    setup = AgentSetup(url, queue.new_worker_id(), tmp_path, tmp_path / "logs", DEFAULT_TEMPLATES)
    task_id = queue.create_task(url, queue.NewTask(title="stopped early", agent_type="reference"))
    queue.claim_ready(url, setup.worker, 1)
    first = queue.start_attempt(url, task_id, setup.worker, None)
    stopped = AgentOutcome("interrupted", None, error="graceful_shutdown: test")
    with TaskLog(setup.logs_dir, task_id, first.number, logging.getLogger("test")) as log:
        _Bookkeeping(setup, task_id, first.number, log).finish(first.run_id, stopped, final=False)
    task = queue.get_task(url, task_id)
    assert (task.status, task.checkpoint_label) == ("pending", "graceful_shutdown@1")
    assert [(h["kind"], h["state"]) for h in queue.checkpoint_history(url, task_id)] == [("graceful_shutdown", None)]
    queue.claim_ready(url, setup.worker, 1)
    second = queue.start_attempt(url, task_id, setup.worker, None)
    job = AgentJob(task_id, second.number, "t", "task", "", {}, second.checkpoint, tmp_path, setup.worker)
    assert json.loads(job.envelope())["checkpoint"] is None


@pytest.mark.usefixtures("prefect_api")
def test_an_attempt_stopped_before_its_agent_started_returns_what_every_attempt_returns(
    fresh_db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A shutdown reaching an attempt between its start and its agent's made the attempt's Prefect
    result carry the whole checkpoint record (attempt, kind, state) as ``checkpoint``, without
    ``attempt`` and ``result``, where every other attempt's carries the state."""
    url = state_url(fresh_db)
    setup = AgentSetup(url, queue.new_worker_id(), tmp_path, tmp_path / "logs", DEFAULT_TEMPLATES)
    task_id = queue.create_task(url, queue.NewTask(title="stopped", agent_type="reference"))
    [task] = queue.claim_ready(url, setup.worker, 1)
    first = queue.start_attempt(url, task_id, setup.worker, None)
    assert queue.record_checkpoint(url, task_id, setup.worker, first.number, {"step": 3})
    queue.finish_attempt(url, first.run_id, setup.worker, "failed", error="crashed")
    start = queue.start_attempt
    with fleet(setup, max_agents=1) as current:
        current.claimed(task)

        def start_then_stop(*args: Any, **kwargs: Any) -> queue.Attempt:
            started = start(*args, **kwargs)
            current.stopping.set()  # the shutdown comes as the attempt starts
            return started

        monkeypatch.setattr(queue, "start_attempt", start_then_stop)
        result = run_agent(task_id, setup.worker)
    assert result == {
        "task_id": task_id,
        "attempt": 2,
        "outcome": "interrupted",
        "result": None,
        "checkpoint": {"step": 3},
    }


def test_an_agents_fields_named_like_flowyards_do_not_replace_them_in_the_task_log(tmp_path: Path) -> None:
    """An agent's log line with its own ``attempt``, ``task_id``, ``ts`` or ``stream`` overwrote
    flowyard's in ``<task_id>.jsonl``; its values are kept under ``agent_fields`` when they differ."""
    line = {"kind": "log", "message": "hi", "attempt": 9, "task_id": 7, "ts": "yesterday", "stream": "mine"}
    with TaskLog(tmp_path, 7, 2, logging.getLogger("test")) as log:
        log.write("stdout", parse_line(json.dumps({**line, "agent_fields": 1})))
        log.write("stdout", parse_line('{"kind": "log", "message": "plain"}'))
    shadowed, plain = [json.loads(text) for text in (tmp_path / "7.jsonl").read_text().splitlines()]
    assert (shadowed["task_id"], shadowed["attempt"], shadowed["stream"], shadowed["message"]) == (7, 2, "stdout", "hi")
    assert datetime.fromisoformat(shadowed["ts"]).tzinfo is not None
    assert shadowed["agent_fields"] == {"attempt": 9, "ts": "yesterday", "stream": "mine", "agent_fields": 1}
    assert "agent_fields" not in plain and (plain["attempt"], plain["message"]) == (2, "plain")


class _Lines(logging.Handler):
    """The run-log lines a logger was given, as its handlers format them."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


def test_an_agents_control_characters_reach_the_run_log_as_their_escapes(tmp_path: Path) -> None:
    """``queue run`` prints the run log on the terminal: an agent's terminal escape reached it raw
    (it cleared the screen or recoloured what followed) and a line break in a log or error message
    forged a log line of its own, and a progress line's JSON kept a C1 escape (``\\x9b``) or a line
    separator raw. The task's ``.jsonl`` keeps what the agent wrote."""
    logger = logging.getLogger("test.agent-run-log")
    logger.propagate = False
    logger.setLevel(logging.INFO)  # agent output is logged at INFO; the tests run Prefect at WARNING
    handler = _Lines()
    logger.addHandler(handler)
    lines = [
        '{"kind": "log", "message": "\\u001b[2Jcleared\\u009b31m"}',
        '{"kind": "error", "message": "disk full\\n[task 7 flowyard] forged\\u2028"}',
        "\x1b]0;retitled\x07 raw\ttext",
        '{"kind": "progress", "percent": 50, "message": "half\\u009b\\u2028"}',
    ]
    try:
        with TaskLog(tmp_path, 7, 1, logger) as log:
            for line in lines:
                log.write("stdout", parse_line(line))
            log.write("stderr", parse_line("plain \u00e9 text"))
    finally:
        logger.removeHandler(handler)
    assert handler.lines == [
        "[task 7 stdout] \\x1b[2Jcleared\\x9b31m",
        "[task 7 stdout] error: disk full\\n[task 7 flowyard] forged\\u2028",
        "[task 7 stdout] \\x1b]0;retitled\\x07 raw\\ttext",
        '[task 7 stdout] {"kind":"progress","percent":50.0,"message":"half\\x9b\\u2028"}',
        "[task 7 stderr] plain \u00e9 text",
    ]
    kept = [json.loads(text)["message"] for text in (tmp_path / "7.jsonl").read_text().splitlines()]
    assert kept == [
        "\x1b[2Jcleared\x9b31m",
        "disk full\n[task 7 flowyard] forged\u2028",
        "\x1b]0;retitled\x07 raw\ttext",
        "half\x9b\u2028",
        "plain \u00e9 text",
    ]


@pytest.mark.usefixtures("prefect_api")
def test_a_run_of_a_task_that_starts_no_attempt_returns_what_every_attempt_returns(
    fresh_db: str, tmp_path: Path
) -> None:
    """A run that started no attempt returned a dict of its own shape, without ``attempt`` and
    ``result``: the run was stopping, or over (``checkpoint``, no ``attempt``), or the task had been
    cancelled, or released and claimed by another worker, while Prefect waited to retry (not even
    ``checkpoint``). Each is the shape of an attempt that ran, saying that none started."""
    url = state_url(fresh_db)
    setup = AgentSetup(url, queue.new_worker_id(), tmp_path, tmp_path / "logs", DEFAULT_TEMPLATES)
    ran, cancelled, reclaimed, stopped = (
        queue.create_task(url, queue.NewTask(title=title, agent_type="reference", payload={"steps": 1}))
        for title in ("ran", "cancelled", "reclaimed", "stopped")
    )
    with fleet(setup, max_agents=4) as current:
        for task in queue.claim_ready(url, setup.worker, 4):
            current.claimed(task)
        results = [run_agent(ran, setup.worker)]
        queue.cancel_task(url, cancelled)
        results.append(run_agent(cancelled, setup.worker))
        queue.release_task(url, reclaimed, setup.worker, "recovered: worker is gone")
        assert [t.id for t in queue.claim_ready(url, queue.new_worker_id(), 1)] == [reclaimed]
        results.append(run_agent(reclaimed, setup.worker))
        assert current.shutdown("graceful_shutdown: test") == [stopped]
        results.append(run_agent(stopped, setup.worker))
    results.append(run_agent(stopped, setup.worker))  # the run is over: its fleet is gone
    assert [list(r) for r in results[1:]] == [list(results[0])] * 4
    assert [(r["attempt"], r["outcome"]) for r in results] == [
        (1, "completed"),
        (None, "cancelled"),
        (None, "released"),
        (None, "interrupted"),
        (None, "interrupted"),
    ]
    assert [(r["task_id"], r["result"], r["checkpoint"]) for r in results[1:]] == [
        (task_id, None, None) for task_id in (cancelled, reclaimed, stopped, stopped)
    ]


def test_a_line_of_megabytes_reaches_the_run_log_cut_and_the_jsonl_log_whole(tmp_path: Path) -> None:
    """An agent that wrote megabytes with no newline put all of it on ``queue run``'s terminal as
    one run-log line (and Prefect's API refuses a log over 1 MB): the run log gets the line's start
    and how much was left out, ``<task id>.jsonl`` the whole line."""
    agent = "import os; os.write(1, b'x' * (3 << 20))"
    logger = logging.getLogger("test.agent-long-line")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    handler = _Lines()
    logger.addHandler(handler)
    job = AgentJob(7, 1, "t", "task", "", {}, None, tmp_path / "work", queue.new_worker_id())
    try:
        with TaskLog(tmp_path, 7, 1, logger) as log:
            process = AgentProcess(job, AgentTemplate(argv=[sys.executable, "-c", agent]), on_message=log.write)
            outcome = process.run()
    finally:
        logger.removeHandler(handler)
    assert outcome.outcome == "completed"
    (line,) = [text for text in handler.lines if text.startswith("[task 7 stdout]")]
    shown = len("[task 7 stdout] ") + (3 << 20)
    assert line == f"{('[task 7 stdout] ' + 'x' * (3 << 20))[:LINE_LIMIT]}… ({shown - LINE_LIMIT} more characters in the task's .jsonl log)"
    records = [json.loads(text) for text in (tmp_path / "7.jsonl").read_text().splitlines()]
    assert [r["message"] for r in records if r["stream"] == "stdout"] == ["x" * (3 << 20)]


def test_a_logs_directory_made_unusable_during_a_run_fails_the_attempt_in_one_line(tmp_path: Path) -> None:
    """The run checks its logs directory when it starts; a file put in its place since (or a
    directory in a task log's) was Python's FileExistsError or IsADirectoryError, which Prefect
    retried to the same end. It is a UserError, which fails the task at once."""
    logs = tmp_path / "logs"
    logs.write_text("not a directory")
    with pytest.raises(UserError) as raised:
        TaskLog(logs, 7, 1, logging.getLogger("test"))
    assert str(raised.value) == (
        f"the agents' logs directory (--logs-dir / logs_dir) {logs} cannot be used as a directory: "
        "File exists; pass a directory path"
    )
    logs.unlink()
    (logs / "7.jsonl").mkdir(parents=True)
    with pytest.raises(UserError) as raised:
        TaskLog(logs, 7, 1, logging.getLogger("test"))
    assert str(raised.value) == (
        f"cannot write the log of task 7 to {logs / '7.jsonl'}: Is a directory; "
        "remove what is in its place and retry the task"
    )


def test_a_task_log_its_full_disk_cannot_take_is_one_line_saying_the_disk_is_full(tmp_path: Path) -> None:
    """The logs directory's disk with no inode left when an attempt opens its log: the task failed
    saying to "remove what is in its place", though nothing was."""
    with small_tmpfs(tmp_path / "logs", inodes=2) as logs:  # 2: its root and the filler
        fill_up(logs)
        with pytest.raises(UserError) as raised:
            TaskLog(logs, 7, 1, logging.getLogger("test"))
    assert str(raised.value) == (
        f"cannot write the log of task 7 to {logs / '7.jsonl'}: No space left on device (disk full); "
        "make room for it (or pass another --logs-dir / logs_dir), then retry the task"
    )


def test_an_attempts_end_held_up_by_a_row_lock_says_so_in_the_task_log_and_is_written_after(
    fresh_db: str, tmp_path: Path
) -> None:
    """The end of an attempt whose task's row a psql session holds (``SELECT ... FOR UPDATE`` left
    open) waited without a word in the task's log. It says it waits on that session's lock, and the
    end is written once the lock is released: the attempt is neither failed nor lost."""
    url = state_url(fresh_db)
    setup = AgentSetup(url, queue.new_worker_id(), tmp_path, tmp_path / "logs", DEFAULT_TEMPLATES)
    task_id = queue.create_task(url, queue.NewTask(title="row locked at its end", agent_type="reference"))
    queue.claim_ready(url, setup.worker, 1)
    attempt = queue.start_attempt(url, task_id, setup.worker, None)
    log_path = setup.logs_dir / f"{task_id}.jsonl"
    ended: list[str | None] = []
    with connection(url) as dba, TaskLog(setup.logs_dir, task_id, attempt.number, logging.getLogger("test")) as log:
        dba.execute("SELECT id FROM flowyard.agent_tasks WHERE id = %s FOR UPDATE", (task_id,))
        holder = dba.info.backend_pid
        books = _Bookkeeping(setup, task_id, attempt.number, log)
        done = AgentOutcome("completed", {"ok": True})
        ending = threading.Thread(target=lambda: ended.append(books.finish(attempt.run_id, done, final=False)))
        ending.start()
        for _ in range(6000):  # until the log says it waits (a guard, not a limit of the behaviour)
            if "waiting on a lock" in log_path.read_text():
                break
            threading.Event().wait(0.01)
        assert ended == [], "the end waits for the lock"
        dba.commit()
        ending.join()
    assert ended == ["completed"]
    said = [json.loads(line)["message"] for line in log_path.read_text().splitlines()]
    assert said[0].startswith(
        "waiting on a lock: a row of flowyard.agent_tasks is locked (canceling statement due to lock timeout): "
        f"held by pid {holder} (user "
    )
    assert "; the agent has exited; the attempt's end is written once it can be (end that session: " in said[0]
    assert said[1].startswith("the lock was released, after ")
