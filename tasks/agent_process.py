"""One agent attempt as an external process: spawn, speak the line protocol, time out, shut down.

An agent is any command, configured per agent type by an :class:`AgentTemplate`. It runs
in its own process group (``tasks.process_group``) with its working directory inside the
configured output directory, gets the task on stdin, argv or env, and reports on stdout
(see ``tasks.agent_protocol``). Whatever happens – normal exit, timeout, graceful shutdown,
an exception in a callback – the whole group is gone when :meth:`AgentProcess.run` returns
or raises, grandchildren included, and so is every process that left the group but carries
the attempt's mark (:func:`agent_mark`).
"""

from __future__ import annotations

import json
import os
import re
import selectors
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from tasks.agent_protocol import (
    CHECKPOINT_REQUEST,
    AgentMessage,
    CheckpointMessage,
    ErrorMessage,
    LogMessage,
    ResultMessage,
    misread,
    parse_line,
)
from tasks.agent_queue import DEFAULT_LEASE_SECONDS, check_agent_type
from tasks.agent_wire import KINDS, TASK_ENV_VAR, TASK_FILE_PREFIX
from tasks.errors import (
    MAX_WAIT_SECONDS,
    UserError,
    check_range,
    disk_full,
    is_utf8,
    make_user_dir,
    resolve_user_path,
    validation_problem,
)
from tasks.process_group import spawn_group, terminate_group

DEFAULT_TIMEOUT_SECONDS = 300.0
DEFAULT_GRACE_SECONDS = 5.0
DEFAULT_CHECKPOINT_WAIT_SECONDS = 2.0
PLACEHOLDERS = ("{task_id}", "{attempt}", "{workdir}", "{task_json}")
INLINE_ENVELOPE_LIMIT = 100_000
"""Characters (the envelope is ASCII JSON) an argv argument or ``FLOWYARD_TASK`` carries inline:
Linux refuses to start a program with any argument or environment string over 128 KiB
(MAX_ARG_STRLEN), so a larger envelope, say a big checkpoint, goes through :data:`ENVELOPE_FILE`."""
ENVELOPE_FILE = ".flowyard-task.json"
WORKER_ENV_VAR = "FLOWYARD_WORKER"
TASK_ID_ENV_VAR = "FLOWYARD_TASK_ID"


def agent_mark(worker: str, task_id: int | None = None) -> dict[str, str]:
    """The environment entries every process an agent starts inherits: the worker's id (unique:
    host, pid, start time and a nonce) and the task's. Processes that leave the agent's group
    (``setsid``, a detached child, a daemon) are found by them, all of a worker's (its reaper)
    or one task's (the end of an attempt, a stale task's recovery)."""
    return {WORKER_ENV_VAR: worker} | ({} if task_id is None else {TASK_ID_ENV_VAR: str(task_id)})


class AgentTemplate(BaseModel):
    """How to start an agent of one type.

    ``argv`` may use the placeholders ``{task_id}``, ``{attempt}``, ``{workdir}`` and
    ``{task_json}``; ``delivery`` says where the task envelope goes (for ``argv`` it replaces
    ``{task_json}``, or is appended when the template has no such placeholder). In argv or env,
    an envelope too large for them is ``@<path of a file holding it>`` (:func:`task_json_for`).
    """

    # A misspelt field (``deliver: env``) must not be dropped in silence: the agent would get
    # its envelope where it does not look, and every attempt of the type would fail.
    model_config = ConfigDict(extra="forbid")

    argv: list[str] = Field(min_length=1)
    delivery: Literal["stdin", "argv", "env"] = "stdin"
    env: dict[str, str] = Field(default_factory=dict)

    @field_validator("argv")
    @classmethod
    def _argv_exec_takes(cls, argv: list[str]) -> list[str]:
        """Refuse what no program can be started with, when the templates are read: a NUL (YAML's
        ``"\\0"``) made ``queue run`` a traceback (the flow run's parameters cannot be stored),
        and a direct call failed every attempt with "embedded null byte", after its retries."""
        for arg in argv:
            _refuse_unpassable(arg, f"argument {arg!r}")
        return argv

    @field_validator("env")
    @classmethod
    def _env_exec_takes(cls, env: dict[str, str]) -> dict[str, str]:
        """Refuse variables no environment can carry: a name holding ``=`` (the separator) or a
        NUL, or a value holding a NUL, failed every attempt of the type at its start, after its
        retries, with Python's "illegal environment variable name"."""
        for name, value in env.items():
            if "=" in name:
                raise ValueError(f"variable name {name!r} holds '=', which separates a name from its value")
            _refuse_unpassable(name, f"variable name {name!r}")
            _refuse_unpassable(value, f"the value of {name}")
        return env

    @property
    def task_json_placeholder(self) -> bool:
        """Whether an argument has the ``{task_json}`` placeholder (whatever the delivery)."""
        return any("{task_json}" in arg for arg in self.argv)


