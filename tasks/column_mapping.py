"""Column mappings applied to whole Arrow batches: rename, cast, compute, filter, drop.

A mapping is declared per source table (JSON/YAML-friendly)::

    {"events": {"target": "events_v2", "rename": {"user_id": "account_id"},
                "cast": {"amount": "double precision"},
                "compute": {"amount_cents": "amount * 100"}, "types": {"amount_cents": "bigint"},
                "filter": "kind != 'debug'", "drop": ["payload"], "key": ["id"]}}

Steps run in that order: rename, cast, compute, filter, drop; expressions see the renamed
columns. Expressions are a small safe language parsed with :mod:`ast` and evaluated with
``pyarrow.compute`` on whole columns (``+ - * / **``, comparisons, ``and/or/not``, ``in [...]``,
and any pyarrow.compute function by name, e.g. ``utf8_upper(kind)``). Nothing runs row by row
and nothing is passed to Python's ``eval``.
"""

from __future__ import annotations

import ast
from collections.abc import Collection, Mapping
from dataclasses import replace
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tasks.arrow_literals import literal_array
from tasks.bulk_sources import Column, TableInfo
from tasks.errors import UserError, first_line, validation_problem
from tasks.pg_arrow_types import arrow_to_pg, pg_to_arrow


class TableMapping(BaseModel):
    model_config = ConfigDict(extra="forbid")

    target: str | None = Field(default=None, description="Target table (``schema.table`` or ``table``).")
    rename: dict[str, str] = Field(default_factory=dict, description="source column -> target column")
    cast: dict[str, str] = Field(
        default_factory=dict, description="column -> PostgreSQL type (a CSV column is read as it)"
    )
    compute: dict[str, str] = Field(default_factory=dict, description="new column -> expression")
    types: dict[str, str] = Field(default_factory=dict, description="computed column -> PostgreSQL type")
    filter: str | None = Field(default=None, description="keep rows where this expression is true")
    drop: list[str] = Field(default_factory=list)
    key: list[str] = Field(default_factory=list, description="target key columns (files, upserts)")
    cursor: str | None = Field(default=None, description="incremental cursor column (source name)")

    @property
    def transforms(self) -> bool:
        """Whether rows change shape or content (otherwise a PG→PG copy can stay binary)."""
        return bool(self.rename or self.cast or self.compute or self.filter or self.drop)

    def untouched(self, source_columns: Collection[str]) -> set[str]:
        """Source columns whose values the mapping never reads or changes (only renames or drops):
        they can travel as text, unparsed."""
        names = {expr_name for e in [*self.compute.values(), self.filter or ""] for expr_name in _names(e)}
        read = {n for n in source_columns if self.rename.get(n, n) in names | set(self.cast)}
        return set(source_columns) - read

    def source_casts(self, source_columns: Collection[str]) -> dict[str, str]:
        """The cast of each source column, by its source name (``cast`` names renamed columns)."""
        return {n: self.cast[self.rename.get(n, n)] for n in source_columns if self.rename.get(n, n) in self.cast}


def parse_mapping(mapping: dict[str, Any] | None) -> dict[str, TableMapping]:
    parsed = {}
    for table, spec in (mapping or {}).items():
        try:
            parsed[table] = TableMapping.model_validate(spec)
        except ValidationError as exc:
            where, problem = validation_problem(exc)
            at = f"{table}.{where}" if where else table
            raise UserError(f"invalid mapping at {at}: {problem}; see docs/bulk_migrate.md") from None
    return parsed


# --- expressions ------------------------------------------------------------------------------

_BINARY = {
    ast.Add: "add_checked",
    ast.Sub: "subtract_checked",
    ast.Mult: "multiply_checked",
    ast.Div: "divide_checked",
    ast.Pow: "power_checked",
}
_COMPARE = {
    ast.Eq: "equal",
    ast.NotEq: "not_equal",
    ast.Lt: "less",
    ast.LtE: "less_equal",
    ast.Gt: "greater",
    ast.GtE: "greater_equal",
}


def _names(expression: str) -> set[str]:
    """Column names an expression refers to (empty when it does not parse: evaluate says why)."""
    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError:
        return set()
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}


