"""``flowyard queue``: the agent task queue – create, list, cancel, retry, run, metrics.

Queue commands talk to the state database directly; ``run`` points Prefect at flowyard's
server and drains the queue in-process, so the run shows in the Prefect UI like a
deployment run (the ``run-agent-queue`` deployment does the same every minute).
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable, Collection, Mapping
from typing import Annotated, Any

import typer
from typer._click import Context  # typer vendors click, exports neither
from typer._click.exceptions import NoSuchOption
from typer.core import TyperCommand

from deployments.cli_options import command_group, finite
from tasks import agent_queue as queue
from tasks.errors import UserError, first_line, parse_problem, printable, read_user_file

app = command_group("Agent task queue: create, list, cancel, retry, run, metrics.")

DatabaseUrl = Annotated[
    str | None,
    typer.Option(
        "--database-url", "-d", help="State PostgreSQL URL (default: FLOWYARD_DATABASE_URL or embedded)."
    ),
]


def _task_id(value: int) -> int:
    """A task id as given: ids start at 1, so 0 or a negative one names no task in any queue,
    which is said without connecting to the database."""
    if value < 1:
        raise queue.no_such_task(value)
    return value


TaskId = Annotated[int, typer.Argument(help="Task id (see `flowyard queue list`).", callback=_task_id)]


class _TaskIdCommand(TyperCommand):
    """A command taking a :data:`TaskId`. Click reads a negative one as an option: `queue cancel -1`
    said 'No such option: -1', as if the id were a typo of an option."""

    def parse_args(self, ctx: Context, args: list[str]) -> list[str]:
        given = list(args)  # click's parser consumes the list
        try:
            return super().parse_args(ctx, args)
        except NoSuchOption:
            for arg in given:
                if re.fullmatch(r"-\d+", arg):
                    _task_id(int(arg))
            raise


def _url(database_url: str | None) -> str:
    from tasks.db import DATABASE_URL_OPTION
    from tasks.state import state_url

    return state_url(database_url, parameter=DATABASE_URL_OPTION)


def _not_a_json_number(token: str) -> Any:
    """``json.loads`` reads NaN, Infinity and -Infinity, which JSON does not have (nor PostgreSQL)."""
    raise ValueError(f"{token} is not a JSON number")


def _json_int(token: str) -> int:
    """An integer of ``--payload``. Past Python's limit on digits (4,300 by default) ``int`` fails
    with advice to call ``sys.set_int_max_str_digits()``, which the user of a command cannot take."""
    digits, limit = len(token.lstrip("-")), sys.get_int_max_str_digits()
    if limit and digits > limit:
        raise UserError(
            f"--payload holds an integer of {digits} digits, over the {limit} that can be read; "
            "pass it as a string"
        )
    return int(token)


def _payload(text: str) -> dict[str, Any]:
    """The ``--payload`` object; JSON nested deeper than Python's recursion limit (about 1,000
    levels) is a RecursionError of the parser, not a ValueError, and was a traceback."""
    try:
        value = json.loads(text, parse_constant=_not_a_json_number, parse_int=_json_int)
    except RecursionError:
        raise UserError(
            "--payload nests too deeply to read (over about 1,000 levels of objects or arrays); flatten it"
        ) from None
    except ValueError as exc:
        raise UserError(
            f"--payload is not valid JSON ({exc}); pass an object such as '{{\"steps\": 3}}'"
        ) from None
    if not isinstance(value, dict):
        raise UserError("--payload must be a JSON object such as '{\"steps\": 3}'")
    return value


def _path_given(kind: str, default: str) -> Callable[[typer.CallbackParam, str | None], str | None]:
    """The callback of a path option of ``queue run`` or ``queue create``: an empty one (``--logs-dir ""``, an unset
    shell variable) was read as ``.``, so agents and their logs went to the current directory
    (the flow takes an empty directory as its ``default``), and an empty ``--agents-file`` was
    "cannot read agents file .". One line instead, naming the option."""

    def check(param: typer.CallbackParam, value: str | None) -> str | None:
        if value == "":
            raise UserError(
                f"{param.opts[0]} is empty; pass a {kind} path, or leave the option out for the default ({default})"
            )
        return value

    return check


def _path_option(help_text: str, kind: str, default: str) -> Any:
    """A path option (``str | None``, None for the default) whose empty value is one line
    (:func:`_path_given`); ``default`` as its help and that line say it."""
    # in backticks: Markdown took "<output dir>" for an HTML tag and left it out
    return typer.Option(help=f"{help_text} (default: `{default}`).", callback=_path_given(kind, default))


@app.command()
def create(
    title: Annotated[str, typer.Argument(help="What the agent should do (1-200 characters).")],
    agent_type: Annotated[
        str, typer.Option("--agent-type", "-a", help="Agent template to run.")
    ] = "reference",
    priority: Annotated[
        str, typer.Option("--priority", "-p", help="critical, high, medium or low.")
    ] = "medium",
    task_type: Annotated[
        str, typer.Option("--type", help="epic, story, task, subtask, bug or spike.")
    ] = "task",
    description: Annotated[str, typer.Option(help="Longer description handed to the agent.")] = "",
    after: Annotated[
        list[int] | None, typer.Option("--after", help="Id of a task that blocks this one; repeatable.")
    ] = None,
    payload: Annotated[str, typer.Option(help="JSON object handed to the agent.")] = "{}",
    workdir: Annotated[str, typer.Option(help="Working directory inside the agent output directory.")] = "",
    output_dir: Annotated[
        str | None,
        _path_option(
            "Output directory of the `queue run` that will run it, to check --workdir against",
            "directory",
            "<FLOWYARD_HOME>/agents",
        ),
    ] = None,
    logs_dir: Annotated[
        str | None,
        _path_option("Logs directory of that run, which --workdir must stay out of", "directory", "<output dir>/logs"),
    ] = None,
    review: Annotated[bool, typer.Option("--review", help="Stop in 'review' until `queue approve`.")] = False,
    draft: Annotated[
        bool, typer.Option("--draft", help="Create as draft; `queue submit` releases it.")
    ] = False,
    database_url: DatabaseUrl = None,
) -> None:
    """Add a task to the queue."""
    from tasks.agent_dirs import check_new_workdir

    new = queue.NewTask.from_input(
        title,
        agent_type,
        priority,
        task_type,
        description=description,
        blocked_by=tuple(after or ()),
        payload=_payload(payload),
        workdir=workdir,
        requires_review=review,
        draft=draft,
    )
    check_new_workdir(workdir, output_dir, logs_dir)
    typer.echo(queue.create_task(_url(database_url), new))


def _status(value: str | None) -> str | None:
    """``--status`` checked as given, before the database URL is resolved (:func:`queue.check_status`)."""
    queue.check_status(value)
    return value


@app.command("list")
def list_(
    status: Annotated[str | None, typer.Option(help="Only tasks in this status.", callback=_status)] = None,
    database_url: DatabaseUrl = None,
) -> None:
    """Show the queue: id, status, priority, agent, attempts, last checkpoint, dependencies, notes."""
    from tasks.agent_process import DEFAULT_TEMPLATES

    tasks = queue.list_tasks(_url(database_url), status)
    cells = [tuple(name for name, *_ in _LIST_COLUMNS)] + [
        (
            str(t.id),
            t.status,
            t.priority,
            printable(t.agent_type),
            str(t.attempts),
            t.checkpoint_label or "-",
            ",".join(map(str, t.blocked_by)) or "-",
        )
        for t in tasks
    ]
    titles = ["title / note"] + [_title_and_note(t, DEFAULT_TEMPLATES) for t in tasks]
    for row, title in zip(_aligned(cells, _LIST_COLUMNS), titles, strict=True):
        typer.echo(row + title)


_Columns = tuple[tuple[str, int, str, str], ...]
"""A table's columns: header, least width, alignment and the gap after each."""

