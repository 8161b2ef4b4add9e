"""Running queued agent tasks as Prefect tasks: one attempt, its logs, checkpoints and artifacts,
and the fleet of attempts a flow run holds, which it stops gracefully on cancellation or signals.

Every message an agent sends goes to ``<logs_dir>/<task_id>.jsonl`` and to the Prefect run
log; every checkpoint goes to ``flowyard.agent_checkpoints`` (and is the task's last
checkpoint, handed back on the next attempt); artifacts become Prefect artifacts.
"""

from __future__ import annotations

import json
import logging
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, TypeVar
from uuid import UUID

import httpx
import psycopg
from prefect import Task, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.context import TaskRunContext
from prefect.filesystems import LocalFileSystem
from prefect.results import get_result_store
from prefect.runtime import flow_run
from pydantic import ValidationError

from tasks import agent_queue as queue
from tasks.abandoned_runs import crash_flow_runs
from tasks.agent_process import (
    AgentJob,
    AgentLimits,
    AgentOutcome,
    AgentProcess,
    AgentTemplate,
    agent_mark,
    resolve_workdir,
)
from tasks.agent_protocol import AgentMessage, ArtifactMessage, CheckpointMessage, ErrorMessage, LogMessage
from tasks.agent_reaper import Reaper
from tasks.errors import (
    ConnectionUnavailable,
    UserError,
    clipped,
    disk_full,
    first_line,
    make_user_dir,
    printable,
)
from tasks.process_group import terminate_groups

_T = TypeVar("_T")


@dataclass(frozen=True)
class AgentSetup:
    """What every attempt of one flow run shares (held by its :class:`Fleet`)."""

    database_url: str
    worker: str
    output_dir: Path
    logs_dir: Path
    templates: dict[str, AgentTemplate]
    limits: AgentLimits = AgentLimits()

    def patiently(self, call: Callable[[], _T]) -> _T:
        """``call()`` (a queue read, or a write fenced by worker and attempt), waiting out an
        outage of the state database (:func:`agent_queue.riding_out`) for up to the lease: the
        longest this worker may go without reaching it before another run may take its tasks.
        The run log says so, naming the holder of a lock it waits on: the run's own writes at its
        end (the reasons pass, a task failed for good) rode out a lock on a task's row without a
        word, for up to the lease."""
        lease = self.limits.lease_seconds
        doing = f"waiting for it for up to the lease ({lease:g}s)"
        return queue.riding_out(call, lease, lambda error: get_run_logger().warning(outage_line(error, doing)))


class AgentFailed(Exception):
    """An attempt failed or timed out; Prefect retries it, resuming from the last checkpoint,
    unless the agent said the error is not retryable."""

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


_FULL_LOGS_FIX = " (or pass another --logs-dir / logs_dir), then retry the task"
"""How to go on when the logs directory's disk is full (:func:`~tasks.errors.disk_full`)."""


class TaskLog:
    """``<logs_dir>/<task_id>.jsonl`` plus the Prefect run log, for one attempt."""

    def __init__(
        self, logs_dir: Path, task_id: int, attempt: int, logger: logging.LoggerAdapter[Any] | logging.Logger
    ) -> None:
        """A logs directory (or a task's log) made unusable since the run checked it at its start
        (a file put in the directory's place, a directory in the log's) fails the attempt in one
        line, not retried: it was Python's ``FileExistsError`` or ``IsADirectoryError``, retried
        to the same end until the task failed."""
        make_user_dir(logs_dir, "the agents' logs directory (--logs-dir / logs_dir)", full_fix=_FULL_LOGS_FIX)
        self.path = logs_dir / f"{task_id}.jsonl"
        self._what = f"the log of task {task_id} to {self.path}"
        try:
            self._file = self.path.open("a", encoding="utf-8")
        except OSError as exc:  # its disk full (no inode left) was told as something in its place
            raise disk_full(exc, self._what, _FULL_LOGS_FIX) or UserError(
                f"cannot write {self._what}: {exc.strerror or exc}; remove what is in its place and retry the task"
            ) from None
        self._task_id = task_id
        self._attempt = attempt
        self._logger = logger
        self._lock = threading.Lock()

    def write(self, stream: str, message: AgentMessage) -> None:
        """Append the record, and log it to the run. The file failing (its disk full, a file size
        limit) fails the attempt in one line naming the log and the cause, not retried: it was
        ``OSError: [Errno 28] No space left on device``, retried to the same end, naming neither.
        The file is closed at once (closing it later tried the line again and raised the same
        error over the first); what the agent writes while it is stopped goes to the run log only."""
        record = log_record(self._task_id, self._attempt, stream, message)
        with self._lock:
            if not self._file.closed:
                try:
                    self._file.write(json.dumps(record) + "\n")
                    self._file.flush()
                except OSError as exc:
                    with suppress(OSError):  # its buffer still holds the line, which closing tries again
                        self._file.close()
                    raise disk_full(exc, self._what, _FULL_LOGS_FIX) or UserError(
                        f"cannot write {self._what}: {exc.strerror or exc}; make room for it{_FULL_LOGS_FIX}"
                    ) from None
        self._logger.log(*run_log_line(self._task_id, stream, message))

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> TaskLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


