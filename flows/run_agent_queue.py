"""Drain the agent task queue: claim ready tasks in priority order and run each agent as a Prefect task.

DAG: recover tasks of dead workers → loop { claim ready tasks (dependencies completed) up to
``max_agents`` → run each as ``run-agent`` (retries resume from the last checkpoint,
``wait_for`` its dependencies) } → mark tasks blocked by failed dependencies (or waiting for
draft or review ones) → metrics.
On cancellation or SIGTERM/SIGINT every running agent is stopped gracefully and its task
goes back to the queue with a ``graceful_shutdown`` checkpoint; the stopped run still publishes
its metrics and its tasks' outcomes. A run called in-process (no runner to deliver SIGTERM)
notices a cancellation through the API and ends ``Cancelled``.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from functools import cache
from typing import Any, cast

from prefect import Task, get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.exceptions import TerminationSignal
from prefect.futures import PrefectConcurrentFuture, PrefectFuture
from prefect.states import Cancelled, State
from prefect.task_runners import ThreadPoolTaskRunner

from tasks import agent_queue as queue
from tasks.agent_dirs import agent_directories
from tasks.agent_execution import (
    AgentFailed,
    AgentSetup,
    Fleet,
    OutageNotice,
    fleet,
    full_result_storage,
    left_to_recovery,
    recover_stale_tasks,
    result_storage_filling,
    run_agent,
    run_agent_task,
    signals_deferred,
)
from tasks.agent_metrics import agent_metrics, metrics_table, publish_metrics
from tasks.agent_process import (
    DEFAULT_CHECKPOINT_WAIT_SECONDS,
    DEFAULT_GRACE_SECONDS,
    DEFAULT_TIMEOUT_SECONDS,
    AgentLimits,
    check_drain,
    templates_from,
)
from tasks.cancel_watch import CancelWatch
from tasks.errors import UserError, one_line, printable
from tasks.flow_parameters import checked_flow
from tasks.state import state_url


@checked_flow(
    name="run-agent-queue", log_prints=True, blank_is_default=("output_dir", "logs_dir", "agents", "max_tasks")
)
def run_agent_queue(
    max_agents: int = 4,
    database_url: str | None = None,
    output_dir: str | None = None,
    logs_dir: str | None = None,
    agents: dict[str, Any] | None = None,
    timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
    grace_seconds: float = DEFAULT_GRACE_SECONDS,
    retries: int = 2,
    lease_seconds: float = queue.DEFAULT_LEASE_SECONDS,
    max_tasks: int | None = None,
    checkpoint_wait_seconds: float = DEFAULT_CHECKPOINT_WAIT_SECONDS,
) -> dict[str, Any]:
    """Run queued agent tasks until none is ready (or ``max_tasks`` were claimed).

    ``agents`` adds or overrides agent templates ({type: {argv, delivery, env}}); the
    ``reference`` type is built in. Agents work in ``output_dir`` (default
    ``<FLOWYARD_HOME>/agents``) and log to ``<logs_dir>/<task_id>.jsonl`` (default
    ``<output_dir>/logs``). An empty ``output_dir`` or ``logs_dir`` is the default, as None is:
    the UI's parameter form and REST callers send ``""`` for a field left blank, and reading it as
    the current directory would put agents and logs wherever the worker was started
    (``flowyard queue run`` refuses an empty ``--output-dir`` or ``--logs-dir``).
    ``lease_seconds`` (at least three 5 s heartbeats) is how long a worker may stay silent before
    its tasks count as abandoned. ``checkpoint_wait_seconds`` is how long a stop (shutdown,
    timeout, cancel) waits for an agent's checkpoint before its SIGTERM.
    """
    # every value is checked before anything is made: a refused run leaves no directory behind
    check_drain(max_agents, retries, max_tasks)
    templates = templates_from(agents)
    limits = AgentLimits(
        timeout_seconds=timeout_seconds,
        grace_seconds=grace_seconds,
        checkpoint_wait_seconds=checkpoint_wait_seconds,
        lease_seconds=lease_seconds,
    )
    url = state_url(database_url)
    outputs, logs = agent_directories(output_dir, logs_dir)
    setup = AgentSetup(
        database_url=url,
        worker=queue.new_worker_id(),
        output_dir=outputs,
        logs_dir=logs,
        templates=templates,
        limits=limits,
    )
    logger = get_run_logger()
    recovery = recover_stale_tasks(url, setup.limits)
    recovered = recovery.resumed
    if recovered:
        logger.info("resuming tasks of workers that are gone: %s", recovered)
    if recovery.crashed:
        logger.info("marked Crashed the flow runs of workers that are gone: %s", recovery.crashed)
    # a task its dead worker's run had given up on is this run's news: it failed
    outcomes = {task_id: f"failed: {one_line(error)}" for task_id, error in recovery.failed.items()}
    for task_id, error in recovery.failed.items():
        logger.error("task %s failed: %s", task_id, error)
    # a queue filled since its tables were last analysed (if ever) had each claim sort every pending task
    statistics = queue.analyse_if_stale(url)
    if statistics.analysed:
        logger.info("analysed %s: their statistics were missing or out of date", ", ".join(statistics.analysed))
    if statistics.advice:
        logger.warning(statistics.advice)
    # its result storage full, each task run logged an error naming no disk: said once, results not kept
    full_storage = full_result_storage()
    if full_storage is not None:
        logger.warning(full_storage)
    attempt = _attempt_tasks(retries, persist=full_storage is None)
    cancel = CancelWatch()
    released: list[int] | None = None
    # twice the agents: a task run whose agent is done may still be ending in Prefect when the
    # next one starts in its slot
    runner: ThreadPoolTaskRunner[dict[str, Any]] = ThreadPoolTaskRunner(max_workers=2 * max_agents)
    running: dict[int, PrefectConcurrentFuture[dict[str, Any]]] = {}
    notice = OutageNotice(lambda level, text: getattr(logger, level)(text))
    try:
        # full since the check above, each task run logged a traceback naming no disk: said once
        with result_storage_filling(logger.warning), runner, fleet(setup, max_agents) as agents_fleet:
            finished: dict[int, PrefectConcurrentFuture[dict[str, Any]]] = {}
            claimed = 0
            while True:
                most = 2 * max_agents - len(running)
                if max_tasks is not None:
                    most = min(most, max_tasks - claimed)
                with agents_fleet.claiming(most) as room:
                    for task in _claim(setup, room, running, notice):
                        claimed += 1
                        agents_fleet.claimed(task)
                        running[task.id] = future = runner.submit(
                            attempt(task.agent_type),
                            parameters={"task_id": task.id, "worker": setup.worker},
                            wait_for=_dependency_runs(agents_fleet, finished, running, task.blocked_by),
                        )
                        future.wrapped_future.add_done_callback(_freeing(agents_fleet, task.id))
                if not running:
                    break
                agents_fleet.wait_for_slot(timeout=1.0)
                if cancel.requested():
                    released = agents_fleet.shutdown("graceful_shutdown: flow run cancelled")
                    break
                for task_id in [t for t, f in running.items() if f.wrapped_future.done()]:
                    finished[task_id] = running.pop(task_id)
                    outcomes[task_id] = _settle(setup, task_id, finished[task_id])
    except (TerminationSignal, KeyboardInterrupt):  # SIGTERM, SIGINT: the fleet stopped the agents
        # a second SIGTERM or SIGINT raised in the middle of the summary and left it unpublished
        with signals_deferred():
            _report_stopped(setup, running, outcomes, recovered)
        raise
    if released is not None:
        _report_stopped(setup, running, outcomes, recovered)
        # Prefect makes a returned state the run's final state; a caller never gets the state
        # object as the value (it gets CancelledRun raised, or the state with return_state=True).
        # Its data must stay empty (Prefect raises a cancelled state's data as the exception), so
        # the message says what the run did besides handing tasks back.
        done = ", ".join(f"task {t} {printable(o)}" for t, o in sorted(outcomes.items()) if t not in released)
        message = f"cancelled through the Prefect API; tasks {released} are back in the queue" + (
            f"; {done}" if done else ""
        )
        return cast(dict[str, Any], Cancelled(message=message))
    return _report(setup, outcomes, recovered)


def _claim(
    setup: AgentSetup, room: int, running: dict[int, Any], notice: OutageNotice
) -> list[queue.AgentTask]:
    """Ready tasks for ``room`` free slots. The state database out of reach (a restart, a failover)
    crashed the run, and its agents with it: while agents run, a claim that cannot be made is left
    for the loop's next turn; with none running, the run waits for the database for up to its lease."""

    def claim() -> list[queue.AgentTask]:
        claimed = queue.claim_ready(
            setup.database_url,
            setup.worker,
            room,
            setup.templates,
            exclude=running,
            lease_seconds=setup.limits.lease_seconds,
        )
        notice.back()
        return claimed

    waiting = "waiting for it to claim the next tasks"
    if not running:
        return queue.riding_out(claim, setup.limits.lease_seconds, lambda exc: notice.lost(exc, waiting))
    with queue.skipping_outage(lambda exc: notice.lost(exc, f"the agents run on; {waiting}")):
        return claim()
    return []


