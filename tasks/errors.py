"""User-facing errors.

A :class:`UserError` is a problem the user can fix (bad URL, missing file, unreachable
database). The CLI prints its message as one line and exits non-zero, without a traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """An error the user can fix; the message says what is wrong and how to fix it."""

    exit_code = 2