_LIST_COLUMNS: _Columns = (
    ("id", 5, ">", "  "),
    ("status", 11, "<", " "),
    ("priority", 8, "<", " "),
    ("agent", 10, "<", " "),
    ("tries", 5, ">", "  "),
    ("ckpt", 18, "<", " "),
    ("after", 10, "<", " "),
)
"""The columns of ``queue list`` before its title / note."""


def _aligned(rows: list[tuple[str, ...]], columns: _Columns) -> list[str]:
    """The rows (the header first) in ``columns`` (header, least width, alignment, gap after),
    each column as wide as its longest cell when that is over its least width. Fixed widths let a
    longer value (a checkpoint label such as ``graceful_shutdown@12``, an agent type, a list of
    dependencies, an id past 99999) push the rest of its row out of line with the header; cut, it
    would lose its end (there, the attempt number)."""
    widths = [max(least, *(len(row[i]) for row in rows)) for i, (_, least, _, _) in enumerate(columns)]
    return [
        "".join(
            f"{cell:{align}{width}}{gap}" for cell, width, (_, _, align, gap) in zip(row, widths, columns, strict=True)
        )
        for row in rows
    ]


def _title_and_note(task: queue.AgentTask, built_in: Collection[str]) -> str:
    """The last column of ``queue list``: the title, and why the task is where it is."""
    note = task.note or _agent_note(task, built_in)
    return f"{printable(task.title)}{'  — ' + note if note else ''}"