SHADOWED_FIELDS_KEY = "agent_fields"
"""Where a ``.jsonl`` record keeps an agent's own values of the fields flowyard writes itself."""


def log_record(task_id: int, attempt: int, stream: str, message: AgentMessage) -> dict[str, Any]:
    """One line of ``<task_id>.jsonl``: flowyard's fields and the agent's message. An agent may add
    fields of its own to a message, named like flowyard's (an ``attempt`` counting its own retries,
    a ``ts`` of its clock): those overwrote flowyard's, so the record no longer told which attempt
    wrote it, nor when. flowyard's win; the agent's values that differ are kept under
    :data:`SHADOWED_FIELDS_KEY` (an agent field of that name too, so the key is never ambiguous)."""
    own: dict[str, Any] = {
        "ts": datetime.now(UTC).isoformat(),
        "task_id": task_id,
        "attempt": attempt,
        "stream": stream,
    }
    fields = message.model_dump(mode="json")
    clashing = {name: fields.pop(name) for name in (*own, SHADOWED_FIELDS_KEY) if name in fields}
    shadowed = {name: value for name, value in clashing.items() if name not in own or value != own[name]}
    return {**own, **fields} | ({SHADOWED_FIELDS_KEY: shadowed} if shadowed else {})


def run_log_line(task_id: int, stream: str, message: AgentMessage) -> tuple[int, str]:
    """How one agent message reads in the Prefect run log: its level and its line, each control
    character as its escape (``\\x1b``, ``\\n``). ``queue run`` prints that log on the terminal,
    where an agent's terminal escape recoloured, cleared or retitled it, and a line break forged a
    log line of its own; the task's ``.jsonl`` log keeps what the agent wrote, whole where the run
    log's line is :func:`~tasks.errors.clipped`."""
    level, line = _run_log_text(task_id, stream, message)
    return level, clipped(printable(line), "the task's .jsonl log")


def _run_log_text(task_id: int, stream: str, message: AgentMessage) -> tuple[int, str]:
    prefix = f"[task {task_id} {stream}]"
    if isinstance(message, CheckpointMessage):
        return logging.INFO, f"{prefix} checkpoint {json.dumps(message.state)[:200]}"
    if isinstance(message, ErrorMessage):
        return logging.ERROR, f"{prefix} error: {message.message}"
    if isinstance(message, LogMessage):
        level = logging.WARNING if message.level in ("stderr", "warning", "error") else logging.INFO
        return level, f"{prefix} {message.message}"
    return (
        logging.INFO,
        f"{prefix} {message.model_dump_json(exclude={'data'} if isinstance(message, ArtifactMessage) else None)}",
    )


def publish_artifact(task_id: int, message: ArtifactMessage) -> str | None:
    """An agent-reported artifact as a Prefect artifact of the current task run.

    Returns why it was not published, or None. An artifact is a side output of the agent's
    work: one Prefect refuses (table data of the wrong shape, an API rejection) is reported in
    the task's log while the agent carries on, instead of failing the attempt.
    """
    key = message.key or f"agent-task-{task_id}"
    description = message.description or f"artifact of agent task {task_id}"
    try:
        if message.type == "link":
            create_link_artifact(link=str(message.data), key=key, description=description)
        elif message.type == "table":
            create_table_artifact(table=message.data, key=key, description=description)
        else:
            create_markdown_artifact(markdown=str(message.data), key=key, description=description)
    except ValidationError:
        reason = "table data must be a list of row objects, a list of row lists or an object of column lists"
    except httpx.HTTPStatusError as exc:
        reason = f"the Prefect API refused it ({first_line(exc)})"
    else:
        return None
    return f"artifact {key!r} not published: {reason}"


def outage_line(error: BaseException, doing: str) -> str:
    """The warning for a queue call held up by ``error`` while the worker goes on ``doing``. A lock
    another session holds (:class:`agent_queue.QueueLocked`) is named with its holder and how to
    end it: it was told as the state database being unreachable, which sent an operator after the
    server and the network instead of the psql session holding a task's row."""
    if isinstance(error, queue.QueueLocked):
        return f"waiting on a lock: {error.lock}; {doing} ({error.end_it})"
    return f"the state database is unreachable ({first_line(error)}); {doing}"


class OutageNotice:
    """Says once that the state database is unreachable (or that a lock holds up the queue's
    writes), and once that it is back, however many calls meet the outage in between."""

    def __init__(self, say: Callable[[str, str], None]) -> None:
        self._say = say
        self._since: float | None = None
        self._locked = False

    def lost(self, error: BaseException, doing: str) -> None:
        if self._since is None:
            self._since = time.monotonic()
            self._locked = isinstance(error, queue.QueueLocked)
            self._say("warning", outage_line(error, doing))

    @property
    def away(self) -> bool:
        """Whether the database is out of reach (or its tables locked) since the last notice."""
        return self._since is not None

    def back(self) -> None:
        if self._since is not None:
            back = "the lock was released" if self._locked else "the state database is reachable again"
            self._say("info", f"{back}, after {time.monotonic() - self._since:.1f}s")
            self._since = None


