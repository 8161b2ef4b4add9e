"""The standard-library half of the agent protocol, for agents themselves.

An agent's start-up is part of every task's overhead, so a Python agent (like the bundled
reference agent) must start in milliseconds. Importing this module costs almost nothing: it
encodes and decodes protocol lines with CPython's C JSON codec (``_json``) directly, because
``import json`` pulls in ``re`` and ``enum`` — about 20 ms of CPU on the development machine,
more than half of the reference agent's whole start-up. Other interpreters fall back to
``json``. flowyard's side parses and validates lines with the pydantic models in
``tasks.agent_protocol``.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (~20 ms)
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

KINDS = ("log", "progress", "checkpoint", "artifact", "result", "error")
TASK_ENV_VAR = "FLOWYARD_TASK"
TASK_FILE_PREFIX = "@"
_JSON_WHITESPACE = " \t\n\r"


def _c_codec() -> tuple[Callable[[object], str], Callable[[str], Any]]:
    """``json.dumps``/``json.loads`` equivalents (default separators, ``allow_nan``) on ``_json``."""
    from _json import encode_basestring_ascii, make_encoder, make_scanner

    def unserializable(obj: object) -> object:
        raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")

    encoder = make_encoder({}, unserializable, encode_basestring_ascii, None, ": ", ", ", False, False, True)

    class _Context:  # the attributes the C scanner reads from a json.JSONDecoder
        strict = True
        object_hook = None
        object_pairs_hook = None
        parse_float = float
        parse_int = int
        parse_constant = {"NaN": float("nan"), "Infinity": float("inf"), "-Infinity": float("-inf")}.__getitem__

    # typeshed types ``context`` as make_scanner; the C scanner only reads the attributes above.
    scanner = make_scanner(_Context())  # type: ignore[arg-type]

    def dumps(obj: object) -> str:
        return "".join(encoder(obj, 0))

    def loads(text: str) -> Any:  # any JSON value, as from json.loads
        body = text.strip(_JSON_WHITESPACE)
        try:
            value, end = scanner(body, 0)
        except StopIteration:
            raise ValueError(f"not a JSON document: {text[:80]!r}") from None
        if end != len(body):
            raise ValueError(f"extra data after the JSON document: {text[:80]!r}")
        return value

    return dumps, loads


try:
    dumps, loads = _c_codec()
except ImportError:  # not CPython: the pure-Python module is the codec
    from json import dumps, loads

CHECKPOINT_REQUEST = dumps({"kind": "control", "command": "checkpoint"})


def read_task(text: str) -> Any:
    """The task envelope from the argv argument or ``FLOWYARD_TASK`` variable that carries it:
    the JSON itself, or ``@`` and the path of a file holding it when it is too large for one
    argument or variable (Linux refuses to start a program with one over 128 KiB). JSON never
    starts with ``@``, so the two cannot be confused."""
    if text.startswith(TASK_FILE_PREFIX):
        with open(text[len(TASK_FILE_PREFIX) :], encoding="utf-8") as file:
            text = file.read()
    return loads(text)


def message_line(kind: str, **fields: object) -> str:
    """One protocol line for stdout."""
    if kind not in KINDS:
        raise ValueError(f"unknown agent message kind {kind!r}; expected one of {', '.join(KINDS)}")
    return dumps({"kind": kind, **fields})


def is_checkpoint_request(line: str) -> bool:
    """Whether a stdin line is flowyard asking the agent for a checkpoint."""
    try:
        data = loads(line)
    except ValueError:
        return False
    return isinstance(data, dict) and data.get("kind") == "control" and data.get("command") == "checkpoint"
