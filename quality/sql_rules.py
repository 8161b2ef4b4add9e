"""Rules as SQL: the relation a suite checks (whole table or a time window) and each rule's row predicate.

Two consumers share these fragments so they cannot drift apart: GX's
``UnexpectedRowsExpectation`` (for the checks GX has no built-in for) and the per-row
scoring query in :mod:`quality.scoring`. Each predicate mirrors GX's semantics for the
matching built-in expectation: column-map checks ignore NULLs, ``not_null`` counts them.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Literal

from psycopg import sql
from psycopg.sql import Composable

from quality.suite_spec import Rule, Suite
from tasks.errors import UserError

Grain = Literal["day", "hour"]
_STEP = {"day": dt.timedelta(days=1), "hour": dt.timedelta(hours=1)}


@dataclass(frozen=True)
class TimeWindow:
    """One daily or hourly batch ``[start, start + grain)`` on a suite's timestamp column."""

    grain: Grain
    start: dt.datetime

    @classmethod
    def containing(cls, grain: Grain, moment: dt.datetime) -> TimeWindow:
        """The window of ``grain`` that holds ``moment`` (UTC; naive means UTC)."""
        if grain not in _STEP:
            raise UserError(f"window grain must be 'day' or 'hour', not {grain!r}")
        moment = moment.replace(tzinfo=dt.UTC) if moment.tzinfo is None else moment.astimezone(dt.UTC)
        start = moment.replace(minute=0, second=0, microsecond=0)
        if grain == "day":
            start = start.replace(hour=0)
        return cls(grain, start)

    @property
    def end(self) -> dt.datetime:
        return self.start + _STEP[self.grain]

    @property
    def label(self) -> str:
        return self.start.strftime("%Y-%m-%d" if self.grain == "day" else "%Y-%m-%dT%H:00Z")


@dataclass(frozen=True)
class TableSource:
    """Where a suite's rows live in PostgreSQL, optionally narrowed to a time window."""

    schema: str
    table: str
    timestamp_column: str | None = None
    window: TimeWindow | None = None

    @classmethod
    def for_suite(cls, suite: Suite, schema: str = "public", window: TimeWindow | None = None) -> TableSource:
        if window is not None and not suite.timestamp_column:
            raise UserError(
                f"suite '{suite.name}' has no timestamp_column, so it cannot be checked by {window.grain}; "
                "add timestamp_column to the suite or drop the window"
            )
        schema_name, table = suite.qualified_table(schema)
        return cls(schema_name, table, suite.timestamp_column, window)

    @property
    def table_ref(self) -> sql.Composable:
        return sql.SQL("{}.{}").format(sql.Identifier(self.schema), sql.Identifier(self.table))

    def window_query(self) -> sql.Composable:
        """``SELECT *`` of the window. Bounds are literals because GX query assets take no parameters."""
        assert self.window is not None and self.timestamp_column is not None
        return sql.SQL("SELECT * FROM {} WHERE {col} >= {start} AND {col} < {end}").format(
            self.table_ref,
            col=sql.Identifier(self.timestamp_column),
            start=sql.Literal(self.window.start),
            end=sql.Literal(self.window.end),
        )

    def relation(self) -> sql.Composable:
        """A FROM item for the rows under check."""
        return self.table_ref if self.window is None else sql.SQL("({})").format(self.window_query())


def bound(query: sql.Composed) -> sql.Composed:
    """``query`` ready to run with parameters. psycopg then reads every ``%`` as a placeholder, also
    one inside a quoted name or a literal (a column ``"Discount %"``): those are doubled. Only for
    queries run with parameters; GX's queries go through SQLAlchemy, which escapes on its own."""
    parts: list[Composable] = []
    for part in query:
        if isinstance(part, sql.Composed):
            parts.append(bound(part))
        elif isinstance(part, sql.Identifier | sql.Literal):
            parts.append(sql.SQL(part.as_string().replace("%", "%%")))
        else:
            parts.append(part)
    return sql.Composed(parts)