def evaluate(expression: str, batch: pa.RecordBatch) -> pa.Array | pa.Scalar:
    """Evaluate ``expression`` on every row of ``batch`` at once."""
    try:
        tree = ast.parse(expression, mode="eval")
        return _eval(tree.body, batch)
    except SyntaxError as exc:
        raise UserError(f"cannot parse mapping expression {expression!r}: {exc.msg}") from None
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
        raise UserError(f"mapping expression {expression!r} failed: {first_line(exc)}") from None


def _eval(node: ast.AST, batch: pa.RecordBatch) -> Any:  # noqa: ANN401 - arrays or scalars
    if isinstance(node, ast.Name):
        if node.id not in batch.schema.names:
            raise UserError(
                f"mapping expression names unknown column {node.id!r}; columns: {batch.schema.names}"
            )
        return batch.column(node.id)
    if isinstance(node, ast.Constant):
        return literal_array([node.value])[0]
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        return pc.call_function(_BINARY[type(node.op)], [_eval(node.left, batch), _eval(node.right, batch)])
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return pc.negate_checked(_eval(node.operand, batch))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        return pc.invert(_eval(node.operand, batch))
    if isinstance(node, ast.BoolOp):
        combine = pc.and_kleene if isinstance(node.op, ast.And) else pc.or_kleene
        result = _eval(node.values[0], batch)
        for value in node.values[1:]:
            result = combine(result, _eval(value, batch))
        return result
    if isinstance(node, ast.Compare) and len(node.ops) == 1:
        left, op, right = _eval(node.left, batch), node.ops[0], node.comparators[0]
        if isinstance(op, ast.In | ast.NotIn) and isinstance(right, ast.List | ast.Tuple):
            values = literal_array([_literal(v) for v in right.elts])
            member = pc.is_in(left, value_set=values)
            return member if isinstance(op, ast.In) else pc.invert(member)
        if type(op) in _COMPARE:
            return pc.call_function(_COMPARE[type(op)], [left, _eval(right, batch)])
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.keywords:
        return pc.call_function(_function(node.func.id), [_eval(arg, batch) for arg in node.args])
    raise UserError(f"unsupported mapping expression part: {ast.unparse(node)!r}; see docs/bulk_migrate.md")


def _function(name: str) -> str:
    """``name`` if pyarrow.compute has that function: a typo is a user error, not a KeyError."""
    try:
        pc.get_function(name)
    except pa.ArrowKeyError:
        raise UserError(
            f"mapping expression calls unknown function {name!r}; use a pyarrow.compute function "
            "name such as utf8_upper, round or coalesce"
        ) from None
    return name


def _literal(node: ast.AST) -> Any:  # noqa: ANN401 - any literal
    if not isinstance(node, ast.Constant):
        raise UserError(f"`in` lists take literals only, got {ast.unparse(node)!r}")
    return node.value


# --- applying a mapping -----------------------------------------------------------------------


def _cast(array: pa.Array, pg_type: str, column: str) -> pa.Array:
    target = pg_to_arrow(pg_type)
    try:
        if pa.types.is_decimal(array.type) and pa.types.is_floating(target):
            # Arrow scales the decimal's integer in binary floating point, which misses the
            # nearest double by one unit for about one value in eight. PostgreSQL's numeric →
            # float cast rounds the exact decimal text correctly, and so does Arrow's parse of it.
            array = pc.cast(array, pa.string())
        return pc.cast(array, target)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise UserError(
            f"cannot cast column {column!r} to {pg_type}: {first_line(exc)}; cast it to a type its values "
            "convert to, or leave it uncast (JSON arrays and objects load as jsonb)"
        ) from None


def apply_mapping(batch: pa.RecordBatch, mapping: TableMapping | None) -> pa.RecordBatch:
    """The batch after rename, cast, compute, filter and drop (vectorized, one batch at a time)."""
    if mapping is None or not mapping.transforms:
        return batch
    names = [mapping.rename.get(n, n) for n in batch.schema.names]
    batch = batch.rename_columns(names)
    if mapping.cast:
        arrays = [
            _cast(col, mapping.cast[n], n) if n in mapping.cast else col
            for n, col in zip(names, batch.columns, strict=True)
        ]
        batch = pa.RecordBatch.from_arrays(arrays, names=names)
    for name, expression in mapping.compute.items():
        value = evaluate(expression, batch)
        if isinstance(value, pa.Scalar):
            value = pa.repeat(value, batch.num_rows)
        if name in mapping.types:
            value = _cast(value, mapping.types[name], name)
        batch = batch.append_column(name, value)
    if mapping.filter:
        mask = evaluate(mapping.filter, batch)
        batch = batch.filter(mask, null_selection_behavior="drop")  # a null condition drops the row
    if mapping.drop:
        batch = batch.select([n for n in batch.schema.names if n not in set(mapping.drop)])
    return batch


