"""JSON values on their way into PostgreSQL, whose json types refuse some that Python's ``json``
module reads and writes: NaN and ±Infinity (``json.dumps`` writes them by default, ``json.loads``
reads them, and reads a number beyond the float range, such as ``1e999``, as Infinity), and text
holding a NUL character (``\\u0000``, valid JSON, which neither ``text`` nor ``jsonb`` can store)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any


def any_scalar(value: Any, test: Callable[[Any], bool]) -> bool:
    """Whether ``test`` holds for a key or a scalar anywhere in a JSON value. Iterative, because
    how deep a value nests is up to whoever sent it."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, dict):
            pending.extend(item)
            pending.extend(item.values())
        elif isinstance(item, list | tuple):
            pending.extend(item)
        elif test(item):
            return True
    return False


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