def _report(setup: AgentSetup, outcomes: dict[int, str], recovered: list[int]) -> dict[str, Any]:
    """The run's summary: the tasks it ran, those it could not run and why, the metrics; published
    as the ``agent-metrics`` and ``agent-queue-run`` artifacts unless the run did nothing."""
    url = setup.database_url
    logger = get_run_logger()
    # a task that waits for `queue approve` was reported "completed", as if its dependents could run
    completed = [t for t, o in outcomes.items() if o == "completed"]
    for task_id in setup.patiently(lambda: queue.in_review(url, completed)):
        outcomes[task_id] = f"completed, in review (approve it with `flowyard queue approve {task_id}`)"
    unrunnable = setup.patiently(lambda: queue.unrunnable(url))
    blocked = unrunnable.blocked
    waiting = {**setup.patiently(lambda: queue.waiting_for_agents(url, setup.templates)), **unrunnable.waiting}
    for task_id, reason in {**blocked, **waiting}.items():
        logger.warning("task %s %s", task_id, reason)
    metrics = setup.patiently(lambda: agent_metrics(url))
    if outcomes or recovered:  # an idle scheduled drain adds no artifact versions
        publish_metrics(metrics)
        rows = [
            *sorted(outcomes.items()),
            *((t, f"blocked: {r}") for t, r in sorted(blocked.items())),
            *sorted(waiting.items()),
        ]
        # An agent's error is kept raw in the returned outcomes (the API consumer's to show); a cell
        # is escaped as ``queue run`` prints it, so a tab or a terminal escape cannot break its row.
        create_table_artifact(
            table=[{"task_id": t, "outcome": printable(o)} for t, o in rows],
            key="agent-queue-run",
            description="Tasks this run of the agent queue executed, and tasks it could not run",
        )
    return {
        "outcomes": outcomes,
        "blocked": blocked,
        "blocked_by_cancelled": list(unrunnable.cancelled_only),
        "waiting": waiting,
        "recovered": recovered,
        "metrics": metrics_table(metrics),
        "logs_dir": str(setup.logs_dir),
    }


