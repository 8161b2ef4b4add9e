"""Run suites with Great Expectations Core 1.x in an ephemeral context.

PostgreSQL tables go through GX's SQL datasource, so every expectation is a query inside
the database and no table is loaded into Python; a time window becomes a GX query asset
over ``[start, end)`` of the suite's timestamp column. DataFrames and files go through
GX's pandas datasource. Each rule maps to GX built-ins where GX has one, otherwise to an
``UnexpectedRowsExpectation`` built from the same SQL predicate the scorer uses.
"""

from __future__ import annotations

import datetime as dt
import difflib
import functools
import itertools
import math
import re
import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

import great_expectations as gx
import great_expectations.expectations as gxe
import pandas as pd
import psycopg
import sqlalchemy
from great_expectations.core.expectation_validation_result import ExpectationValidationResult
from great_expectations.data_context.types.base import ProgressBarsConfig
from great_expectations.datasource.fluent import PostgresDatasource
from psycopg import sql
from psycopg.abc import Buffer
from psycopg.postgres import types as pg_types
from psycopg.types.datetime import DateLoader, TimestampLoader, TimestamptzLoader
from psycopg.types.multirange import MultirangeInfo
from psycopg.types.numeric import NumericLoader
from psycopg.types.range import RangeInfo
from psycopg.types.string import TextLoader
from sqlalchemy import quoted_name

from quality.data_files import read_data_file
from quality.profiling import require_populated, table_columns
from quality.scoring import TableScore, score_rows, score_table
from quality.sql_rules import (
    TableSource,
    TimeWindow,
    bound,
    gx_query,
    gx_unexpected_rows_query,
    gx_value_set,
    in_set_values,
    violation,
)
from quality.suite_spec import Rule, Suite
from tasks.db import connect, connection, sqlalchemy_url
from tasks.errors import UserError, first_line

Backend = Literal["sql", "pandas"]
DEFAULT_SAMPLE = 20


@dataclass
class RuleResult:
    """One rule's outcome: how many rows broke it, which share of the rows, and a bounded sample."""

    rule: str
    check: str
    severity: str
    column: str | None
    success: bool
    unexpected_count: int
    unexpected_percent: float
    sample: list[Any] = field(default_factory=list)
    observed: Any = None
    error: str | None = None


@dataclass
class SuiteResult:
    suite: str
    target: str
    window: str | None
    row_count: int
    score: float
    rules: list[RuleResult]

    @property
    def success(self) -> bool:
        return all(r.success for r in self.rules)

    @property
    def violations(self) -> list[RuleResult]:
        return [r for r in self.rules if not r.success]


class UnexpectedRowsWithSample(gxe.UnexpectedRowsExpectation):
    """GX's unexpected-rows expectation that always returns its sample rows.

    GX fetches up to 200 unexpected rows in any case but only reports them under the
    COMPLETE result format, which for the built-in column expectations would list every
    unexpected value. This keeps SUMMARY for the run and still gives a bounded sample here.
    """

    def _validate(
        self,
        metrics: dict,
        runtime_configuration: dict | None = None,
        execution_engine: Any = None,
    ) -> Any:
        complete = {**(runtime_configuration or {}), "result_format": {"result_format": "COMPLETE"}}
        return super()._validate(metrics, complete, execution_engine)