@dataclass(frozen=True)
class Predicate:
    """A boolean SQL expression over alias ``b`` that is true for a violating row, and its parameters.

    ``join`` is a ``LEFT JOIN`` the expression needs next to ``b`` (it never multiplies rows).
    """

    sql: Composable  # the field shadows the module inside this class, hence the plain name
    params: tuple[Any, ...] = ()
    join: Composable | None = None


def violation(rule: Rule, source: TableSource) -> Predicate:
    """The row predicate for a row-level rule, evaluated against ``<relation> AS b``."""
    col = sql.SQL("b.{}").format(sql.Identifier(rule.required_column))
    present = sql.SQL("{} IS NOT NULL AND ").format(col)
    match rule.check:
        case "not_null":
            return Predicate(sql.SQL("{} IS NULL").format(col))
        case "unique":
            return _duplicated(rule, source, col)
        case "in_set":
            return Predicate(sql.SQL("{}NOT ({} = ANY(%s))").format(present, col), (in_set_values(rule),))
        case "regex":
            return Predicate(sql.SQL("{}NOT ({} ~ %s)").format(present, col), (rule.pattern,))
        case "range":
            return _range(rule, col, present)
        case "not_future":
            return Predicate(not_future_sql(col))
        case "foreign_key":
            return Predicate(sql.SQL("{}").format(present) + foreign_key_missing_sql(rule, source, col))
    raise ValueError(f"rule {rule.name!r} ({rule.check}) has no row predicate")


def in_set_values(rule: Rule) -> list[object]:
    """An in_set rule's values, integers beside decimals all as floats: psycopg dumps no list
    mixing ``int`` and ``float`` (the score query failed), and GX binds every value as the first
    one's type (``[1, 2.5]`` checked 2.5 as 2)."""
    values = rule.values or []
    if {type(v) for v in values} == {int, float}:
        return [float(v) for v in values]
    return list(values)


class ColumnTyped(str):
    """An in_set text value that SQLAlchemy binds without a cast, as psycopg binds the score
    query's: PostgreSQL then reads it as the column's type (``'2024-01-01'`` as a date, ``'ok'`` as
    an enum label, ``'abc'`` as citext). SQLAlchemy casts a plain ``str`` to ``VARCHAR`` (its
    psycopg dialect renders a cast for every typed bind), and PostgreSQL has no ``date <> varchar``
    nor ``enum <> varchar`` and compares citext with varchar as text, case-sensitively; a subclass
    of ``str`` is no type SQLAlchemy knows, so it is bound untyped (its ``NullType``)."""

    __slots__ = ()


_INT32 = range(-(2**31), 2**31)


def gx_value_set(rule: Rule) -> list[object]:
    """An in_set rule's values for GX's SQL check, compared as the score query compares them. GX's
    ``IN`` binds every value with the first one's type: text is bound untyped (:class:`ColumnTyped`),
    and integers that do not all fit ``INTEGER`` as decimals, since a cast to ``INTEGER`` (first
    value ``1``) or ``BIGINT`` (first value ``2**40``) failed the rule with "integer out of range"
    for a later ``2**40`` or ``10**20``; ``NUMERIC`` holds them all and compares exactly with any
    number column, so a value no integer column holds is simply not in its set."""
    values = in_set_values(rule)
    if all(isinstance(v, str) for v in values):
        return [ColumnTyped(v) for v in values]
    integers = [v for v in values if type(v) is int]
    if len(integers) == len(values) and not all(v in _INT32 for v in integers):
        return [Decimal(v) for v in integers]
    return values


def _duplicated(rule: Rule, source: TableSource, col: sql.Composable) -> Predicate:
    """Rows whose value occurs more than once: a join on the duplicated values.

    A join rather than ``IN (subquery)``: on big tables PostgreSQL would not hash that subplan
    and would rescan it for every row.
    """
    alias = sql.Identifier(f"dup_{rule.name}")
    join = sql.SQL(
        " LEFT JOIN (SELECT {raw} AS v FROM {rel} AS d GROUP BY {raw} HAVING count(*) > 1) AS {alias} ON {alias}.v = {col}"
    ).format(raw=sql.Identifier(rule.required_column), rel=source.relation(), alias=alias, col=col)
    return Predicate(sql.SQL("{}.v IS NOT NULL").format(alias), join=join)


