"""The seed's recommendation rules: >10% failing rows, and high-severity anomalies."""

from __future__ import annotations

from quality.anomalies import Anomaly
from quality.recommendations import recommend
from quality.runner import RuleResult, SuiteResult


def _rule(name: str, count: int) -> RuleResult:
    return RuleResult(name, "regex", "high", "c", count == 0, count, count)


def test_more_than_ten_percent_is_high_priority_and_exactly_ten_is_not():
    result = SuiteResult(
        "users", "public.users", None, 200, 90.0, [_rule("at_limit", 20), _rule("over", 21), _rule("ok", 0)]
    )
    anomalies = [
        Anomaly("users", "age", "outlier", "high", 40),
        Anomaly("users", "email", "pattern_violation", "medium", 3),
    ]
    recs = recommend([result], anomalies)
    assert [(r.type, r.priority, r.title) for r in recs] == [
        ("validation", "high", "Frequent over violations"),
        ("anomaly", "high", "High number of outliers in age"),
    ]
    assert recs[1].action == "Investigate the source for potential issues"
    assert "21 of 200 rows" in recs[0].description


def test_empty_table_recommends_nothing():
    assert recommend([SuiteResult("users", "public.users", None, 0, 100.0, [_rule("x", 0)])], []) == []
