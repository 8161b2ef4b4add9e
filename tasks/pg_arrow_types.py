"""Type mapping between PostgreSQL, Arrow and SQLite, for copies that do not go PG→PG unchanged.

PostgreSQL types without a faithful Arrow twin (jsonb, bytea, arrays, uuid, interval, ...)
travel as their PostgreSQL text form in an Arrow string column, which COPY reads back
losslessly; only the types a mapping usefully computes on get real Arrow types.
"""

from __future__ import annotations

import re

import pyarrow as pa

_PG_TO_ARROW: dict[str, pa.DataType] = {
    "smallint": pa.int16(),
    "integer": pa.int32(),
    "bigint": pa.int64(),
    "real": pa.float32(),
    "double precision": pa.float64(),
    "boolean": pa.bool_(),
    "text": pa.string(),
    "character varying": pa.string(),
    "character": pa.string(),
    "date": pa.date32(),
    "timestamp with time zone": pa.timestamp("us", tz="UTC"),
    "timestamp without time zone": pa.timestamp("us"),
}
_NUMERIC = re.compile(r"numeric\((\d+),(\d+)\)")
_TYPMOD = re.compile(r"\(\d+(,\d+)?\)")


def base_type(pg_type: str) -> str:
    """``pg_type`` (``format_type`` text) without its modifiers: ``numeric(12,2)`` → ``numeric``,
    ``timestamp(3) with time zone`` → ``timestamp with time zone``."""
    return _TYPMOD.sub("", pg_type)


def pg_to_arrow(pg_type: str) -> pa.DataType:
    """The Arrow type a column of ``pg_type`` (``format_type`` text) is read as."""
    numeric = _NUMERIC.fullmatch(pg_type.replace(" ", ""))
    if numeric and int(numeric.group(1)) <= 38:
        return pa.decimal128(int(numeric.group(1)), int(numeric.group(2)))
    if pg_type.endswith("[]"):
        return pa.string()
    return _PG_TO_ARROW.get(base_type(pg_type), pa.string())


def arrow_to_pg(kind: pa.DataType) -> str:
    """The PostgreSQL column type for Arrow data (static files, SQLite, computed columns)."""
    if pa.types.is_dictionary(kind):
        return arrow_to_pg(kind.value_type)
    if pa.types.is_decimal(kind):
        return f"numeric({kind.precision},{kind.scale})"
    if pa.types.is_timestamp(kind):
        return "timestamp with time zone" if kind.tz else "timestamp without time zone"
    checks = [
        (pa.types.is_boolean, "boolean"),
        (lambda t: pa.types.is_int8(t) or pa.types.is_int16(t) or pa.types.is_uint8(t), "smallint"),
        (lambda t: pa.types.is_int32(t) or pa.types.is_uint16(t), "integer"),
        (lambda t: pa.types.is_int64(t) or pa.types.is_uint32(t), "bigint"),
        (pa.types.is_uint64, "numeric(20,0)"),
        (lambda t: pa.types.is_float16(t) or pa.types.is_float32(t), "real"),
        (pa.types.is_float64, "double precision"),
        (pa.types.is_date, "date"),
        (pa.types.is_time, "time without time zone"),
        (lambda t: pa.types.is_binary(t) or pa.types.is_large_binary(t), "bytea"),
        (pa.types.is_fixed_size_binary, "bytea"),
        (pa.types.is_nested, "jsonb"),
    ]
    for check, pg_type in checks:
        if check(kind):
            return pg_type
    return "text"


def sqlite_to_pg(declared: str) -> str:
    """PostgreSQL type for a SQLite declared type, following SQLite's affinity rules, except for
    JSON (SQLAlchemy's and others' spelling for JSON text, NUMERIC by affinity: its objects would
    not load as numbers) and timestamps declared with a time zone (an offset would be dropped)."""
    decl = declared.upper()
    if "JSON" in decl:
        return "jsonb"
    if "TIMESTAMPTZ" in decl or "WITH TIME ZONE" in decl:
        return "timestamp with time zone"
    if "INT" in decl:
        return "bigint"
    if any(word in decl for word in ("CHAR", "CLOB", "TEXT")) or not decl:
        return "text"
    if "BLOB" in decl:
        return "bytea"
    if any(word in decl for word in ("REAL", "FLOA", "DOUB")):
        return "double precision"
    if "BOOL" in decl:
        return "boolean"
    if "DATETIME" in decl or "TIMESTAMP" in decl:
        return "timestamp without time zone"
    if decl == "DATE":
        return "date"
    return "numeric"
