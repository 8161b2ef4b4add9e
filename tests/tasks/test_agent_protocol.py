"""The agent line protocol: every kind parses, anything else is kept as a raw log line."""

from __future__ import annotations

import json

import pytest

from tasks.agent_protocol import (
    ArtifactMessage,
    CheckpointMessage,
    ErrorMessage,
    LogMessage,
    ProgressMessage,
    ResultMessage,
    parse_line,
)
from tasks.agent_wire import CHECKPOINT_REQUEST, KINDS, dumps, is_checkpoint_request, loads, message_line


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"kind": "log", "message": "hi"}, LogMessage),
        ({"kind": "progress", "percent": 50}, ProgressMessage),
        ({"kind": "checkpoint", "state": {"step": 2}}, CheckpointMessage),
        ({"kind": "artifact", "key": "report-1", "data": "# hi"}, ArtifactMessage),
        ({"kind": "result", "data": {"ok": True}}, ResultMessage),
        ({"kind": "error", "message": "bad", "retryable": False}, ErrorMessage),
    ],
)
def test_every_kind_parses(fields: dict[str, object], expected: type) -> None:
    message = parse_line(json.dumps(fields) + "\n")
    assert isinstance(message, expected)
    assert message.kind == fields["kind"]


@pytest.mark.parametrize(
    "line",
    [
        "plain text from a print()",
        "{not json",
        json.dumps({"kind": "progress", "percent": 250}),
        json.dumps({"kind": "checkpoint", "state": "not an object"}),
        json.dumps({"kind": "teleport"}),
        json.dumps(["a", "list"]),
        json.dumps({"kind": "artifact", "key": "Bad Key!", "data": 1}),
        json.dumps({"kind": "checkpoint", "state": {"step": 1, "loss": float("nan")}}),
        json.dumps({"kind": "result", "data": {"scores": [1.5, {"max": float("inf")}]}}),
        json.dumps({"kind": "result", "data": {"min": float("-inf")}}),
        '{"kind": "checkpoint", "state": {"huge": 1e999}}',
        json.dumps({"kind": "artifact", "key": "scores", "type": "table", "data": [{"loss": float("nan")}]}),
        json.dumps({"kind": "artifact", "type": "markdown", "data": float("inf")}),
        '{"kind": "artifact", "type": "table", "data": {"loss": [1e999]}}',
        json.dumps({"kind": "log", "message": "epoch done", "loss": float("nan")}),
        json.dumps({"kind": "progress", "percent": 50, "eta": {"seconds": float("inf")}}),
        json.dumps({"kind": "error", "message": "diverged", "last": [float("-inf")]}),
        json.dumps({"kind": "checkpoint", "state": {"bytes": "a\x00b"}}),
        json.dumps({"kind": "result", "data": {"out\x00": 1}}),
        json.dumps({"kind": "error", "message": "bad \x00 byte"}),
        "binary \x00 output",
        "",
    ],
)
def test_garbage_is_kept_as_a_raw_log_line(line: str) -> None:
    """Garbage includes any line holding NaN or ±Infinity, whatever its kind and wherever the
    number sits (artifact data, a log line's extra fields): JSON has no such numbers, and the
    message would carry them into the task's .jsonl log, the Prefect run log or an artifact. So
    is one holding a ``\\u0000`` escape, in a key or a string: PostgreSQL cannot store it."""
    message = parse_line(line + "\n")
    assert isinstance(message, LogMessage)
    assert message.level == "raw" and message.message == line


def test_a_backslash_before_u0000_is_no_nul_character() -> None:
    """Only the ``\\u0000`` escape is a NUL; the text ``\\u0000`` (an escaped backslash) is fine."""
    line = json.dumps({"kind": "checkpoint", "state": {"pattern": "\\u0000"}})
    message = parse_line(line)
    assert isinstance(message, CheckpointMessage) and message.state == {"pattern": "\\u0000"}


def test_agent_side_helpers_speak_the_same_protocol() -> None:
    assert set(KINDS) == {"log", "progress", "checkpoint", "artifact", "result", "error"}
    assert isinstance(parse_line(message_line("checkpoint", state={"s": 1})), CheckpointMessage)
    with pytest.raises(ValueError, match="unknown agent message kind"):
        message_line("teleport")
    assert is_checkpoint_request(CHECKPOINT_REQUEST + "\n")
    assert not is_checkpoint_request('{"kind": "control", "command": "stop"}')
    assert not is_checkpoint_request("checkpoint please")


CODEC_SAMPLES = [
    {"kind": "result", "data": {"digest": "ab" * 32, "steps": 3, "resumed_from": 0}},
    {"nested": [1, -2, 3.5, 1e300, None, True, False, [], {}], "text": 'é "quoted"\n\t\\ \u2028 \U0001f600'},
    [],
    "just a string",
    0,
    -0.0,
]


@pytest.mark.parametrize("value", CODEC_SAMPLES)
def test_lean_codec_matches_the_json_module(value: object) -> None:
    assert dumps(value) == json.dumps(value)
    assert loads(json.dumps(value)) == value
    assert loads(f" \t{json.dumps(value, indent=2)}\r\n") == value


@pytest.mark.parametrize("text", ["", "   ", "{not json", '{"a": 1} trailing', "[1, 2", "nan"])
def test_lean_codec_rejects_what_the_json_module_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        json.loads(text)
    with pytest.raises(ValueError):
        loads(text)


def test_lean_codec_refuses_unserializable_values_like_json() -> None:
    with pytest.raises(TypeError, match="not JSON serializable"):
        dumps({"when": object()})
    assert dumps({"x": float("nan")}) == json.dumps({"x": float("nan")})
