"""Only metadata leaves a developer machine (seed 002 §9.1).

Fields of ``event_data`` outside the configured allowlist (code content, file paths,
commit messages …) are dropped, or replaced by a keyed hash so the central side can still
count distinct values without seeing them. The filter runs on the device side, before the
batch is encoded for upload, so a raw value never reaches the central database.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from typing import Any, Literal

import orjson
from pydantic import BaseModel, Field

DEFAULT_ALLOWLIST: tuple[str, ...] = (
    "action",
    "status",
    "tool",
    "language",
    "file_extension",
    "duration_ms",
    "lines_added",
    "lines_removed",
    "files_changed",
    "exit_code",
)


class PrivacyPolicy(BaseModel):
    """Which ``event_data`` fields may leave the device, and what happens to the rest."""

    allowlist: tuple[str, ...] = Field(default=DEFAULT_ALLOWLIST, description="Top-level fields kept as is.")
    mode: Literal["drop", "hash"] = Field(default="drop", description="What to do with any other field.")
    hash_key: str = Field(
        default="", description="HMAC key for mode=hash; set one so short values resist guessing."
    )


def _digest(value: Any, key: bytes) -> str:
    encoded = orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
    return "hmac-sha256:" + hmac.new(key, encoded, hashlib.sha256).hexdigest()


def compile_filter(policy: PrivacyPolicy) -> Callable[[str], str]:
    """A function from an event's JSON to the JSON that may leave the device.

    Non-allowlisted fields are dropped or hashed; anything that is not a JSON object (bad
    JSON included) is not metadata and becomes ``{}``. Built once per batch, so the
    allowlist lookup is a set and the key is encoded once.
    """
    allowed = frozenset(policy.allowlist)
    key = policy.hash_key.encode()
    hashing = policy.mode == "hash"

    def keep(raw: str) -> str:
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return "{}"
        if not isinstance(data, dict):
            return "{}"
        if hashing:
            kept = {k: (v if k in allowed else _digest(v, key)) for k, v in data.items()}
        else:
            kept = {k: data[k] for k in data.keys() & allowed}
        text = orjson.dumps(kept).decode()
        # PostgreSQL's jsonb cannot store NUL characters; one such value must not poison a batch.
        return orjson.dumps(_without_nul(kept)).decode() if "\\u0000" in text else text

    return keep


def _without_nul(value: Any) -> Any:
    if isinstance(value, str):
        return value.replace("\x00", "")
    if isinstance(value, dict):
        return {_without_nul(k): _without_nul(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_nul(v) for v in value]
    return value
