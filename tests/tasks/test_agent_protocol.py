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
from tasks.agent_wire import CHECKPOINT_REQUEST, KINDS, is_checkpoint_request, message_line


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
        "",
    ],
)
def test_garbage_is_kept_as_a_raw_log_line(line: str) -> None:
    message = parse_line(line + "\n")
    assert isinstance(message, LogMessage)
    assert message.level == "raw" and message.message == line


def test_agent_side_helpers_speak_the_same_protocol() -> None:
    assert set(KINDS) == {"log", "progress", "checkpoint", "artifact", "result", "error"}
    assert isinstance(parse_line(message_line("checkpoint", state={"s": 1})), CheckpointMessage)
    with pytest.raises(ValueError, match="unknown agent message kind"):
        message_line("teleport")
    assert is_checkpoint_request(CHECKPOINT_REQUEST + "\n")
    assert not is_checkpoint_request('{"kind": "control", "command": "stop"}')
    assert not is_checkpoint_request("checkpoint please")
