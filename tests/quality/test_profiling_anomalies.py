"""Profiles, IQR outliers, pattern breaks and score trends, checked against values computed in Python."""

from __future__ import annotations

import statistics
import uuid

import psycopg
import pytest

from quality import anomalies, history
from quality.anomalies import trends
from quality.profiling import profile_table
from quality.runner import RuleResult, SuiteResult
from quality.sql_rules import TableSource
from tests.conftest import run_cli

AMOUNTS = [10, 12, 11, 13, 9, 10, 12, 11, 500, -300, 10, 11]
CODES = [
    "AB-12",
    "CD-34",
    "EF-56",
    "GH-78",
    "IJ-90",
    "KL-11",
    "MN-22",
    "OP-33",
    "QR-44",
    "zz_top",
    "ST-55",
    None,
]


@pytest.fixture()
def measured(fresh_db):
    with psycopg.connect(fresh_db, autocommit=True) as conn:
        conn.execute("CREATE TABLE m (amount numeric, code text, seen date)")
        conn.cursor().executemany(
            "INSERT INTO m VALUES (%s, %s, DATE '2026-01-01' + %s)",
            [(a, c, i) for i, (a, c) in enumerate(zip(AMOUNTS, CODES, strict=True))],
        )
    return fresh_db


def _quantile(values, q):
    """PostgreSQL's percentile_cont: linear interpolation between closest ranks."""
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo = int(pos)
    return ordered[lo] + (ordered[min(lo + 1, len(ordered) - 1)] - ordered[lo]) * (pos - lo)


def test_profile_numbers_strings_dates(measured):
    with psycopg.connect(measured) as conn:
        profile = profile_table(conn, TableSource("public", "m"))
    amount, code, seen = profile.column("amount"), profile.column("code"), profile.column("seen")
    assert profile.row_count == 12
    assert (amount.kind, amount.null_count, amount.distinct_count) == ("number", 0, len(set(AMOUNTS)))
    assert amount.stats["min"] == min(AMOUNTS) and amount.stats["max"] == max(AMOUNTS)
    assert amount.stats["mean"] == pytest.approx(statistics.fmean(AMOUNTS))
    assert amount.stats["stddev"] == pytest.approx(statistics.stdev(AMOUNTS))
    assert amount.stats["p25"] == pytest.approx(_quantile(AMOUNTS, 0.25))
    assert amount.stats["p75"] == pytest.approx(_quantile(AMOUNTS, 0.75))
    present = [c for c in CODES if c is not None]
    assert (code.kind, code.null_count, code.distinct_count) == ("string", 1, len(set(present)))
    assert code.stats["min_length"] == min(map(len, present)) and code.stats["max_length"] == 6
    assert code.stats["mean_length"] == pytest.approx(statistics.fmean(map(len, present)))
    assert len(code.stats["top_values"]) == 5 and all(v["count"] == 1 for v in code.stats["top_values"])
    assert (seen.kind, seen.stats["min"], seen.stats["max"]) == ("date", "2026-01-01", "2026-01-12")


def test_iqr_outliers_and_pattern_violations(measured):
    q1, q3 = _quantile(AMOUNTS, 0.25), _quantile(AMOUNTS, 0.75)
    lower, upper = q1 - 1.5 * (q3 - q1), q3 + 1.5 * (q3 - q1)
    outliers = [a for a in AMOUNTS if a < lower or a > upper]
    source = TableSource("public", "m")
    with psycopg.connect(measured) as conn:
        found = anomalies.detect_anomalies(conn, "m", source, profile_table(conn, source))
    by_type = {a.type: a for a in found}
    outlier = by_type["outlier"]
    assert (outlier.field, outlier.count) == ("amount", len(outliers))
    assert outlier.threshold == pytest.approx({"lower": lower, "upper": upper})
    assert sorted(outlier.sample) == sorted(outliers)
    # 2 of 12 values are outliers: more than 10% → high severity (the seed's rule)
    assert outlier.severity == ("high" if len(outliers) / len(AMOUNTS) > 0.1 else "medium") == "high"
    pattern = by_type["pattern_violation"]
    assert (pattern.field, pattern.count, pattern.sample) == ("code", 1, ["zz_top"])
    assert pattern.threshold["dominant_pattern"] == "a-9"