def _report_stopped(
    setup: AgentSetup,
    running: dict[int, PrefectConcurrentFuture[dict[str, Any]]],
    outcomes: dict[int, str],
    recovered: list[int],
) -> None:
    """The summary of a run the cancellation or a signal stopped, published as a finished run's is:
    without it the metrics and the run's artifact waited for the next run. Every task run is over
    (the fleet stopped the agents, the runner waited for its threads), so each reports its real
    outcome: ``interrupted`` for a task back in the queue, its own for one whose agent finished as
    the stop came (it never went through the loop's settling). Best effort: a failure here is
    logged, never raised instead of the stop."""
    try:
        for task_id, future in running.items():
            if not future.wrapped_future.cancelled():
                outcomes[task_id] = _settle(setup, task_id, future)
        _report(setup, outcomes, recovered)
    except Exception as exc:
        reason = f"{type(exc).__name__}: {one_line(str(exc))}"
        get_run_logger().warning("the stopped run's summary was not published: %s", reason)


def _attempt_tasks(retries: int, *, persist: bool = True) -> Callable[[str], Task[..., dict[str, Any]]]:
    """``run-agent`` per agent type, its runs named ``agent-<task id>-<agent type>``, persisting
    their results unless told not to (:func:`run_agent_task`). One Task object per type, not per
    task: building one reads and hashes the function's source (~5 ms, in the loop that hands out
    every claim)."""
    base = (run_agent if persist else run_agent_task(persist=False)).with_options(retries=retries)

    @cache
    def for_type(agent_type: str) -> Task[..., dict[str, Any]]:
        literal = agent_type.replace("{", "{{").replace("}", "}}")
        return base.with_options(task_run_name="agent-{task_id}-" + literal)

    return for_type