class _Bookkeeping:
    """An attempt's writes while its agent runs (heartbeats, checkpoints), riding out an outage of
    the state database (a restart, a failover): the agent needs no database to work, and a
    heartbeat's connection error killed it, failing the attempt. A checkpoint the database could
    not take is kept (the newest one) and written with the next heartbeat that gets through, or at
    the end of the attempt. Only an outage longer than the worker's lease stops the agent: another
    run may then take the task for abandoned (each write is fenced by worker and attempt, so this
    attempt's late writes never overwrite its next holder's)."""

    def __init__(self, setup: AgentSetup, task_id: int, attempt: int, log: TaskLog) -> None:
        self._setup = setup
        self.task_id = task_id
        self.attempt = attempt
        self._reached = time.monotonic()  # the last write the database took
        self.unsaved: dict[str, Any] | None = None  # the newest checkpoint not yet written
        self._notice = OutageNotice(
            lambda level, text: log.write("flowyard", LogMessage(kind="log", level=level, message=text))
        )
        self.agent: AgentProcess | None = None

    def checkpoint(self, state: dict[str, Any]) -> bool:
        """Record the agent's checkpoint; False when the attempt no longer holds the task. While the
        database is away it is only kept, for the next heartbeat: each write waited for it (up to
        the lock timeout behind a locked table), and the agent's output was not read meanwhile."""
        self.unsaved = state
        if self._notice.away:
            return True
        with queue.skipping_outage(
            lambda exc: self._notice.lost(exc, "the agent runs on; its checkpoint is written once it can be")
        ):
            return self._save()
        return True

    def heartbeat(self) -> bool:
        """Refresh the claim (writing a checkpoint the database could not take); False when the
        agent must stop: the task was cancelled or taken, or the database has been out of reach
        for longer than the lease."""
        url, setup = self._setup.database_url, self._setup
        lease = setup.limits.lease_seconds
        away = f"the agent runs on for up to the lease ({lease:g}s) meanwhile"
        with queue.skipping_outage(lambda exc: self._notice.lost(exc, away)):
            held = self._save() and queue.heartbeat(url, self.task_id, setup.worker, self.attempt)
            self._reached_it()
            return held
        if time.monotonic() - self._reached < lease:
            return True
        if self.agent is not None:
            self.agent.request_stop(
                f"the state database was out of reach (or locked) for longer than the lease ({lease:g}s): "
                "another run may take the task"
            )
        return False

    def flush(self) -> None:
        """Write a checkpoint still unsaved, waiting for the database for up to the lease: the next
        attempt resumes from it."""
        if self.unsaved is not None:
            self.patiently(self._save, "its checkpoint is written once it can be")

    def finish(self, run_id: int, outcome: AgentOutcome, *, final: bool) -> str | None:
        """Record the end of the attempt, waiting out an outage of the state database (or a lock)
        for up to the lease: an agent that finished while the database restarted had its result
        thrown away, and the task ran again. Returns the task's new status, None when the attempt
        no longer held the task (:func:`queue.finish_attempt`)."""
        setup = self._setup
        if outcome.outcome == "interrupted":
            self.patiently(
                lambda: _record_interrupted(setup, self.task_id, self.attempt, outcome.checkpoint),
                "its last checkpoint is written once it can be",
            )
        return self.patiently(
            lambda: queue.finish_attempt(
                setup.database_url,
                run_id,
                setup.worker,
                outcome.outcome,
                result=outcome.result if outcome.outcome == "completed" else None,
                error=outcome.error,
                final=final,
            ),
            "the attempt's end is written once it can be",
        )

    def patiently(self, call: Callable[[], _T], doing: str) -> _T:
        """``call()``, waiting out an outage of the state database, or a lock on what it writes, for
        up to the lease (:meth:`AgentSetup.patiently`), and saying so in the task's log: the end of
        an attempt held up by a lock on its task's row waited without a word."""
        done = queue.riding_out(
            call, self._setup.limits.lease_seconds, lambda exc: self._notice.lost(exc, f"the agent has exited; {doing}")
        )
        self._reached_it()
        return done

    def _save(self) -> bool:
        """Write the unsaved checkpoint, if any; False when the attempt no longer holds the task."""
        if self.unsaved is None:
            return True
        setup = self._setup
        stored = queue.record_checkpoint(setup.database_url, self.task_id, setup.worker, self.attempt, self.unsaved)
        self.unsaved = None
        self._reached_it()
        return stored

    def _reached_it(self) -> None:
        self._reached = time.monotonic()
        self._notice.back()


@dataclass
class _Attempt:
    process: AgentProcess
    done: threading.Event = field(default_factory=threading.Event)


