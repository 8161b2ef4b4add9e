"""Flows that refuse parameters of the wrong type in one line, and may read ``""`` as a default.

The UI's parameter form, a REST trigger, a ``prefect.yaml`` template or an automation can send any
JSON for a parameter: ``""`` for a field left blank, ``null``, text for a number, one string for a
list. A value of the wrong type failed the run with Prefect's message of several lines (``Flow run
received invalid parameters:\\n - task_id: Input should be a valid integer``), so the run's
one-line state message named neither the parameter, the value it got nor the type it takes;
flowyard's other errors are one line that says what to fix.

Text PostgreSQL cannot store is refused before Prefect creates the flow run: a NUL character
(``\\u0000``, which ``jsonb`` refuses: Prefect's client retried the server's 500 for minutes, then
raised a traceback) or a lone surrogate (``\\ud800``, not UTF-8: a ``UnicodeEncodeError``), in a
string or a dict key anywhere in a parameter. A flow called from Python checks in
:meth:`CheckedParametersFlow.__call__`; :func:`deployments.trigger.create_flow_run` checks with
the same :func:`unstorable_parameters` before it posts.

A JSON ``true`` or ``false`` for a number is refused too: pydantic's lax mode read ``task_id=true``
as task 1 and ``timeout_seconds=true`` as one second, acting on a value nobody meant.

``""`` for a filter whose default is None (a status, a list of dependencies) is that default:
a field once typed in and cleared failed the run (``unknown status ''``). Database URLs are never
among them: an empty URL (an unset variable in a template) is an error, not the default database
(:func:`tasks.db.resolve_url`).

NaN and ±Infinity (a float parameter, or in a payload) are refused there too: JSON has no such
numbers, so Prefect recorded null for them in the flow run's parameters while the body, called
from Python, went on with the original value; a retry or a rerun of that record ran with null.
"""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any, ParamSpec, TypeVar, cast

from prefect import Flow
from prefect.exceptions import ParameterBindError, ParameterTypeError
from prefect.utilities.callables import get_call_parameters
from pydantic import ValidationError

from tasks.errors import UserError, is_utf8

P = ParamSpec("P")
R = TypeVar("R")

_SHOWN_VALUE = 60
"""Characters of a refused value the message quotes: a pasted document stays one short line."""


class CheckedParametersFlow(Flow[P, R]):
    """A flow whose parameters of the wrong type fail the run, before its body starts, in one line
    naming each bad parameter, the value it got and the type it takes; ``""`` for a parameter in
    :attr:`blank_is_default` is None, its default."""

    blank_is_default: frozenset[str] = frozenset()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Refuse text PostgreSQL cannot store and numbers JSON cannot hold
        (:func:`unstorable_parameters`) before Prefect creates the flow run, then run the flow as
        Prefect does. Arguments that do not bind to the signature are left to Prefect, which
        refuses them in its own words."""
        call_kwargs = {k: v for k, v in kwargs.items() if k not in ("return_state", "wait_for")}
        try:
            parameters = get_call_parameters(self.fn, args, call_kwargs, apply_defaults=False)
        except ParameterBindError:  # Prefect's own call raises it again, as it always did
            parameters = {}
        problems = unstorable_parameters(parameters)
        if problems:
            raise UserError(f"{self.name}: {problems}")
        return super().__call__(*args, **kwargs)

    def with_options(self, **options: Any) -> CheckedParametersFlow[P, R]:
        """Prefect's copy with new options, still a :class:`CheckedParametersFlow` with the same
        :attr:`blank_is_default`: Prefect builds the copy as a plain ``Flow``, which dropped the
        checks (a NUL parameter hung on retried 500s again). Its state is all ``Flow.__init__``'s,
        which this class does not extend, so only its class and that attribute need carrying over."""
        plain = super().with_options(**options)
        plain.__class__ = type(self)
        checked = cast(CheckedParametersFlow[P, R], plain)
        checked.blank_is_default = self.blank_is_default
        return checked

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


_SHOWN_PROBLEMS = 3
"""Places :func:`unstorable_parameters` names; past them it says how many more there are."""


def unstorable_parameters(parameters: dict[str, Any]) -> str:
    """The problems, in one line (``""`` if none), with values in ``parameters`` that cannot be
    stored as they are: a string or a dict key, at any depth, holding a NUL character or a lone
    surrogate (a parameter's name too), or a NaN or ±Infinity, which JSON cannot hold. Each names
    its parameter and place (``payload.files.2``) as :func:`_problem` does. Iterative: how deep a
    value nests is up to its sender."""
    found: list[str] = []
    more = 0
    pending: list[tuple[tuple[Any, ...], Any]] = [((), parameters)]
    while pending:
        where, value = pending.pop()
        if isinstance(value, dict):
            for key in value:
                if (reason := _unstorable(key)) is not None:
                    if len(found) < _SHOWN_PROBLEMS:
                        found.append(
                            _problem(where, key, f"{reason}; rename the key", {}, verb="has the key")
                            if where
                            else f"parameter name {_shown(key)}: {reason}; rename the parameter"
                        )
                    else:
                        more += 1
            pending.extend(reversed([((*where, key), item) for key, item in value.items()]))
        elif isinstance(value, list | tuple | set | frozenset):
            pending.extend(((*where, i), item) for i, item in reversed(list(enumerate(value))))
        elif (reason := _unstorable(value)) is not None:
            if len(found) < _SHOWN_PROBLEMS:
                fix = "give a finite number" if isinstance(value, float) else "remove it"
                found.append(_problem(where, value, f"{reason}; {fix}", {}))
            else:
                more += 1
    return "; ".join(found) + (f" (and {more} more)" if more else "")


def _unstorable(value: Any) -> str | None:
    """Why a string cannot be stored in PostgreSQL, or a float in JSON (None if it can, or is
    neither)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "not a finite number, which JSON cannot hold (the flow run would record null)"
    if not isinstance(value, str):
        return None
    if "\x00" in value:
        return "a NUL character (\\u0000), which PostgreSQL cannot store"
    if is_utf8(value):
        return None
    half = next(c for c in value if "\ud800" <= c <= "\udfff")  # all that UTF-8 cannot encode
    return f"a surrogate (\\u{ord(half):04x}, half of a character in UTF-16), which is not UTF-8 text"


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


def _problem(loc: tuple[Any, ...], value: Any, reason: str, signature: Any, *, verb: str = "is") -> str:
    """``parameter <name> is <value>: <reason>; give a value of type <annotation>``. A key in the
    location that is not printable text (a NUL, a surrogate, a line break) is shown as JSON, so
    the message stays one line of text; a location deep in a value keeps its two ends."""
    where = ".".join(_shown(part) if isinstance(part, str) and not part.isprintable() else str(part) for part in loc)
    if len(where) > 2 * _SHOWN_VALUE:
        where = f"{where[: _SHOWN_VALUE - 3]}...{where[-_SHOWN_VALUE:]}"
    where = where or "?"
    name = str(loc[0]) if loc else ""
    wanted = f"; give a value of type {_annotation(signature[name].annotation)}" if name in signature else ""
    return f"parameter {where} {verb} {_shown(value)}: {reason}{wanted}"


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
