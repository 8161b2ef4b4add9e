"""The durable agent task queue in PostgreSQL (``flowyard.agent_tasks`` and friends).

Status flow: ``draft → pending → in_progress → completed | failed | cancelled``, with
``review`` between ``in_progress`` and ``completed`` for tasks that require it. A task is
*ready* when it is pending and every task that ``blocks`` it is completed. Workers claim
ready tasks with ``SELECT … FOR UPDATE SKIP LOCKED`` in priority order, so two workers
never take the same task, and stamp them with their worker id; a task whose worker died
is handed back to ``pending`` by :func:`recover_stale`, keeping its last checkpoint.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import threading
import time
import unicodedata
import uuid
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from functools import cache
from typing import Any, Literal, TypeVar, cast

import psutil
import psycopg
from psycopg import sql
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from tasks.db import connect, connection, read_only_refusal
from tasks.errors import (
    ConnectionUnavailable,
    UserError,
    control_character,
    first_line,
    is_utf8,
    one_line,
    printable,
)
from tasks.json_values import any_scalar, has_non_finite, has_nul, nesting_depth, non_json_type
from tasks.retry_policy import is_transient

Priority = Literal["critical", "high", "medium", "low"]
Status = Literal["draft", "pending", "in_progress", "review", "completed", "failed", "cancelled"]
TaskType = Literal["epic", "story", "task", "subtask", "bug", "spike"]
Outcome = Literal["completed", "failed", "timeout", "interrupted"]
PRIORITIES: tuple[str, ...] = ("critical", "high", "medium", "low")
TASK_TYPES: tuple[str, ...] = ("epic", "story", "task", "subtask", "bug", "spike")
STATUSES: tuple[str, ...] = ("draft", "pending", "in_progress", "review", "completed", "failed", "cancelled")
DEFAULT_LEASE_SECONDS = 120.0
"""How long a worker may stay silent before its tasks count as abandoned (``lease_seconds``)."""


MAX_TITLE_LENGTH = 200
"""Characters a task's title may have (the table's check): one row of ``queue list``."""


@dataclass(frozen=True)
class NewTask:
    """A task to enqueue. Its priority, type and title are checked when it is built, so a task
    made in Python (the demo, the bench, a user's script) is refused with the same one line as
    one from the CLI or a flow, never stored with a title that breaks ``queue list``'s rows."""

    title: str
    agent_type: str
    type: TaskType = "task"
    description: str = ""
    priority: Priority = "medium"
    blocked_by: tuple[int, ...] = ()
    payload: dict[str, Any] = field(default_factory=dict)
    workdir: str = ""
    requires_review: bool = False
    draft: bool = False

    def __post_init__(self) -> None:
        """Also strips spaces (and line breaks) around the title: pasted or written as
        ``"$(cat title.txt)"``, it was stored with them, misaligned in ``queue list`` and counted
        against the limit."""
        if self.priority not in PRIORITIES:
            raise UserError(f"unknown priority {self.priority!r}; use one of {', '.join(PRIORITIES)}")
        if self.type not in TASK_TYPES:
            raise UserError(f"unknown task type {self.type!r}; use one of {', '.join(TASK_TYPES)}")
        object.__setattr__(self, "title", self.title.strip())  # frozen: set once, while being built
        if not self.title:
            raise UserError(f"the title must have 1 to {MAX_TITLE_LENGTH} characters, not only spaces")
        if len(self.title) > MAX_TITLE_LENGTH:
            raise UserError(
                f"the title has {len(self.title)} characters, at most {MAX_TITLE_LENGTH}; shorten it and put "
                "the rest in the description (--description / description)"
            )
        _refuse_line_breaking(
            self.title,
            "the title",
            "give a one-line title and put the rest in the description (--description / description)",
        )
        # a path the run's lines and the agent's envelope name: a newline split them, and an
        # escape garbled them, in a directory nobody meant to make
        _refuse_line_breaking(self.workdir, "the working directory", "name a directory without it (--workdir / workdir)")
        if self.workdir and not self.workdir.strip():
            # only an empty workdir means the default (``task-<id>``): one of spaces was a
            # directory named by them, invisible in ``queue list`` and in any path shown
            raise UserError(
                f"the working directory {self.workdir!r} is only whitespace; leave it out (--workdir / workdir) "
                "for the task's own directory (task-<id>), or name a directory"
            )
        if below_one := sorted({task_id for task_id in self.blocked_by if task_id < 1}):
            # said before connecting, as for a command's task id (:func:`no_such_task`)
            raise UserError(
                f"no dependency task {', '.join(map(str, below_one))}: task ids are positive integers; "
                "list tasks with `flowyard queue list` (--after / blocked_by)"
            )

    @classmethod
    def from_input(cls, title: str, agent_type: str, priority: str, task_type: str, **fields: Any) -> NewTask:
        """A task from untyped input (CLI options, flow parameters). The casts only tell the type
        checker: :meth:`__post_init__` refuses a priority or type that is none of the choices, in
        one line naming them instead of the table's constraint names."""
        return cls(
            title=title,
            agent_type=agent_type,
            priority=cast(Priority, priority),
            type=cast(TaskType, task_type),
            **fields,
        )


def _refuse_line_breaking(text: str, what: str, fix: str) -> None:
    """A title and an agent type are columns of one row of ``flowyard queue list`` (and of a
    run's lines about the task): a newline split that row, and other control characters (a tab,
    a carriage return, a terminal escape) garble it; the description takes the rest of a title."""
    control = control_character(text)
    if control is not None:
        raise UserError(f"{what} {text!r} holds the control character {control!r}; {fix}")


@dataclass(frozen=True)
class AgentTask:
    id: int
    title: str
    type: str
    description: str
    priority: str
    status: str
    agent_type: str
    payload: dict[str, Any]
    workdir: str
    requires_review: bool
    attempts: int
    last_checkpoint: dict[str, Any] | None
    result: dict[str, Any] | None
    error: str | None
    blocked_reason: str | None
    worker: str | None
    agent_pgid: int | None
    blocked_by: tuple[int, ...]
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    @property
    def checkpoint_label(self) -> str:
        """``kind@attempt`` of the last checkpoint ('' without one), as the listings show it."""
        last = self.last_checkpoint
        return f"{last['kind']}@{last['attempt']}" if last else ""

    @property
    def note(self) -> str:
        """Why the task is where it is, on one line: what blocks it, or its last error (an
        agent's may be a whole traceback: its first line). Control characters are shown as
        escapes: the reason quotes a dependency's title as stored, which may hold a newline
        from before flowyard refused them, and cutting there dropped the dependency's status."""
        return printable(self.blocked_reason or one_line(self.error or ""))


_TASK_COLUMNS = sql.SQL(
    """
    t.id, t.title, t.type, t.description, t.priority, t.status, t.agent_type, t.payload, t.workdir,
    t.requires_review, t.attempts, t.last_checkpoint, t.result, t.error, t.blocked_reason, t.worker,
    t.agent_pgid, t.created_at, t.updated_at, t.started_at, t.finished_at,
    ARRAY(SELECT b.blocker_id FROM flowyard.agent_task_blocks b
          WHERE b.blocked_id = t.id ORDER BY b.blocker_id) AS blocked_by
    """
)
_SELECT_TASKS = sql.SQL("SELECT {columns} FROM flowyard.agent_tasks t").format(columns=_TASK_COLUMNS)


LOCK_WAIT_SECONDS = 2.0
"""How long a queue statement waits for a lock (``lock_timeout``). A DBA's ``LOCK TABLE``,
``VACUUM FULL`` or ``ALTER TABLE`` on a queue table held every statement for as long as it lasted:
a worker's heartbeat stopped the loop reading its agents' output (so the agents, and their
timeouts), and ``queue`` commands hung without a word. Workers take a lock timeout for the state
database being away for now (:func:`unreachable`); commands say who holds the lock."""

_LOCK_TIMEOUT = f"{LOCK_WAIT_SECONDS * 1000:g}ms"

_QUEUE_TABLES = ("agent_tasks", "agent_task_blocks", "agent_runs", "agent_checkpoints")


class QueueLocked(UserError):
    """A queue statement waited :data:`LOCK_WAIT_SECONDS` for a lock another session holds: a lock
    on a queue table, or on one of its rows. ``lock`` says which and who holds it, ``end_it`` how
    to end that session; a worker says both in its log while it rides the lock out."""

    def __init__(self, locked: str, holders: list[str], pids: list[int], error: str) -> None:
        held = f": held by {'; '.join(holders)}" if holders else " (by a session that has ended since)"
        self.lock = f"{locked} ({error}){held}"
        terminate = ", ".join(f"pg_terminate_backend({pid})" for pid in pids) or "pg_terminate_backend(<pid>)"
        self.end_it = f"end that session: SELECT {terminate}"
        super().__init__(f"{self.lock}; try again once that session is done (or {self.end_it})")


_WAITED_ROW = re.compile(r'\((\d+),(\d+)\)(?: of tuple)? in relation "([^"]+)"')
"""The row a lock timeout cut a wait for, in the error's context (``while updating tuple (0,5) in
relation "agent_tasks"``): the server names it when the statement waited for the transaction that
holds the row, not for a lock on the table."""

_HOLDERS = sql.SQL(
    """
    SELECT DISTINCT a.pid, a.usename, a.application_name, a.state,
           extract(epoch FROM now() - coalesce(a.xact_start, a.backend_start))::int, a.query
      FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
     WHERE l.granted AND l.pid <> pg_backend_pid() AND {holds}
     ORDER BY 1
    """
)
_HOLDS_A_TABLE = sql.SQL(
    # a table's lock, not a row's tuple lock, which names the table too (in ExclusiveLock mode)
    "l.locktype = 'relation' AND l.relation = ANY(%(tables)s::regclass[]) "
    "AND l.mode IN ('ShareLock', 'ShareRowExclusiveLock', 'ExclusiveLock', 'AccessExclusiveLock')"
)
_HOLDS_THE_ROW = sql.SQL(
    # the transaction in the rows' xmax, holding a lock on their table too: a row several sessions
    # lock has a multixact id there, which must not be taken for some other transaction's id
    "l.locktype = 'transactionid' AND l.transactionid IN (SELECT xmax FROM {table} WHERE ctid = ANY(%(ctids)s::tid[])) "
    "AND l.pid IN (SELECT pid FROM pg_locks WHERE relation = %(table)s::regclass AND granted)"
)
_ROWS_WAITED_AHEAD = sql.SQL(
    # the rows of one queue table that sessions wait for, each holding the row's tuple lock meanwhile
    """
    SELECT c.relname, array_agg(DISTINCT format('(%%s,%%s)', l.page, l.tuple))
      FROM pg_locks l JOIN pg_class c ON c.oid = l.relation
     WHERE l.locktype = 'tuple' AND l.granted AND l.relation = ANY(%(tables)s::regclass[])
     GROUP BY c.relname ORDER BY c.relname LIMIT 1
    """
)


def _queue_locked(url: str, error: psycopg.errors.LockNotAvailable) -> QueueLocked:
    """What a lock timeout of a queue statement waited for (a row, named by the error's context,
    else the queue's tables) and the sessions holding it, with who they are and what they run. Only
    table locks were looked for: a session holding a task's row (``SELECT ... FOR UPDATE`` or an
    ``UPDATE`` left open in psql) made ``queue cancel`` say the tables were locked, naming no one,
    and a worker call the state database unreachable. Read on a connection of its own: the failed
    one may be in an aborted transaction.

    A statement queued behind another waiter for the row (a second worker, a ``queue cancel``)
    waits for that waiter's tuple lock, not for the holder's transaction, and the server names no
    row then: it said the tables were locked, held by that waiter (its tuple lock taken for a lock
    on the table), and told to end it, which only puts the statement next in line behind the same
    holder. The row is then the one such a waiter holds the tuple lock of, and its holder the
    transaction that waiter waits for (what ``pg_blocking_pids`` gives for it)."""
    tables = [f"flowyard.{name}" for name in _QUEUE_TABLES]
    context = _WAITED_ROW.search(error.diag.context or "")
    waited = (context[3], [f"({context[1]},{context[2]})"]) if context and context[3] in _QUEUE_TABLES else None
    try:
        with connection(url, autocommit=True) as conn:
            # reading the row waits for no lock on its table longer than the statement that failed
            conn.execute("SELECT set_config('lock_timeout', %s, false)", (_LOCK_TIMEOUT,))
            waited = waited or conn.execute(_ROWS_WAITED_AHEAD, {"tables": tables}).fetchone()
            if waited is None:
                rows = conn.execute(_HOLDERS.format(holds=_HOLDS_A_TABLE), {"tables": tables}).fetchall()
            else:
                holds = _HOLDS_THE_ROW.format(table=sql.Identifier("flowyard", waited[0]))
                values = {"table": f"flowyard.{waited[0]}", "ctids": waited[1]}
                rows = conn.execute(_HOLDERS.format(holds=holds), values).fetchall()
    except psycopg.Error:
        rows = []
    locked = f"a row of flowyard.{waited[0]} is locked" if waited else "the agent queue's tables are locked"
    holders = [
        f"pid {pid} (user {user}, application {app or '-'!r}, {state}, in a transaction for {secs}s, "
        f"its query: {printable(one_line(query))})"
        for pid, user, app, state, secs, query in rows
    ]
    return QueueLocked(locked, holders, [int(r[0]) for r in rows], first_line(error))


_IDLE: dict[tuple[str, bool], list[psycopg.Connection]] = {}
_IDLE_LOCK = threading.Lock()
_MAX_IDLE = 16


@contextmanager
def _connection(url: str, *, atomic: bool = False, durable: bool = True) -> Iterator[psycopg.Connection]:
    """A reused autocommit connection: every attempt touches the queue several times, and a new
    connection costs ~20 ms against well under 1 ms per statement. A statement commits on its
    own in one round trip, so only functions whose statements must hold together ask for a
    transaction (``atomic``), which costs two more (BEGIN, COMMIT). Broken connections are dropped.

    ``durable=False`` commits without waiting for the WAL flush (``synchronous_commit = off``,
    ~2 ms saved per commit, far more on a busy disk). It is for bookkeeping on the way to
    starting an agent whose loss in a database crash is harmless: a crash loses at most the
    newest such commits, never half of one, and the next durable commit (a checkpoint, the
    end of the attempt) flushes them all.
    """
    key = (url, durable)
    with _IDLE_LOCK:
        idle = _IDLE.setdefault(key, [])
        conn = idle.pop() if idle else None
    if conn is None or conn.closed:
        conn = connect(url, autocommit=True)
        conn.execute(
            "SELECT set_config('lock_timeout', %s, false)"
            + ("" if durable else ", set_config('synchronous_commit', 'off', false)"),
            (_LOCK_TIMEOUT,),
        )
    try:
        if atomic:
            with conn.transaction():
                yield conn
        else:
            yield conn
    except psycopg.errors.LockNotAvailable as exc:
        raise _queue_locked(url, exc) from exc
    except psycopg.errors.ReadOnlySqlTransaction as exc:  # a standby, a read-only role: no outage to ride out
        raise read_only_refusal(url, exc) from None
    except (psycopg.OperationalError, psycopg.InterfaceError):
        conn.close()
        # The server restarted (or dropped every session): the idle connections are dead too, and
        # each would fail its next statement in turn, so the calls riding out the outage
        # (:func:`riding_out`) met one such failure per pooled connection after it was back.
        _drop_idle(key)
        raise
    finally:
        _release(key, conn)


def _drop_idle(key: tuple[str, bool]) -> None:
    with _IDLE_LOCK:
        idle, _IDLE[key] = _IDLE.get(key, []), []
    for conn in idle:
        conn.close()


def _release(key: tuple[str, bool], conn: psycopg.Connection) -> None:
    """Back to the idle list if it is healthy and outside any transaction, else closed."""
    reusable = not conn.closed and conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    with _IDLE_LOCK:
        if reusable and len(_IDLE[key]) < _MAX_IDLE:
            _IDLE[key].append(conn)
            return
    if not conn.closed:
        conn.close()


def unreachable(error: BaseException) -> bool:
    """Whether ``error`` says the state database could not be reached, or lost the connection, or
    could not take a statement for now (a restart or failover, a network blip, a server shutting
    down or out of connections, a deadlock): what a later try meets differently, as
    :func:`~tasks.retry_policy.is_transient` tells. A connection refused outright (a one-line
    :class:`~tasks.errors.ConnectionUnavailable`, which a wrong URL raises too) counts as well: to
    a queue that has been working, it is a server down for now. So does a lock held on a queue table
    (:class:`QueueLocked`): a worker cannot write until it is released, as in an outage."""
    return isinstance(error, ConnectionUnavailable | QueueLocked) or is_transient(error)


_T = TypeVar("_T")


def riding_out(
    call: Callable[[], _T], seconds: float, on_outage: Callable[[BaseException], None] | None = None
) -> _T:
    """``call()``, tried again while the state database is :func:`unreachable`, for up to
    ``seconds`` (at growing intervals up to 2 s); then its error is raised. ``on_outage`` is told
    of the first such error. For reads, and for the queue's writes, which fence themselves by
    worker and attempt: one whose commit was applied but whose answer was lost with the connection
    changes nothing more when tried again (a heartbeat, a checkpoint, an attempt's end), or leaves
    what recovery hands back (a claim, an attempt started twice)."""
    deadline = time.monotonic() + seconds
    delay = 0.1
    told = False
    while True:
        try:
            return call()
        except Exception as exc:
            if not unreachable(exc) or time.monotonic() + delay > deadline:
                raise
            if on_outage is not None and not told:
                on_outage(exc)
                told = True
        time.sleep(delay)
        delay = min(2 * delay, 2.0)


@contextmanager
def skipping_outage(on_outage: Callable[[BaseException], None] | None = None) -> Iterator[None]:
    """The block, cut short without an error when the state database is :func:`unreachable`
    (``on_outage`` is told of it): for what a worker goes on without while the database is away (a
    heartbeat, a claim, a checkpoint kept for later), as :func:`riding_out` is for what must wait."""
    try:
        yield
    except Exception as exc:
        if not unreachable(exc):
            raise
        if on_outage is not None:
            on_outage(exc)


def _task(row: dict[str, Any]) -> AgentTask:
    return AgentTask(**{**row, "blocked_by": tuple(row["blocked_by"])})


def new_worker_id() -> str:
    """``host:pid:process-start:nonce`` – enough for :func:`recover_stale` to tell a dead worker."""
    started = int(psutil.Process().create_time())
    return f"{process_space()}:{os.getpid()}:{started}:{uuid.uuid4().hex[:8]}"


@cache
def process_space() -> str:
    """The host name, and on Linux a tag of the kernel's boot and this PID namespace: the space
    in which a worker's pid means that worker. Containers on one kernel (host networking) and
    cloned VMs share a host name but not their process ids, so by the name alone a worker of
    one was judged dead by another, which then handed its live tasks to a second agent."""
    parts = []
    for read, path in ((_read_text, "/proc/sys/kernel/random/boot_id"), (os.readlink, "/proc/self/ns/pid")):
        try:
            parts.append(read(path).strip())
        except OSError:  # not Linux, or /proc hidden: the host name alone, as before
            continue
    tag = hashlib.sha256("|".join(parts).encode()).hexdigest()[:8]
    return f"{socket.gethostname()}~{tag}" if parts else socket.gethostname()


def _read_text(path: str) -> str:
    with open(path) as file:
        return file.read()


def worker_alive(worker: str) -> bool | None:
    """Whether the worker process is alive; None when it ran elsewhere (another host, container
    or PID namespace, or a flowyard that named workers by host alone): then it cannot tell."""
    try:
        host, pid, started, _ = worker.rsplit(":", 3)
    except ValueError:
        return None
    if host != process_space():
        return None
    try:
        return int(psutil.Process(int(pid)).create_time()) == int(started)
    except (psutil.Error, ValueError):
        return False


def _refuse_unstorable(value: Any, what: str) -> None:
    """Refuse text PostgreSQL cannot store anywhere in a string or JSON value, naming the task
    and the fix: its own errors (UntranslatableCharacter, psycopg's UnicodeEncodeError) name
    neither."""
    if has_nul(value):
        raise UserError(
            f"{what} contains a NUL character (\\u0000), which PostgreSQL cannot store; "
            "remove it or encode that value (e.g. as base64)"
        )
    if any_scalar(value, lambda item: isinstance(item, str) and not is_utf8(item)):
        raise UserError(
            f"{what} is not valid UTF-8 (bytes in another encoding, or an unpaired \\ud800-\\udfff "
            "escape), which PostgreSQL cannot store; give it as UTF-8 text"
        )


MAX_PAYLOAD_DEPTH = 256
"""Levels of objects and arrays a payload may nest. Python's JSON encoder recurses once per
level, so a payload nested near its recursion limit (~1,000) was a RecursionError traceback
when the task was stored, or later, in the deeper stack of the Prefect task that encodes the
agent's envelope; no task needs more than a few levels."""


def _refuse_non_finite(value: Any, what: str) -> None:
    if has_non_finite(value):
        raise UserError(
            f"{what} holds NaN, Infinity or a number beyond ±1.8e308 (read as Infinity), which "
            "PostgreSQL cannot store as JSON; use null or a string instead"
        )


def _refuse_non_json(value: Any, what: str) -> None:
    """Refuse a value JSON has no type for (bytes, a set, a datetime), which only a Python caller
    can send (a flow or :func:`create_task` called directly): encoding it failed the insert with a
    TypeError naming neither the task nor the fix."""
    if (odd := non_json_type(value)) is not None:
        raise UserError(
            f"{what} holds a {odd} value, which JSON has no type for; give text (bytes as base64, "
            "for example), a number, true/false, null, a list or an object"
        )


_NAME_THE_AGENT = "name the agent template that runs it, such as 'reference' (--agent-type / agent_type)"
"""How to fix an agent type no worker can have a template for."""

MAX_AGENT_TYPE_LENGTH = 63
"""Characters an agent type may have. It names a template, as a program name does, and is shown
in a column of ``queue list`` and ``queue metrics`` and in every task run's name
(``agent-<id>-<type>``): a longer one is a mistake (a description given as the type, a pasted
command line), and the task would wait for a template nobody writes."""


def create_task(url: str, task: NewTask) -> int:
    """Insert a task (``pending``, or ``draft``) and its ``blocks`` edges; returns its id.

    A task whose agent type no template can have (:func:`check_agent_type`; an empty one: no
    worker has a template for it) is refused: it would wait in the queue for good. A pending one
    created after a dependency that keeps it from running (cancelled, failed, draft, in review)
    gets its reason at once, as a cancel gives one: ``queue list`` showed it plain ``pending``,
    as if it would run next, until the next queue run's end."""
    check_agent_type(task.agent_type, f"the agent type of task {task.title!r}", _NAME_THE_AGENT)
    for field_name, value in (
        ("title", task.title),
        ("description", task.description),
        ("agent type", task.agent_type),
        ("working directory", task.workdir),
        ("payload", task.payload),
    ):
        _refuse_unstorable(value, f"the {field_name} of task {task.title!r}")
    _refuse_non_json(task.payload, f"the payload of task {task.title!r}")
    _refuse_non_finite(task.payload, f"the payload of task {task.title!r}")
    if (depth := nesting_depth(task.payload)) > MAX_PAYLOAD_DEPTH:
        raise UserError(
            f"the payload of task {task.title!r} nests objects or arrays {depth} levels deep; "
            f"at most {MAX_PAYLOAD_DEPTH} are accepted: flatten it"
        )
    with _connection(url, atomic=True) as conn:
        if task.blocked_by:
            found = {
                r[0]
                for r in conn.execute(
                    "SELECT id FROM flowyard.agent_tasks WHERE id = ANY(%s)", (list(task.blocked_by),)
                )
            }
            missing = sorted(set(task.blocked_by) - found)
            if missing:
                raise UserError(
                    f"unknown dependency task id(s) {missing}; list existing tasks with `flowyard queue list`"
                )
        row = conn.execute(
            """
            INSERT INTO flowyard.agent_tasks
                (title, type, description, priority, status, agent_type, payload, workdir, requires_review)
            VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING id
            """,
            (
                task.title,
                task.type,
                task.description,
                task.priority,
                "draft" if task.draft else "pending",
                task.agent_type,
                Jsonb(task.payload),
                task.workdir,
                task.requires_review,
            ),
        ).fetchone()
        assert row is not None
        conn.cursor().executemany(
            "INSERT INTO flowyard.agent_task_blocks (blocker_id, blocked_id) VALUES (%s, %s)",
            [(blocker, row[0]) for blocker in sorted(set(task.blocked_by))],
        )
        if task.blocked_by and not task.draft:
            _mark_unrunnable(conn)
    return int(row[0])


def check_agent_type(agent_type: str, what: str, fix: str) -> None:
    """One rule for a task's agent type and a template's, so every template can run a task and
    every task can have a template: not empty; no control character (a column of ``queue list``,
    as a title is); no invisible format character (a zero-width space or a byte order mark pasted
    with the name: ``coder\\u200b`` looks like ``coder`` in every listing, and no template named
    ``coder`` runs it); no leading or trailing space (``"coder "``, likewise); at most
    :data:`MAX_AGENT_TYPE_LENGTH` characters. ``what`` names the value in the one-line error,
    ``fix`` says what to do."""
    if not agent_type.strip():
        raise UserError(f"{what} is empty; {fix}")
    _refuse_line_breaking(agent_type, what, fix)
    if (invisible := next((c for c in agent_type if unicodedata.category(c) == "Cf"), None)) is not None:
        raise UserError(
            f"{what} {agent_type!r} holds the invisible character U+{ord(invisible):04X} "
            f"({unicodedata.name(invisible, 'unnamed')}); {fix}"
        )
    if agent_type != agent_type.strip():
        raise UserError(f"{what} {agent_type!r} starts or ends with a space; {fix}")
    if len(agent_type) > MAX_AGENT_TYPE_LENGTH:
        raise UserError(
            f"{what} has {len(agent_type)} characters; at most {MAX_AGENT_TYPE_LENGTH} are accepted: {fix}"
        )


def no_such_task(task_id: int) -> UserError:
    """The error for a task id no queue has, the same from the CLI and the flows. Ids start at 1,
    so for 0 or below it also says that ids are positive: the CLI says it without a query."""
    why = ": task ids are positive integers" if task_id < 1 else ""
    return UserError(f"no agent task {task_id}{why}; list tasks with `flowyard queue list`")


def get_task(url: str, task_id: int) -> AgentTask:
    with _connection(url) as conn:
        row = (
            conn.cursor(row_factory=dict_row)
            .execute(_SELECT_TASKS + sql.SQL(" WHERE t.id = %s"), (task_id,))
            .fetchone()
        )
    if row is None:
        raise no_such_task(task_id)
    return _task(row)


def check_status(status: str | None) -> None:
    """Refuse a status no task has (None: any). Callers check it before they connect, too: with
    the database unreachable, ``queue list --status bogus`` reported the connection error."""
    if status is not None and status not in STATUSES:
        raise UserError(f"unknown status {status!r}; use one of {', '.join(STATUSES)}")


def list_tasks(url: str, status: str | None = None) -> list[AgentTask]:
    """The queue (or the tasks in one ``status``), oldest first."""
    check_status(status)
    with _connection(url) as conn:
        rows = conn.cursor(row_factory=dict_row).execute(
            _SELECT_TASKS + sql.SQL(" WHERE %(s)s::text IS NULL OR t.status = %(s)s ORDER BY t.id"),
            {"s": status},
        ).fetchall()
    return [_task(r) for r in rows]


def _transition(url: str, task_id: int, allowed: tuple[str, ...], to: str, verb: str, reset: bool) -> str:
    """Move a task from one of ``allowed`` to ``to``; a one-line UserError says why not otherwise.
    Returns the task's new status: ``draft`` instead of ``pending`` for a task cancelled as a
    draft (a cancel records the status it came from in ``cancelled_from``), so a retry does not
    release a draft nobody submitted.

    Its dependents' reasons are recomputed in the same transaction: ``queue list`` went on
    telling to submit a draft just submitted, or that a retried dependency failed, until the
    next queue run. The task's own reason goes with the move (recomputed if it is pending): a
    blocked task, cancelled, kept saying that a dependency failed after it was retried and done.

    The row is locked and read before it is moved: an UPDATE alone judges ``status`` by the row
    as its statement began, so a cancel racing a retry that had just committed was refused with
    the status the retry left ("cannot cancel task 2: it is pending (possible from: ...,
    pending, ...)"), and the task stayed queued though the user cancelled it."""
    with _connection(url, atomic=True) as conn:
        current = conn.execute(
            "SELECT status, cancelled_from, blocked_reason FROM flowyard.agent_tasks WHERE id = %s FOR UPDATE",
            (task_id,),
        ).fetchone()
        if current is None:
            raise no_such_task(task_id)
        status, cancelled_from, reason = current
        if status not in allowed:
            # A pending task a dependency holds up is the one a user retries after seeing its
            # dependency fail: "it is pending" alone read as if it would run next.
            held = f"; it waits for its dependencies ({printable(reason)})" if reason else ""
            raise UserError(
                f"cannot {verb} task {task_id}: it is {status} (possible from: {', '.join(allowed)}){held}"
            )
        moved_to = "draft" if to == "pending" and cancelled_from == "draft" else to
        conn.execute(
            """
            UPDATE flowyard.agent_tasks
               SET status = %(moved_to)s,
                   cancelled_from = CASE WHEN %(to)s = 'cancelled' THEN status END,
                   updated_at = now(),
                   error = CASE WHEN %(reset)s THEN NULL ELSE error END,
                   blocked_reason = NULL,
                   worker = CASE WHEN %(reset)s THEN NULL ELSE worker END,
                   agent_pgid = CASE WHEN %(reset)s THEN NULL ELSE agent_pgid END,
                   finished_at = CASE WHEN %(to)s IN ('completed', 'cancelled') THEN now() ELSE finished_at END
             WHERE id = %(id)s
            """,
            {"to": to, "moved_to": moved_to, "reset": reset, "id": task_id},
        )
        _mark_unrunnable(conn)
    return moved_to


def cancel_task(url: str, task_id: int) -> str:
    """Cancel a task; a running one is stopped gracefully by its worker at the next heartbeat."""
    return _transition(
        url, task_id, ("draft", "pending", "in_progress", "review"), "cancelled", "cancel", reset=False
    )


def retry_task(url: str, task_id: int) -> str:
    """Put a failed or cancelled task back in the queue, or in ``draft`` if it was cancelled as a
    draft; it resumes from its last checkpoint. Returns its new status. A task cancelled in
    ``review`` is queued and its agent runs again: cancelling in review is how a result is
    rejected, and this is the way to have the work redone.

    Refused while a cancelled attempt is still stopping its agent: queued again at once, the
    task could be claimed and a second agent started beside the first."""
    stopping = _stopping_attempt(url, task_id)
    if stopping is not None:
        attempt, worker = stopping
        raise UserError(
            f"cannot retry task {task_id} yet: its cancelled attempt {attempt} is still stopping its agent "
            f"(worker {worker}); retry in a few seconds"
        )
    return _transition(url, task_id, ("failed", "cancelled"), "pending", "retry", reset=True)


def _stopping_attempt(url: str, task_id: int) -> tuple[int, str] | None:
    """(attempt, worker) of a cancelled task's attempt whose agent may still run: its
    ``agent_runs`` row is open (the worker closes it only once the agent's group is gone), its
    worker is not known dead and the attempt heartbeat is fresher than the lease that worker runs
    with (the default for attempts recorded before leases were). The worker keeps heartbeating a
    cancelled attempt until it has stopped its agent."""
    with _connection(url) as conn:
        row = conn.execute(
            """
            SELECT r.attempt, r.worker FROM flowyard.agent_runs r
              JOIN flowyard.agent_tasks t ON t.id = r.task_id
             WHERE r.task_id = %s AND r.outcome IS NULL AND t.status = 'cancelled'
               AND t.heartbeat_at >= now() - make_interval(secs => coalesce(r.lease_seconds, %s))
             ORDER BY r.id DESC LIMIT 1
            """,
            (task_id, DEFAULT_LEASE_SECONDS),
        ).fetchone()
    if row is None or worker_alive(row[1]) is False:
        return None
    return int(row[0]), str(row[1])


def in_review(url: str, task_ids: Collection[int]) -> set[int]:
    """Which of ``task_ids`` wait in ``review``: an attempt that completed one such task left it
    there, not ``completed``."""
    if not task_ids:
        return set()
    with _connection(url) as conn:
        rows = conn.execute(
            "SELECT id FROM flowyard.agent_tasks WHERE id = ANY(%s::bigint[]) AND status = 'review'",
            (list(task_ids),),
        ).fetchall()
    return {int(r[0]) for r in rows}


def submit_task(url: str, task_id: int) -> str:
    """Release a draft into the queue."""
    return _transition(url, task_id, ("draft",), "pending", "submit", reset=False)


def approve_task(url: str, task_id: int) -> str:
    """Accept a task waiting in review as completed (which unblocks its dependents)."""
    return _transition(url, task_id, ("review",), "completed", "approve", reset=False)


_CLAIM = sql.SQL(
    """
    WITH ready AS (
        SELECT t.id FROM flowyard.agent_tasks t
         WHERE t.status = 'pending'
           AND (%s::text[] IS NULL OR t.agent_type = ANY(%s::text[]))
           AND NOT t.id = ANY(%s::bigint[])
           AND NOT EXISTS (
               SELECT 1 FROM flowyard.agent_task_blocks b
                 JOIN flowyard.agent_tasks d ON d.id = b.blocker_id
                WHERE b.blocked_id = t.id AND d.status <> 'completed')
         ORDER BY t.priority_rank, t.id
         LIMIT %s
         FOR UPDATE OF t SKIP LOCKED
    ), claimed AS (
        UPDATE flowyard.agent_tasks t
           SET status = 'in_progress', worker = %s, heartbeat_at = now(), updated_at = now(),
               claims = t.claims + 1, lease_seconds = %s,
               blocked_reason = NULL, error = NULL, started_at = coalesce(t.started_at, now())
          FROM ready WHERE t.id = ready.id
        RETURNING t.*
    )
    SELECT {columns} FROM claimed t ORDER BY t.priority_rank, t.id
    """
).format(columns=_TASK_COLUMNS)
"""The claim of :func:`claim_ready`, walking the ready index (``agent_tasks_ready``) in its order
once the tables have statistics (:func:`analyse_if_stale`)."""


def claim_ready(
    url: str,
    worker: str,
    limit: int,
    agent_types: Collection[str] | None = None,
    exclude: Collection[int] = (),
    *,
    lease_seconds: float = DEFAULT_LEASE_SECONDS,
) -> list[AgentTask]:
    """Claim up to ``limit`` ready tasks, highest priority first, oldest first within a priority.

    With ``agent_types``, only tasks of those types: a worker never takes a task it has no
    agent for (the scheduled drain has the built-in types only; a ``queue run`` with an
    agents file serves the rest).

    ``FOR UPDATE SKIP LOCKED`` makes concurrent claimers skip each other's rows; a row
    another worker claimed and committed no longer matches ``status = 'pending'`` on
    re-check, so no task is ever claimed twice. One statement (one round trip) claims and
    returns the rows. ``exclude`` are the tasks the claimer still runs: one retried while its
    previous attempt winds down waits for the next claim instead of getting a second attempt.

    Each claim is counted (``claims``, which the claim's attempts record) and records the lease
    the worker runs with: recovery judges the worker's silence by it, also before its first
    attempt starts, and tells this claim's attempts from an earlier one's (:func:`release_task`).
    """
    if limit <= 0:
        return []
    types = None if agent_types is None else list(agent_types)
    with _connection(url) as conn:
        rows = conn.cursor(row_factory=dict_row).execute(
            _CLAIM,
            (types, types, list(exclude), limit, worker, lease_seconds),
        ).fetchall()
    return [_task(r) for r in rows]


_UNPLANNABLE_TABLES = """
    SELECT s.schemaname, s.relname,
           pg_has_role(d.datdba, 'USAGE')
           OR CASE WHEN current_setting('server_version_num')::int >= 170000
                   THEN has_table_privilege(c.oid, 'MAINTAIN') ELSE pg_has_role(c.relowner, 'USAGE') END
      FROM pg_stat_user_tables s JOIN pg_class c ON c.oid = s.relid
      JOIN pg_database d ON d.datname = current_database()
     WHERE s.relid IN ('flowyard.agent_tasks'::regclass, 'flowyard.agent_task_blocks'::regclass)
       AND (coalesce(s.last_analyze, s.last_autoanalyze) IS NULL
            OR s.n_mod_since_analyze > current_setting('autovacuum_analyze_threshold')::float8
               + current_setting('autovacuum_analyze_scale_factor')::float8 * greatest(c.reltuples, 0))
     ORDER BY s.relname
"""
"""The queue tables :func:`analyse_if_stale` would analyse, and whether this role may: the
database's owner may (its tables are never shared), else, from PostgreSQL 17, a role with the
``MAINTAIN`` privilege (the owner's, unless revoked; ``pg_maintain``'s members), and before 17 the
table's owner; a superuser always. ``MAINTAIN`` is only looked up on a server that knows it."""


@dataclass(frozen=True)
class Statistics:
    """What :func:`analyse_if_stale` did: the tables it analysed, and those it needed to but the
    role may not analyse, with what to do about them (None when there are none)."""

    analysed: list[str]
    not_permitted: list[str]
    advice: str | None


def analyse_if_stale(url: str) -> Statistics:
    """ANALYZE the tables :func:`claim_ready` plans over when they have no statistics, or ones
    autovacuum would now renew. Without them (a queue just filled by many ``queue create`` or a
    bulk insert, or filled since it was analysed empty, as a new install's first drain leaves it)
    the planner guessed that almost no task is pending and sorted every pending task for each claim
    (8 ms a claim at 5,000 tasks, 75 ms at 50,000, against 1 ms walking the ready index) until
    autovacuum got to them, about a minute later. Once per run, before its first claim;
    ``SKIP_LOCKED`` leaves a table that autovacuum (or another run) is analysing to it.

    A table the role may not analyse (it does not own it, nor on PostgreSQL 17+ has ``MAINTAIN``
    on it) is left out and reported: the server only warned and skipped it, and the run said it
    had analysed it, every run, while its claims stayed slow."""
    with _connection(url) as conn:
        rows = conn.execute(_UNPLANNABLE_TABLES).fetchall()
        permitted = [(str(schema), str(name)) for schema, name, may in rows if may]
        if permitted:
            names = sql.SQL(", ").join(sql.Identifier(*table) for table in permitted)
            conn.execute(sql.SQL("ANALYZE (SKIP_LOCKED) {}").format(names))
        maintain = conn.info.server_version >= 170000
        role = sql.Identifier(conn.info.user).as_string(conn)
    refused = [f"{schema}.{name}" for schema, name, may in rows if not may]
    advice = _analyse_advice(refused, role, maintain=maintain) if refused else None
    return Statistics([".".join(table) for table in permitted], refused, advice)


def _analyse_advice(tables: list[str], role: str, *, maintain: bool) -> str:
    """The one line saying that ``role`` (quoted as SQL needs it) may not analyse ``tables``, and
    what to do about it; ``maintain``: the server has the ``MAINTAIN`` privilege (PostgreSQL 17+)."""
    names = ", ".join(tables)
    if maintain:
        fix = f"GRANT MAINTAIN ON TABLE {names} TO {role}"
    else:
        fix = "run the worker as their owner (before PostgreSQL 17 only it, the database owner or a superuser may)"
    return (
        f"could not analyse {names}: role {role} may not; claims sort every pending task until "
        f"autovacuum analyses them (within about a minute); to let runs do it: {fix}"
    )


def waiting_for_agents(url: str, agent_types: Collection[str]) -> dict[int, str]:
    """Pending tasks of agent types outside ``agent_types``, which this worker left for another.

    Returns {task id: reason}, so a drain that skipped them says why instead of going quiet.
    Tasks a dependency holds up (a ``blocked_reason`` from :func:`unrunnable`) are left out: no
    agent would run them yet, and telling the user to run one with an agents file hid a failed
    dependency (``queue run`` printed this reason while counting the task as blocked).
    """
    with _connection(url) as conn:
        rows = conn.execute(
            "SELECT id, agent_type FROM flowyard.agent_tasks "
            "WHERE status = 'pending' AND blocked_reason IS NULL AND NOT agent_type = ANY(%s::text[]) "
            "ORDER BY id",
            (list(agent_types),),
        ).fetchall()
    known = ", ".join(sorted(agent_types))
    return {
        int(task_id): f"waiting: no {agent_type!r} agent in this run (it has {known}); "
        "run `flowyard queue run --agents-file FILE` with one"
        for task_id, agent_type in rows
    }


@dataclass(frozen=True)
class Attempt:
    """A started attempt: its number, its ``agent_runs`` id, and the checkpoint to resume from."""

    number: int
    run_id: int
    checkpoint: dict[str, Any] | None


class TaskNotHeld(UserError):
    """The worker no longer holds the task: it was cancelled, retried or reclaimed meanwhile."""


def start_attempt(
    url: str, task_id: int, worker: str, flow_run_id: str | None, *, lease_seconds: float = DEFAULT_LEASE_SECONDS
) -> Attempt:
    """Count a new attempt of a task this worker holds, with the lease the worker runs with and the
    claim it runs in. The task's last checkpoint comes back from the same statement: a retry
    resumes from whatever the failed attempt saved.

    An earlier attempt of the task that this worker left open is closed as ``interrupted``,
    superseded: a start whose answer was lost with the connection and was made again
    (:func:`riding_out`), or an attempt whose end could not be written before the retry, stayed
    open for good beside its successor. It held up ``queue retry`` of the cancelled task as an
    agent still stopping, and a later run's recovery closed it as if the worker were gone. A
    worker runs one attempt of a task at a time, so that attempt's agent is gone (another
    worker's attempts are recovery's: it also ends what their agents left)."""
    with _connection(url, durable=False) as conn:
        row = conn.execute(
            """
            WITH t AS (
                UPDATE flowyard.agent_tasks SET attempts = attempts + 1, heartbeat_at = now(), updated_at = now()
                 WHERE id = %(task)s AND worker = %(worker)s AND status = 'in_progress'
                RETURNING id, attempts, claims, agent_type, last_checkpoint
            ), r AS (
                INSERT INTO flowyard.agent_runs (task_id, attempt, claim, agent_type, worker, flow_run_id, lease_seconds)
                SELECT id, attempts, claims, agent_type, %(worker)s, %(flow_run)s, %(lease)s FROM t
                RETURNING attempt, id
            ), superseded AS (
                UPDATE flowyard.agent_runs o
                   SET outcome = 'interrupted', finished_at = now(),
                       error = format('superseded by attempt %%s, started by the same worker', t.attempts),
                       seconds = extract(epoch FROM now() - o.started_at)
                  FROM t
                 WHERE o.task_id = t.id AND o.worker = %(worker)s AND o.outcome IS NULL
            )
            SELECT r.attempt, r.id, t.last_checkpoint FROM r, t
            """,
            {"task": task_id, "worker": worker, "flow_run": flow_run_id, "lease": lease_seconds},
        ).fetchone()
        if row is None:  # rare: one more statement only then
            _let_go_of_unstarted(conn, task_id, worker)
    if row is None:
        raise TaskNotHeld(f"task {task_id} is no longer held by this worker (cancelled or reclaimed)")
    return Attempt(int(row[0]), int(row[1]), _resumable(row[2]))


def _let_go_of_unstarted(conn: psycopg.Connection, task_id: int, worker: str) -> None:
    """Clear ``worker``'s hold on a task cancelled after it claimed it and before an attempt
    started, while no attempt of its is open. The cancel leaves the hold for an attempt stopping
    its agent (:func:`_let_go_of_cancelled` clears it once that attempt is closed); with none
    started, nothing else ever cleared it, and the cancelled task went on naming the worker."""
    conn.execute(
        """
        UPDATE flowyard.agent_tasks t SET worker = NULL, agent_pgid = NULL, updated_at = now()
         WHERE t.id = %s AND t.worker = %s AND t.status = 'cancelled'
           AND NOT EXISTS (SELECT 1 FROM flowyard.agent_runs r
                            WHERE r.task_id = t.id AND r.worker = t.worker AND r.outcome IS NULL)
        """,
        (task_id, worker),
    )


def _resumable(checkpoint: dict[str, Any] | None) -> dict[str, Any] | None:
    """The checkpoint an attempt resumes from: none when the task's last one holds no state, the
    ``graceful_shutdown`` record of a stop that came before the agent saved any. Handed that record,
    the agent got a checkpoint whose state was ``{}`` and looked in it for what it never saved;
    ``null`` tells it to start afresh, as on a first attempt. (Older flowyard stored ``{}`` for
    such a stop: migration ``agents_0006`` made those ``null``.)"""
    return checkpoint if checkpoint is not None and checkpoint["state"] is not None else None


def set_agent_pgid(url: str, task_id: int, worker: str, attempt: int, pgid: int | None) -> None:
    with _connection(url, durable=False) as conn:
        conn.execute(
            "UPDATE flowyard.agent_tasks SET agent_pgid = %s WHERE id = %s AND worker = %s AND attempts = %s",
            (pgid, task_id, worker, attempt),
        )


def heartbeat(url: str, task_id: int, worker: str, attempt: int) -> bool:
    """Refresh the claim of one attempt; False when the task was cancelled, taken away or
    superseded by a newer attempt, so the agent must stop.

    Every write of an attempt is fenced by (worker, attempt number): a worker that claims a
    task again starts a new attempt, and the old one's writes no longer match. A cancelled
    attempt's heartbeat still refreshes ``heartbeat_at`` while its agent stops, which is how
    :func:`retry_task` tells that it is still alive."""
    with _connection(url, durable=False) as conn:
        row = conn.execute(
            """
            UPDATE flowyard.agent_tasks SET heartbeat_at = now()
             WHERE id = %s AND worker = %s AND attempts = %s AND status IN ('in_progress', 'cancelled')
            RETURNING status = 'in_progress'
            """,
            (task_id, worker, attempt),
        ).fetchone()
    return row is not None and bool(row[0])


def record_checkpoint(
    url: str, task_id: int, worker: str, attempt: int, state: dict[str, Any] | None, kind: str = "agent"
) -> bool:
    """Append to the checkpoint history and make it the task's last checkpoint, in one statement.
    A ``state`` of None (JSON null) records that the attempt stopped before its agent saved any.

    Only while ``worker`` still holds the task with this attempt (see :func:`heartbeat`):
    returns False, storing nothing, when the attempt was superseded, so a stale agent's
    state (or its ``graceful_shutdown`` checkpoint) never overwrites the current holder's."""
    _refuse_unstorable(state, f"the checkpoint of task {task_id} attempt {attempt}")
    value = {"attempt": attempt, "kind": kind, "state": state}
    with _connection(url) as conn:
        stored = conn.execute(
            """
            WITH t AS (
                UPDATE flowyard.agent_tasks SET last_checkpoint = %s, updated_at = now()
                 WHERE id = %s AND worker = %s AND attempts = %s RETURNING id
            )
            INSERT INTO flowyard.agent_checkpoints (task_id, attempt, kind, state)
            SELECT id, %s, %s, %s FROM t
            """,
            (Jsonb(value), task_id, worker, attempt, attempt, kind, Jsonb(state)),
        ).rowcount
    return stored == 1


def checkpoint_history(url: str, task_id: int) -> list[dict[str, Any]]:
    with _connection(url) as conn:
        return conn.cursor(row_factory=dict_row).execute(
            "SELECT attempt, kind, state, created_at FROM flowyard.agent_checkpoints WHERE task_id = %s ORDER BY id",
            (task_id,),
        ).fetchall()


CANCELLED_AS_IT_COMPLETED = "its task was cancelled as the agent completed; the agent's result was not taken"
"""The error of an attempt whose agent completed after its task was cancelled (:func:`finish_attempt`)."""


def finish_attempt(
    url: str,
    run_id: int,
    worker: str,
    outcome: Outcome,
    *,
    result: dict[str, Any] | None = None,
    error: str | None = None,
    final: bool = False,
) -> str | None:
    """Close an attempt and move its task: completed → ``completed`` (or ``review``);
    interrupted → back to ``pending`` (resumable); failed/timeout → stays claimed for a retry.

    ``final`` says that the run gives up after this failure (no retry left, or not worth one),
    so a worker dying before :func:`fail_task` does not cost the run's limit: see
    :func:`release_task`. Returns the task's new status, or None when this attempt no longer
    held the task.

    An attempt already closed is rewritten only while it still holds its task (its own end, tried
    again after the answer was lost): one that another run's recovery closed (``interrupted``, its
    worker silent past the lease) or that its worker's next attempt superseded keeps that end. A
    worker back from such a silence rewrote it with its agent's outcome, ``completed`` for a task
    pending again or running elsewhere, which counted a finished attempt the task never got.

    A completion whose task was cancelled first (``queue cancel`` committed between the agent's
    exit and this end, before a heartbeat could stop the agent) closes the attempt as
    ``interrupted``, as an agent the cancel stopped is: the task stays ``cancelled``, as the cancel
    told the user and the task's dependents, and the agent's last checkpoint is what ``queue retry``
    resumes from. It was recorded ``completed`` beside a cancelled task, a finished attempt in the
    metrics whose result the task never took. The task's row is locked before the attempt is
    closed, so a cancel committing while this statement runs is seen by both halves of it.
    """
    with _connection(url) as conn:
        row = conn.execute(
            """
            WITH h AS (
                SELECT t.status FROM flowyard.agent_runs o
                  JOIN flowyard.agent_tasks t ON t.id = o.task_id AND t.attempts = o.attempt
                 WHERE o.id = %(run)s AND t.worker = %(worker)s
                   FOR UPDATE OF t
            ), r AS (
                UPDATE flowyard.agent_runs r
                   SET finished_at = now(),
                       outcome = CASE WHEN %(outcome)s = 'completed' AND h.status = 'cancelled'
                                      THEN 'interrupted' ELSE %(outcome)s END,
                       error = CASE WHEN %(outcome)s = 'completed' AND h.status = 'cancelled'
                                    THEN %(cancelled)s ELSE %(error)s END,
                       final = %(final)s,
                       seconds = extract(epoch FROM now() - r.started_at)
                  FROM (SELECT 1) one LEFT JOIN h ON true
                 WHERE r.id = %(run)s AND (r.outcome IS NULL OR h.status = 'in_progress')
                RETURNING r.task_id, r.attempt
            )
            UPDATE flowyard.agent_tasks t
               SET status = CASE %(outcome)s
                                WHEN 'completed' THEN CASE WHEN t.requires_review THEN 'review' ELSE 'completed' END
                                WHEN 'interrupted' THEN 'pending'
                                ELSE t.status END,
                   result = coalesce(%(result)s, t.result),
                   error = %(error)s,
                   worker = CASE WHEN %(outcome)s IN ('completed', 'interrupted') THEN NULL ELSE t.worker END,
                   agent_pgid = NULL, updated_at = now(),
                   finished_at = CASE WHEN %(outcome)s = 'completed' THEN now() ELSE t.finished_at END
              FROM r
             WHERE t.id = r.task_id AND t.worker = %(worker)s AND t.attempts = r.attempt
               AND t.status = 'in_progress'
            RETURNING t.status
            """,
            {
                "outcome": outcome,
                "error": error,
                "run": run_id,
                "result": Jsonb(result) if result is not None else None,
                "worker": worker,
                "final": final,
                "cancelled": CANCELLED_AS_IT_COMPLETED,
            },
        ).fetchone()
        if row is None:  # rare: not this attempt's task any more; one more statement only then
            _let_go_of_cancelled(conn, run_id, worker)
    return row[0] if row else None


def attempt_end(url: str, run_id: int) -> tuple[str | None, str | None, bool]:
    """The outcome recorded for attempt ``run_id`` (None while it is open), its task's status now,
    and whether the task is where that outcome puts it, still this attempt's: ``completed`` or
    ``review`` after a completion, ``pending`` after an interruption, held by the attempt's worker
    after a failure. They tell whose end it is, this worker's or a recovery's, and whether the task
    moved on without it: cancelled and retried while the attempt was open, its end closed the
    attempt but left the task pending (or claimed elsewhere). (None, None, False) for a task deleted
    meanwhile."""
    with _connection(url) as conn:
        row = conn.execute(
            """
            SELECT r.outcome, t.status,
                   t.attempts = r.attempt AND CASE r.outcome
                       WHEN 'completed' THEN t.status IN ('completed', 'review')
                       WHEN 'interrupted' THEN t.status = 'pending'
                       ELSE t.status = 'in_progress' AND t.worker = r.worker END
              FROM flowyard.agent_runs r JOIN flowyard.agent_tasks t ON t.id = r.task_id
             WHERE r.id = %s
            """,
            (run_id,),
        ).fetchone()
    return (row[0], row[1], bool(row[2])) if row is not None else (None, None, False)


def _let_go_of_cancelled(conn: psycopg.Connection, run_id: int, worker: str) -> None:
    """Clear ``worker``'s hold on the task of attempt ``run_id`` if it was cancelled meanwhile, once
    that attempt is closed (its agent gone). The cancel leaves the hold so the stopping attempt can
    still heartbeat and record its ``graceful_shutdown`` checkpoint; kept after that, a cancelled
    task went on naming a worker and the process group of an agent long gone."""
    conn.execute(
        """
        UPDATE flowyard.agent_tasks t SET worker = NULL, agent_pgid = NULL, updated_at = now()
          FROM flowyard.agent_runs r
         WHERE r.id = %s AND t.id = r.task_id AND t.worker = %s AND t.status = 'cancelled'
        """,
        (run_id, worker),
    )


def fail_task(url: str, task_id: int, worker: str, error: str) -> None:
    """Give up on a task after its last retry (only if this worker still holds it)."""
    with _connection(url) as conn:
        conn.execute(
            """
            UPDATE flowyard.agent_tasks
               SET status = 'failed', error = %s, worker = NULL, agent_pgid = NULL,
                   finished_at = now(), updated_at = now()
             WHERE id = %s AND worker = %s AND status = 'in_progress'
            """,
            (error, task_id, worker),
        )


def release_task(url: str, task_id: int, worker: str, reason: str) -> str | None:
    """Hand a claimed task back to ``pending`` (keeping its checkpoint) so a later run resumes it,
    and close ``worker``'s open attempts of it as interrupted. Those are closed also when the task
    is no longer held (cancelled, or retried since): a worker that died stopping a cancelled
    agent left its attempt open, and nothing else would ever close it.

    A task whose current attempt was its run's last (failed, ``final``) is failed instead, with
    that attempt's error and ``reason``: its worker stopped between that failure and
    :func:`fail_task`, and handing it back would give it a fresh set of retries (a run's
    ``retries`` means at most retries + 1 attempts; ``queue retry`` is how a person grants more).
    Only an attempt of the current claim counts: after a ``queue retry`` the same worker may claim
    the task again and stop before its next attempt, while the attempt that gave up keeps the
    task's attempt number.

    Returns the task's new status (``pending`` or ``failed``), or None when it was not held."""
    with _connection(url, atomic=True) as conn:
        row = conn.execute(
            """
            WITH last AS (
                SELECT format('attempt %%s, the last of its run, failed: %%s; %%s', r.attempt, r.error, %(reason)s::text)
                       AS error
                  FROM flowyard.agent_runs r JOIN flowyard.agent_tasks t ON t.id = r.task_id
                 WHERE r.task_id = %(task)s AND r.worker = %(worker)s AND r.attempt = t.attempts
                   AND r.claim = t.claims AND r.final
            )
            UPDATE flowyard.agent_tasks t
               SET status = CASE WHEN last.error IS NULL THEN 'pending' ELSE 'failed' END,
                   error = coalesce(last.error, %(reason)s),
                   finished_at = CASE WHEN last.error IS NULL THEN t.finished_at ELSE now() END,
                   worker = NULL, agent_pgid = NULL, updated_at = now()
              FROM (SELECT 1) one LEFT JOIN last ON true
             WHERE t.id = %(task)s AND t.worker = %(worker)s AND t.status = 'in_progress'
            RETURNING t.status
            """,
            {"reason": reason, "task": task_id, "worker": worker},
        ).fetchone()
        closed = conn.execute(
            """
            UPDATE flowyard.agent_runs
               SET outcome = 'interrupted', finished_at = now(), error = %s,
                   seconds = extract(epoch FROM now() - started_at)
             WHERE task_id = %s AND worker = %s AND outcome IS NULL
            RETURNING id
            """,
            (reason, task_id, worker),
        ).fetchall()
        for (run_id,) in closed if row is None else ():
            _let_go_of_cancelled(conn, run_id, worker)
    return None if row is None else str(row[0])


@dataclass(frozen=True)
class StaleTask:
    id: int
    worker: str
    dead: bool
    """Known dead (this host, process gone), not merely silent past the lease."""


def stale_tasks(url: str, lease_seconds: float) -> list[StaleTask]:
    """In-progress tasks, and tasks with an open attempt, whose worker is dead (same host) or
    silent for longer than its lease: the one it claimed the task (or started the attempt) with,
    since it heartbeats by that one; ``lease_seconds`` for a claim or attempt recorded without one.

    The open attempts matter for tasks no longer in progress: a worker killed while it stopped
    the agent of a cancelled task left that attempt open (and the task may have been retried
    since), so only recovery can end what the agent left and close the attempt."""
    with _connection(url) as conn:
        rows = conn.execute(
            """
            SELECT id, worker, bool_or(lapsed) FROM (
                SELECT id, worker,
                       heartbeat_at < now() - make_interval(secs => coalesce(lease_seconds, %(lease)s)) AS lapsed
                  FROM flowyard.agent_tasks WHERE status = 'in_progress'
                UNION ALL
                SELECT r.task_id, r.worker,
                       t.heartbeat_at < now() - make_interval(secs => coalesce(r.lease_seconds, %(lease)s))
                  FROM flowyard.agent_runs r JOIN flowyard.agent_tasks t ON t.id = r.task_id
                 WHERE r.outcome IS NULL
            ) held GROUP BY id, worker ORDER BY id
            """,
            {"lease": lease_seconds},
        ).fetchall()
    stale = [StaleTask(row[0], row[1] or "", row[1] is not None and worker_alive(row[1]) is False) for row in rows]
    return [task for task, row in zip(stale, rows, strict=True) if row[1] is None or row[2] or task.dead]


def worker_flow_runs(url: str, worker: str) -> list[uuid.UUID]:
    """The Prefect flow runs in which ``worker`` ran attempts: its ``queue run`` flow runs."""
    with _connection(url) as conn:
        rows = conn.execute(
            "SELECT DISTINCT flow_run_id FROM flowyard.agent_runs WHERE worker = %s AND flow_run_id IS NOT NULL",
            (worker,),
        ).fetchall()
    return [row[0] for row in rows]


@dataclass(frozen=True)
class Unrunnable:
    """Pending tasks a dependency keeps from running, {task id: reason} each."""

    blocked: dict[int, str]
    """By a failed or cancelled dependency: work that failed, which ``queue run`` counts."""
    waiting: dict[int, str]
    """On a dependency in ``draft`` or ``review``, which a person releases: informational."""
    cancelled_only: tuple[int, ...] = ()
    """The blocked tasks no failed dependency holds up, directly or through other blocked tasks:
    only cancelled ones, which ``queue run`` must not call failed."""


_MARK_UNRUNNABLE = sql.SQL(
    """
    WITH RECURSIVE walk(id, level, blocks, failed) AS (
        SELECT b.blocked_id, 1, d.status IN ('failed', 'cancelled'), d.status = 'failed'
          FROM flowyard.agent_tasks d
          JOIN flowyard.agent_task_blocks b ON b.blocker_id = d.id
          JOIN flowyard.agent_tasks t ON t.id = b.blocked_id AND t.status = 'pending'
         WHERE d.status IN ('failed', 'cancelled', 'draft', 'review')
        UNION
        SELECT next.id, w.level + 1, w.blocks, w.failed
          FROM walk w
         CROSS JOIN LATERAL (
               SELECT b.blocked_id AS id
                 FROM flowyard.agent_task_blocks b
                WHERE b.blocker_id = w.id
                  AND (SELECT t.status FROM flowyard.agent_tasks t WHERE t.id = b.blocked_id) = 'pending'
                OFFSET 0) next
    ), blocked AS (
        SELECT id, min(level) AS level, bool_or(failed) AS failed FROM walk WHERE blocks GROUP BY id
    ), held AS (
        SELECT id, level, true AS is_blocked, failed FROM blocked
        UNION ALL
        SELECT id, min(level), false, false FROM walk
         WHERE NOT blocks AND id NOT IN (SELECT id FROM blocked) GROUP BY id
    ), reasons AS (
        SELECT h.id, h.is_blocked, h.failed,
               'not run: dependency ' || string_agg(
                   format('#%s %L is %s', d.id, d.title,
                          CASE d.status
                              WHEN 'pending' THEN CASE WHEN h.is_blocked THEN 'blocked' ELSE 'waiting' END
                              WHEN 'draft' THEN
                                  format('draft (submit it with `flowyard queue submit %s`)', d.id)
                              WHEN 'review' THEN
                                  format('in review (approve it with `flowyard queue approve %s`)', d.id)
                              ELSE d.status END),
                   ', ' ORDER BY d.id) AS reason
          FROM held h
          JOIN flowyard.agent_task_blocks b ON b.blocked_id = h.id
          JOIN flowyard.agent_tasks d ON d.id = b.blocker_id
          LEFT JOIN held dh ON dh.id = d.id AND dh.is_blocked = h.is_blocked
         WHERE CASE WHEN h.is_blocked THEN d.status IN ('failed', 'cancelled')
                    ELSE d.status IN ('draft', 'review') END
            OR (d.status = 'pending' AND dh.level < h.level)
         GROUP BY h.id, h.is_blocked, h.failed
    ), written AS (
        UPDATE flowyard.agent_tasks t SET blocked_reason = r.reason
          FROM (SELECT id, reason FROM reasons
                UNION ALL
                SELECT id, NULL FROM flowyard.agent_tasks
                 WHERE status = 'pending' AND blocked_reason IS NOT NULL AND id NOT IN (SELECT id FROM reasons)) r
         WHERE t.id = r.id AND t.blocked_reason IS DISTINCT FROM r.reason
        RETURNING t.id
    )
    SELECT id, is_blocked, failed, reason FROM reasons ORDER BY id
    """
)


def unrunnable(url: str) -> Unrunnable:
    """Pending tasks that cannot become ready because of a dependency, directly or through a
    dependency held up the same way: blocked by one that failed or was cancelled, or waiting
    for one in draft or review.

    They stay pending (a retried, submitted or approved dependency releases them) but carry
    the reason, which ``flowyard queue list`` shows. Failures come first, so a task both blocked
    and waiting counts as blocked (every dependent of a blocked task is blocked too). A reason
    names the dependencies nearest the cause: the failed or cancelled (draft, in review) ones, or
    else the held-up ones fewest links from it.
    """
    with _connection(url, atomic=True) as conn:
        return _mark_unrunnable(conn)


_REASONS_LOCK = "flowyard agent task reasons"


def _mark_unrunnable(conn: psycopg.Connection) -> Unrunnable:
    """:func:`unrunnable` inside the caller's transaction. A transaction-scoped advisory lock
    serialises it: two at once (a queue run's end and a ``queue retry``) would lock the same
    pending rows in different orders and could deadlock.

    One statement walks from the failed, cancelled, draft and review tasks down the blocker index
    through pending ones only (``OFFSET 0`` and the status subquery keep each step a lookup in
    that index and the primary key: joined, a table not analysed since it grew was read whole at
    every step), rewrites just the reasons that
    changed, and says which blocked tasks only cancelled ones hold up. Recomputing every
    reason one dependency level per statement, each joining the whole dependencies table, took
    seconds per ``queue create --after``, ``cancel`` or run's end behind a chain a thousand deep,
    and rewrote every held-up row each time."""
    # each pass waits its turn however long the one before takes; only a lock on a table is cut short
    conn.execute(
        "SELECT set_config('lock_timeout', '0', true), pg_advisory_xact_lock(hashtextextended(%s, 0)), "
        "set_config('lock_timeout', %s, true)",
        (_REASONS_LOCK, _LOCK_TIMEOUT),
    )
    found: tuple[dict[int, str], dict[int, str]] = ({}, {})
    cancelled_only: list[int] = []
    for task_id, is_blocked, failed, reason in conn.execute(_MARK_UNRUNNABLE, prepare=False):
        found[0 if is_blocked else 1][int(task_id)] = printable(str(reason))
        if is_blocked and not failed:
            cancelled_only.append(int(task_id))
    blocked, waiting = found
    return Unrunnable(blocked=blocked, waiting=waiting, cancelled_only=tuple(cancelled_only))