def _refuse_unpassable(text: str, what: str) -> None:
    """A NUL ends a C string, so ``exec`` cannot pass one in an argument or variable. Nor is text
    that is not UTF-8 passed: an unpaired surrogate (YAML reads ``"\\ud83d\\ude00"``, JSON's way
    of writing an emoji, as two of them) cannot be encoded, and ``queue run`` was a
    UnicodeEncodeError traceback when Prefect stored the flow run's parameters."""
    if "\0" in text:
        raise ValueError(f"{what} holds a NUL character (\\0), which no program can be given")
    if not is_utf8(text):
        raise ValueError(f"{what} {_NOT_UTF8}")


_NOT_UTF8 = (
    "is not valid UTF-8 (an unpaired \\ud800-\\udfff escape); write the character itself, or \\U "
    "and 8 hex digits in a double-quoted YAML string"
)
"""What is wrong with a template's text that holds a lone surrogate, and the fix."""


def _reference_argv() -> list[str]:
    """``python -m tasks.reference_agent``, started lean, because its start-up is part of every
    task's overhead: ``-S`` skips ``site`` (the site-packages scan and the .pth import hooks,
    half the start-up), ``-c`` skips runpy, ``-I`` keeps the user's PYTHON* variables and the
    agent's working directory off its import path; the directory holding ``tasks`` is put
    back explicitly."""
    root = str(Path(__file__).resolve().parent.parent)
    boot = f"import sys; sys.path.insert(0, {root!r}); from tasks.reference_agent import serve; serve()"
    return [sys.executable, "-I", "-S", "-c", boot]


REFERENCE_TEMPLATE = AgentTemplate(argv=_reference_argv())
DEFAULT_TEMPLATES: dict[str, AgentTemplate] = {"reference": REFERENCE_TEMPLATE}


def templates_from(config: dict[str, Any] | None) -> dict[str, AgentTemplate]:
    """The built-in templates overlaid with user ones ({agent type: {argv, delivery, env}}).

    A bad one is a UserError naming its agent type and field: pydantic's own first line says
    only "1 validation error for AgentTemplate"."""
    if not isinstance(config, dict | None):
        raise UserError(
            f"agent templates must map each agent type to {{argv, delivery, env}}, not a {type(config).__name__}"
        )
    user = {_agent_type(name): _template(name, spec) for name, spec in (config or {}).items()}
    return {**DEFAULT_TEMPLATES, **user}


def _agent_type(name: object) -> str:
    """An agent type of the templates, which must be text like the tasks' own: YAML reads a bare
    ``1:``, ``on:``, ``no:`` or ``null:`` as a number, boolean or null, and ``queue run`` then
    failed with a traceback (Prefect refused the ``agents`` parameter). It follows a task's rule
    (:func:`check_agent_type`): a name no task's agent type can be would never run a task."""
    if not isinstance(name, str):
        raise UserError(
            f"agent type {name!r} in the agent templates is not text but {type(name).__name__}; "
            "quote it (YAML reads bare numbers, yes/no, on/off and null as other types)"
        )
    if not is_utf8(name):  # a task's agent type is stored, so it cannot hold one either
        raise UserError(f"agent type {name!r} in the agent templates {_NOT_UTF8}")
    check_agent_type(name, "an agent type in the agent templates", _NO_TASK_COULD_USE_IT)
    return name


_NO_TASK_COULD_USE_IT = "rename that template as a task's agent type can be named (no task could use it)"


def _template(name: str, spec: Any) -> AgentTemplate:
    try:
        return AgentTemplate.model_validate(spec)
    except ValidationError as exc:
        where, problem = validation_problem(exc)
        if exc.errors()[0]["type"] == "extra_forbidden":
            problem = "unknown field; a template takes argv, delivery and env"
        raise UserError(f"agent template {name!r} is invalid: {where or 'template'}: {problem}") from None


NAME_MAX = 255
"""Bytes a file name may have on Linux and macOS file systems: a longer directory name in a
workdir is accepted by path arithmetic, and only the run's mkdir fails (ENAMETOOLONG)."""


