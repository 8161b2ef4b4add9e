"""What the CLI's options share beyond typer's own parsing: checks that name the option typed."""

from __future__ import annotations

import math
from collections.abc import Callable

import typer

from tasks.errors import UserError


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