class Fleet:
    """The attempts one flow run is executing, so a shutdown can reach all of them."""

    def __init__(self, setup: AgentSetup, max_agents: int) -> None:
        self.setup = setup
        self.max_agents = max_agents
        self.stopping = threading.Event()
        self.reaper = Reaper(setup.limits.grace_seconds, agent_mark(setup.worker))
        self.tasks: dict[int, queue.AgentTask] = {}  # as claimed; see :meth:`claimed`
        self._attempts: dict[int, _Attempt] = {}
        self._lock = threading.Lock()
        self._slot_change = threading.Condition(self._lock)
        self._slots: set[int] = set()  # tasks holding an agent slot; see :meth:`free_slot`
        self._reserved = 0  # slots set aside for the claim in hand; see :meth:`claiming`
        self._retries_waiting = 0  # retries waiting for a slot; see :meth:`take_slot`
        self._done_elsewhere: set[int] = set()  # see :meth:`completed_in_queue`
        self._slot_freed = threading.Event()

    @contextmanager
    def claiming(self, most: int) -> Iterator[int]:
        """How many tasks the flow may claim now, up to ``most``: the free slots, less one for each
        retry waiting for a slot (a retry goes first: the next claim would take every slot it
        frees). They stay set aside until the block ends, the tasks claimed in it (:meth:`claimed`)
        counted twice meanwhile, so a retry taking a slot during the claim never makes one agent
        too many: it waits for the claim to end."""
        with self._lock:
            free = self.max_agents - len(self._slots) - self._retries_waiting
            self._reserved = room = max(0, min(most, free))
        try:
            yield room
        finally:
            with self._slot_change:
                self._reserved = 0
                self._slot_change.notify_all()

    def claimed(self, task: queue.AgentTask) -> None:
        """A task the flow claimed for this fleet, in a slot :meth:`claiming` set aside; it holds
        the slot until :meth:`free_slot`. Its attempts take the fields that never change (agent
        type, payload, working directory...) from this row instead of reading the task again; the
        checkpoint to resume from comes fresh with each attempt."""
        self.tasks[task.id] = task
        with self._lock:
            self._done_elsewhere.discard(task.id)  # claimed again: its retries run agents again
            self._slots.add(task.id)

    def busy_slots(self) -> int:
        with self._lock:
            return len(self._slots)

    def take_slot(self, task_id: int) -> bool:
        """A slot for the task's attempt: at once for the claimed task's first attempt, which holds
        one; a retry, whose failed attempt freed its slot for Prefect's retry delay, waits for one.
        False when the fleet is stopping: no attempt starts then."""
        with self._slot_change:
            if task_id in self._slots:
                return True
            self._retries_waiting += 1
            try:
                while (
                    len(self._slots) + self._reserved >= self.max_agents
                    and task_id not in self._done_elsewhere
                    and not self.stopping.is_set()
                ):
                    self._slot_change.wait()
            finally:
                self._retries_waiting -= 1
            if self.stopping.is_set():
                return False
            if task_id not in self._done_elsewhere:  # else it starts no agent: the task is not held
                self._slots.add(task_id)
            return True

    def completed_in_queue(self, task_id: int) -> None:
        """The queue says the task is completed while its task run here has not ended: the run is
        ending in Prefect, or it is a retry (in its delay, or waiting for a slot) of a task that a
        ``queue cancel`` and ``queue retry`` gave to another worker, which completed it. Such a
        retry starts no attempt (the task is not this worker's), so it takes no slot: the loop
        waits for the run before it submits the run's dependent, inside a claim whose slots the
        retry waited for, and neither went on (the worker hung for good)."""
        with self._slot_change:
            self._done_elsewhere.add(task_id)
            self._slot_change.notify_all()

    def free_slot(self, task_id: int) -> None:
        """The task needs its agent slot no more: its attempt's agent has exited and the attempt
        is recorded (a failure Prefect retries too: the retry takes a slot again after its delay,
        :meth:`take_slot`, and ready tasks run meanwhile), or its Prefect task run is over.
        Freeing the slot there, not when Prefect has finished the task run (its final state, the
        persisted result, its events), lets the next agent start while Prefect does that: the
        agents' limit still holds, and a slot no longer idles through Prefect's bookkeeping."""
        with self._slot_change:
            self._slots.discard(task_id)
            self._slot_change.notify_all()
        self._slot_freed.set()

    def wait_for_slot(self, timeout: float) -> None:
        """Until a slot was freed since the last call, or ``timeout`` seconds."""
        self._slot_freed.wait(timeout)
        self._slot_freed.clear()

    def add(self, task_id: int, process: AgentProcess) -> None:
        with self._lock:
            if self.stopping.is_set():
                raise _Stopping
            self._attempts[task_id] = _Attempt(process)

    def remove(self, task_id: int) -> None:
        with self._lock:
            attempt = self._attempts.pop(task_id, None)
        if attempt is not None:
            attempt.done.set()

    def shutdown(self, reason: str) -> list[int]:
        """Graceful shutdown of every running agent (in parallel), then release every task this
        worker still holds. Returns the ids of the tasks released back to the queue."""
        self.stopping.set()
        with self._slot_change:
            self._slot_change.notify_all()  # retries waiting for a slot start no attempt
            attempts = dict(self._attempts)
        for attempt in attempts.values():
            attempt.process.request_stop(reason)
        limits = self.setup.limits
        wait = limits.checkpoint_wait_seconds + 2 * limits.grace_seconds + 10.0

        def patiently(call: Callable[[], _T]) -> _T:
            """A shutdown that meets an outage of the state database waits for it about as long as
            for the agents."""
            return queue.riding_out(call, wait)

        for task_id, attempt in attempts.items():
            if not attempt.done.wait(timeout=wait) and attempt.process.pgid is not None:
                attempt.process.terminate(0.0)  # bookkeeping stuck: never leave the group
                patiently(partial(_record_interrupted, self.setup, task_id, attempt.process.job.attempt, None))
        url, worker = self.setup.database_url, self.setup.worker
        held = [t.id for t in patiently(partial(queue.list_tasks, url, "in_progress")) if t.worker == worker]
        released = [t for t in held if patiently(partial(queue.release_task, url, t, worker, reason)) == "pending"]
        # The stopped attempts handed their tasks back themselves; one whose agent finished as the
        # stop came (completed, in review, failed for good, cancelled meanwhile) is not back.
        stopped = [t for t in attempts if patiently(partial(queue.get_task, url, t)).status == "pending"]
        return sorted(set(released) | set(stopped))