def expectations_for(
    rule: Rule, backend: Backend, source: TableSource | None = None
) -> list[gxe.Expectation]:
    """GX expectations that together check ``rule``; each is tagged with the rule's name."""
    meta = {"rule": rule.name}
    if rule.check == "row_count":
        return [
            gxe.ExpectTableRowCountToBeBetween(
                min_value=_row_bound(rule.min), max_value=_row_bound(rule.max), meta=meta
            )
        ]
    column = rule.required_column
    match rule.check:
        case "not_null":
            return [gxe.ExpectColumnValuesToNotBeNull(column=column, meta=meta)]
        case "unique" if backend == "sql" and own_query(rule):
            # GX's unique check drops NULLs through its condition language, col("..."), which has no
            # escape for a double quote ("unable to parse condition"): the scorer's SQL checks it.
            assert source is not None
            return [UnexpectedRowsWithSample(unexpected_rows_query=gx_unexpected_rows_query(rule, source), meta=meta)]
        case "unique":
            return [gxe.ExpectColumnValuesToBeUnique(column=column, meta=meta)]
        case "in_set":
            values = gx_value_set(rule) if backend == "sql" else in_set_values(rule)
            return [gxe.ExpectColumnValuesToBeInSet(column=column, value_set=values, meta=meta)]
        case "regex":
            assert rule.pattern is not None, "validation requires a pattern for regex rules"
            return [gxe.ExpectColumnValuesToMatchRegex(column=column, regex=rule.pattern, meta=meta)]
        case "range":
            return [
                gxe.ExpectColumnValuesToBeBetween(
                    column=column, min_value=rule.min, max_value=rule.max, meta=meta
                )
            ]
        case "not_future" if backend == "pandas":
            now = dt.datetime.now(dt.UTC)
            return [
                gxe.ExpectColumnValuesToNotBeNull(column=column, meta=meta),
                gxe.ExpectColumnValuesToBeBetween(column=column, max_value=now, meta=meta),
            ]
        case "foreign_key" if backend == "pandas":
            raise UserError(
                f"rule '{rule.name}' (foreign_key) needs the referenced table; check this suite against "
                "a PostgreSQL table, or drop the rule for file input"
            )
        case "not_future" | "foreign_key":
            assert source is not None
            query = gx_unexpected_rows_query(rule, source)
            return [UnexpectedRowsWithSample(unexpected_rows_query=query, meta=meta)]
    raise ValueError(f"unsupported check {rule.check!r}")


def own_query(rule: Rule) -> bool:
    """Whether a table's rule runs as flowyard's query (an ``UnexpectedRowsExpectation``) rather
    than a GX built-in: GX writes the table's name into that query itself."""
    return rule.check in ("not_future", "foreign_key") or (rule.check == "unique" and '"' in rule.required_column)


def _row_bound(bound: float | None) -> int | None:
    """A row-count bound as GX types it; GX would truncate a float to int the same way."""
    return None if bound is None else int(bound)


_DOCS_SITE = "flowyard"

_SQL_RESULT_FORMAT = {"result_format": "SUMMARY", "return_unexpected_index_query": False}
"""GX's summary of a table's checks, without the copy-pasteable query of each check's failing rows,
which flowyard never shows: GX writes the values into it with ``repr`` through ``re.sub``, so a
value holding a backslash (an in_set ``'\\x0102'`` on a bytea column, ``'a\\b'`` on text) came out
changed, GX fell back to rendering the values as SQL literals, and an untyped
:class:`~quality.sql_rules.ColumnTyped` value has none: "No literal value renderer is available
... NULL" was the rule's error, with no failing rows."""


