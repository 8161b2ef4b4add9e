"""The standard-library half of the agent protocol, for agents themselves.

Importing it costs nothing beyond ``json`` (not even ``typing``): an agent's start-up is
part of every task's overhead, so a Python agent (like the bundled reference agent) must
start in milliseconds. flowyard's side parses and validates lines with the pydantic models
in ``tasks.agent_protocol``.
"""

from __future__ import annotations

import json

KINDS = ("log", "progress", "checkpoint", "artifact", "result", "error")
TASK_ENV_VAR = "FLOWYARD_TASK"
CHECKPOINT_REQUEST = json.dumps({"kind": "control", "command": "checkpoint"})


def message_line(kind: str, **fields: object) -> str:
    """One protocol line for stdout."""
    if kind not in KINDS:
        raise ValueError(f"unknown agent message kind {kind!r}; expected one of {', '.join(KINDS)}")
    return json.dumps({"kind": kind, **fields})


def is_checkpoint_request(line: str) -> bool:
    """Whether a stdin line is flowyard asking the agent for a checkpoint."""
    try:
        data = json.loads(line)
    except ValueError:
        return False
    return isinstance(data, dict) and data.get("kind") == "control" and data.get("command") == "checkpoint"