class _Stopping(Exception):
    """The fleet is shutting down; attempts that have not started do not start."""


_FLEETS: dict[str, Fleet] = {}


@contextmanager
def fleet(setup: AgentSetup, max_agents: int) -> Iterator[Fleet]:
    """Register the flow run's fleet; on any BaseException (TerminationSignal from Prefect's
    SIGTERM bridge on cancellation or worker shutdown, KeyboardInterrupt on SIGINT) stop
    every agent gracefully before the exception leaves the flow. A reaper sidecar ends the
    agents even if this process is killed outright (see ``tasks.agent_reaper``)."""
    current = _FLEETS[setup.worker] = Fleet(setup, max_agents)
    try:
        yield current
    except BaseException as exc:
        with signals_deferred():
            released = current.shutdown(f"graceful_shutdown: {type(exc).__name__}")
            logging.getLogger("flowyard.agents").warning(
                "graceful shutdown: released tasks %s back to the queue", released
            )
        raise
    finally:
        _FLEETS.pop(setup.worker, None)
        current.reaper.close()


@contextmanager
def signals_deferred() -> Iterator[None]:
    """Keep a second SIGTERM/SIGINT from interrupting what a stop still has to do: the shutdown
    itself, then the stopped run's summary (main thread only). The run is ending on the first
    signal anyway; one more raised in the middle cut that work short. Ignored, not queued."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _record_interrupted(setup: AgentSetup, task_id: int, attempt: int, checkpoint: dict[str, Any] | None) -> None:
    """The ``graceful_shutdown`` checkpoint: the agent's latest state, so the task resumes from it
    (not stored when the attempt was superseded: the task's checkpoint is its new holder's).
    Before the agent saved any state it is recorded with none (null): the stop still shows in the
    history and the listing, and the next attempt starts afresh (see :func:`queue.start_attempt`)."""
    state = checkpoint if checkpoint is not None else _last_state(setup.database_url, task_id)
    queue.record_checkpoint(
        setup.database_url, task_id, setup.worker, attempt, state, kind="graceful_shutdown"
    )


def _last_state(url: str, task_id: int) -> dict[str, Any] | None:
    last = queue.get_task(url, task_id).last_checkpoint
    return last["state"] if last else None


def _result_key(context: Any, parameters: dict[str, Any]) -> str:
    """One result record per task run: the outcome and last checkpoint are persisted for every
    run, and never served from cache (a re-queued task must run again). The key is new for
    every run, so ``refresh_cache`` skips Prefect's lookup of it in the result store, which
    could never hit (a path resolution and a failed file open per attempt)."""
    return f"agent-task-{parameters['task_id']}-{context.task_run.id}"


def _retryable(task: Any, task_run: Any, state: Any) -> bool:
    return _worth_retrying(state.data)


def _worth_retrying(error: BaseException) -> bool:
    """Agent failures are retried; configuration errors (UserError) and errors the agent itself
    marked ``"retryable": false`` are not, nor is the state database out of reach (a
    ``ConnectionUnavailable`` is a UserError too): the attempt waited a whole lease for it, and the
    task is left to a later run's recovery, which resumes it (see ``left_to_recovery``)."""
    if queue.unreachable(error):
        return False
    return not isinstance(error, UserError) and not (isinstance(error, AgentFailed) and not error.retryable)


def left_to_recovery(error: object) -> str | None:
    """What a run reports of a task whose attempt ended on the state database being out of reach
    for longer than the lease: its bookkeeping could not be written (a result, the attempt's end),
    so the task is neither failed nor completed, and a later run's recovery resumes it from its last
    checkpoint. None for any other error."""
    if not isinstance(error, BaseException) or not queue.unreachable(error):
        return None
    return (
        f"interrupted: the state database was out of reach for longer than the lease ({first_line(error)}); "
        "a later run resumes the task from its last checkpoint"
    )


