"""Only allowlisted event_data fields leave the device; the rest are dropped or hashed."""

from __future__ import annotations

import orjson

from tasks.privacy_filter import PrivacyPolicy, filter_event_data

RAW = orjson.dumps(
    {"action": "save", "code": "secret()", "file_path": "/home/a/x.py", "duration_ms": 5}
).decode()


def test_drop_keeps_only_allowlisted_fields() -> None:
    policy = PrivacyPolicy(allowlist=("action", "duration_ms"))
    assert orjson.loads(filter_event_data(RAW, policy)) == {"action": "save", "duration_ms": 5}


def test_hash_replaces_values_with_keyed_digests() -> None:
    policy = PrivacyPolicy(allowlist=("action",), mode="hash", hash_key="k1")
    out = orjson.loads(filter_event_data(RAW, policy))
    assert out["action"] == "save"
    assert set(out) == {"action", "code", "file_path", "duration_ms"}
    assert all(v.startswith("hmac-sha256:") and "secret" not in v for k, v in out.items() if k != "action")
    # Same value and key → same digest (countable); another key → another digest.
    assert orjson.loads(filter_event_data(RAW, policy))["code"] == out["code"]
    other = orjson.loads(filter_event_data(RAW, policy.model_copy(update={"hash_key": "k2"})))
    assert other["code"] != out["code"]


def test_non_objects_carry_no_metadata() -> None:
    policy = PrivacyPolicy()
    assert filter_event_data("[1, 2]", policy) == "{}"
    assert filter_event_data("not json", policy) == "{}"


def test_nul_characters_are_removed_for_jsonb() -> None:
    raw = orjson.dumps({"action": ["sa\u0000ve"], "status": "\\u0000 stays"}).decode()
    assert orjson.loads(filter_event_data(raw, PrivacyPolicy())) == {
        "action": ["save"],
        "status": "\\u0000 stays",
    }