def generated_as_values(
    info: TableInfo, mapping: TableMapping, reads: Mapping[str, Collection[str]]
) -> TableInfo:
    """``info`` with the generated columns that its mapped copy cannot generate by the same
    expression made data columns, whose values the copy reads from the source.

    The expression (``reads``: the columns each one reads) is the source's SQL text, which names
    columns: the copy stays generated only when every column it reads is kept under its name
    and type (a cast changes what it computes) and the mapping neither casts nor reads the
    generated column itself (``compute`` and ``filter`` need its values). ``drop`` drops either kind.
    """
    kept_as_is = {
        c.name
        for c in info.columns
        if mapping.rename.get(c.name, c.name) == c.name and c.name not in {*mapping.cast, *mapping.drop}
    }
    untouched = mapping.untouched([c.name for c in info.columns if c.generated])

    def stays_generated(column: Column) -> bool:
        if column.name not in untouched:
            return False
        dropped = mapping.rename.get(column.name, column.name) in mapping.drop  # no values needed then
        return dropped or kept_as_is.issuperset(reads.get(column.name, ()))

    columns = tuple(replace(c, generated=c.generated and stays_generated(c)) for c in info.columns)
    return replace(info, columns=columns)


def mapped_table(info: TableInfo, mapping: TableMapping | None) -> TableInfo:
    """The target table's columns and key after the mapping (types of computed columns inferred).
    Generated columns stay generated, renamed if the mapping says so (see :func:`generated_as_values`)."""
    if mapping is None or not mapping.transforms:
        key = tuple(mapping.key) if mapping and mapping.key else info.key
        return TableInfo(info.name, info.columns, key, info.schema, info.path)
    source_names = [c.name for c in info.data_columns]
    renamed = [mapping.rename.get(n, n) for n in source_names]
    every_name = [mapping.rename.get(c.name, c.name) for c in info.columns]
    unknown = [n for n in mapping.rename if n not in {c.name for c in info.columns}]
    unknown += [n for n in mapping.cast if n not in renamed]
    unknown += [n for n in mapping.types if n not in mapping.compute]
    unknown += [n for n in mapping.drop if n not in every_name and n not in mapping.compute]
    if unknown:
        raise UserError(
            f"mapping for {info.qualified} names unknown columns {unknown}; check rename/cast/types/drop "
            f"(cast, types and drop use the renamed names; columns: {every_name})"
        )
    if repeated := sorted({n for n in every_name if every_name.count(n) > 1}):
        raise UserError(
            f"mapping for {info.qualified} renames columns onto names another column keeps or gets: "
            f"{repeated}; rename the other column too (and drop it by its new name if it should go)"
        )
    clashing = [n for n in mapping.compute if n in every_name]
    if clashing:
        raise UserError(
            f"mapping for {info.qualified} computes columns the table already has: {clashing}; give the "
            "computed columns new names (and drop the old ones if they should go)"
        )
    columns = [
        Column(name, mapping.cast.get(name, c.pg_type), c.not_null, c.generated)
        for c, name in zip(info.columns, every_name, strict=True)
    ]
    schema = info.arrow_schema()
    empty = pa.RecordBatch.from_arrays([pa.nulls(0, t) for t in schema.types], schema=schema)
    empty = apply_mapping(empty, mapping.model_copy(update={"filter": None, "drop": []}))
    if mapping.filter:  # a typo in the filter fails here, once, not in every chunk
        evaluate(mapping.filter, empty)
    for name in mapping.compute:
        pg_type = mapping.types.get(name) or arrow_to_pg(empty.schema.field(name).type)
        columns.append(Column(name, pg_type))
    columns = [c for c in columns if c.name not in set(mapping.drop)]
    key = tuple(mapping.key) if mapping.key else tuple(mapping.rename.get(k, k) for k in info.key)
    missing = [k for k in key if k not in {c.name for c in columns}]
    if missing:
        raise UserError(f"mapping for {info.qualified} drops key columns {missing}; keep them or set `key`")
    return TableInfo(info.name, tuple(columns), key, info.schema, info.path)