def _gives_up(error: BaseException) -> bool:
    """Whether Prefect retries this attempt's ``error`` no more: the error is not worth it, or the
    attempt was the task run's last allowed one (Prefect retries while fewer than ``retries``
    retries have run). Recorded with the attempt (``final``), so that a worker dying before it
    fails the task does not hand the task a fresh set of retries."""
    context = TaskRunContext.get()
    last_try = context is None or context.task_run.run_count > context.task.retries
    return last_try or not _worth_retrying(error)


def _run_agent(task_id: int, worker: str) -> dict[str, Any]:
    """One attempt of a queued task, run by the fleet of flow run ``worker``. Returns the task's
    outcome and last checkpoint (the Prefect result); raises :class:`AgentFailed` on failure
    or timeout so Prefect retries it, unless the attempt no longer held its task (cancelled, or
    recovered by another run): that is reported ``cancelled`` or ``released``, never retried.

    The fleet's :class:`AgentSetup` is looked up, not passed: Prefect walks every task
    parameter on every attempt (for futures and task inputs), and the worker id is all it
    needs to see."""
    current = _FLEETS.get(worker)
    if current is None or current.stopping.is_set() or not current.take_slot(task_id):
        # the run is stopping (or over): its shutdown hands the task back, and no attempt starts
        return _attempt_result(task_id, None, "interrupted")
    setup = current.setup
    url = setup.database_url
    row = current.tasks[task_id]
    template = setup.templates[row.agent_type]  # claims take only the types this fleet has
    workdir = resolve_workdir(setup.output_dir, row.workdir, task_id, logs_dir=setup.logs_dir)
    try:
        flow_run_id = flow_run.get_id()
        started = setup.patiently(
            lambda: queue.start_attempt(
                url, task_id, setup.worker, flow_run_id, lease_seconds=setup.limits.lease_seconds
            )
        )
    except queue.TaskNotHeld:
        # Cancelled (or retried and claimed elsewhere) while Prefect waited to retry: the task
        # is where the user put it, which is no failure of this run.
        status = setup.patiently(lambda: queue.get_task(url, task_id).status)
        return _attempt_result(task_id, None, "cancelled" if status == "cancelled" else "released")
    attempt, run_id = started.number, started.run_id
    job = AgentJob(
        task_id,
        attempt,
        row.title,
        row.type,
        row.description,
        row.payload,
        started.checkpoint,
        workdir,
        setup.worker,
    )
    process: AgentProcess | None = None
    try:
        # The log is opened inside the try that closes the attempt: a logs directory that
        # cannot take it must not leave the attempt open for good.
        with TaskLog(setup.logs_dir, task_id, attempt, get_run_logger()) as log:
            books = _Bookkeeping(setup, task_id, attempt, log)

            def on_message(stream: str, message: AgentMessage) -> None:
                if isinstance(message, CheckpointMessage) and not books.checkpoint(message.state):
                    agent.request_stop(f"attempt {attempt} of task {task_id} was cancelled or superseded")
                log.write(stream, message)
                if isinstance(message, ArtifactMessage) and (refused := publish_artifact(task_id, message)):
                    log.write("flowyard", LogMessage(kind="log", level="warning", message=refused))

            process = agent = AgentProcess(
                job,
                template,
                on_message=on_message,
                limits=setup.limits,
                keep_going=books.heartbeat,
                on_start=lambda pgid: _started(setup, current, task_id, attempt, pgid),
            )
            books.agent = agent
            current.add(task_id, agent)
            outcome = agent.run()
            books.flush()  # what the next attempt resumes from, and the task's last checkpoint
            failure = (
                AgentFailed(f"task {task_id} attempt {attempt}: {outcome.error}", retryable=outcome.retryable)
                if outcome.outcome in ("failed", "timeout")
                else None
            )
            final = failure is not None and _gives_up(failure)
            moved = books.finish(run_id, outcome, final=final)
    except _Stopping:
        setup.patiently(
            lambda: queue.finish_attempt(url, run_id, setup.worker, "interrupted", error="shutdown before start")
        )
        return _attempt_result(task_id, started, "interrupted")
    except Exception as exc:
        # The log or the agent could not be started (UserError: missing or not executable
        # command; not retried) or a callback failed (a checkpoint or heartbeat write; retried
        # from the last checkpoint): close the attempt as failed, so it counts in the metrics
        # and never stays open. The database may be what failed, so closing is best effort.
        with suppress(psycopg.Error, ConnectionUnavailable):
            # never final on an outage: the task is left to recovery, which must resume it, not fail it
            final = _gives_up(exc) and not queue.unreachable(exc)
            queue.finish_attempt(url, run_id, setup.worker, "failed", error=first_line(exc), final=final)
        raise
    finally:
        if process is not None and process.pgid is not None:
            current.reaper.unwatch(process.pgid)
        current.remove(task_id)
        # the agent is gone and the attempt closed: a retry takes a slot again after its delay
        current.free_slot(task_id)
    # A failure whose end was not taken (another run's recovery closed the attempt, its task
    # handed back and maybe running elsewhere, or the user cancelled the task) is not raised:
    # Prefect retried an attempt of a task no longer this worker's, and the run reported failed
    # a task that was not. It is reported as a late completed end is.
    if failure is not None and moved is not None:
        raise failure
    # the task moved as the attempt's end said; else that end was not taken, and the run says why
    reported = outcome.outcome if moved is not None else setup.patiently(lambda: _reported_outcome(url, run_id, outcome.outcome))
    return _attempt_result(task_id, started, reported, outcome.result, outcome.checkpoint)


