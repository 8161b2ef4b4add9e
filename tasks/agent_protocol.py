"""The line protocol between flowyard and an agent process.

Agent → flowyard, one JSON object per stdout line, ``kind`` being one of:

- ``{"kind": "log", "message": "...", "level": "info"}``
- ``{"kind": "progress", "percent": 40, "message": "..."}``
- ``{"kind": "checkpoint", "state": {...}}`` – everything the agent needs to resume; the
  latest one is handed back on the next attempt.
- ``{"kind": "artifact", "key": "report", "type": "markdown"|"link"|"table", "data": ...,
  "description": "..."}`` – becomes a Prefect artifact.
- ``{"kind": "result", "data": {...}}`` – the task's result; the agent then exits 0.
- ``{"kind": "error", "message": "...", "retryable": true}``

A line that is not valid JSON, or not one of these shapes, is kept as a ``log`` line with
``level="raw"``: agents are external programs and their stray prints must not break a run.
That includes any line holding NaN or ±Infinity anywhere (which Python's ``json.dumps`` writes
by default): JSON has no such numbers, PostgreSQL refuses to store them (checkpoints, results),
and elsewhere (artifact data, a log line's extra fields) they would silently become ``null``.
So is any line holding a ``\\u0000`` escape, valid JSON that PostgreSQL stores nowhere.

flowyard → agent, on stdin (one JSON object per line):

- the task envelope (first line) when the template delivers the task on stdin;
- ``{"kind": "control", "command": "checkpoint"}`` – "emit a checkpoint now": sent before a
  graceful shutdown, after which the process group gets SIGTERM and, after the grace
  period, SIGKILL. Agents that do not read stdin simply lose the work since their last
  checkpoint.
"""

from __future__ import annotations

from contextlib import suppress
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator
from pydantic_core import from_json

from tasks.agent_wire import CHECKPOINT_REQUEST, KINDS, TASK_ENV_VAR
from tasks.errors import validation_problem
from tasks.json_values import has_non_finite, has_nul

__all__ = ["CHECKPOINT_REQUEST", "TASK_ENV_VAR", "AgentMessage", "misread", "parse_line"]


class _Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    @model_validator(mode="before")
    @classmethod
    def _finite(cls, data: Any) -> Any:
        """Refuse a line holding NaN or ±Infinity anywhere, whatever its kind: it then fails
        validation and is kept as a raw log line. A checkpoint or result would otherwise fail the
        attempt (every retry alike) on PostgreSQL's multi-line error when flowyard stores it;
        artifact data or a log line's extra fields would reach the ``.jsonl`` log, the run log and
        Prefect artifacts with those numbers silently turned into ``null``: one rule for every
        kind, the one the agent's own ``json.dumps(..., allow_nan=False)`` applies."""
        if has_non_finite(data):
            raise ValueError("NaN and Infinity are not JSON numbers")
        return data


class LogMessage(_Message):
    kind: Literal["log"]
    message: str
    level: str = "info"


class ProgressMessage(_Message):
    kind: Literal["progress"]
    percent: float = Field(ge=0, le=100)
    message: str = ""


class CheckpointMessage(_Message):
    kind: Literal["checkpoint"]
    state: dict[str, Any]


class ArtifactMessage(_Message):
    kind: Literal["artifact"]
    key: str | None = Field(default=None, pattern=r"^[a-z0-9-]+$")
    type: Literal["markdown", "link", "table"] = "markdown"
    data: Any
    description: str | None = None


class ResultMessage(_Message):
    kind: Literal["result"]
    data: dict[str, Any] = Field(default_factory=dict)


class ErrorMessage(_Message):
    kind: Literal["error"]
    message: str
    retryable: bool = True


AgentMessage = Annotated[
    LogMessage | ProgressMessage | CheckpointMessage | ArtifactMessage | ResultMessage | ErrorMessage,
    Field(discriminator="kind"),
]
_ADAPTER: TypeAdapter[AgentMessage] = TypeAdapter(AgentMessage)


def parse_line(line: str) -> AgentMessage:
    """One stdout line as a message; anything unparseable becomes a raw log line.

    So does a message holding a ``\\u0000`` escape anywhere: valid JSON, but PostgreSQL stores a
    NUL character in neither ``text`` nor ``jsonb``, so such a result failed every attempt on the
    database's multi-line error after the agent had done its work (a checkpoint, the task at
    once). The escape is looked for in the text first, the one way a NUL gets into a parsed
    value (a raw NUL byte is not JSON), so other lines pay nothing for it."""
    text = line.rstrip("\r\n")
    with suppress(ValidationError):
        message = _ADAPTER.validate_json(text)
        if "\\u0000" not in text or not has_nul(message.model_dump()):
            return message
    return LogMessage(kind="log", message=text, level="raw")


def misread(line: str) -> str | None:
    """Why a line naming one of the protocol's kinds was kept as a raw log line (:func:`parse_line`),
    or None for any other line. A checkpoint whose ``state`` is not an object, or a result whose
    ``data`` is not, was dropped in silence: the next attempt resumed from an older checkpoint, and
    the task completed with the result ``{}``, while the agent believed both saved. Lines without
    ``"kind"`` (stray prints) are not parsed again."""
    text = line.rstrip("\r\n")
    if '"kind"' not in text:
        return None
    try:
        data = from_json(text)
    except ValueError:
        return None
    if not isinstance(data, dict) or data.get("kind") not in KINDS:
        return None
    kind = data["kind"]
    try:
        _ADAPTER.validate_python(data)
    except ValidationError as exc:
        where, problem = validation_problem(exc)
        where = where.removeprefix(kind).lstrip(".")
        return f"a {kind} line was kept as a raw log line, not taken as a {kind}: {where + ': ' if where else ''}{problem}"
    if has_nul(data):
        return f"a {kind} line was kept as a raw log line: it holds a \\u0000 escape, which PostgreSQL cannot store"
    return None