def resolve_workdir(
    output_dir: Path, workdir: str, task_id: int | None, *, logs_dir: Path | None = None
) -> Path:
    """The agent's working directory, which must resolve inside ``output_dir``, to a directory of
    its own: not ``output_dir`` itself, which all tasks share, nor ``logs_dir`` (default
    ``<output_dir>/logs``) or a directory inside it, where the agent would write among (or over)
    the task logs.

    Resolution follows symlinks, so ``..`` components and links that point outside are
    both caught; the resolved path is what the agent gets, so a link swapped afterwards
    cannot redirect it. A directory name no file system takes (over :data:`NAME_MAX` bytes) is
    refused here, when the task is created, not by the run's mkdir. ``task_id`` is None then: the
    task has no id yet (and its ``workdir`` is given), so the errors name none.
    """
    longest = max((len(os.fsencode(name)) for name in Path(workdir).parts), default=0)
    if longest > NAME_MAX:
        raise UserError(
            f"the working directory has a directory name of {longest} bytes, over the "
            f"{NAME_MAX} a file system allows; use shorter names (nest directories with '/')"
        )
    base = output_dir.expanduser().resolve()
    logs = (logs_dir or base / "logs").expanduser().resolve()
    of_task = "" if task_id is None else f" of task {task_id}"
    named = base / (workdir or f"task-{task_id}")
    target = resolve_user_path(
        named, f"working directory {workdir!r}{of_task} ({named})", "remove the loop or give the task another directory"
    )
    if not target.is_relative_to(base):
        raise UserError(
            f"working directory {workdir!r}{of_task} resolves to {target}, outside the agent "
            f"output directory {base}; use a relative path that stays inside it (no '..', no symlinks out)"
        )
    if target == base or target.is_relative_to(logs):
        where = (
            "the agent output directory itself, which all tasks share"
            if target == base
            else f"in the agents' logs directory {logs}"
        )
        raise UserError(
            f"working directory {workdir!r}{of_task} resolves to {target}, {where}; give the task "
            "a directory of its own in the output directory (an empty workdir is task-<id>)"
        )
    return target


@dataclass(frozen=True)
class AgentJob:
    """Everything an agent attempt needs to know; serialised as the task envelope."""

    task_id: int
    attempt: int
    title: str
    type: str
    description: str
    payload: dict[str, Any]
    checkpoint: dict[str, Any] | None
    workdir: Path
    worker: str
    """The worker running the attempt (not part of the envelope): half of the attempt's mark."""

    @property
    def mark(self) -> dict[str, str]:
        return agent_mark(self.worker, self.task_id)

    def envelope(self) -> str:
        return json.dumps(
            {
                "task_id": self.task_id,
                "attempt": self.attempt,
                "title": self.title,
                "type": self.type,
                "description": self.description,
                "payload": self.payload,
                "checkpoint": self.checkpoint,
                "workdir": str(self.workdir),
                "control": "stdin",
            }
        )


def command_for(template: AgentTemplate, job: AgentJob, task_json: str) -> tuple[list[str], dict[str, str]]:
    """The argv and environment of one attempt; ``task_json`` is what stands for the envelope in
    them (see :func:`task_json_for`)."""
    values = dict(
        zip(PLACEHOLDERS, (str(job.task_id), str(job.attempt), str(job.workdir), task_json), strict=True)
    )
    argv = []
    for arg in template.argv:
        for placeholder, value in values.items():
            arg = arg.replace(placeholder, value)
        argv.append(arg)
    if template.delivery == "argv" and not template.task_json_placeholder:
        argv.append(task_json)
    env = {**os.environ, **template.env, **job.mark}
    if template.delivery == "env":
        env[TASK_ENV_VAR] = task_json
    return argv, env


_FULL_OUTPUT_FIX = " (or pass another --output-dir / output_dir), then retry the task"
"""How to go on when the output directory's disk is full (:func:`~tasks.errors.disk_full`): the
agent's working directory or its envelope file could not be written, and every attempt would fail alike."""