def run_agent_task(*, persist: bool = True) -> Task[[int, str], dict[str, Any]]:
    """The Prefect task ``run-agent`` (:func:`_run_agent`). ``persist``: keep each run's result in
    Prefect's result storage, one record per task run (:func:`_result_key`); off for a run whose
    storage has no room (:func:`full_result_storage`), where each task run, its agent done and its
    task completed, logged an error that named no disk ("An error was encountered while committing
    transaction 'agent-task-9-…'", read as the task or the database failing). Its cache key goes
    with it: Prefect warns of a cache policy it ignores."""
    keyed: dict[str, Any] = {"cache_key_fn": _result_key, "refresh_cache": True} if persist else {}
    return task(
        name="run-agent",
        retries=2,
        retry_delay_seconds=1,
        retry_condition_fn=_retryable,
        persist_result=persist,
        **keyed,
    )(_run_agent)


run_agent = run_agent_task()


_FULL_RESULTS_FIX = (
    " (or set PREFECT_LOCAL_STORAGE_PATH to a directory on another disk); this run keeps its tasks' "
    "outcomes and checkpoints in the queue only, not as Prefect results"
)


_PAGE = 4096
"""Bytes a result takes at the least on disk: an empty file still fits on a full one."""


def full_result_storage() -> str | None:
    """One line when the local directory Prefect keeps ``run-agent`` results in has no room for one
    (its disk full, the quota), else None, tried by writing a page to an unnamed file there (a
    remote result storage is left to Prefect). A run that finds it full says so once and persists
    no result (:func:`run_agent_task`): the queue, not Prefect, holds each task's outcome and
    checkpoint, so the agents run on. ``run-agent`` has no storage of its own: it is the flow run's."""
    directory = _local_result_storage()
    if directory is None:
        return None
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory, buffering=0) as probe:
            probe.write(bytes(_PAGE))
    except OSError as exc:
        return _result_storage_full(exc, directory)
    return None


def _local_result_storage() -> Path | None:
    """The local directory of the flow run's result storage; None for a remote one."""
    storage = get_result_store().result_storage
    if not isinstance(storage, LocalFileSystem) or storage.basepath is None:
        return None
    return Path(storage.basepath).expanduser()


def _result_storage_full(error: OSError, directory: Path) -> str | None:
    """The one line for a result storage found full, at the run's start or during it; else None."""
    full = disk_full(error, f"Prefect's result storage {directory}", _FULL_RESULTS_FIX)
    return None if full is None else str(full)


_COMMIT_FAILED = "An error was encountered while committing transaction"
"""How Prefect's log starts the error of a task run whose result could not be written."""


class _ResultStorageFilling(logging.Filter):
    """Drops, from the task runs of one flow run, Prefect's error for a result its storage had no
    room for, having told the first in :func:`full_result_storage`'s line instead. Looks no further
    than ``exc_info`` at any other record: it sees every log line of every task run."""

    def __init__(self, flow_run_id: str, directory: Path, warn: Callable[[str], None]) -> None:
        super().__init__()
        self._flow_run_id = flow_run_id
        self._directory = directory
        self._warn = warn
        self._told = False
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info is None or getattr(record, "flow_run_id", None) != self._flow_run_id:
            return True
        error = record.exc_info[1]
        if not isinstance(error, OSError) or not str(record.msg).startswith(_COMMIT_FAILED):
            return True
        full = _result_storage_full(error, self._directory)
        if full is None:
            return True
        with self._lock:  # task runs end on threads of their own
            first, self._told = not self._told, True
        if first:
            self._warn(full)
        return False


@contextmanager
def result_storage_filling(warn: Callable[[str], None]) -> Iterator[None]:
    """While a flow run's task runs run: Prefect's result storage filling up after
    :func:`full_result_storage` found room for them at the run's start made each task run, its agent
    done and its task completed in the queue, log Prefect's commit error with a traceback naming no
    disk. The first is told once, through ``warn``, as the probe's line; the rest are dropped, the
    queue keeping every outcome and checkpoint. Costs nothing per task run until then but a look
    at each of its log records' ``exc_info``."""
    directory = _local_result_storage()
    if directory is None:
        yield
        return
    task_runs = logging.getLogger("prefect.task_runs")
    dropping = _ResultStorageFilling(str(flow_run.get_id()), directory, warn)
    task_runs.addFilter(dropping)
    try:
        yield
    finally:
        task_runs.removeFilter(dropping)


