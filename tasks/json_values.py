"""JSON values on their way into PostgreSQL, whose json types refuse some that Python's ``json``
module reads and writes: NaN and ±Infinity (``json.dumps`` writes them by default, ``json.loads``
reads them, and reads a number beyond the float range, such as ``1e999``, as Infinity), and text
holding a NUL character (``\\u0000``, valid JSON, which neither ``text`` nor ``jsonb`` can store)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

JSON_SCALARS = (str, int, float, bool, type(None))
"""The Python types of JSON's scalars (a dict is an object, a list or tuple an array)."""


def scalars(value: Any) -> Iterator[Any]:
    """Every key and scalar of a JSON value (a key is never looked into). Iterative, because how
    deep a value nests is up to whoever sent it."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, dict):
            yield from item
            pending.extend(item.values())
        elif isinstance(item, list | tuple):
            pending.extend(item)
        else:
            yield item


def any_scalar(value: Any, test: Callable[[Any], bool]) -> bool:
    """Whether ``test`` holds for a key or a scalar anywhere in a JSON value."""
    return any(test(item) for item in scalars(value))


def non_json_type(value: Any) -> str | None:
    """The type name of the first key or scalar in ``value`` that JSON has no type for (bytes, a
    set, a datetime, a tuple as a key), else None. A Python caller can put one in a value that
    JSON callers cannot, and encoding it was a TypeError that names neither the value nor the fix."""
    return next((type(item).__name__ for item in scalars(value) if not isinstance(item, JSON_SCALARS)), None)


def nesting_depth(value: Any) -> int:
    """How many objects and arrays deep a JSON value nests (0 for a scalar). Iterative, like
    :func:`any_scalar`: the value may nest deeper than Python's recursion limit."""
    deepest = 0
    pending = [(value, 1)]
    while pending:
        item, level = pending.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list | tuple) else None
        if children is not None:
            deepest = max(deepest, level)
            pending.extend((child, level + 1) for child in children)
    return deepest


def has_non_finite(value: Any) -> bool:
    """Whether a JSON value holds NaN, Infinity or -Infinity: PostgreSQL refuses the whole value,
    with a multi-line error that names neither the task nor the fix."""
    return any_scalar(value, _non_finite)


def has_nul(value: Any) -> bool:
    """Whether a key or a string anywhere in a JSON value holds a NUL character: PostgreSQL refuses
    the whole value, with a multi-line error that names neither the task nor the fix."""
    return any_scalar(value, _holds_nul)


def _holds_nul(item: Any) -> bool:
    return isinstance(item, str) and "\x00" in item


def _non_finite(item: Any) -> bool:
    return isinstance(item, float) and not math.isfinite(item)