class GxSession:
    """One ephemeral GX context shared by concurrent checks; its configuration is guarded by a lock.

    GX's stores are plain dictionaries, so adding datasources, assets and suites is
    serialised; the validations themselves (the expensive part, all in the database) run
    in parallel.
    """

    def __init__(self, docs_dir: Path | None = None) -> None:
        self.context = gx.get_context(mode="ephemeral")
        self.context.variables.progress_bars = ProgressBarsConfig(globally=False)
        self._lock = threading.Lock()
        self._datasources: dict[str, Any] = {}
        self._names = itertools.count(1)
        self.docs_dir = docs_dir
        if docs_dir is not None:
            self.context.add_data_docs_site(
                _DOCS_SITE,
                {
                    "class_name": "SiteBuilder",
                    "store_backend": {
                        "class_name": "TupleFilesystemStoreBackend",
                        "base_directory": str(docs_dir),
                    },
                    "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
                },
            )

    def _unique(self, name: str) -> str:
        return f"{name}-{next(self._names)}"

    def _postgres(self, url: str) -> Any:
        if url not in self._datasources:
            datasource = PostgresDatasource(
                name=self._unique("postgres"),
                connection_string=sqlalchemy_url(url),
                # GX's SQLAlchemy sessions are opened by flowyard's ``connect`` like every other:
                # a role's statement_timeout is lifted (a check lasts as long as its table).
                kwargs={"creator": functools.partial(_gx_connect, url)},
            )
            self._datasources[url] = self.context.data_sources.add_postgres(datasource=datasource)
        return self._datasources[url]

    def _validation(self, suite: Suite, batch_definition: Any, expectations: list[gxe.Expectation]) -> Any:
        gx_suite = self.context.suites.add(gx.ExpectationSuite(name=self._unique(suite.name)))
        for expectation in expectations:
            gx_suite.add_expectation(expectation)
        definition = gx.ValidationDefinition(
            name=self._unique(suite.name), data=batch_definition, suite=gx_suite
        )
        return self.context.validation_definitions.add(definition)

    def validate_table(self, url: str, suite: Suite, source: TableSource, sample_size: int) -> list[Any]:
        expectations = [e for r in suite.rules for e in expectations_for(r, "sql", source)]
        with self._lock:
            datasource = self._postgres(url)
            if source.window is None:
                # Quoted names: GX lowercases a plain schema and leaves a plain table unquoted, so
                # ``Shop.Orders`` was read as ``shop.orders`` (another table, or none). A table
                # asset, not a query asset over it: that one held 2.3x the memory (docs/benchmarks.md).
                asset = datasource.add_table_asset(
                    self._unique(suite.name),
                    table_name=quoted_name(source.table, quote=True),
                    schema_name=quoted_name(source.schema, quote=True),
                )
            else:
                asset = datasource.add_query_asset(
                    self._unique(suite.name), query=gx_query(source.window_query())
                )
            validation = self._validation(suite, asset.add_batch_definition_whole_table("all"), expectations)
        result = validation.run(result_format=_SQL_RESULT_FORMAT | {"partial_unexpected_count": sample_size})
        return list(result.results)

    def validate_frame(self, suite: Suite, frame: pd.DataFrame, sample_size: int) -> list[Any]:
        expectations = [e for r in suite.rules for e in expectations_for(r, "pandas")]
        with self._lock:
            asset = self.context.data_sources.add_pandas(self._unique("pandas")).add_dataframe_asset(
                suite.name
            )
            validation = self._validation(
                suite, asset.add_batch_definition_whole_dataframe("all"), expectations
            )
        result = validation.run(
            batch_parameters={"dataframe": frame},
            result_format={"result_format": "COMPLETE", "partial_unexpected_count": sample_size},
        )
        return list(result.results)

    def build_docs(self) -> Path | None:
        """Write GX Data Docs (HTML) for every validation of this session into ``docs_dir``."""
        if self.docs_dir is None:
            return None
        with self._lock:
            # Only flowyard's site: the ephemeral context's default one lives in a new temporary
            # directory that nothing removes (~4 MB of HTML left in /tmp per run).
            self.context.build_data_docs(site_names=[_DOCS_SITE])
        return self.docs_dir / "index.html"


_AS_TEXT = ["interval", "inet", "cidr", "bytea", "json", "jsonb"]
"""Types GX gets as PostgreSQL prints them: it never compares their values in Python, and it
cannot write timedelta, IPv4Address or Range values into its results ("... is of type timedelta
which cannot be serialized" ended the whole run); bytes and dicts were samples in Python's spelling."""


class _TextBeyondPython:
    """A loader that gives the value as PostgreSQL prints it where Python has no such value: a
    date or timestamp ``infinity`` failed GX's query ("date too large"), a numeric ``NaN`` failed
    GX's own handling of it (decimal.InvalidOperation), each reported as the rule's error with no
    failing rows."""

    def load(self, data: Buffer) -> Any:
        try:
            value = super().load(data)  # type: ignore[misc]
        except psycopg.DataError:
            return bytes(data).decode()
        return str(value) if isinstance(value, Decimal) and value.is_nan() else value


class _Date(_TextBeyondPython, DateLoader): ...


class _Timestamp(_TextBeyondPython, TimestampLoader): ...


class _Timestamptz(_TextBeyondPython, TimestamptzLoader): ...


class _Numeric(_TextBeyondPython, NumericLoader): ...