def _reported_outcome(url: str, run_id: int, outcome: str) -> str:
    """What the run reports of an attempt: one whose task the user cancelled while its agent ran
    is ``cancelled`` (the task is), as one cancelled while Prefect waited to retry is. It was
    ``interrupted``, which ``queue run`` and the ``agent-queue-run`` artifact give for a task back
    in the queue, to resume next run. The attempt itself stays ``interrupted``.

    One another run's recovery closed first (this worker silent past its lease, its task handed
    back and maybe running elsewhere) is ``released``, as a task reclaimed while Prefect waited to
    retry is: its agent's end was not taken (see :func:`queue.finish_attempt`), and reporting it
    ``completed`` (or ``failed``) told of a task that was not. So is one whose end closed it but
    found its task moved on: cancelled and retried while the agent ran (its heartbeats held up past
    the lease), pending again or claimed elsewhere; it was reported ``failed``, a task back in the
    queue."""
    recorded, status, taken = queue.attempt_end(url, run_id)
    if status == "cancelled":
        return "cancelled"
    return outcome if recorded == outcome and taken else "released"


def _attempt_result(
    task_id: int,
    started: queue.Attempt | None,
    outcome: str,
    result: dict[str, Any] | None = None,
    checkpoint: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The Prefect result of every ``run-agent`` run, whether its agent ran, the shutdown came
    before the agent started, or no attempt started at all (``started`` None: the run was stopping,
    or the task was no longer this worker's: ``cancelled``, or ``released`` and reclaimed): one shape,
    so a reader of the results never tells them apart by their keys. ``attempt`` is the attempt's
    number, None when none started. ``checkpoint`` is the state the attempt left the task at: its
    own latest, else the one it was handed back (an attempt that resumed and ended without a
    checkpoint of its own still has it); None when it had neither, or no attempt started."""
    return {
        "task_id": task_id,
        "attempt": started.number if started is not None else None,
        "outcome": outcome,
        "result": result,
        "checkpoint": checkpoint if checkpoint is not None else _resumed_state(started),
    }


def _resumed_state(started: queue.Attempt | None) -> dict[str, Any] | None:
    """The state of the checkpoint an attempt was handed back, None without one (or no attempt)."""
    return started.checkpoint["state"] if started is not None and started.checkpoint else None


def _started(setup: AgentSetup, current: Fleet, task_id: int, attempt: int, pgid: int) -> None:
    current.reaper.watch(pgid)
    # The recorded group is for people only (recovery finds an agent by its mark): an outage of
    # the state database must not stop the agent it would describe.
    with queue.skipping_outage():
        queue.set_agent_pgid(setup.database_url, task_id, setup.worker, attempt, pgid)


@dataclass(frozen=True)
class Recovery:
    """What a run's recovery did with the tasks of dead or silent workers."""

    resumed: list[int]
    """Handed back to the queue, to resume from their last checkpoint."""
    failed: dict[int, str]
    """Failed, {task id: error}: the worker died after the last attempt its run allowed had failed."""
    crashed: list[UUID]
    """Flow runs of workers that died on this host, set from Running (or Cancelling) to Crashed."""


def recover_stale_tasks(url: str, limits: AgentLimits) -> Recovery:
    """Hand tasks of dead or silent workers back to the queue, ending any agent processes they left
    and closing the attempts they left open, also of a task cancelled (or retried) meanwhile; a
    task whose run had given up on it is failed instead (see :func:`queue.release_task`). A
    worker counts as silent after the lease it claimed with (``limits.lease_seconds`` for a claim
    recorded without one, see :func:`queue.stale_tasks`); a leftover agent gets
    ``limits.grace_seconds`` between SIGTERM and SIGKILL, as this run's own agents do.

    The processes are found by the mark of the worker and the task (:func:`agent_mark`), never
    by the recorded process-group id alone, so a recycled id is never hit.
    """
    recovery = Recovery([], {}, [])
    stale_tasks = queue.stale_tasks(url, limits.lease_seconds)
    for stale in stale_tasks:
        terminate_groups((), limits.grace_seconds, agent_mark(stale.worker, stale.id))
        status = queue.release_task(url, stale.id, stale.worker, f"recovered: worker {stale.worker} is gone")
        if status == "pending":
            recovery.resumed.append(stale.id)
        elif status == "failed":
            recovery.failed[stale.id] = queue.get_task(url, stale.id).error or ""
    # only a worker known dead: one merely silent past its lease may still run (on another host,
    # through a network split) and report its own end, which a Crashed state would then refuse
    for worker in dict.fromkeys(stale.worker for stale in stale_tasks if stale.dead):
        message = f"worker {worker} is gone; flow run {flow_run.get_id()} recovered its tasks"
        recovery.crashed.extend(crash_flow_runs(queue.worker_flow_runs(url, worker), message))
    return recovery