def _freeing(agents_fleet: Fleet, task_id: int) -> Callable[[Future[Any]], None]:
    """A done-callback that frees the task's agent slot, however its task run ended."""
    return lambda _: agents_fleet.free_slot(task_id)


def _dependency_runs(
    agents_fleet: Fleet,
    finished: dict[int, PrefectConcurrentFuture[dict[str, Any]]],
    running: dict[int, PrefectConcurrentFuture[dict[str, Any]]],
    blocked_by: tuple[int, ...],
) -> list[PrefectConcurrentFuture[dict[str, Any]]]:
    """The ``wait_for`` of a claimed task: its dependencies' task runs in this flow run, so the
    DAG shows in the UI. Completed runs only: the database already said every dependency is
    completed, and a run of one that failed here (then retried and completed since, by another
    worker or this run's own next attempt not yet settled) would make Prefect leave the task
    ``NotReady`` without running it, failing a task whose dependencies are all done.

    A dependency whose agent is done can still be ending in Prefect (its slot is freed
    first, see :meth:`Fleet.free_slot`): its run is waited for, a matter of milliseconds. So is
    the retry of one completed elsewhere, which must not wait for a slot meanwhile
    (:meth:`Fleet.completed_in_queue`)."""
    for d in blocked_by:
        if d in running:
            agents_fleet.completed_in_queue(d)
    runs = [run for d in blocked_by if (run := running.get(d, finished.get(d))) is not None]
    for run in runs:
        run.wait()  # at once for a settled run
    return [run for run in runs if run.state.is_completed()]


def _settle(setup: AgentSetup, task_id: int, future: PrefectFuture[dict[str, Any]]) -> str:
    """Record the final outcome of a task's Prefect task run; a failure after the last retry fails
    it, unless the state database was what failed (:func:`left_to_recovery`)."""
    future.wait()  # sets the future's final state from the finished thread
    state = future.state
    if state.is_completed():
        return str(future.result()["outcome"])
    if (interrupted := left_to_recovery(state.result(raise_on_failure=False))) is not None:
        return interrupted
    message = _failure_text(state)
    setup.patiently(lambda: queue.fail_task(setup.database_url, task_id, setup.worker, message))
    return f"failed: {one_line(message)}"


def _failure_text(state: State[Any]) -> str:
    """What a failed task run's error says, for the task, ``queue list`` and the run's summary.
    Prefect's state message wraps it ("Task run encountered an exception AgentFailed: task 3
    attempt 2: …"); an agent's failure already names its task and attempt, a configuration error
    (an agent command that cannot start, a working directory refused) is a sentence of its own,
    which ``queue list`` showed as "UserError: cannot start agent …", and any other error (a bug,
    the state database gone) keeps its type's name."""
    error = state.result(raise_on_failure=False)
    if isinstance(error, AgentFailed | UserError):
        return str(error)
    if isinstance(error, BaseException):
        return f"{type(error).__name__}: {error}"
    return state.message or state.name or state.type.value