def _gx_connect(url: str) -> psycopg.Connection:
    """A connection for GX (see :func:`tasks.db.connect`) whose values GX can serialise into its
    results: the types of :data:`_AS_TEXT`, their arrays and every range type load as text, and an
    infinite date or timestamp or a numeric NaN as text too. Only GX's queries read so; common
    types (numbers, text, dates, uuids) load as before."""
    conn = connect(url)
    for info in pg_types:
        if info.name in _AS_TEXT or isinstance(info, RangeInfo | MultirangeInfo):
            conn.adapters.register_loader(info.oid, TextLoader)
            conn.adapters.register_loader(info.array_oid, TextLoader)
    for name, loader in (("date", _Date), ("timestamp", _Timestamp), ("timestamptz", _Timestamptz), ("numeric", _Numeric)):
        conn.adapters.register_loader(name, loader)
    return conn


def _error(result: ExpectationValidationResult) -> str | None:
    info = result.exception_info or {}
    entries = [info] if "raised_exception" in info else list(info.values())
    for entry in entries:
        if isinstance(entry, dict) and entry.get("raised_exception"):
            return first_line(str(entry.get("exception_message", "")))
    return None


def _unexpected(result: ExpectationValidationResult) -> tuple[int, list[Any]]:
    """(count, sample) from a GX result, whatever the expectation's result shape."""
    outcome = result.result or {}
    assert result.expectation_config is not None, "validation results carry their expectation"
    if result.expectation_config.type == "unexpected_rows_with_sample":
        rows = (outcome.get("details") or {}).get("unexpected_rows") or []
        # The query selects only the rule's column, so each row holds a single value.
        return int(outcome.get("observed_value") or 0), [next(iter(row.values()), None) for row in rows]
    return int(outcome.get("unexpected_count") or 0), list(outcome.get("partial_unexpected_list") or [])


def collect(suite: Suite, gx_results: Iterable[Any], row_count: int, sample_size: int) -> list[RuleResult]:
    """Fold GX's per-expectation results back into one :class:`RuleResult` per rule, in suite order."""
    by_rule: dict[str, list[Any]] = {}
    for result in gx_results:
        by_rule.setdefault(result.expectation_config.meta["rule"], []).append(result)
    rules = []
    for rule in suite.rules:
        results = by_rule.get(rule.name, [])
        count, sample, errors = 0, [], []
        for result in results:
            n, values = _unexpected(result)
            count += n
            sample.extend(values)
            if message := _error(result):
                errors.append(message)
        observed = results[0].result.get("observed_value") if rule.check == "row_count" and results else None
        rules.append(
            RuleResult(
                rule=rule.name,
                check=rule.check,
                severity=rule.severity,
                column=rule.column,
                success=all(r.success for r in results) and not errors,
                unexpected_count=count,
                unexpected_percent=100.0 * count / row_count if row_count else 0.0,
                sample=[_plain(v) for v in sample[:sample_size]],
                observed=observed,
                error="; ".join(errors) or None,
            )
        )
    return rules


def _plain(value: Any) -> Any:
    """JSON-friendly sample values (timestamps, UUIDs, numpy scalars become str/float/int; a float
    NaN or infinity is spelled as PostgreSQL prints it: JSON has no such number, and the state
    database refused the alert holding one, failing the run)."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else "Infinity" if value > 0 else "-Infinity"
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)


def column_hint(name: str, columns: Sequence[Any]) -> str:
    """The closest column (a slip of case or spelling: ``order date`` for ``Order Date``), else
    every column, so a one-line error says what to write instead."""
    by_folded = {str(c).casefold(): str(c) for c in columns}
    close = difflib.get_close_matches(name.casefold(), list(by_folded), n=1)
    if close:
        return f"did you mean '{by_folded[close[0]]}'?"
    return f"its columns: {', '.join(map(str, columns))}"


def require_columns(suite: Suite, columns: Sequence[Any], target: str) -> None:
    """Fail before GX runs, naming the rule and the closest column, when a rule's column does not exist."""
    for rule in suite.rules:
        if rule.column is not None and rule.column not in columns:
            raise UserError(
                f"suite '{suite.name}' rule '{rule.name}': column '{rule.column}' is not in {target} "
                f"({column_hint(rule.column, columns)}); fix the rule's column"
            )


