"""User-facing errors.

A :class:`UserError` is a problem the user can fix (bad URL, missing file, unreachable
database). The CLI prints its message as one line and exits non-zero, without a traceback.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import psycopg

if TYPE_CHECKING:
    from pydantic import ValidationError


class UserError(Exception):
    """An error the user can fix; the message says what is wrong and how to fix it."""

    exit_code = 2


def option_and_parameter(parameter: str) -> str:
    """How a one-line error names a value a CLI option and a flow parameter both give: the
    option as typed, then the parameter (``--batch-size (batch_size)``), so that it reads right
    to the user of either."""
    return f"--{parameter.replace('_', '-')} ({parameter})"


class ConnectionUnavailable(UserError):
    """Connecting to PostgreSQL failed. ``sqlstate`` is the server's reason when it is one a
    later attempt can meet differently (53300 too many connections, 57P03 starting up or
    shutting down), so a retry policy can tell a busy server from a wrong URL; None otherwise.
    ``timed_out``: nothing answered for the whole connect timeout (a host that drops packets, a
    hung server), so an attempt right after it would most likely wait as long again; with
    several hosts, on any one of them, whatever the others answered.
    (Defaulted, so that pickling, e.g. back from a Dask worker, can rebuild the error.)"""

    def __init__(self, message: str, sqlstate: str | None = None, timed_out: bool = False) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.timed_out = timed_out


class ServerReadOnly(UserError):
    """The server refused a write (SQLSTATE 25006, ``cannot execute INSERT in a read-only
    transaction``): the URL points at a standby, or ``default_transaction_read_only`` is on for the
    role, the database or the server. PostgreSQL's words named neither, nor the fix."""


READ_ONLY_CAUSES = (
    "it is a standby, or default_transaction_read_only is on; point the URL at the primary, or have a "
    "DBA reset it for the role (ALTER ROLE ... RESET default_transaction_read_only)"
)
"""Why a server refuses writes and what to do, when which of the two is not known (see
:func:`tasks.db.read_only_reason`, which finds out)."""


def read_only_error(error: BaseException) -> psycopg.errors.ReadOnlySqlTransaction | None:
    """psycopg's read-only refusal behind ``error``: itself, or the driver error SQLAlchemy wraps
    (Alembic's migrations run through it); None for any other error."""
    for candidate in (error, getattr(error, "orig", None), error.__cause__):
        if isinstance(candidate, psycopg.errors.ReadOnlySqlTransaction):
            return candidate
    return None


def first_line(error: BaseException | str) -> str:
    """The first line of an error message: PostgreSQL's add LINE/HINT/CONTEXT lines after it."""
    fallback = "" if isinstance(error, str) else type(error).__name__  # an exception without a message
    return next(iter(str(error).strip().splitlines()), fallback)


def parse_problem(error: Exception) -> str:
    """What a YAML (or JSON) parser error says is wrong, and where: a YAML error's first line is
    often only the context (``while parsing a flow sequence``), which says neither; the problem and
    its line follow. Other errors (JSON's name their line) are their first line."""
    problem = getattr(error, "problem", None)
    if problem is None:
        return first_line(error)
    mark = getattr(error, "problem_mark", None)
    return f"{problem}{f' at line {mark.line + 1}, column {mark.column + 1}' if mark else ''}"


def one_line(text: str) -> str:
    """``text`` for a row of a listing or a status line: its first line, saying how many lines were
    left out, and :func:`clipped`. An agent's error may carry a whole traceback, which split the
    ``queue list`` table and ``queue run``'s per-task lines, or megabytes on one line, which
    filled them; the full text stays in the task and in its log."""
    left_out = len(text.strip().splitlines()) - 1
    return clipped(first_line(text)) + (f" … ({left_out} more lines)" if left_out > 0 else "")


LINE_LIMIT = 10_000
"""Characters of one line of text flowyard does not write itself (an agent's output or error) that
a log line, a listing or a status line shows: an agent that wrote a 50 MB line with no newline put
50 MB on ``queue run``'s terminal per attempt, and Prefect's API refuses a log over 1 MB."""


def clipped(line: str, kept_in: str = "") -> str:
    """``line`` cut at :data:`LINE_LIMIT` characters, saying how many were left out and, given
    ``kept_in``, where the whole line is."""
    more = len(line) - LINE_LIMIT
    if more <= 0:
        return line
    return f"{line[:LINE_LIMIT]}… ({more} more characters{f' in {kept_in}' if kept_in else ''})"


_CONTROL_CHARACTER = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
"""Unicode's categories Cc, Zl and Zp as one pattern: agent output passes :func:`printable` line
by line, and a search costs a fraction of a category lookup per character."""


def control_character(text: str) -> str | None:
    """The first character of ``text`` that breaks or garbles a line on a terminal (a newline, a
    tab, a carriage return, an escape, a Unicode line or paragraph separator), else None."""
    found = _CONTROL_CHARACTER.search(text)
    return found.group() if found else None


