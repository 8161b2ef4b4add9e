"""How a quality suite is declared: rules with a check, a column, a severity and the check's parameters.

The platform's entity suites (:mod:`quality.suites`) and users' own suites share this model.
Users write suites in Python (``Suite(...)``/``Rule(...)``) or YAML; both go through
pydantic validation so a bad definition fails before anything runs, with one line that
names the suite, the rule and the field to fix.
"""

from __future__ import annotations

import importlib
import math
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tasks.errors import UserError, read_user_file

Severity = Literal["critical", "high", "medium", "low"]
Check = Literal["not_null", "unique", "in_set", "regex", "range", "not_future", "foreign_key", "row_count"]

# The seed's penalty per violated rule, per row.
SEVERITY_WEIGHTS: dict[str, int] = {"critical": 10, "high": 5, "medium": 2, "low": 1}
TABLE_CHECKS = frozenset({"row_count"})
"""Checks about the whole table rather than each row; they fail a suite but carry no row penalty."""

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]*$")


class Rule(BaseModel):
    """One rule: ``check`` decides which parameters are required."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    check: Check
    severity: Severity
    column: str | None = Field(
        default=None, min_length=1, description="any column of the table, exactly as named (quoted)"
    )
    values: list[str | int | float | bool] | None = Field(default=None, description="in_set: allowed values")
    pattern: str | None = Field(default=None, description="regex: POSIX/Python-compatible pattern")
    min: float | None = Field(default=None, description="range / row_count: inclusive lower bound")
    max: float | None = Field(default=None, description="range / row_count: inclusive upper bound")
    references: str | None = Field(default=None, description="foreign_key: [schema.]table.column")
    message: str = ""

    @field_validator("name")
    @classmethod
    def _name_is_identifier(cls, value: str) -> str:
        if not _IDENTIFIER.match(value):
            raise ValueError("must be letters, digits and underscores")
        return value

    @field_validator("pattern")
    @classmethod
    def _pattern_compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"invalid regular expression ({exc})") from None
        return value

    @field_validator("min", "max")
    @classmethod
    def _bound_is_a_number(cls, value: float | None) -> float | None:
        # nan compares false with everything: min nan would flag every row, max nan none.
        if value is not None and math.isnan(value):
            raise ValueError("must be a number, not nan")
        return value

    @field_validator("references")
    @classmethod
    def _references_shape(cls, value: str | None) -> str | None:
        # The column part may be any name (``customers.Customer Id``), as a rule's own column may;
        # the check against the referenced table's columns happens before the run.
        if value is not None:
            *names, column = value.split(".")
            if len(names) not in (1, 2) or not all(names) or not column:
                raise ValueError("must be table.column or schema.table.column")
        return value

    @model_validator(mode="after")
    def _parameters_match_check(self) -> Rule:
        needs = {
            "in_set": ("values",),
            "regex": ("pattern",),
            "foreign_key": ("references",),
        }.get(self.check, ())
        for name in needs:
            if getattr(self, name) in (None, []):
                raise ValueError(f"field '{name}' is required for check '{self.check}'")
        if self.check in ("range", "row_count") and self.min is None and self.max is None:
            raise ValueError(f"field 'min' or 'max' is required for check '{self.check}'")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"field 'min' ({self.min}) is greater than 'max' ({self.max})")
        if self.check not in TABLE_CHECKS and self.column is None:
            raise ValueError(f"field 'column' is required for check '{self.check}'")
        return self

    @property
    def weight(self) -> int:
        return SEVERITY_WEIGHTS[self.severity]

    @property
    def row_level(self) -> bool:
        return self.check not in TABLE_CHECKS

    @property
    def required_column(self) -> str:
        """``column`` of a row-level rule, which validation guarantees; a table-level rule has none."""
        if self.column is None:
            raise ValueError(f"rule {self.name!r} ({self.check}) checks no column")
        return self.column

    def reference(self, default_schema: str) -> tuple[str, str, str]:
        """(schema, table, column) a foreign_key rule points at."""
        parts = (self.references or "").split(".")
        schema, table, column = [default_schema, *parts] if len(parts) == 2 else parts
        return schema, table, column


class Suite(BaseModel):
    """Rules for one table (``[schema.]table``) or one file/DataFrame."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    table: str
    timestamp_column: str | None = Field(
        default=None, min_length=1, description="column that time windows filter on"
    )
    rules: list[Rule] = Field(min_length=1)

    @field_validator("name")
    @classmethod
    def _suite_name(cls, value: str) -> str:
        if not re.match(r"^[a-z0-9][a-z0-9_-]*$", value):
            raise ValueError("must be lowercase letters, digits, '-' or '_'")
        return value

    @field_validator("table")
    @classmethod
    def _table_shape(cls, value: str) -> str:
        # A name may hold any character but the dot that parts it (``order lines``, ``Order-Lines``):
        # it is quoted wherever it is used.
        parts = value.split(".")
        if len(parts) not in (1, 2) or not all(parts):
            raise ValueError("must be table or schema.table")
        return value

    @model_validator(mode="after")
    def _unique_rule_names(self) -> Suite:
        seen: set[str] = set()
        for rule in self.rules:
            if rule.name in seen:
                raise ValueError(f"rule name '{rule.name}' is used twice")
            seen.add(rule.name)
        return self

    def qualified_table(self, default_schema: str = "public") -> tuple[str, str]:
        parts = self.table.split(".")
        return (default_schema, parts[0]) if len(parts) == 1 else (parts[0], parts[1])


