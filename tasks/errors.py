"""User-facing errors.

A :class:`UserError` is a problem the user can fix (bad URL, missing file, unreachable
database). The CLI prints its message as one line and exits non-zero, without a traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable


class UserError(Exception):
    """An error the user can fix; the message says what is wrong and how to fix it."""

    exit_code = 2


def first_line(exc: BaseException) -> str:
    """The first line of an error's message: PostgreSQL's adds LINE/HINT/CONTEXT lines after it."""
    return next(iter(str(exc).strip().splitlines()), type(exc).__name__)


def exit_on_user_error(main: Callable[[], None], prog: str) -> None:
    """Run an entry point; a UserError becomes ``prog: error: <message>`` on stderr and its exit code."""
    try:
        main()
    except UserError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