def _agent_note(task: queue.AgentTask, built_in: Collection[str]) -> str:
    """Why a pending task of an agent type that is not built in may wait for good: only a run with
    an agents file that has that type claims it (the scheduled drain has the built-in ones), and
    a bare ``pending`` does not say so."""
    if task.status != "pending" or task.agent_type in built_in:
        return ""
    return (
        f"runs only with a {task.agent_type!r} agent: `flowyard queue run --agents-file FILE` "
        f"(built in: {', '.join(sorted(built_in))})"
    )


def _transition_command(
    name: str, action: Callable[[str, int], str], done: Mapping[str, str], help_text: str
) -> None:
    """Register ``queue <name> ID``: one status change, one confirmation line, ``done`` by the
    status the task ends in (``{id}`` is its id)."""

    def command(task_id: TaskId, database_url: DatabaseUrl = None) -> None:
        status = action(_url(database_url), task_id)
        typer.echo(f"task {task_id} {done[status].format(id=task_id)}")

    command.__doc__ = help_text
    app.command(name, cls=_TaskIdCommand)(command)


_transition_command(
    "cancel",
    queue.cancel_task,
    {"cancelled": "cancelled"},
    "Cancel a task; a running agent is stopped gracefully within a heartbeat.",
)
_transition_command(
    "retry",
    queue.retry_task,
    {
        "pending": "is pending again",
        "draft": "is a draft again, as it was when cancelled; `flowyard queue submit {id}` releases it",
    },
    "Queue a failed or cancelled task again; it resumes from its checkpoint (a cancelled draft is a draft again).",
)
_transition_command("submit", queue.submit_task, {"pending": "is pending"}, "Release a draft into the queue.")
_transition_command(
    "approve",
    queue.approve_task,
    {"completed": "completed"},
    "Accept a task waiting in review (its dependents become ready).",
)


@app.command()
def run(
    max_agents: Annotated[int, typer.Option(help="Agents running at once.")] = 4,
    timeout: Annotated[
        float, typer.Option(help="Seconds per attempt before the agent's group is killed.", callback=finite())
    ] = 300.0,
    grace: Annotated[
        float, typer.Option(help="Seconds between SIGTERM and SIGKILL on shutdown.", callback=finite())
    ] = 5.0,
    checkpoint_wait: Annotated[
        float, typer.Option(help="Seconds a stop waits for the agent's checkpoint before SIGTERM.", callback=finite())
    ] = 2.0,
    retries: Annotated[int, typer.Option(help="Prefect retries per task (each resumes).")] = 2,
    lease: Annotated[
        float,
        typer.Option(help="Seconds a worker may stay silent before its tasks count as abandoned.", callback=finite()),
    ] = queue.DEFAULT_LEASE_SECONDS,
    output_dir: Annotated[
        str | None, _path_option("Agents' output directory", "directory", "<FLOWYARD_HOME>/agents")
    ] = None,
    logs_dir: Annotated[
        str | None, _path_option("Where <task_id>.jsonl logs go", "directory", "<output dir>/logs")
    ] = None,
    agents_file: Annotated[
        str | None,
        _path_option("YAML/JSON {agent type: {argv, delivery, env}} templates", "file", "the built-in agents only"),
    ] = None,
    database_url: DatabaseUrl = None,
) -> None:
    """Drain the queue now (Ctrl-C stops the agents gracefully; their tasks resume next run).
    Exits 1 when a task failed or is blocked by a failed or cancelled dependency."""
    from deployments.runtime import prepare_flow_run
    from tasks.agent_dirs import agent_directories
    from tasks.agent_process import AgentLimits, check_drain
    from tasks.settings import get_settings

    agents = _agents(agents_file)
    # a bad --max-agents, --retries, --timeout, --grace, --checkpoint-wait, --lease or directory:
    # one line, no flow run
    check_drain(max_agents, retries)
    AgentLimits(
        timeout_seconds=timeout, grace_seconds=grace, checkpoint_wait_seconds=checkpoint_wait, lease_seconds=lease
    )
    agent_directories(output_dir, logs_dir, names=("--output-dir", "--logs-dir"))
    prepare_flow_run(get_settings())
    from prefect.exceptions import CancelledRun

    from flows.run_agent_queue import run_agent_queue

    try:
        summary = run_agent_queue(
            max_agents=max_agents,
            database_url=database_url,
            output_dir=output_dir,
            logs_dir=logs_dir,
            agents=agents,
            timeout_seconds=timeout,
            grace_seconds=grace,
            checkpoint_wait_seconds=checkpoint_wait,
            retries=retries,
            lease_seconds=lease,
        )
    except CancelledRun as cancelled:  # through the UI or API: the agents were stopped gracefully
        raise UserError(f"queue run cancelled: {first_line(cancelled)}") from None
    for task_id, outcome in sorted(summary["outcomes"].items()):
        typer.echo(f"task {task_id}: {printable(outcome)}")  # an agent's error, as `queue list` shows it
    unrun = {**summary["blocked"], **summary["waiting"]}
    for task_id, reason in sorted(unrun.items()):
        typer.echo(f"task {task_id}: {reason}")
    if not summary["outcomes"] and not unrun:
        typer.echo("no ready tasks")
    failed = [t for t, o in sorted(summary["outcomes"].items()) if o.startswith("failed")]
    if failed or summary["blocked"]:
        # a script or CI job draining the queue must see that work failed, as with make or pytest
        by_cancelled = set(summary["blocked_by_cancelled"])
        blocked = [t for t in sorted(summary["blocked"]) if t not in by_cancelled]
        line = _unfinished(failed, blocked, sorted(by_cancelled), summary["logs_dir"])
        typer.echo(f"flowyard: {line}", err=True)
        raise typer.Exit(1)