def require_plain_name(suite: Suite, source: TableSource) -> None:
    """Fail before GX runs, naming the rules and the remedy, when GX would misread the table's name
    in the rules it runs as flowyard's query: GX writes the name into that query and runs it as
    SQLAlchemy ``text()``, where a colon after a space or a sign (schema ``"shop :x"``) is a bind
    parameter, so each such rule failed with "A value is required for bind parameter 'x'", and a
    ``%`` is doubled for psycopg's placeholders that GX then does not fill (relation "a%%b" does
    not exist). A window's query asset spells the name itself (:func:`quality.sql_rules.gx_query`),
    so it runs."""
    if source.window is not None:
        return
    name = source.table_ref.as_string()
    params = sorted(sqlalchemy.text(name).compile().params)
    misread = f"reads ':{params[0]}' in its name as a parameter" if params else "doubles the '%' in its name"
    rules = [f"'{rule.name}' ({rule.check})" for rule in suite.rules if own_query(rule)]
    if (params or "%" in name) and rules:
        raise UserError(
            f"suite '{suite.name}': {', '.join(rules)} cannot run on {name} (Great Expectations {misread}); "
            "check a view of it under a plain name, or one window of it"
        )


def require_fitting_checks(suite: Suite, columns: Sequence[tuple[str, str, str]]) -> None:
    """Fail before GX runs, naming the rule, its column and the column's type, when the rule's check
    cannot compare that type: PostgreSQL has no ``integer ~ text`` nor ``text < double precision``,
    and psycopg dumps no list mixing numbers and text, so GX and the score query each failed with
    the driver's error (the score query with its traceback)."""
    described = {name: (type_, kind) for name, type_, kind in columns}
    for rule in suite.rules:
        if rule.column is None:
            continue
        type_, kind = described[rule.column]
        if misfit := _misfit(rule, type_, kind):
            raise UserError(
                f'suite \'{suite.name}\' rule \'{rule.name}\': {rule.check} on "{rule.column}" ({type_}) {misfit}'
            )


def _misfit(rule: Rule, type_: str, kind: str) -> str | None:
    """What ``rule`` needs that a column of ``type_`` (of profile ``kind``) is not, and what would
    fit; None when PostgreSQL compares them. ``money`` is a number without a comparison with the
    double precision bounds a range has."""
    numeric = kind == "number" and type_ != "money"
    if rule.check == "regex" and kind != "string":
        return "needs a text column; cast it in a view" + (" or use range" if numeric else "")
    if rule.check == "range" and not numeric:
        instead = "use regex or in_set" if kind == "string" else "cast it to a number in a view"
        return f"needs a numeric column (its min and max are numbers); {instead}"
    if rule.check != "in_set":
        return None
    if type_.endswith("[]"):
        # psycopg sends the values as one array to ``= ANY(%s)``: an array of arrays, which
        # PostgreSQL refused ("could not find array type") and the score query failed the run.
        return "cannot list whole arrays as values; check its elements in a view (unnest)"
    given = {_value_kind(v) for v in rule.values or []}
    if len(given) > 1:
        fits = "numbers" if numeric else "text (quote the numbers: '1')" if kind == "string" else "text"
        return f"mixes {' and '.join(sorted(given))} in its values; give them all as {fits}"
    if given == {"numbers"} and not numeric:
        return "has numbers, which its type does not compare with; quote them ('1') or check a numeric column"
    if given == {"true/false"} and type_ != "boolean":
        return "has true/false, which its type does not compare with; give values of its type"
    return None


def _value_kind(value: object) -> str:
    """An in_set value as PostgreSQL compares it (a bool is checked first: it is an int in Python)."""
    if isinstance(value, bool):
        return "true/false"
    return "numbers" if isinstance(value, int | float) else "text"