@contextmanager
def task_json_for(template: AgentTemplate, job: AgentJob, envelope: str) -> Iterator[str]:
    """The envelope as argv or the environment carry it, for the length of one attempt: itself,
    or, when it is too large for them, ``@`` and the path of :data:`ENVELOPE_FILE` in the working
    directory, written here and removed on the way out. Without that file, every attempt of a
    task whose checkpoint grew that large could not even start, so it could never resume.

    A file left by a worker that was killed outright (or a symlink an agent put there) is
    replaced, never followed. On the way out only the file written here is removed, and only if
    it is still that file: whatever the agent made at that path is its own."""
    only_on_stdin = template.delivery == "stdin" and not template.task_json_placeholder
    if len(envelope) <= INLINE_ENVELOPE_LIMIT or only_on_stdin:
        yield envelope
        return
    path = job.workdir / ENVELOPE_FILE
    what = f"the envelope of task {job.task_id} to {path}"
    try:
        path.unlink(missing_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:  # say, a directory an agent made under that name: every retry would fail alike
        raise disk_full(exc, what, _FULL_OUTPUT_FIX) or UserError(
            f"cannot write {what} ({exc.strerror or exc}); remove what is in its place and retry the task"
        ) from None
    try:
        with open(fd, "w", encoding="ascii") as file:
            file.write(envelope)
            file.flush()
            written = _identity(os.fstat(file.fileno()))
    except OSError as exc:
        with suppress(OSError):  # the part written is ours (made above, no agent yet): not left on a full disk
            path.unlink()
        raise disk_full(exc, what, _FULL_OUTPUT_FIX) or UserError(
            f"cannot write {what} ({exc.strerror or exc}); retry the task"
        ) from None
    try:
        yield TASK_FILE_PREFIX + str(path)
    finally:
        with suppress(OSError):  # best effort: the next attempt replaces a file left behind
            if _identity(path.lstat()) == written:
                path.unlink()


def _identity(stat: os.stat_result) -> tuple[int, int, int]:
    """Device, inode and change time: a file the agent made in place of ours may reuse our inode
    number, but not our change time (any write, rename or chmod since moves it on)."""
    return stat.st_dev, stat.st_ino, stat.st_ctime_ns


Outcome = Literal["completed", "failed", "timeout", "interrupted"]


@dataclass
class AgentOutcome:
    outcome: Outcome
    exit_code: int | None
    result: dict[str, Any] | None = None
    error: str | None = None
    checkpoint: dict[str, Any] | None = None
    killed: bool = False
    stderr_tail: list[str] = field(default_factory=list)
    retryable: bool = True
    """False when the agent reported an error with ``"retryable": false``: another attempt would fail alike."""


LEASE_HEARTBEATS = 3
"""Heartbeats a lease must span at least: one late heartbeat (a slow database, a busy host) must
not make a live worker's tasks look abandoned."""
MAX_AGENTS = 10_000
"""More agents than any host runs at once; a bound, so that a typo is not a bigint overflow."""
MAX_RETRIES = 100
"""Retries of one task in one run: each is a whole attempt of the agent (and a 1 s delay), so a
failure 100 retries did not cure needs a person, who grants another set with ``queue retry``;
a typo such as 10**12 would instead retry a broken agent for good."""
MIN_TIMEOUT_SECONDS = 1
"""The shortest agent timeout: an attempt needs that long to start its agent and hear from it (the
reference agent takes tens of milliseconds, a real coding agent seconds). A timeout of ``1e-9``, a
typo or a slipped unit, stopped every agent as it started and burned all the task's retries."""
MIN_STOP_WAIT_SECONDS = 0.001
"""The shortest grace period or checkpoint wait other than 0 (no wait). A stop signals the agent's
group and walks the process table before it first looks again, which takes longer than this, and
no agent answers a signal or a checkpoint request sooner: a shorter wait, such as ``1e-6`` (a typo
or a slipped unit), acted as 0 while the run looked as if it gave the agent time."""


def check_drain(max_agents: int, retries: int, max_tasks: int | None = None) -> None:
    """Refuse counts a queue run cannot mean, in one line naming the parameter, before anything
    is claimed: 0 agents cannot run a task (and a thread pool refuses 0 workers), and a negative
    ``max_tasks`` or ``retries`` would silently act as 0 (see :data:`MAX_RETRIES` for its top)."""
    if not 1 <= max_agents <= MAX_AGENTS:
        raise UserError(f"max_agents must be 1 to {MAX_AGENTS}, not {max_agents} (--max-agents / max_agents)")
    check_range(retries, "retries (--retries / retries)", 0, MAX_RETRIES)
    if max_tasks is not None and max_tasks < 0:
        raise UserError(f"max_tasks must be 0 or more (or None for no limit), not {max_tasks}")


@dataclass(frozen=True)
class AgentLimits:
    timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS
    grace_seconds: float = DEFAULT_GRACE_SECONDS
    heartbeat_seconds: float = 5.0
    checkpoint_wait_seconds: float = DEFAULT_CHECKPOINT_WAIT_SECONDS
    """How long a stop waits for the agent's answer to its checkpoint request before SIGTERM."""
    lease_seconds: float = DEFAULT_LEASE_SECONDS
    """How long a worker may stay silent before its tasks count as abandoned; stored with each
    claim and attempt, so recovery and ``queue retry`` judge a worker by its own lease."""

    def __post_init__(self) -> None:
        """Refuse limits no attempt can live with: a timeout under :data:`MIN_TIMEOUT_SECONDS`
        stops every agent as it starts and burns all its retries; a negative grace period or
        checkpoint wait is a typo (0 is not: SIGKILL right after SIGTERM, no wait for a checkpoint),
        and so is one above 0 but under :data:`MIN_STOP_WAIT_SECONDS`, which acted as 0; a lease
        shorter than a few heartbeats lets other runs take this run's live tasks for abandoned ones (each worker is judged by the lease it claimed with)
        and start them a second time. (``not >=`` also catches NaN.) A timeout, grace period,
        checkpoint wait or lease past :data:`MAX_WAIT_SECONDS` is a typo, and ``inf`` would let a
        hung agent, or a dead worker's tasks, hold on for good (or a stop wait for good on an
        agent that never answers)."""
        check_range(
            self.timeout_seconds,
            "the agent timeout (--timeout / timeout_seconds)",
            MIN_TIMEOUT_SECONDS,
            MAX_WAIT_SECONDS,
            " seconds",
        )
        _check_stop_wait(self.grace_seconds, "the grace period (--grace / grace_seconds)")
        _check_stop_wait(self.checkpoint_wait_seconds, "the checkpoint wait (--checkpoint-wait / checkpoint_wait_seconds)")
        if not self.lease_seconds >= LEASE_HEARTBEATS * self.heartbeat_seconds:
            raise UserError(
                f"the lease must be at least {LEASE_HEARTBEATS * self.heartbeat_seconds:g} seconds "
                f"({LEASE_HEARTBEATS} heartbeats of {self.heartbeat_seconds:g} s), not {self.lease_seconds:g} "
                "(--lease / lease_seconds): with a shorter one, other runs take this run's live tasks for abandoned ones"
            )
        if not self.lease_seconds <= MAX_WAIT_SECONDS:
            raise UserError(
                f"the lease must be a finite number of seconds, at most {MAX_WAIT_SECONDS}, not "
                f"{self.lease_seconds:g} (--lease / lease_seconds): a longer one leaves a dead worker's tasks stuck"
            )


def _check_stop_wait(value: float, what: str) -> None:
    """A grace period or checkpoint wait: 0 (no wait), or :data:`MIN_STOP_WAIT_SECONDS` to
    :data:`MAX_WAIT_SECONDS`; else one line naming ``what`` and both choices."""
    check_range(value, what, 0, MAX_WAIT_SECONDS, " seconds")
    if 0 < value < MIN_STOP_WAIT_SECONDS:
        raise UserError(
            f"{what} {value} is out of range; give 0 (no wait) or {MIN_STOP_WAIT_SECONDS} to {MAX_WAIT_SECONDS} "
            "seconds: a shorter wait acts as 0"
        )


class AgentProcess:
    """One running attempt. :meth:`run` blocks in the worker thread; :meth:`shutdown` may be
    called from any other thread (signal handler path, cancellation, heartbeat)."""

    def __init__(
        self,
        job: AgentJob,
        template: AgentTemplate,
        *,
        on_message: Callable[[str, AgentMessage], None],
        limits: AgentLimits = AgentLimits(),
        keep_going: Callable[[], bool] | None = None,
        on_start: Callable[[int], None] | None = None,
    ) -> None:
        self.job = job
        self.template = template
        self.limits = limits
        self._on_message = on_message
        self._keep_going = keep_going
        self._on_start = on_start
        self._proc: subprocess.Popen[bytes] | None = None
        self._envelope_sent = threading.Event()  # until then, stdin belongs to the envelope writer
        if template.delivery != "stdin":
            self._envelope_sent.set()
        self._checkpoint_seen = threading.Event()
        self._stop_lock = threading.Lock()
        self._stopper: threading.Thread | None = None
        self._stop_reason: tuple[Outcome, str] | None = None
        self._killed = False
        self.started = threading.Event()

    @property
    def pgid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def run(self) -> AgentOutcome:
        envelope = self.job.envelope()
        # a file in its way, or its disk full: one line, not retried (it was Python's FileExistsError, retried)
        make_user_dir(self.job.workdir, f"the working directory of task {self.job.task_id}", full_fix=_FULL_OUTPUT_FIX)
        with task_json_for(self.template, self.job, envelope) as task_json:
            argv, env = command_for(self.template, self.job, task_json)
            # Under the stop lock, so that a stop is requested either before the start (the agent
            # never starts) or after it (the stop sequence finds it started): one that came in
            # between, with a grace period too short to wait for the start, let the agent run on.
            with self._stop_lock:
                if self._stop_reason is not None:
                    outcome, reason = self._stop_reason
                    return AgentOutcome(outcome, None, error=reason)
                try:
                    self._proc = spawn_group(
                        argv,
                        env=env,
                        cwd=self.job.workdir,
                        stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE,
                    )
                except OSError as exc:  # its strerror: str(exc) repeats the path the message names
                    raise UserError(
                        f"cannot start agent {argv[0]!r} for task {self.job.task_id}: {exc.strerror or exc}"
                    ) from None
                self.started.set()
            try:
                if self._on_start is not None:
                    self._on_start(self._proc.pid)
                self._emit_flowyard(f"agent started: pid {self._proc.pid}, cwd {self.job.workdir}")
                if self.template.delivery == "stdin":
                    threading.Thread(target=self._send_envelope, args=(envelope,), daemon=True).start()
                return self._pump(self._proc)
            finally:
                # Also when a callback raised (a database error recording a checkpoint, a heartbeat):
                # the exception fails the attempt and Prefect starts another agent, so this one's
                # group must not keep running beside it (nor read the envelope file, removed next).
                self._stop_group_leftovers()

    def shutdown(self, reason: str, outcome: Outcome = "interrupted") -> None:
        """Graceful stop, waiting for it: ask for a checkpoint, SIGTERM the group, SIGKILL after grace."""
        stopper = self.request_stop(reason, outcome)
        if stopper is not None:
            stopper.join()

    def request_stop(self, reason: str, outcome: Outcome = "interrupted") -> threading.Thread | None:
        """Start the graceful stop sequence in the background (once); returns its thread."""
        with self._stop_lock:
            if self._stopper is None:
                self._stop_reason = (outcome, reason)
                self._stopper = threading.Thread(target=self._stop_sequence, daemon=True)
                self._stopper.start()
            return self._stopper

    def _stop_sequence(self) -> None:
        if not self.started.wait(timeout=self.limits.grace_seconds) or self._proc is None:
            return
        assert self._stop_reason is not None
        self._emit_flowyard(f"stopping agent ({self._stop_reason[1]}): asking for a checkpoint")
        self._checkpoint_seen.clear()
        if self._request_checkpoint():
            self._checkpoint_seen.wait(timeout=self.limits.checkpoint_wait_seconds)
        self._killed = self.terminate(self.limits.grace_seconds)
        if self._killed:
            self._emit_flowyard(f"agent group {self._proc.pid} ignored SIGTERM; sent SIGKILL")

    def _send_envelope(self, envelope: str) -> None:
        """Write the task envelope to stdin (in its own thread: it blocks while the agent has not
        read what fills the pipe, possibly for good), then let the stop sequence use stdin."""
        assert self._proc is not None and self._proc.stdin is not None
        try:
            self._proc.stdin.write(envelope.encode() + b"\n")
            self._proc.stdin.flush()
        except OSError:  # the agent exited or closed its stdin without reading it all
            pass
        finally:
            self._envelope_sent.set()

    def _request_checkpoint(self) -> bool:
        """Ask the agent for a checkpoint without ever blocking, so the stop sequence always goes on
        to end the group: not at all while the envelope is still being written (the agent is not
        reading stdin, and the request would interleave with it), and with a non-blocking write,
        which for a line shorter than PIPE_BUF writes all of it or, the pipe being full, nothing.
        False when the request was not delivered."""
        assert self._proc is not None and self._proc.stdin is not None
        if not self._envelope_sent.is_set():
            return False
        fd = self._proc.stdin.fileno()
        try:
            os.set_blocking(fd, False)
            os.write(fd, CHECKPOINT_REQUEST.encode() + b"\n")
        except OSError:  # BlockingIOError: a full pipe; BrokenPipeError: the agent is gone
            return False
        return True

    def _pump(self, proc: subprocess.Popen[bytes]) -> AgentOutcome:
        """Read stdout/stderr until the agent and its pipes are done, enforcing timeout and heartbeat."""
        assert proc.stdout is not None and proc.stderr is not None
        state = _RunState()
        deadline = time.monotonic() + self.limits.timeout_seconds
        next_beat = time.monotonic() + self.limits.heartbeat_seconds
        selector = selectors.DefaultSelector()
        streams = {"stdout": proc.stdout, "stderr": proc.stderr}
        readers = {name: _LineReader() for name in streams}
        for name, stream in streams.items():
            os.set_blocking(stream.fileno(), False)
            selector.register(stream, selectors.EVENT_READ, name)
        exit_fd = _exit_fd(proc)
        try:
            if exit_fd is not None:
                selector.register(exit_fd, selectors.EVENT_READ, _EXITED)
            exited_at: float | None = None
            give_up_at: float | None = None
            # Until the agent has exited and its pipes are closed: an agent that closes both (a
            # wrapper's `exec >log 2>&1`) still runs, and its timeout, heartbeat and cancel checks with it.
            while selector.get_map() or proc.poll() is None:
                for key, _ in _ready(selector, proc, timeout=0.25):
                    if key.data == _EXITED:
                        selector.unregister(key.fileobj)  # readable for good from the exit on
                    else:
                        self._read(streams[key.data], key.data, readers[key.data], selector, state)
                now = time.monotonic()
                # Only while the agent runs: one that exited in time is not timed out by flowyard's
                # own handling of its output (a 50 MB line written to the logs took seconds, and an
                # agent that had exited 0 was failed with "timeout after 3s", every retry alike).
                if now >= deadline and proc.poll() is None:
                    self.request_stop(f"timeout after {self.limits.timeout_seconds:g}s", "timeout")
                if self._keep_going is not None and now >= next_beat:
                    next_beat = now + self.limits.heartbeat_seconds
                    if not self._keep_going():
                        self.request_stop("task cancelled or reclaimed")
                if proc.poll() is not None:
                    exited_at = exited_at or now
                    if give_up_at is None and now - exited_at > 1.0:
                        # A descendant holds the pipes open: end the group and the marked processes.
                        self.terminate(self.limits.grace_seconds)
                        give_up_at = time.monotonic() + 1.0
                    elif give_up_at is not None and now > give_up_at:
                        self._emit_flowyard(
                            f"stopped reading the output of agent {proc.pid}: a process that left its group "
                            f"without {WORKER_ENV_VAR} and {TASK_ID_ENV_VAR} in its environment still "
                            "holds its pipes (one started with a cleared environment, such as env -i)"
                        )
                        break
        finally:  # also when a callback raised: the descriptors are not left open
            selector.close()
            if exit_fd is not None:
                os.close(exit_fd)
        for stream in streams.values():
            stream.close()
        exit_code = proc.wait()
        if self._stopper is not None:
            self._stopper.join()
        return self._outcome(exit_code, state)

    def _read(
        self,
        stream: IO[bytes],
        name: str,
        reader: _LineReader,
        selector: selectors.BaseSelector,
        state: _RunState,
    ) -> None:
        chunk = os.read(stream.fileno(), 65536)
        if not chunk:
            selector.unregister(stream)
        for raw, dropped in reader.feed(chunk):
            self._line(name, raw, dropped, state)

    def _line(self, stream: str, raw: bytes, dropped: int, state: _RunState) -> None:
        """One line of the agent's output; ``dropped`` bytes of it were cut (:class:`_LineReader`)."""
        if stream == "stderr":
            text = raw.decode(errors="replace")
            state.stderr_tail.append(text)
            self._on_message("stderr", LogMessage(kind="log", level="stderr", message=text))
            if dropped:
                self._emit_flowyard(_cut_line("stderr", raw, dropped), level="warning")
            return
        message: AgentMessage
        problem: str | None
        if dropped:
            message, problem = _raw_line(raw), _cut_line("stdout", raw, dropped)
        else:
            message, problem = _stdout_message(raw)
        if isinstance(message, CheckpointMessage):
            state.checkpoint = message.state
        elif isinstance(message, ResultMessage):
            state.result = message.data
        elif isinstance(message, ErrorMessage):
            state.errors.append(message.message)
            state.retryable = state.retryable and message.retryable
        if isinstance(message, CheckpointMessage):
            # Before the message is handed on, never after: a stop that began while it was being
            # handled (a checkpoint persisted, a caller that saw it) would clear the event and
            # then take this checkpoint, written before its request, for the answer.
            self._checkpoint_seen.set()
        self._on_message("stdout", message)
        if problem is not None:  # after its line, which it explains
            self._emit_flowyard(problem, level="warning")

    def _emit_flowyard(self, text: str, level: str = "info") -> None:
        self._on_message("flowyard", LogMessage(kind="log", level=level, message=text))

    def _outcome(self, exit_code: int, state: _RunState) -> AgentOutcome:
        tail = list(state.stderr_tail)
        if self._stop_reason is not None:
            outcome, reason = self._stop_reason
            return AgentOutcome(
                outcome, exit_code, state.result, reason, state.checkpoint, self._killed, tail
            )
        if exit_code == 0 and not state.errors:
            return AgentOutcome(
                "completed", exit_code, state.result or {}, None, state.checkpoint, False, tail
            )
        detail = "; ".join(state.errors) or (tail[-1] if tail else "no error message")
        return AgentOutcome(
            "failed",
            exit_code,
            state.result,
            f"agent exited {_exit_text(exit_code)}: {detail}" + ("" if state.retryable else " (not retryable)"),
            state.checkpoint,
            False,
            tail,
            state.retryable,
        )

    def _stop_group_leftovers(self) -> None:
        """Processes the agent left behind (daemons, grandchildren, in its group or not) die with it."""
        self.terminate(self.limits.grace_seconds)

    def terminate(self, grace_seconds: float) -> bool:
        """SIGTERM the agent's group and the processes carrying its mark, SIGKILL what is left after
        ``grace_seconds``; True when SIGKILL was needed."""
        assert self._proc is not None
        return terminate_group(self._proc.pid, grace_seconds, self.job.mark)


def _stdout_message(raw: bytes) -> tuple[AgentMessage, str | None]:
    """One stdout line as a message, and why a line naming one of the protocol's kinds was not
    taken as it (None for any other line). JSON text is UTF-8: a line that is not is read with its
    bad bytes as U+FFFD, and taken only as a log or error message, which are shown, never as a
    checkpoint, result or artifact, whose data the task would store (and hand back on resume)
    with those characters in place of what the agent wrote; such a line is a raw log line, and
    the warning says so (it was dropped in silence: the agent took its checkpoint for saved)."""
    try:
        text = raw.decode()
    except UnicodeDecodeError as exc:
        text = raw.decode(errors="replace")
        message = parse_line(text)
        if not isinstance(message, LogMessage | ErrorMessage):
            return _raw_line(raw), _not_utf8(message.kind, exc)
    else:
        message = parse_line(text)
    # the line itself kept raw, not an agent's own log message of level raw
    if isinstance(message, LogMessage) and message.level == "raw" and message.message == text.rstrip("\r\n"):
        return message, misread(message.message)
    return message, None


def _raw_line(raw: bytes) -> LogMessage:
    """A stdout line kept as a raw log line, as it reads (bad bytes as U+FFFD)."""
    return LogMessage(kind="log", message=raw.decode(errors="replace").rstrip("\r\n"), level="raw")


def _not_utf8(kind: str, error: UnicodeDecodeError) -> str:
    a = _article(kind)
    return (
        f"{a} {kind} line was kept as a raw log line, not taken as {a} {kind}: it is not UTF-8 "
        f"(byte 0x{error.object[error.start]:02x} at offset {error.start}); JSON text must be UTF-8: "
        "escape such characters as \\uXXXX or encode the data (as base64, for instance)"
    )


MAX_LINE_BYTES = 64 << 20
"""The longest line of an agent's output that is read (bytes): the reader holds a line until its
newline, and an agent writing without one (a binary dump, a runaway loop) grew the worker's memory
without end, several copies of the line once it ended. Checkpoints and results of megabytes pass."""
CUT_LINE_KEEPS = 64 << 10
"""Bytes kept, for the logs, of a line over :data:`MAX_LINE_BYTES`: its start shows what it was."""


@dataclass
class _LineReader:
    """One output stream of an agent, cut into lines. A line over :data:`MAX_LINE_BYTES` is kept
    as its first :data:`CUT_LINE_KEEPS` bytes, the rest dropped (counted) up to its newline."""

    held: bytearray = field(default_factory=bytearray)
    """The line so far (its kept start, once it is cut)."""
    dropped: int = 0
    """Bytes of that line dropped past its kept start."""

    def feed(self, chunk: bytes) -> list[tuple[bytes, int]]:
        """The lines ``chunk`` completes, each with how many of its bytes were dropped; an empty
        ``chunk`` (the end of the stream) completes the last one. The newline is looked for in
        the new chunk only: splitting a long line's whole buffer per read was quadratic."""
        end = chunk.find(b"\n")
        if end < 0:
            self._hold(chunk)
            return [self._take()] if not chunk and (self.held or self.dropped) else []
        self._hold(chunk[:end])
        lines = [self._take()]
        *whole, rest = chunk[end + 1 :].split(b"\n")
        lines.extend((line, 0) for line in whole)  # shorter than a chunk: never cut
        self._hold(rest)
        return lines

    def _hold(self, part: bytes) -> None:
        if self.dropped:
            self.dropped += len(part)
            return
        self.held.extend(part)
        if len(self.held) > MAX_LINE_BYTES:
            self.dropped = len(self.held) - CUT_LINE_KEEPS
            del self.held[CUT_LINE_KEEPS:]

    def _take(self) -> tuple[bytes, int]:
        line = (bytes(self.held), self.dropped)
        self.held, self.dropped = bytearray(), 0
        return line


def _cut_line(stream: str, kept: bytes, dropped: int) -> str:
    """The warning that follows a line :class:`_LineReader` cut: how long it was, what is kept of
    it, and, on stdout, that it was taken as no message (a checkpoint or result that long is not)."""
    size = f"{len(kept) + dropped:,} bytes"
    if stream == "stderr":
        return (
            f"a stderr line of {size} was cut to its first {len(kept):,} bytes "
            f"(lines over {MAX_LINE_BYTES:,} bytes are not kept whole)"
        )
    kind = _named_kind(kept)
    what = f"{_article(kind)} {kind}" if kind else "a stdout"
    return (
        f"{what} line of {size} was cut to its first {len(kept):,} bytes and kept as a raw log line"
        f"{f', not taken as {what}' if kind else ''}: a line over {MAX_LINE_BYTES:,} bytes is not read; "
        "keep large data in files in the working directory"
    )


def _article(kind: str) -> str:
    return "an" if kind[0] in "aeiou" else "a"


_KIND = re.compile(rb'^\s*\{\s*"kind"\s*:\s*"(%s)"' % "|".join(KINDS).encode())


def _named_kind(line: bytes) -> str | None:
    """The protocol kind a line starts by naming (``{"kind": "checkpoint", ...``), if any."""
    found = _KIND.match(line)
    return found.group(1).decode() if found else None


_EXITED = "exited"
"""The selector key of :func:`_exit_fd`'s descriptor."""


def _exit_fd(proc: subprocess.Popen[bytes]) -> int | None:
    """A descriptor that turns readable when the agent exits (Linux's pidfd), so the pump wakes at
    the exit itself: an agent's pipes close a few milliseconds before its exit status is there
    (Python closes its standard streams early in its shutdown), and polling for the status after
    them cost every attempt several. None where there is none (not Linux, a kernel before 5.3)."""
    try:
        return os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        return None


def _ready(
    selector: selectors.BaseSelector, proc: subprocess.Popen[bytes], timeout: float
) -> list[tuple[selectors.SelectorKey, int]]:
    """The files ready to read; with nothing left to watch (both pipes closed, and no
    :func:`_exit_fd`), none, after the agent exits or ``timeout`` passes."""
    if selector.get_map():
        return selector.select(timeout=timeout)
    with suppress(subprocess.TimeoutExpired):
        proc.wait(timeout)
    return []


@dataclass
class _RunState:
    checkpoint: dict[str, Any] | None = None
    result: dict[str, Any] | None = None
    errors: list[str] = field(default_factory=list)
    retryable: bool = True
    stderr_tail: deque[str] = field(default_factory=lambda: deque(maxlen=20))


def _exit_text(code: int) -> str:
    """How the agent ended. ``signal.Signals`` names no real-time signal but SIGRTMIN and SIGRTMAX
    (the others end a process by default too): one of those is given by its number."""
    if code < 0:
        try:
            return f"on signal {signal.Signals(-code).name}"
        except ValueError:
            return f"on signal {-code}"
    return f"with code {code}"