def parse_suite(data: Any, source: str = "suite definition") -> Suite:
    """Validate one suite from plain data, turning the first problem into a one-line UserError."""
    try:
        return Suite.model_validate(data)
    except ValidationError as exc:
        raise UserError(_describe(exc, data, source)) from None


def _describe(exc: ValidationError, data: Any, source: str) -> str:
    """'suite X rule Y field Z: problem' from the first pydantic error, located in the raw data."""
    error = exc.errors()[0]
    loc = list(error["loc"])
    suite_name = data.get("name", "?") if isinstance(data, dict) else "?"
    where = [f"suite '{suite_name}'"]
    if len(loc) >= 2 and loc[0] == "rules" and isinstance(loc[1], int):
        rules = data.get("rules") or []
        rule = rules[loc[1]] if loc[1] < len(rules) else {}
        rule_name = rule.get("name", f"#{loc[1] + 1}") if isinstance(rule, dict) else f"#{loc[1] + 1}"
        where.append(f"rule '{rule_name}'")
        loc = loc[2:]
    field = next((str(p) for p in loc if isinstance(p, str)), None)
    if field:
        where.append(f"field '{field}'")
    message = str(error["msg"]).removeprefix("Value error, ")
    return f"{' '.join(where)}: {message}; fix it in {source}"


def load_suite_file(path: str | Path) -> list[Suite]:
    """Suites from a YAML file holding one suite or ``suites: [...]``."""
    file = Path(path)
    text = read_user_file(file, "suite file", "pass a YAML file path, a built-in suite or module:attr")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise UserError(f"suite file {file} is not valid YAML{at}; fix the syntax") from None
    items = data.get("suites") if isinstance(data, dict) and "suites" in data else [data]
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise UserError(f"suite file {file} must hold a suite mapping or 'suites:' with a list of them")
    return [parse_suite(item, str(file)) for item in items]


def load_python_suites(ref: str) -> list[Suite]:
    """Suites from ``package.module:attribute`` (a Suite, a list of them, or a dict of them)."""
    module_name, _, attribute = ref.partition(":")
    try:
        value = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise UserError(f"cannot load suites from {ref!r}: {exc}; use package.module:attribute") from None
    values = (
        list(value.values()) if isinstance(value, dict) else value if isinstance(value, list) else [value]
    )
    if not all(isinstance(v, Suite) for v in values):
        raise UserError(f"{ref!r} must be a quality.suite_spec.Suite or a list/dict of them")
    return values


def resolve_suites(refs: list[str]) -> list[Suite]:
    """Suites from references: a built-in entity name, a YAML path, or ``module:attribute``."""
    from quality.suites import ENTITY_SUITES

    suites: list[Suite] = []
    for ref in refs:
        if ref in ENTITY_SUITES:
            suites.append(ENTITY_SUITES[ref])
        elif ref.endswith((".yaml", ".yml")):
            suites.extend(load_suite_file(ref))
        elif ":" in ref:
            suites.extend(load_python_suites(ref))
        else:
            raise UserError(
                f"unknown suite {ref!r}; use one of {', '.join(ENTITY_SUITES)}, a .yaml file or module:attribute"
            )
    names = [s.name for s in suites]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise UserError(f"suite name(s) {', '.join(duplicates)} given twice; each suite needs a unique name")
    return suites
