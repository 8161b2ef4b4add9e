"""Only allowlisted event_data fields leave the device; the rest are dropped or hashed."""

from __future__ import annotations

import json
from decimal import Decimal

import orjson

from tasks.privacy_filter import PrivacyPolicy, compile_filter

RAW = orjson.dumps(
    {"action": "save", "code": "secret()", "file_path": "/home/a/x.py", "duration_ms": 5}
).decode()


def test_drop_keeps_only_allowlisted_fields() -> None:
    keep = compile_filter(PrivacyPolicy(allowlist=("action", "duration_ms")))
    assert orjson.loads(keep(RAW)) == {"action": "save", "duration_ms": 5}


def test_hash_replaces_names_and_values_with_keyed_digests() -> None:
    policy = PrivacyPolicy(allowlist=("action",), mode="hash", hash_key="k1")
    raw = orjson.dumps({"action": "save", "/home/alice/payroll.py": 12, "AWS_SECRET=AKIA123": 1}).decode()
    out = orjson.loads(compile_filter(policy)(raw))
    assert out["action"] == "save" and len(out) == 3
    hashed = {k: v for k, v in out.items() if k != "action"}
    assert all(k.startswith("hmac-sha256:") and v.startswith("hmac-sha256:") for k, v in hashed.items())
    assert "payroll" not in str(out) and "AWS" not in str(out)
    # Same name, value and key → same digests (countable); another key → other digests.
    same_name = orjson.loads(compile_filter(policy)(orjson.dumps({"/home/alice/payroll.py": 12}).decode()))
    assert same_name.items() <= hashed.items()
    other = orjson.loads(compile_filter(policy.model_copy(update={"hash_key": "k2"}))(raw))
    assert other["action"] == "save" and not (set(other) - {"action"}) & set(hashed)
    assert set(other.values()) & set(hashed.values()) == set()


def test_non_objects_carry_no_metadata() -> None:
    keep = compile_filter(PrivacyPolicy())
    assert keep("[1, 2]") == "{}"
    assert keep("not json") == "{}"


def test_nul_characters_of_kept_fields_stay_for_central_to_refuse() -> None:
    """jsonb cannot store a NUL: removed here, the value reached central changed without a word.
    Central refuses that event alone, naming the field (tests/tasks/test_sync_batches.py)."""
    raw = orjson.dumps({"action": ["sa\u0000ve"], "status": "\\u0000 stays", "code": "x\u0000"}).decode()
    assert orjson.loads(compile_filter(PrivacyPolicy())(raw)) == {
        "action": ["sa\u0000ve"],
        "status": "\\u0000 stays",
    }


def test_valid_json_orjson_refuses_keeps_its_allowlisted_fields() -> None:
    """A number beyond float64, NaN/Infinity (Python's ``json.dumps`` default) and a lone
    surrogate are valid JSON in the wild: only the values jsonb cannot store change."""
    keep = compile_filter(PrivacyPolicy(allowlist=("action", "language", "duration_ms", "status")))
    assert orjson.loads(keep('{"action":"save","language":"python","code_metric":1e400}')) == {
        "action": "save",
        "language": "python",
    }
    assert orjson.loads(keep('{"action":"save","code":"\\ud800 snippet","status":"ok \\udfff"}')) == {
        "action": "save",
        "status": "ok \ufffd",
    }
    raw = json.dumps({"action": "run", "duration_ms": float("nan"), "status": [float("-inf"), 1.5]})
    assert orjson.loads(keep(raw)) == {"action": "run", "duration_ms": None, "status": [None, 1.5]}


def test_numbers_beyond_64_bits_keep_their_digits() -> None:
    keep = compile_filter(PrivacyPolicy(allowlist=("lines_added", "duration_ms", "files_changed")))
    out = keep(
        '{"lines_added":123456789012345678901234567890,"duration_ms":-2.5e400,'
        '"files_changed":-0.0001e1003,"code":"x"}'
    )
    assert json.loads(out, parse_float=Decimal) == {
        "lines_added": 123456789012345678901234567890,
        "duration_ms": Decimal("-2.5e400"),
        "files_changed": Decimal("-1e999"),
    }
    # Beyond what PostgreSQL's numeric reads on every supported server: no jsonb form, null.
    assert orjson.loads(keep('{"lines_added":1e1001,"duration_ms":7}')) == {"lines_added": None, "duration_ms": 7}


def test_json_nested_past_any_parser_carries_no_metadata() -> None:
    keep = compile_filter(PrivacyPolicy())
    assert keep('{"action":"save","code":' + "[" * 100_000 + "]" * 100_000 + "}") == "{}"


def _nested(inner: str, levels: int = 300) -> str:
    return "[" * levels + inner + "]" * levels


def test_values_nested_deeper_than_orjson_writes_keep_their_metadata() -> None:
    """orjson reads 1,024 levels but writes 253: such a value, kept or hashed, failed its device
    on every run. Its NUL characters go as anywhere else; its digest ignores key order."""
    keep = compile_filter(PrivacyPolicy(allowlist=("action", "status")))
    out = keep('{"action":"save","status":' + _nested('"o\\u0000k"') + ',"code":"x"}')
    assert json.loads(out) == {"action": "save", "status": json.loads(_nested('"o\\u0000k"'))}
    # A number only orjson can write (read leniently, here because of the NaN) becomes null.
    out = keep('{"action":NaN,"status":' + _nested("1e400") + "}")
    assert json.loads(out) == {"action": None, "status": json.loads(_nested("null"))}
    # Deeper than Python's stack lets the standard library write: like JSON too deep to parse.
    assert keep('{"action":"save","status":' + _nested("1", 1000) + "}") == "{}"

    hashed = compile_filter(PrivacyPolicy(allowlist=("action",), mode="hash", hash_key="k"))
    out = orjson.loads(hashed('{"action":"save","code":{"b":1,"a":' + _nested("1") + "}}"))
    assert out["action"] == "save" and len(out) == 2
    assert out.items() == orjson.loads(hashed('{"code":{"a":' + _nested("1") + ',"b":1},"action":"save"}')).items()
    assert out.items() != orjson.loads(hashed('{"action":"save","code":{"b":1,"a":' + _nested("2") + "}}")).items()
