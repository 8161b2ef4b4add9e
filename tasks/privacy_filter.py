"""Only metadata leaves a developer machine (seed 002 §9.1).

Fields of ``event_data`` outside the configured allowlist (code content, file paths,
commit messages …) are dropped, or their names and values replaced by keyed hashes so the
central side can still count distinct values without seeing them. The filter runs on the device side, before the
batch is encoded for upload, so a raw value never reaches the central database.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
from collections.abc import Callable
from decimal import Decimal
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

_INT64_DIGITS = 18
"""Any integer of up to 18 digits fits in 64 bits; a longer one may not."""
_ROUNDED_INT_MAGNITUDE = 2.0**63
"""orjson reads integers beyond 64 bits as float64, so from this magnitude a float may be a rounded integer."""
_JSONB_MAX_EXPONENT = 1000
"""The largest decimal exponent PostgreSQL 14's numeric input accepts (later versions take more)."""


class PrivacyPolicy(BaseModel):
    """Which ``event_data`` fields may leave the device, and what happens to the rest."""

    allowlist: tuple[str, ...] = Field(default=DEFAULT_ALLOWLIST, description="Top-level fields kept as is.")
    mode: Literal["drop", "hash"] = Field(default="drop", description="What to do with any other field.")
    hash_key: str = Field(
        default="", description="HMAC key for mode=hash; set one so short values resist guessing."
    )


def _digest(value: Any, key: bytes) -> str:
    return "hmac-sha256:" + hmac.new(key, _dumps(value, sort_keys=True), hashlib.sha256).hexdigest()


def _dumps(value: Any, *, sort_keys: bool = False) -> bytes:
    """``value`` as compact JSON, by orjson. orjson reads JSON nested up to 1,024 levels but
    writes only 253 (its one refusal of a value :func:`_parse` returns), so the standard library
    writes a deeper one: the event syncs instead of failing its device on every run. A number
    only orjson can write (a :class:`orjson.Fragment`) becomes null there, and a value nested
    deeper than Python's stack raises RecursionError."""
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS if sort_keys else None)
    except orjson.JSONEncodeError:
        text = json.dumps(
            value, ensure_ascii=False, separators=(",", ":"), sort_keys=sort_keys, default=_no_jsonb_form
        )
        return text.encode()


def compile_filter(policy: PrivacyPolicy) -> Callable[[str], str]:
    """A function from an event's JSON to the JSON that may leave the device.

    Non-allowlisted fields are dropped or hashed; anything that is not a JSON object (bad
    JSON included) is not metadata and becomes ``{}``. Built once per batch, so the
    allowlist lookup is a set and the key is encoded once. Kept fields are picked by a scan of
    the event's few fields, in their order: a fifth less time than intersecting key sets
    (1.7 against 2.1 µs per event, docs/benchmarks.md), and the filter runs on every event.
    """
    allowed = frozenset(policy.allowlist)
    key = policy.hash_key.encode()
    hashing = policy.mode == "hash"

    def keep(raw: str) -> str:
        data = _parse(raw)
        if not isinstance(data, dict):
            return "{}"
        kept = {k: v for k, v in data.items() if k in allowed}
        try:
            if hashing:  # a field's name can be as private as its value (a path, a secret): both are hashed
                kept.update((_digest(k, key), _digest(v, key)) for k, v in data.items() if k not in allowed)
            # A NUL character (\u0000) stays: jsonb cannot store it, so central refuses that event
            # alone, as it does a NUL in the event type (central_store names the field). Removed
            # here, the value reached central changed, without a word.
            return _dumps(kept).decode()
        except RecursionError:  # nested deeper than Python's stack: as for JSON too deep to parse
            return "{}"

    return keep


def _parse(raw: str) -> Any:
    """The event's JSON, read by orjson (fast), or by the standard library when orjson refuses
    valid JSON (numbers beyond float64, ``NaN``/``Infinity`` as Python's ``json`` writes them,
    lone surrogates) or may have rounded an integer beyond 64 bits, so the allowlisted fields
    survive with their values."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return _parse_leniently(raw)
    if isinstance(data, dict) and _may_hold_rounded_int(data):
        return _parse_leniently(raw)
    return data


def _may_hold_rounded_int(data: dict[str, Any]) -> bool:
    """orjson reads an integer beyond 64 bits as a rounded float64, so a top-level float that
    large may be one. The type scan runs in C, so an event without floats costs next to
    nothing; nested values are not scanned."""
    return float in map(type, data.values()) and any(
        type(v) is float and abs(v) >= _ROUNDED_INT_MAGNITUDE for v in data.values()
    )


def _parse_leniently(raw: str) -> Any:
    """The standard library's reading of ``raw`` in values jsonb can store; ``None`` for bad JSON
    and for no text at all: an app's own v1 table may lack ``NOT NULL``, and SQLite hands a NULL
    ``event_data`` over as ``None``, which must not stop its device's sync on every run."""
    try:
        data = json.loads(raw, parse_int=_parse_int, parse_float=_parse_float, parse_constant=_no_jsonb_form)
        return _map_strings(data, _without_lone_surrogates)
    except (ValueError, RecursionError, TypeError):  # not JSON, nested deeper than Python's stack, or NULL
        return None


def _parse_int(text: str) -> int | orjson.Fragment | None:
    if len(text.lstrip("-")) <= _INT64_DIGITS:
        return int(text)
    return _exact_number(Decimal(text), text)


def _parse_float(text: str) -> float | orjson.Fragment | None:
    value = float(text)
    if math.isfinite(value):
        return value
    number = Decimal(text)
    return _exact_number(number, f"{number:e}")


def _exact_number(number: Decimal, written: str) -> orjson.Fragment | None:
    """A number beyond int64/float64 with all its digits, or ``None`` (null) when PostgreSQL's
    numeric cannot hold it on every supported server (14 refuses a written exponent past
    ±1000): like NaN, such a value has no jsonb form."""
    if number.adjusted() > _JSONB_MAX_EXPONENT:
        return None
    return orjson.Fragment(written)


def _no_jsonb_form(_value: object) -> None:
    """``NaN``, ``Infinity`` and ``-Infinity`` have no jsonb form, and the standard library
    cannot write a number kept as an :class:`orjson.Fragment`: they become null."""
    return None


def _without_lone_surrogates(text: str) -> str:
    """A lone surrogate (``"\\ud800"`` is valid JSON) cannot be UTF-8 encoded; it becomes U+FFFD."""
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


def _map_strings(value: Any, fix: Callable[[str], str]) -> Any:
    """``value`` with ``fix`` applied to every string in it, object keys included."""
    if isinstance(value, str):
        return fix(value)
    if isinstance(value, dict):
        return {fix(k): _map_strings(v, fix) for k, v in value.items()}
    if isinstance(value, list):
        return [_map_strings(v, fix) for v in value]
    return value
