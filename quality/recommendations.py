"""Recommendations (seed 2.5.3 ``generateRecommendations``).

A rule broken by more than 10% of a table's rows is a high-priority validation finding;
a high-severity anomaly means the data source itself should be investigated.
"""

from __future__ import annotations

from dataclasses import dataclass

from quality.anomalies import Anomaly
from quality.runner import SuiteResult

FREQUENT_SHARE = 0.1


@dataclass(frozen=True)
class Recommendation:
    type: str
    priority: str
    suite: str
    title: str
    description: str
    action: str


def recommend(results: list[SuiteResult], anomalies: list[Anomaly]) -> list[Recommendation]:
    out = []
    for result in results:
        for rule in result.rules:
            if result.row_count and rule.unexpected_count > result.row_count * FREQUENT_SHARE:
                out.append(
                    Recommendation(
                        "validation",
                        "high",
                        result.suite,
                        f"Frequent {rule.rule} violations",
                        f"{rule.unexpected_count} of {result.row_count} rows of {result.target} failed {rule.rule}",
                        f"Review and update {rule.rule} validation logic or data source",
                    )
                )
    for anomaly in anomalies:
        if anomaly.severity == "high":
            out.append(
                Recommendation(
                    "anomaly",
                    "high",
                    anomaly.suite,
                    f"High number of {anomaly.type.replace('_', ' ')}s in {anomaly.field}",
                    f"{anomaly.count} detected ({anomaly.threshold})",
                    "Investigate the source for potential issues",
                )
            )
    return out