def _unfinished(failed: list[int], blocked: list[int], cancelled: list[int], logs_dir: str) -> str:
    """The one line of a run that left work undone: the tasks that failed, those a failed
    dependency blocks and those only a cancelled one blocks (as their reasons in ``queue list``
    say; a cancelled dependency has no failure to look up). It names the run's own logs
    directory (the user gave it, or it is the default under ``FLOWYARD_HOME``) when there is a
    failure to look up, so nobody has to look it up."""

    def ids(tasks: list[int]) -> str:
        return ", ".join(map(str, tasks))

    parts = [f"{len(failed)} task(s) failed ({ids(failed)})"] if failed else []
    if blocked:
        parts.append(f"{len(blocked)} blocked by a failed dependency ({ids(blocked)})")
    if cancelled:
        parts.append(f"{len(cancelled)} blocked by a cancelled dependency ({ids(cancelled)})")
    if failed or blocked:
        fix = f"see {logs_dir}/<task id>.jsonl, fix the cause, then 'flowyard queue retry ID'"
    else:
        fix = "'flowyard queue retry ID' the cancelled dependency, or cancel the tasks that need it"
    return "; ".join(parts) + f": {fix}"


def _agents(agents_file: str | None) -> dict[str, Any] | None:
    if agents_file is None:
        return None
    import yaml

    from tasks.agent_process import templates_from

    text = read_user_file(agents_file, "agents file", "give the YAML or JSON file")
    try:
        config = yaml.safe_load(text) or {}
        templates_from(config)
    except Exception as exc:
        reason = parse_problem(exc)
        raise UserError(f"{agents_file} is not a valid agent template file ({reason})") from None
    return config


@app.command()
def metrics(database_url: DatabaseUrl = None) -> None:
    """Per agent type: tasks completed and failed, attempts, interrupted attempts (counted apart,
    out of the times), average (per attempt) and total execution time, error rate (failed /
    finished tasks)."""
    from tasks.agent_metrics import agent_metrics

    rows = agent_metrics(_url(database_url))  # a bad URL: the one-line error, not a header before it
    cells = [tuple(name for name, *_ in _METRICS_COLUMNS)] + [
        (
            printable(m.agent_type),
            str(m.tasks_completed),
            str(m.tasks_failed),
            str(m.attempts),
            str(m.interrupted),
            f"{m.average_execution_seconds:.2f}",
            f"{m.total_execution_seconds:.2f}",
            f"{m.error_rate:.1%}",
        )
        for m in rows
    ]
    for line in _aligned(cells, _METRICS_COLUMNS):
        typer.echo(line)


_METRICS_COLUMNS: _Columns = (
    ("agent type", 14, "<", " "),
    ("completed", 9, ">", " "),
    ("failed", 6, ">", " "),
    ("attempts", 8, ">", " "),
    ("interrupted", 11, ">", " "),
    ("avg s", 8, ">", " "),
    ("total s", 9, ">", " "),
    ("error rate", 10, ">", ""),
)
"""The columns of ``queue metrics``, as :data:`_LIST_COLUMNS`."""