def require_table(url: str, suite: Suite, source: TableSource) -> Suite:
    """The table, the rules' and the window's columns and foreign keys' targets exist and are
    readable, and each rule's check fits its column's type and values (else a one-line UserError).
    Returns the suite as it is checked: see :func:`integers_as_given`."""
    with connection(url) as conn:
        described = table_columns(conn, source.schema, source.table)
        columns = [name for name, _type, _kind in described]
        references = {
            rule.name: (
                rule.reference(source.schema),
                [c[0] for c in table_columns(conn, *rule.reference(source.schema)[:2])],
            )
            for rule in suite.rules
            if rule.check == "foreign_key"
        }
        target = f"{source.schema}.{source.table}"
        if not columns:
            raise UserError(f"suite '{suite.name}': table {target} not found; check its table and the schema")
        require_populated(conn, source.schema, source.table)
        require_plain_name(suite, source)
        require_columns(suite, columns, target)
        require_fitting_checks(suite, described)
        suite = integers_as_given(suite, described)
        if suite.timestamp_column is not None and suite.timestamp_column not in columns:
            raise UserError(
                f"suite '{suite.name}': timestamp_column '{suite.timestamp_column}' is not in {target} "
                f"({column_hint(suite.timestamp_column, columns)}); fix the suite's timestamp_column"
            )
        used = {rule.column for rule in suite.rules if rule.column} | (
            {suite.timestamp_column} if suite.timestamp_column else set()
        )
        require_readable(conn, suite, source.schema, source.table, used)
        require_comparable_values(conn, suite, source, described)
        for name, ((schema, table, column), found) in references.items():
            if column not in found:
                hint = f" ({column_hint(column, found)})" if found else ""
                raise UserError(
                    f"suite '{suite.name}' rule '{name}': referenced {schema}.{table}.{column} not found{hint}; "
                    "fix 'references'"
                )
            require_readable(conn, suite, schema, table, {column})
    return suite


_INTEGER_TYPES = ("smallint", "integer", "bigint")
_DECIMAL_INTEGER = re.compile(r"\s*[+-]?[0-9]+\s*", re.ASCII)


def integers_as_given(suite: Suite, columns: Sequence[tuple[str, str, str]]) -> Suite:
    """``suite`` with the in_set values of an integer column that are all written as decimal
    integers (``'99999999999'``) as those integers: PostgreSQL reads such text as the column's type,
    so a number beyond its range was refused as a value the column cannot read ("value ... is out of
    range for type integer"), where the same number given unquoted is simply not in the set
    (:func:`quality.sql_rules.gx_value_set`). Any other spelling (``'0x1F'``, ``'abc'``) is left
    to PostgreSQL's reading, and its refusal."""
    integer_columns = {name for name, type_, _kind in columns if type_ in _INTEGER_TYPES}
    rules = [
        rule.model_copy(update={"values": [int(v) for v in rule.values or []]})
        if rule.check == "in_set"
        and rule.column in integer_columns
        and all(isinstance(v, str) and _DECIMAL_INTEGER.fullmatch(v) for v in rule.values or [])
        else rule
        for rule in suite.rules
    ]
    return suite.model_copy(update={"rules": rules})


def require_readable(conn: psycopg.Connection, suite: Suite, schema: str, table: str, columns: set[str]) -> None:
    """The session may read ``columns`` of the table. GX would report a missing privilege as a
    failed connection test, with a traceback; a query that reads no row finds it first."""
    selected = sql.SQL(", ").join(sql.Identifier(c) for c in sorted(columns)) if columns else sql.SQL("1")
    try:
        with conn.transaction():
            conn.execute(
                sql.SQL("SELECT {} FROM {} LIMIT 0").format(selected, sql.Identifier(schema, table))
            )
    except psycopg.errors.InsufficientPrivilege as exc:
        raise UserError(
            f"suite '{suite.name}': {first_line(exc)} (role {conn.info.user}); "
            f"grant it SELECT on {schema}.{table}"
        ) from None


# PostgreSQL's refusal of a value its column's type cannot read (22P02, 22008...) or of a
# comparison its type has no operator for (json = json, oid < double precision).
_INCOMPARABLE = (psycopg.errors.DataError, psycopg.errors.UndefinedFunction)


