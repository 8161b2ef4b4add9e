"""Flows that refuse parameters of the wrong type in one line, and may read ``""`` as a default.

The UI's parameter form, a REST trigger, a ``prefect.yaml`` template or an automation can send any
JSON for a parameter: ``""`` for a field left blank, ``null``, text for a number, one string for a
list. A value of the wrong type failed the run with Prefect's message of several lines (``Flow run
received invalid parameters:\\n - task_id: Input should be a valid integer``), so the run's
one-line state message named neither the parameter, the value it got nor the type it takes;
flowyard's other errors are one line that says what to fix.

``""`` for a filter whose default is None (a status, a list of dependencies) is that default:
a field once typed in and cleared failed the run (``unknown status ''``). Database URLs are never
among them: an empty URL (an unset variable in a template) is an error, not the default database
(:func:`tasks.db.resolve_url`).
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Iterable
from typing import Any, ParamSpec, TypeVar

from prefect import Flow
from prefect.exceptions import ParameterTypeError
from pydantic import ValidationError

from tasks.errors import UserError

P = ParamSpec("P")
R = TypeVar("R")

_SHOWN_VALUE = 60
"""Characters of a refused value the message quotes: a pasted document stays one short line."""


class CheckedParametersFlow(Flow[P, R]):
    """A flow whose parameters of the wrong type fail the run, before its body starts, in one line
    naming each bad parameter, the value it got and the type it takes; ``""`` for a parameter in
    :attr:`blank_is_default` is None, its default."""

    blank_is_default: frozenset[str] = frozenset()

    def validate_parameters(self, parameters: dict[str, Any]) -> dict[str, Any]:
        blank = [name for name in self.blank_is_default if parameters.get(name) == ""]
        try:
            return super().validate_parameters({**parameters, **dict.fromkeys(blank)})
        except ParameterTypeError as exc:
            cause = exc.__context__  # Prefect raises it ``from None``: hidden, still there
            if not isinstance(cause, ValidationError):  # a block reference, mixed pydantic versions
                raise
            signature = inspect.signature(self.fn).parameters
            problems = "; ".join(_problem(error, signature) for error in cause.errors())
            raise UserError(f"{self.name}: {problems}") from None


def _problem(error: Any, signature: Any) -> str:
    """``parameter <name> is <value>: <pydantic's reason>; give a value of type <annotation>``."""
    where = ".".join(map(str, error["loc"])) or "?"
    name = str(error["loc"][0]) if error["loc"] else ""
    wanted = f"; give a value of type {_annotation(signature[name].annotation)}" if name in signature else ""
    return f"parameter {where} is {_shown(error.get('input'))}: {error['msg']}{wanted}"


def _shown(value: Any) -> str:
    """The refused value as JSON (``""``, ``null``, ``true``), as the UI or a REST caller wrote it;
    another Python value by its repr. Shortened past :data:`_SHOWN_VALUE` characters."""
    try:
        shown = json.dumps(value, ensure_ascii=True)
    except (TypeError, ValueError):
        shown = repr(value)
    return shown if len(shown) <= _SHOWN_VALUE else shown[: _SHOWN_VALUE - 3] + "..."


def _annotation(annotation: Any) -> str:
    """A parameter's type as written in the flow's signature (``int``, ``list[int] | None``)."""
    if isinstance(annotation, str):  # postponed annotations: the source text
        return annotation
    return str(getattr(annotation, "__name__", annotation))


def checked_flow(
    name: str, *, blank_is_default: Iterable[str] = (), **options: Any
) -> Callable[[Callable[P, R]], CheckedParametersFlow[P, R]]:
    """``@flow(name=..., **options)``, for a :class:`CheckedParametersFlow`. Each name in
    ``blank_is_default`` must be a parameter whose default is None."""

    def decorate(fn: Callable[P, R]) -> CheckedParametersFlow[P, R]:
        defaults = inspect.signature(fn).parameters
        for parameter in blank_is_default:
            if parameter not in defaults or defaults[parameter].default is not None:
                raise TypeError(f"{fn.__name__}: {parameter!r} is not a parameter whose default is None")
        checked = CheckedParametersFlow(fn, name=name, **options)
        checked.blank_is_default = frozenset(blank_is_default)
        return checked

    return decorate