def printable(text: str) -> str:
    """``text`` for one cell of a listing or one line of a log, each control character written as
    its escape (``\\n``, ``\\x1b``): a value stored before flowyard refused them, written to the
    table by hand or sent by an agent must not split or recolour the row it is shown in."""
    return _CONTROL_CHARACTER.sub(lambda found: repr(found.group())[1:-1], text)


def is_utf8(text: str) -> bool:
    """Whether ``text`` can be written as UTF-8. Bytes that are not UTF-8 reach Python from a
    command line as surrogate escapes (and an unpaired ``\\ud800`` escape from JSON as a lone
    surrogate), which psycopg cannot encode and PostgreSQL cannot store: its UnicodeEncodeError
    is a traceback naming neither the argument nor the fix."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def check_utf8(text: str, what: str, fix: str) -> str:
    """``text`` if it is UTF-8 text (:func:`is_utf8`), else one line: ``{what} holds bytes that
    are not UTF-8; {fix}``."""
    if not is_utf8(text):
        raise UserError(f"{what} holds bytes that are not UTF-8; {fix}")
    return text


Number = TypeVar("Number", int, float)

INT64_MAX = 2**63 - 1
"""The largest integer SQLite's LIMIT and PostgreSQL's bigint take; beyond it they raise, far
from the option that was given."""

PG_MAX_MILLISECONDS = 2**31 - 1
"""The largest lock_timeout or statement_timeout PostgreSQL takes (an int of milliseconds)."""

MAX_WAIT_SECONDS = 365 * 86_400
"""The longest wait, pause or deadline flowyard takes, in seconds: a longer one is a typo, and
``inf`` would sleep forever (``time.sleep(inf)`` even raises)."""


def check_range(value: Number, what: str, low: Number, high: Number, fix: str = "") -> Number:
    """``value`` if it is ``low`` to ``high``, else one line naming ``what``, the range and how to
    ``fix`` it. nan is out of every range: it compares false with everything, so a ``<= 0`` check
    passes it and a deadline of nan never arrives."""
    if not low <= value <= high:
        raise UserError(f"{what} {value} is out of range; give {low} to {high}{fix}")
    return value


def check_user_file(
    path: str | Path, what: str, fix: str = "pass the file's path", *, regular: bool = False
) -> Path:
    """The file the user named, if it can be opened for reading; else one line saying why not
    (missing, a directory, no permission) and how to ``fix`` it. Said by the command before any
    server starts or run is recorded, and for files another library reads (pandas, SQLite), whose
    own errors are a traceback or a message that names neither the file nor the option.

    ``regular``: refuse a FIFO, socket or device too, for a reader that needs a file it can seek
    in (SQLite): opening a FIFO to check it waits for a writer, so the command hung for good."""
    file = Path(path)
    try:  # one stat: Path.is_dir() raised for a name over 255 bytes ("File name too long")
        mode = file.stat().st_mode
        if stat.S_ISDIR(mode):  # opening one says "Is a directory" only on some systems
            reason = "it is a directory"
        elif regular and not stat.S_ISREG(mode):
            reason = "it is not a regular file (a FIFO, socket or device)"
        else:
            file.open("rb").close()
            return file
    except FileNotFoundError:
        reason = "no such file"
    except OSError as exc:
        reason = exc.strerror or first_line(exc)
    raise UserError(f"cannot read {what} {file}: {reason}; {fix}")


def read_user_file(path: str | Path, what: str, fix: str = "pass the file's path") -> str:
    """The UTF-8 text of a file the user named, or one line saying why it cannot be read
    (:func:`check_user_file`'s reasons, or bytes that are not UTF-8), instead of Python's traceback."""
    file = check_user_file(path, what, fix)
    try:
        return file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(
            f"cannot read {what} {file}: {first_line(exc)}; save it as a readable UTF-8 file"
        ) from None


def resolve_user_path(path: Path, what: str, fix: str) -> Path:
    """``path`` with its symlinks and ``..`` followed, or one line when it runs into a symlink loop:
    it is the user's path to fix, and Python's RuntimeError was a traceback (or, in a run, taken for
    an agent failure and retried). Python before 3.13 raises that on a loop; from 3.13 it leaves
    the loop unresolved, and only a ``stat`` meets it (ELOOP). A path that does not exist yet is
    fine, and any other reason a ``stat`` fails is left to the caller's own checks."""
    try:
        resolved = path.resolve()
        resolved.stat()
    except RuntimeError:
        pass
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            return resolved
    else:
        return resolved
    raise UserError(f"{what} runs into a symlink loop; {fix}")


DISK_FULL_FIX = " (or pass a directory on another disk)"
"""How to go on from a full disk, after "make room for it": :func:`disk_full`'s default."""


def disk_full(error: OSError, what: str, fix: str = DISK_FULL_FIX) -> UserError | None:
    """The one line for ``what`` (named, with its path) not written because its disk, or the user's
    quota, is full: ``cannot write {what}: No space left on device (disk full); make room for
    it{fix}``; None for any other error. A directory that could not be made was said to be no
    directory ("pass a directory path"), and a file to be in the way of something to remove:
    advice that sent the operator after a typo rather than the disk."""
    if error.errno not in (errno.ENOSPC, errno.EDQUOT):
        return None
    return UserError(f"cannot write {what}: {error.strerror} (disk full); make room for it{fix}")


def make_user_dir(path: str | Path, what: str, *, writable: bool = False, full_fix: str = DISK_FULL_FIX) -> Path:
    """The directory the user named, created if missing; one line when it cannot be (a file of
    that name, no permission, its disk full: :func:`disk_full`, ending with ``full_fix``), said
    before a run changes or records anything rather than by the step that writes there at its end.

    ``writable``: refuse, in close words, one that exists but cannot take a new entry (immutable,
    on a read-only file system, no permission, no inode left), which ``mkdir`` lets through: see
    :func:`check_writable_dir`."""
    directory = Path(path)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise disk_full(exc, f"{what} {directory}", full_fix) or _unusable_dir(
            what, directory, exc.strerror or first_line(exc)
        ) from None
    return check_writable_dir(directory, what, full_fix) if writable else directory


def check_writable_dir(directory: Path, what: str, full_fix: str = DISK_FULL_FIX) -> Path:
    """``directory`` if a file can be made in it, else one line: ``{what} {directory} cannot be
    written: {reason}; pass a writable directory path`` (a full disk as :func:`disk_full` says it).
    Tried by making and removing an empty file of its own (``.flowyard-write-check-*``), as the
    writers that come later will: neither ``os.access`` nor the mode bits tell, since root passes
    every permission check yet cannot write in an immutable directory (``chattr +i``), nor on a
    file system mounted read-only."""
    try:
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".flowyard-write-check-"):
            pass
    except OSError as exc:
        raise disk_full(exc, f"{what} {directory}", full_fix) or _unusable_dir(
            what, directory, exc.strerror or first_line(exc), problem="cannot be written", fix="a writable directory path"
        ) from None
    return directory