def test_names_with_a_percent_sign_are_profiled(fresh_db):
    """psycopg reads a % inside a quoted name as a placeholder in a query run with parameters: the
    profile of any table with a column such as "Amount %" failed (its top values and anomaly
    queries raised "only '%s', '%b', '%t' are allowed as placeholders")."""
    with psycopg.connect(fresh_db, autocommit=True) as conn:
        conn.execute('CREATE TABLE m ("Amount %" numeric, "Code %" text)')
        conn.cursor().executemany("INSERT INTO m VALUES (%s, %s)", list(zip(AMOUNTS, CODES, strict=True)))
    source = TableSource("public", "m")
    with psycopg.connect(fresh_db) as conn:
        profile = profile_table(conn, source)
        found = {a.type: a for a in anomalies.detect_anomalies(conn, "m", source, profile)}
    assert len(profile.column("Code %").stats["top_values"]) == 5
    assert (found["outlier"].field, sorted(found["outlier"].sample)) == ("Amount %", [-300, 500])
    assert (found["pattern_violation"].field, found["pattern_violation"].sample) == ("Code %", ["zz_top"])


def _result(suite: str, score: float) -> SuiteResult:
    rule = RuleResult("r", "not_null", "high", "id", score == 100, 0, 0.0)
    return SuiteResult(suite, "public.t", None, 10, score, [rule])


def test_trends_over_several_runs(state_db):
    suite = f"trend-{uuid.uuid4().hex[:8]}"
    seen = []
    for run, score in enumerate([90.0, 90.0, 95.0, 80.0, 80.005]):
        previous = history.score_history(state_db, [suite])
        [trend], breaks = trends([_result(suite, score)], previous)
        history.record_scores(state_db, f"run-{run}", [_result(suite, score)])
        seen.append((trend.direction, trend.change, [b.type for b in breaks]))
    assert seen[0] == ("stable", None, [])
    assert seen[1] == ("stable", 0.0, [])
    assert seen[2] == ("up", 5.0, [])
    # 80 is more than 5 points below the mean of 90, 90, 95: a trend break
    assert seen[3][0:2] == ("down", -15.0) and seen[3][2] == ["trend_break"]
    assert seen[4][0] == "stable" and seen[4][1] == pytest.approx(0.005)
    stored = history.score_history(state_db, [suite], limit=3)[suite]
    assert [p.score for p in stored] == [95.0, 80.0, 80.005]


def test_cli_profile_text_shows_the_top_values_of_text_columns(fresh_db):
    """``--json`` listed a text column's most frequent values, the text output left them out: they
    follow each text column's statistics, quoted (a newline stays on the line) and cut when long."""
    with psycopg.connect(fresh_db, autocommit=True) as conn:
        conn.execute("CREATE TABLE orders (status text, note text, n int)")
        conn.cursor().executemany(
            "INSERT INTO orders VALUES (%s, %s, %s)",
            [("open", "a\nb", 1), ("open", "x" * 50, 2), ("lost", None, 3)],
        )
    proc = run_cli("quality", "profile", "orders", "--database-url", fresh_db)
    assert proc.returncode == 0, proc.stderr
    lines = {line.split()[0]: line for line in proc.stdout.splitlines()[1:]}
    assert lines["status"].endswith("mean_length=4.0  top: 'open' 2, 'lost' 1")
    assert lines["note"].endswith(f"  top: 'a\\nb' 1, '{'x' * 28}… 1")
    assert "top:" not in lines["n"]