def require_comparable_values(
    conn: psycopg.Connection, suite: Suite, source: TableSource, columns: Sequence[tuple[str, str, str]]
) -> None:
    """Fail before GX runs, naming the rule, its column, the column's type and the value, when
    PostgreSQL cannot compare an in_set value or a range bound with the column (``'abc'`` on an
    integer, ``'2026-13-01'`` on a date, any value on json): GX reported the driver's error as the
    rule's and the score query failed the run with its traceback. One query for the suite reads
    every value as the score query does; only when it fails is each rule, then each value, tried
    alone to name the one at fault."""
    rules = [rule for rule in suite.rules if rule.check in ("in_set", "range")]
    if not rules or _incomparable(conn, source, rules) is None:
        return
    types = {name: type_ for name, type_, _kind in columns}
    for rule in rules:
        if (error := _incomparable(conn, source, [rule])) is None:
            continue
        where = f'suite \'{suite.name}\' rule \'{rule.name}\': {rule.check} on "{rule.column}" ({types[rule.required_column]})'
        if isinstance(error, psycopg.errors.UndefinedFunction):
            raise UserError(f"{where} cannot be compared with its values ({first_line(error)}); cast it in a view")
        # Only an in_set's text values are parsed as the column's type (a range's bounds are numbers).
        alone = (v for v in rule.values or [] if _incomparable(conn, source, [rule.model_copy(update={"values": [v]})]))
        named = "its values" if (value := next(alone, None)) is None else f"its value {value!r}"
        raise UserError(f"{where} cannot read {named} ({first_line(error)}); give values of its type")


def _incomparable(conn: psycopg.Connection, source: TableSource, rules: Sequence[Rule]) -> psycopg.Error | None:
    """PostgreSQL's error for the rules' predicates over the table, as the score query states them,
    or None. ``LIMIT 0`` reads no row: the values are parsed as the column's type when bound."""
    predicates = [violation(rule, source) for rule in rules]
    query = sql.SQL("SELECT {} FROM {} AS b LIMIT 0").format(
        sql.SQL(", ").join(p.sql for p in predicates), source.table_ref
    )
    try:
        with conn.transaction():
            conn.execute(bound(query), [param for p in predicates for param in p.params])
    except _INCOMPARABLE as exc:
        return exc
    return None


def check_table(
    session: GxSession,
    url: str,
    suite: Suite,
    schema: str = "public",
    window: TimeWindow | None = None,
    sample_size: int = DEFAULT_SAMPLE,
) -> SuiteResult:
    """Validate a PostgreSQL table (or one window of it) and score it, all inside the database."""
    source = TableSource.for_suite(suite, schema, window)
    suite = require_table(url, suite, source)
    gx_results = session.validate_table(url, suite, source, sample_size)
    score: TableScore = score_table(url, suite, source)
    return SuiteResult(
        suite=suite.name,
        target=f"{source.schema}.{source.table}",
        window=window.label if window else None,
        row_count=score.row_count,
        score=score.score,
        rules=collect(suite, gx_results, score.row_count, sample_size),
    )


def check_frame(
    session: GxSession, suite: Suite, frame: pd.DataFrame, target: str, sample_size: int = DEFAULT_SAMPLE
) -> SuiteResult:
    """Validate a DataFrame with GX's pandas datasource; row scores come from GX's unexpected indexes."""
    frame = frame.reset_index(drop=True)
    require_columns(suite, list(frame.columns), target)
    for rule in suite.rules:
        if rule.check == "not_future":
            frame[rule.column] = pd.to_datetime(frame[rule.column], errors="coerce", utc=True, format="mixed")
    gx_results = session.validate_frame(suite, frame, sample_size)
    violating: dict[str, set[int]] = {}
    for result in gx_results:
        indexes = (result.result or {}).get("unexpected_index_list") or []
        violating.setdefault(result.expectation_config.meta["rule"], set()).update(int(i) for i in indexes)
    score = score_rows(len(frame), suite, violating)
    return SuiteResult(
        suite=suite.name,
        target=target,
        window=None,
        row_count=len(frame),
        score=score.score,
        rules=collect(suite, gx_results, len(frame), sample_size),
    )


def check_file(
    session: GxSession, suite: Suite, path: str | Path, sample_size: int = DEFAULT_SAMPLE
) -> SuiteResult:
    return check_frame(session, suite, read_data_file(path), str(path), sample_size)


def run_suites(
    url: str,
    suites: list[Suite],
    *,
    schema: str = "public",
    window: TimeWindow | None = None,
    max_workers: int = 2,
    sample_size: int = DEFAULT_SAMPLE,
    session: GxSession | None = None,
) -> list[SuiteResult]:
    """Check several tables concurrently with at most ``max_workers`` at a time (outside Prefect)."""
    session = session or GxSession()
    with ThreadPoolExecutor(max_workers=max_workers) as pool:
        futures = [pool.submit(check_table, session, url, s, schema, window, sample_size) for s in suites]
        return [f.result() for f in futures]