def check_user_dir(path: str | Path, what: str) -> Path:
    """The directory the user named, refused in :func:`make_user_dir`'s words when a file is in
    the way (at the path or at a parent), but not created: for checks that must change nothing,
    such as a deploy's preflight."""
    directory = Path(path)
    existing = nearest_existing(directory)
    if not existing.is_dir():
        raise _unusable_dir(
            what, directory, os.strerror(errno.EEXIST if existing == directory else errno.ENOTDIR)
        )
    return directory


def nearest_existing(path: Path) -> Path:
    """``path`` or its nearest parent that exists: where a directory still to be made would go."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _unusable_dir(
    what: str,
    directory: Path,
    reason: str,
    *,
    problem: str = "cannot be used as a directory",
    fix: str = "a directory path",
) -> UserError:
    return UserError(f"{what} {directory} {problem}: {reason}; pass {fix}")


def validation_problem(exc: ValidationError) -> tuple[str, str]:
    """Where (the dotted field path, '' for the model as a whole) and what of pydantic's first
    error, for a one-line UserError: its own message starts "1 validation error for <Model>",
    which names neither the input nor the fix."""
    first = exc.errors()[0]
    return ".".join(str(part) for part in first["loc"]), first["msg"].removeprefix("Value error, ")


def tool_error(stderr: str, exit_code: int) -> str:
    """The line of a client tool's stderr that says what went wrong.

    pg_dump, pg_restore and psql print the error first and context after it
    (``pg_dump: error: query failed: ERROR:  permission denied for table users`` followed by
    ``pg_dump: detail: Query was: LOCK TABLE …``), so the last line alone can hide the cause."""
    lines = [" ".join(line.split()) for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line.lower()]
    if errors:
        return errors[0]
    return lines[-1] if lines else f"exit code {exit_code}"


def exit_on_user_error(main: Callable[[], None], prog: str) -> None:
    """Run an entry point; a UserError becomes ``prog: error: <message>`` on stderr and its exit code.

    So does a privilege PostgreSQL refused (SQLSTATE 42501) wherever it surfaces: the role in
    the URL lacks a grant or an ownership, which the user fixes, not flowyard. So does a write a
    read-only server refused (SQLSTATE 25006, also wrapped by SQLAlchemy) that no caller turned
    into a :class:`ServerReadOnly` naming why: Alembic's upgrade of a new state schema."""
    try:
        main()
    except UserError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except psycopg.errors.InsufficientPrivilege as exc:
        print(
            f"{prog}: error: PostgreSQL refused a privilege: {first_line(exc)} "
            "(grant it to the role in the database URL, or connect as a role that has it)",
            file=sys.stderr,
        )
        sys.exit(UserError.exit_code)
    except Exception as exc:
        # a write the server refused as read-only where no caller said why (:class:`ServerReadOnly`)
        refusal = read_only_error(exc)
        if refusal is None:
            raise
        print(
            f"{prog}: error: the database accepts no writes ({first_line(refusal)}): {READ_ONLY_CAUSES}",
            file=sys.stderr,
        )
        sys.exit(UserError.exit_code)
