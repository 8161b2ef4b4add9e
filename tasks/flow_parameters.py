"""Flows that refuse parameters of the wrong type in one line, and may read ``""`` as a default.

The UI's parameter form, a REST trigger, a ``prefect.yaml`` template or an automation can send any
JSON for a parameter: ``""`` for a field left blank, ``null``, text for a number, one string for a
list. A value of the wrong type failed the run with Prefect's message of several lines (``Flow run
received invalid parameters:\\n - task_id: Input should be a valid integer``), so the run's
one-line state message named neither the parameter, the value it got nor the type it takes;
flowyard's other errors are one line that says what to fix.

A JSON ``true`` or ``false`` for a number is refused too: pydantic's lax mode read ``task_id=true``
as task 1 and ``timeout_seconds=true`` as one second, acting on a value nobody meant.

``""`` for a filter whose default is None (a status, a list of dependencies) is that default:
a field once typed in and cleared failed the run (``unknown status ''``). Database URLs are never
among them: an empty URL (an unset variable in a template) is an error, not the default database
(:func:`tasks.db.resolve_url`).
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Iterable, Iterator
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
        given = {**parameters, **dict.fromkeys(name for name in self.blank_is_default if parameters.get(name) == "")}
        signature = inspect.signature(self.fn).parameters
        try:
            checked = super().validate_parameters(given)
        except ParameterTypeError as exc:
            cause = exc.__context__  # Prefect raises it ``from None``: hidden, still there
            if not isinstance(cause, ValidationError):  # a block reference, mixed pydantic versions
                raise
            problems = [_problem(error["loc"], error.get("input"), error["msg"], signature) for error in cause.errors()]
            raise UserError(f"{self.name}: {'; '.join(problems)}") from None
        numbers = [
            _problem(where, value, "true or false is not a number", signature)
            for name in given
            for where, value in _booleans_read_as_numbers((name,), given[name], checked.get(name))
        ]
        if numbers:
            raise UserError(f"{self.name}: {'; '.join(numbers)}")
        return checked


def _booleans_read_as_numbers(where: tuple[Any, ...], given: Any, checked: Any) -> Iterator[tuple[tuple[Any, ...], bool]]:
    """(location, value) of each ``true``/``false`` in ``given`` that validation made a number in
    ``checked``, walking lists and objects side by side; a boolean kept as one (a ``bool`` or an
    ``Any`` parameter, a payload's values) is no problem."""
    if isinstance(given, bool):
        if isinstance(checked, int | float) and not isinstance(checked, bool):
            yield where, given
    elif isinstance(given, list | tuple) and isinstance(checked, list | tuple) and len(given) == len(checked):
        for index, (item, validated) in enumerate(zip(given, checked, strict=True)):
            yield from _booleans_read_as_numbers((*where, index), item, validated)
    elif isinstance(given, dict) and isinstance(checked, dict):
        for key in (key for key in given if key in checked):
            yield from _booleans_read_as_numbers((*where, key), given[key], checked[key])


def _problem(loc: tuple[Any, ...], value: Any, reason: str, signature: Any) -> str:
    """``parameter <name> is <value>: <reason>; give a value of type <annotation>``."""
    where = ".".join(map(str, loc)) or "?"
    name = str(loc[0]) if loc else ""
    wanted = f"; give a value of type {_annotation(signature[name].annotation)}" if name in signature else ""
    return f"parameter {where} is {_shown(value)}: {reason}{wanted}"


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
