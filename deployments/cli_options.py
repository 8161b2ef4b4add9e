"""What the CLI's command groups and options share beyond typer's own parsing: how help is
written, and checks that name the option typed."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import typer

from tasks.errors import UserError


def command_group(help: str, **settings: Any) -> typer.Typer:
    """A ``flowyard`` command group, whose commands' help is Markdown: a docstring's lines join
    into paragraphs the terminal wraps, and ``code`` shows as code. Typer's default ("rich") kept
    every line break of the source, cutting sentences in two at any terminal width, and showed
    doubled backticks as they are written. No group offers shell completion, which would have
    to import every group to complete a command (see ``deployments.cli``)."""
    return typer.Typer(help=help, no_args_is_help=True, rich_markup_mode="markdown", add_completion=False, **settings)


def finite(unit: str = "seconds") -> Callable[[typer.CallbackParam, float | None], float | None]:
    """The callback of a float option (``--timeout``, ``--lock-timeout``, ...): click reads ``nan``
    and ``inf``, which then failed in the words of the flow parameter they were passed to
    (``online-migrate: parameter retry_deadline_seconds is Infinity``), or of a range check, not
    naming the option typed. One line naming it instead, before any database is touched."""

    def check(param: typer.CallbackParam, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            given = "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
            raise UserError(f"{param.opts[0]} is {given}; give a finite number of {unit}")
        return value

    return check
