"""The seed's quality score: per-row penalties by severity, averaged per table, then across tables.

A row's score is ``100 - sum(weight of each rule it breaks)``, floored at 0; a table's
score is the mean of its row scores (100 for an empty table: no row is wrong). For
PostgreSQL tables the whole computation is one query inside the database, so a table of
any size costs one scan and returns a handful of numbers. DataFrames score from the row
indexes GX reports.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from statistics import fmean

from psycopg import sql

from quality.sql_rules import TableSource, bound, violation
from quality.suite_spec import Rule, Suite
from tasks.db import connection, one_row

PERFECT = 100.0


@dataclass(frozen=True)
class TableScore:
    row_count: int
    score: float
    rule_counts: dict[str, int]
    """Violating rows per row-level rule, as the scoring query counted them."""


def row_rules(suite: Suite) -> list[Rule]:
    return [r for r in suite.rules if r.row_level]


def score_query(suite: Suite, source: TableSource) -> tuple[sql.Composed, list[object]]:
    """One scan: row count, mean row score and each rule's violation count."""
    rules = row_rules(suite)
    flags: list[sql.Composable] = []
    joins: list[sql.Composable] = []
    params: list[object] = []
    for i, rule in enumerate(rules):
        predicate = violation(rule, source)
        flags.append(sql.SQL("coalesce({}, false) AS {}").format(predicate.sql, sql.Identifier(f"r{i}")))
        params.extend(predicate.params)
        if predicate.join is not None:
            joins.append(predicate.join)
    penalties: list[sql.Composable] = [
        sql.SQL("CASE WHEN {} THEN {} ELSE 0 END").format(sql.Identifier(f"r{i}"), sql.Literal(rule.weight))
        for i, rule in enumerate(rules)
    ]
    penalty = sql.SQL(" + ").join(penalties or [sql.SQL("0")])
    counts = [
        sql.SQL(", count(*) FILTER (WHERE {})").format(sql.Identifier(f"r{i}")) for i in range(len(rules))
    ]
    query = sql.SQL(
        "SELECT count(*), avg(GREATEST(0, 100 - ({penalty}))){counts} FROM (SELECT {flags} FROM {rel} AS b{joins}) AS p"
    ).format(
        penalty=penalty,
        counts=sql.SQL("").join(counts),
        flags=sql.SQL(", ").join(flags) if flags else sql.SQL("1 AS one"),
        rel=source.relation(),
        joins=sql.SQL("").join(joins),  # joins take no parameters, so params stay in flag order
    )
    return query, params


def score_table(url: str, suite: Suite, source: TableSource) -> TableScore:
    query, params = score_query(suite, source)
    with connection(url) as conn:
        row = one_row(conn, bound(query), params)
    rules = row_rules(suite)
    return TableScore(
        row_count=row[0],
        score=float(row[1]) if row[1] is not None else PERFECT,
        rule_counts={rule.name: row[2 + i] for i, rule in enumerate(rules)},
    )


def score_rows(row_count: int, suite: Suite, violating_rows: Mapping[str, Iterable[int]]) -> TableScore:
    """The same score from the row positions that broke each rule (the DataFrame path)."""
    penalties: dict[int, int] = {}
    counts: dict[str, int] = {}
    for rule in row_rules(suite):
        rows = set(violating_rows.get(rule.name, ()))
        counts[rule.name] = len(rows)
        for row in rows:
            penalties[row] = penalties.get(row, 0) + rule.weight
    if row_count == 0:
        return TableScore(0, PERFECT, counts)
    lost = sum(min(PERFECT, p) for p in penalties.values())
    return TableScore(row_count, (PERFECT * row_count - lost) / row_count, counts)


def overall_score(scores: Iterable[float]) -> float:
    """Across entities: the plain mean of table scores, so a small table counts as much as a big one."""
    values = list(scores)
    return fmean(values) if values else PERFECT