def _range(rule: Rule, col: sql.Composable, present: sql.Composable) -> Predicate:
    bounds: list[sql.Composable] = []
    params: list[float] = []
    if rule.min is not None:
        bounds.append(sql.SQL("{} < %s").format(col))
        params.append(rule.min)
    if rule.max is not None:
        bounds.append(sql.SQL("{} > %s").format(col))
        params.append(rule.max)
    return Predicate(sql.SQL("{}({})").format(present, sql.SQL(" OR ").join(bounds)), tuple(params))


def not_future_sql(col: sql.Composable) -> sql.Composable:
    """Missing, infinite or later than now: the seed's 'valid timestamp' rule."""
    return sql.SQL("({col} IS NULL OR NOT isfinite({col}) OR {col} > now())").format(col=col)


def foreign_key_missing_sql(rule: Rule, source: TableSource, col: sql.Composable) -> sql.Composable:
    schema, table, column = rule.reference(source.schema)
    return sql.SQL("NOT EXISTS (SELECT 1 FROM {}.{} AS r WHERE r.{} = {})").format(
        sql.Identifier(schema), sql.Identifier(table), sql.Identifier(column), col
    )


def gx_unexpected_rows_query(rule: Rule, source: TableSource) -> str:
    """The ``UnexpectedRowsExpectation`` query for checks GX has no SQL built-in for.

    Only the rule's column is selected, cast to text, so samples stay small and values like
    ``'infinity'`` (which Python datetimes cannot hold) still come back. GX substitutes
    ``{batch}`` with or without an alias depending on the asset, hence the extra sub-select.
    A ``unique`` rule (on a column GX's own check cannot name) brings its join on the duplicated values.
    """
    predicate = violation(rule, source)
    assert not predicate.params, "GX queries take no parameters"
    col = sql.Identifier(rule.required_column)
    before = sql.SQL("SELECT CAST(b.{col} AS text) AS {col} FROM (SELECT * FROM ").format(col=col)
    after = sql.SQL(") AS b{join} WHERE {pred}").format(
        join=predicate.join or sql.SQL(""), pred=predicate.sql
    )
    return "{batch}".join(_gx_text(part) for part in (before, after))


def _gx_text(query: Composable) -> str:
    """SQL for GX, which fills ``{batch}`` with ``str.format`` (braces are doubled, so a column
    such as ``"a{b}"`` is no placeholder) and runs the result as SQLAlchemy ``text()`` (see
    :func:`gx_query`)."""
    return gx_query(query).replace("{", "{{").replace("}", "}}")


_QUOTED_NAME = re.compile(r'"(?:[^"]|"")*"')


def gx_query(query: Composable) -> str:
    """SQL for GX, which runs it as SQLAlchemy ``text()``, where ``:y`` is a bind parameter. A
    window's query asset is parsed so twice: once as the asset, and again inside each check's
    query that GX builds from the compiled asset, so an escaped ``\\:`` held for the first pass
    only and a ``timestamp_column`` such as ``"x :y"`` failed every check of the window. A name
    holding a colon is spelled as a Unicode escape instead (``U&"x \\003Ay"``), which no pass reads.
    So is a ``%``: SQLAlchemy doubles it for psycopg's placeholders, but GX runs the query without
    parameters, so psycopg sent ``"a%%b"`` and every check of a window of table ``a%b`` failed."""
    if isinstance(query, sql.Composed):
        return "".join(gx_query(part) for part in query)
    text = query.as_string()
    if not isinstance(query, sql.Identifier) or not _MISREAD.search(text):
        return text
    return _QUOTED_NAME.sub(_escaped, text)


_MISREAD = re.compile("[:%]")


def _escaped(name: re.Match[str]) -> str:
    """One double-quoted name, as ``U&"..."`` with its colons and percent signs (and the escape
    character) escaped."""
    quoted = name.group(0)
    if not _MISREAD.search(quoted):
        return quoted
    return "U&" + quoted.replace("\\", "\\\\").replace(":", "\\003A").replace("%", "\\0025")
