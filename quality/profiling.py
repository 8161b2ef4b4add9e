"""Column profiles of a table, computed by PostgreSQL (seed 2.5.3 ``profileData``).

Per column: type, null and distinct counts; numbers add min/max/mean/stddev/quartiles;
strings add length statistics and the most frequent values; dates add their range. One
aggregate query scans the table once for all columns; only top values need one small
GROUP BY per string column. Nothing but the aggregates reaches Python.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from quality.sql_rules import TableSource, bound
from tasks.db import one_row
from tasks.errors import UserError

KIND_BY_CATEGORY = {"N": "number", "S": "string", "D": "date"}
"""pg_type.typcategory → profile kind; everything else (bool, uuid, json...) gets the common stats only."""


@dataclass
class ColumnProfile:
    name: str
    type: str
    kind: str
    null_count: int
    distinct_count: int
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class TableProfile:
    target: str
    row_count: int
    columns: list[ColumnProfile]

    def column(self, name: str) -> ColumnProfile:
        return next(c for c in self.columns if c.name == name)

    def rows(self) -> list[dict[str, Any]]:
        """One flat row per column, for a Prefect table artifact."""
        return [
            {"column": c.name, "type": c.type, "nulls": c.null_count, "distinct": c.distinct_count, **c.stats}
            for c in self.columns
        ]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def table_columns(conn: psycopg.Connection, schema: str, table: str) -> list[tuple[str, str, str]]:
    """(name, SQL type, kind) of the table's live columns in order."""
    rows = conn.execute(
        """
        SELECT a.attname, format_type(a.atttypid, a.atttypmod), t.typcategory
        FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
        WHERE a.attrelid = to_regclass(format('%%I.%%I', %s::text, %s::text)) AND a.attnum > 0 AND NOT a.attisdropped
        ORDER BY a.attnum
        """,
        (schema, table),
    ).fetchall()
    return [(name, type_, KIND_BY_CATEGORY.get(category, "other")) for name, type_, category in rows]


def require_populated(conn: psycopg.Connection, schema: str, table: str) -> None:
    """A materialized view created ``WITH NO DATA`` refuses every read until it is refreshed: say so
    in one line rather than as the driver's error."""
    row = conn.execute(
        "SELECT relispopulated FROM pg_class WHERE oid = to_regclass(format('%%I.%%I', %s::text, %s::text))",
        (schema, table),
    ).fetchone()
    if row is not None and not row[0]:
        name = sql.Identifier(schema, table).as_string()
        raise UserError(
            f"materialized view {schema}.{table} has not been populated; run REFRESH MATERIALIZED VIEW {name} first"
        )


def _aggregates(name: str, kind: str) -> Sequence[tuple[str, sql.Composable]]:
    """(stat name, expression) for one column."""
    col = sql.Identifier(name)
    common = [
        ("nulls", sql.SQL("count(*) - count({})").format(col)),
        ("distinct", sql.SQL("count(DISTINCT {})").format(col)),
    ]
    if kind == "number":
        num = sql.SQL("CAST({} AS double precision)").format(col)
        quartiles = [
            (
                f"p{int(q * 100)}",
                sql.SQL("percentile_cont({}) WITHIN GROUP (ORDER BY {})").format(sql.Literal(q), num),
            )
            for q in (0.25, 0.5, 0.75)
        ]
        return common + [
            ("min", sql.SQL("min({})").format(num)),
            ("max", sql.SQL("max({})").format(num)),
            ("mean", sql.SQL("avg({})").format(num)),
            ("stddev", sql.SQL("stddev_samp({})").format(num)),
            *quartiles,
        ]
    if kind == "string":
        length = sql.SQL("length({})").format(col)
        return common + [
            ("min_length", sql.SQL("min({})").format(length)),
            ("max_length", sql.SQL("max({})").format(length)),
            ("mean_length", sql.SQL("CAST(avg({}) AS double precision)").format(length)),
        ]
    if kind == "date":
        # As text: 'infinity' is a valid PostgreSQL timestamp Python cannot hold.
        return common + [
            ("min", sql.SQL("CAST(min({}) AS text)").format(col)),
            ("max", sql.SQL("CAST(max({}) AS text)").format(col)),
        ]
    return common


def top_values(
    conn: psycopg.Connection, source: TableSource, column: str, limit: int
) -> list[dict[str, Any]]:
    query = sql.SQL(
        "SELECT {col}, count(*) FROM {rel} AS b WHERE {col} IS NOT NULL GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT %s"
    ).format(col=sql.Identifier(column), rel=source.relation())
    return [{"value": v, "count": n} for v, n in conn.execute(bound(query), (limit,)).fetchall()]


def profile_table(conn: psycopg.Connection, source: TableSource, top_n: int = 5) -> TableProfile:
    """Profile every column of ``source`` (a table or one time window of it)."""
    columns = table_columns(conn, source.schema, source.table)
    if not columns:
        raise UserError(f"table {source.schema}.{source.table} not found; check the schema and table name")
    require_populated(conn, source.schema, source.table)
    names: list[tuple[str, str]] = []
    expressions: list[sql.Composable] = [sql.SQL("count(*)")]
    for name, _type, kind in columns:
        for stat, expression in _aggregates(name, kind):
            names.append((name, stat))
            expressions.append(expression)
    row = one_row(conn, sql.SQL("SELECT {} FROM {} AS b").format(sql.SQL(", ").join(expressions), source.relation()))
    values: dict[str, dict[str, Any]] = {}
    for (column, stat), value in zip(names, row[1:], strict=True):
        values.setdefault(column, {})[stat] = value
    profiles = []
    for name, type_, kind in columns:
        stats = values.get(name, {})
        profile = ColumnProfile(name, type_, kind, int(stats.pop("nulls")), int(stats.pop("distinct")), stats)
        if kind == "string":
            profile.stats["top_values"] = top_values(conn, source, name, top_n)
        profiles.append(profile)
    return TableProfile(f"{source.schema}.{source.table}", row[0], profiles)
