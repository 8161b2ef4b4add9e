"""Only allowlisted event_data fields leave the device; the rest are dropped or hashed."""

from __future__ import annotations

import orjson

from tasks.privacy_filter import PrivacyPolicy, compile_filter

RAW = orjson.dumps(
    {"action": "save", "code": "secret()", "file_path": "/home/a/x.py", "duration_ms": 5}
).decode()


def test_drop_keeps_only_allowlisted_fields() -> None:
    keep = compile_filter(PrivacyPolicy(allowlist=("action", "duration_ms")))
    assert orjson.loads(keep(RAW)) == {"action": "save", "duration_ms": 5}


def test_hash_replaces_values_with_keyed_digests() -> None:
    policy = PrivacyPolicy(allowlist=("action",), mode="hash", hash_key="k1")
    out = orjson.loads(compile_filter(policy)(RAW))
    assert out["action"] == "save"
    assert set(out) == {"action", "code", "file_path", "duration_ms"}
    assert all(v.startswith("hmac-sha256:") and "secret" not in v for k, v in out.items() if k != "action")
    # Same value and key → same digest (countable); another key → another digest.
    assert orjson.loads(compile_filter(policy)(RAW))["code"] == out["code"]
    other = orjson.loads(compile_filter(policy.model_copy(update={"hash_key": "k2"}))(RAW))
    assert other["code"] != out["code"]


def test_non_objects_carry_no_metadata() -> None:
    keep = compile_filter(PrivacyPolicy())
    assert keep("[1, 2]") == "{}"
    assert keep("not json") == "{}"


def test_nul_characters_are_removed_for_jsonb() -> None:
    raw = orjson.dumps({"action": ["sa\u0000ve"], "status": "\\u0000 stays"}).decode()
    assert orjson.loads(compile_filter(PrivacyPolicy())(raw)) == {
        "action": ["save"],
        "status": "\\u0000 stays",
    }
