"""Where bulk copies read from: PostgreSQL, SQLite files, or a directory of static files.

``source_url`` picks the kind: ``postgresql://...``; ``sqlite:///path.db`` (or a path to a
``.db``/``.sqlite``/``.sqlite3`` file); or a directory (``file:///dir`` or a plain path) whose
``<table>.json``, ``<table>.jsonl``, ``<table>.csv`` and ``<table>.parquet`` files become
tables (seed 004's static reference data). Every source describes its tables in
PostgreSQL types and reads a chunk as a stream of Arrow record batches.
"""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal
from urllib.parse import urlsplit

import psycopg
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pq
from psycopg import sql

from tasks.arrow_literals import literal_array
from tasks.copy_pipe import read_csv_batches
from tasks.db import connection, one_row, validate_postgres_url
from tasks.errors import UserError, check_user_file, first_line
from tasks.pg_arrow_types import arrow_to_pg, pg_to_arrow, sqlite_to_pg

if TYPE_CHECKING:
    from tasks.chunk_plan import Chunk

SourceKind = Literal["postgres", "sqlite", "files"]
FILE_SUFFIXES = (".parquet", ".csv", ".jsonl", ".ndjson", ".json")
SQLITE_SUFFIXES = (".db", ".sqlite", ".sqlite3")
BATCH_ROWS = 50_000


@dataclass(frozen=True)
class Column:
    name: str
    pg_type: str
    not_null: bool = False
    generated: bool = False
    declared: bool = False  # a CSV column read as ``pg_type``, not as its first rows look


@dataclass(frozen=True)
class TableInfo:
    """A source table in PostgreSQL terms. ``schema`` is None for SQLite and files."""

    name: str
    columns: tuple[Column, ...]
    key: tuple[str, ...] = ()
    schema: str | None = None
    path: str | None = None
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def qualified(self) -> str:
        return qualified_name(self.schema, self.name) if self.schema else self.name

    @property
    def ident(self) -> sql.Identifier:
        return sql.Identifier(self.schema, self.name) if self.schema else sql.Identifier(self.name)

    @property
    def data_columns(self) -> list[Column]:
        """Columns that carry data (generated columns are recomputed by the target)."""
        return [c for c in self.columns if not c.generated]

    @property
    def copy_columns(self) -> list[str]:
        return [c.name for c in self.data_columns]

    @property
    def read_types(self) -> dict[str, pa.DataType]:
        """The Arrow types a CSV file's declared columns are read as (see :func:`declare_types`)."""
        return {c.name: pg_to_arrow(c.pg_type) for c in self.columns if c.declared}

    def arrow_schema(self, as_text: Collection[str] = ()) -> pa.Schema:
        """Arrow types of the data columns; ``as_text`` columns stay PostgreSQL text (pass-through)."""
        return pa.schema(
            [
                (c.name, pa.string() if c.name in as_text else pg_to_arrow(c.pg_type))
                for c in self.data_columns
            ]
        )


def source_kind(source_url: str) -> SourceKind:
    """Which kind of source a URL or path names; a UserError says what is accepted otherwise."""
    scheme = urlsplit(source_url).scheme
    if scheme.startswith("postgres"):
        return "postgres"
    path = source_path(source_url)
    if scheme == "sqlite" or path.suffix.lower() in SQLITE_SUFFIXES:
        check_user_file(path, "SQLite file", "pass an existing .db file", regular=True)
        return "sqlite"
    if path.is_dir():
        return "files"
    raise UserError(
        f"cannot read source {source_url!r}: pass postgresql://..., sqlite:///file.db or a directory "
        "of .json/.jsonl/.csv/.parquet files"
    )


def source_path(source_url: str) -> Path:
    """The file or directory a source URL names: ``sqlite:///rel.db``, ``sqlite:////abs.db`` (as
    SQLAlchemy spells them), ``file:///dir`` or a plain path."""
    parts = urlsplit(source_url)
    if parts.scheme == "sqlite":
        return Path(parts.netloc + parts.path[1:])
    if parts.scheme == "file":
        return Path(parts.netloc + parts.path)
    return Path(source_url)


# --- PostgreSQL -------------------------------------------------------------------------------


def pg_describe(conn: psycopg.Connection, schema: str, table: str) -> TableInfo:
    rows = conn.execute(
        """
        SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull, a.attgenerated <> ''
        FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = %s AND c.relname = %s AND a.attnum > 0 AND NOT a.attisdropped
        ORDER BY a.attnum
        """,
        (schema, table),
    ).fetchall()
    if not rows:
        raise UserError(
            f"table {qualified_name(schema, table)} does not exist in the source; check the tables parameter"
        )
    key = conn.execute(
        """
        SELECT a.attname FROM pg_index i
        JOIN pg_class c ON c.oid = i.indrelid JOIN pg_namespace n ON n.oid = c.relnamespace
        CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY k(attnum, ord)
        JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
        WHERE n.nspname = %s AND c.relname = %s AND i.indisprimary ORDER BY k.ord
        """,
        (schema, table),
    ).fetchall()
    columns = tuple(Column(r[0], r[1], r[2], r[3]) for r in rows)
    return TableInfo(table, columns, tuple(r[0] for r in key), schema)


# A part of a table name: in double quotes (``""`` for a quote inside), or bare up to a dot.
_NAME_PART = re.compile(r'"((?:[^"]|"")*)"|([^."]*)')


def quoted_name(schema: str, name: str) -> str:
    """``"schema"."name"``, every part quoted: PostgreSQL's SQL spelling, and a ``pg_dump -t``
    pattern that matches exactly that table (psql's pattern rules take ``*``, ``?`` and ``.``
    literally inside double quotes, and ``""`` as a quote)."""
    return ".".join('"' + part.replace('"', '""') + '"' for part in (schema, name))


def qualified_name(schema: str, name: str) -> str:
    """``schema.name`` as reports and checkpoints name a table and the ``tables`` parameter takes
    it: parts are quoted only when they hold a dot or a quote (or are empty), so every label parses
    back to its one table and ordinary names read as before."""
    return ".".join(
        '"' + part.replace('"', '""') + '"' if not part or "." in part or '"' in part else part
        for part in (schema, name)
    )


def name_parts(text: str) -> list[str]:
    """The dot-separated parts of a table name, bare or in double quotes:
    ``"my.schema"."a""b"`` is ``["my.schema", 'a"b']``; a stray quote is a one-line error."""
    parts: list[str] = []
    position = 0
    while True:
        match = _NAME_PART.match(text, position)
        assert match is not None  # the bare alternative matches the empty string
        quoted, bare = match.groups()
        parts.append(quoted.replace('""', '"') if quoted is not None else bare)
        position = match.end()
        if position == len(text):
            return parts
        if text[position] != ".":
            raise UserError(
                f"table name {text!r} is not schema.table: a part with a dot or a quote goes in double "
                'quotes, with "" for a quote inside, e.g. "my.schema"."a.b"'
            )
        position += 1


def split_name(name: str, default_schema: str = "public") -> tuple[str, str]:
    """``(schema, table)`` of ``schema.table`` or ``table`` (in ``default_schema``)."""
    parts = name_parts(name)
    if len(parts) > 2:
        raise UserError(
            f"table name {name!r} has {len(parts)} dot-separated parts; write schema.table, with a part "
            'that holds a dot in double quotes, e.g. "my.schema"."a.b"'
        )
    return (default_schema, parts[0]) if len(parts) == 1 else (parts[0], parts[1])


def resolve_table_name(name: str, available: Collection[str]) -> str:
    """The PostgreSQL source table (as :func:`list_tables` names it) that a ``tables`` entry means.

    A quoted entry is read strictly. An unquoted one may be split at any of its dots, or be a
    table of ``public`` whose name holds them (``my.table``: schema ``my``, or ``public."my.table"``):
    the one reading that exists is meant; several are a one-line error asking for quotes. An entry
    no table matches is returned as given, for the caller to report as missing."""
    if '"' in name:
        return qualified_name(*split_name(name))
    readings = [("public", name), *((name[:i], name[i + 1 :]) for i, c in enumerate(name) if c == ".")]
    found = [(schema, table) for schema, table in readings if qualified_name(schema, table) in available]
    if len(found) > 1:
        meanings = " or ".join(quoted_name(*reading) for reading in found)
        raise UserError(f"table name {name!r} could be {meanings}; quote its parts to say which")
    return qualified_name(*found[0]) if found else name


# --- SQLite -----------------------------------------------------------------------------------


def sqlite_connect(source_url: str) -> sqlite3.Connection:
    return sqlite3.connect(source_path(source_url).resolve().as_uri() + "?mode=ro", uri=True)


def sqlite_tables(conn: sqlite3.Connection) -> list[str]:
    rows = conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\' ORDER BY name"
    ).fetchall()
    return [r[0] for r in rows]


def sqlite_describe(conn: sqlite3.Connection, table: str) -> TableInfo:
    """The table's columns, generated ones included as plain data columns.

    ``pragma_table_info`` does not list generated columns, so their values were never read and
    the target lacked them without a word. Their expressions are SQLite's, not PostgreSQL's, so
    they cannot be generated in the target: they are read, copied and validated as the values
    SQLite computed (not marked ``generated``, which would leave them out for the target to compute).
    """
    # hidden: 0 an ordinary column, 2 a VIRTUAL and 3 a STORED generated column; 1 a hidden
    # column of a virtual table (FTS5's rank), which holds no data
    query = 'SELECT name, type, "notnull", pk FROM pragma_table_xinfo(?) WHERE hidden IN (0, 2, 3)'
    rows = conn.execute(query, (table,)).fetchall()
    if not rows:
        raise UserError(f"table {table} does not exist in the SQLite source; check the tables parameter")
    columns = tuple(Column(r[0], sqlite_to_pg(r[1] or ""), bool(r[2])) for r in rows)
    key = tuple(r[0] for r in sorted((r for r in rows if r[3]), key=lambda r: r[3]))
    return TableInfo(table, columns, key)


ROWID_NAMES = ("rowid", "_rowid_", "oid")


def sqlite_rowid_name(info: TableInfo) -> str | None:
    """The name the table's rowid goes by: the first of SQLite's three that no column of the
    table takes (a column named ``rowid`` hides the rowid under that name); None when all are
    taken, and such a table is read as one chunk, like a ``WITHOUT ROWID`` table."""
    taken = {c.name.lower() for c in info.columns}
    return next((name for name in ROWID_NAMES if name not in taken), None)


def sqlite_has_rowid(conn: sqlite3.Connection, info: TableInfo) -> bool:
    """Whether the table has a rowid to chunk by (a ``WITHOUT ROWID`` table has none)."""
    row = conn.execute("SELECT wr FROM pragma_table_list(?) WHERE schema = 'main'", (info.name,)).fetchone()
    return row is not None and not row[0] and sqlite_rowid_name(info) is not None


def sqlite_rowid_span(conn: sqlite3.Connection, info: TableInfo) -> tuple[int, int]:
    """(first rowid, last rowid + 1); (0, 0) for an empty table."""
    rowid = sqlite_rowid_name(info)
    query = f"SELECT min({rowid}), max({rowid}) FROM {_sqlite_ident(info.name)}"  # noqa: S608 - quoted identifier
    low, high = conn.execute(query).fetchone()
    return (0, 0) if low is None else (low, high + 1)


def _sqlite_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _sqlite_text(value: object) -> str | None:
    """A value of any SQLite storage class as PostgreSQL input text, for columns read as text.

    SQLite stores what it is given: a NUMERIC, BOOLEAN, DATETIME or untyped column holds
    integers and reals next to text, so every non-text value is spelled out here (BLOBs as
    bytea hex) instead of being handed to Arrow as a string it is not.
    """
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return "\\x" + value.hex()
    return str(value)


class UnfitValue(UserError):
    """A source value its declared column type cannot hold (SQLite stores whatever it is given)."""


def sqlite_batches(
    source_url: str, info: TableInfo, chunk: Chunk, as_text: Collection[str] = (), cursor: str | None = None
) -> Iterator[pa.RecordBatch]:
    """Rows of the chunk's rowid range (and, incrementally, its ``cursor`` window), as Arrow
    batches typed from the PostgreSQL types (``as_text`` columns as their text forms, whatever
    they hold).

    SQLite has no columnar export, so rows are transposed per batch; BLOBs become bytea hex.
    An unbounded chunk names no rowid: it is how a ``WITHOUT ROWID`` table is read (a chunk
    has rowid bounds only when the table has a rowid name left, see :func:`sqlite_rowid_name`).
    """
    schema = pa.schema(
        [(c.name, pa.string() if c.name in as_text else _sqlite_arrow(c.pg_type)) for c in info.columns]
    )
    bounds: list[tuple[str, object]] = [
        (f"{sqlite_rowid_name(info)} {op} ?", int(bound[0]))
        for bound, op in ((chunk.lo, ">="), (chunk.hi, "<"))
        if bound
    ]
    if cursor is not None and chunk.cursor_hi is not None:
        bounds += _sqlite_cursor_window(cursor, chunk.cursor_lo, chunk.cursor_hi)
    query = "SELECT {} FROM {} WHERE {}".format(  # noqa: S608 - identifiers quoted, values bound
        ", ".join(_sqlite_ident(c.name) for c in info.columns),
        _sqlite_ident(info.name),
        " AND ".join(condition for condition, _ in bounds) or "1",
    )
    with sqlite_connect(source_url) as conn:
        cursor_rows = conn.execute(query, [value for _, value in bounds])
        while rows := cursor_rows.fetchmany(BATCH_ROWS):
            columns = list(zip(*rows, strict=True))
            arrays = [
                _sqlite_array(info.name, field, col) for col, field in zip(columns, schema, strict=True)
            ]
            yield pa.RecordBatch.from_arrays(arrays, schema=schema)


def _sqlite_cursor_window(cursor: str, low: str | None, high: str | None) -> list[tuple[str, object]]:
    """Conditions and parameters for ``low < cursor <= high`` (None = open); without ``low`` (a
    first pass) rows whose cursor is NULL are in the window too, as in ``Chunk.pg_filter``.

    The bounds are bound as text, as the saved cursor is: SQLite converts a parameter compared
    with a column to the column's affinity, so an INTEGER, REAL or NUMERIC cursor compares as a
    number and a TEXT one (ISO timestamps) as text.
    """
    column = _sqlite_ident(cursor)
    window: list[tuple[str, object]] = [] if low is None else [(f"{column} > ?", low)]
    upto = f"{column} <= ?" if low is not None else f"({column} <= ? OR {column} IS NULL)"
    return window + ([] if high is None else [(upto, high)])


def sqlite_rows_since(
    conn: sqlite3.Connection, info: TableInfo, cursor: str, since: str | None, every: int
) -> tuple[str | None, int, list[int]]:
    """For an incremental pass: the highest cursor value (as text), the rows past ``since``,
    and the rowid of every ``every``-th of them after the first (the chunk bounds; none for a
    ``WITHOUT ROWID`` table, which is one chunk)."""
    name, column = _sqlite_ident(info.name), _sqlite_ident(cursor)
    (high,) = conn.execute(f"SELECT max({column}) FROM {name}").fetchone()  # noqa: S608 - quoted identifiers
    window = _sqlite_cursor_window(cursor, since, None)
    where = " AND ".join(condition for condition, _ in window) or "1"
    params = [value for _, value in window]
    (rows,) = conn.execute(f"SELECT count(*) FROM {name} WHERE {where}", params).fetchone()  # noqa: S608
    bounds: list[int] = []
    if rows > every and sqlite_has_rowid(conn, info):
        rowid = sqlite_rowid_name(info)
        numbered = f"SELECT {rowid} AS fy_rowid, row_number() OVER (ORDER BY {rowid}) AS fy_rn FROM {name} WHERE {where}"  # noqa: S608
        query = f"SELECT fy_rowid FROM ({numbered}) WHERE fy_rn % ? = 1 AND fy_rn > 1 ORDER BY fy_rn"  # noqa: S608
        bounds = [r[0] for r in conn.execute(query, [*params, every])]
    return None if high is None else str(high), rows, bounds


def _sqlite_array(table: str, field: pa.Field, values: Sequence[object]) -> pa.Array:
    """One column of a batch as Arrow; a value its declared type cannot hold is a one-line error
    naming the table and column (it fails before any mapping applies)."""
    if field.type == pa.string():
        return pa.array([_sqlite_text(v) for v in values], pa.string())
    # SQLite keeps a REAL in an INTEGER column unless it is a whole number, and Arrow would
    # truncate it to one without a word (2.9999 -> 2)
    real = next((v for v in values if isinstance(v, float)), None) if field.type == pa.int64() else None
    if real is not None:
        raise _unfit(table, field, f"{real!r} is not an integer")
    try:
        return pa.array(values, field.type)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as exc:
        raise _unfit(table, field, first_line(exc)) from None


def _unfit(table: str, field: pa.Field, reason: str) -> UnfitValue:
    return UnfitValue(
        f"SQLite column {table}.{field.name} holds a value that does not fit its declared type "
        f"({reason}); fix the value in the SQLite file or declare the column's "
        "type to match its values, or rerun with quarantine=True to load the rest"
    )


def _sqlite_arrow(pg_type: str) -> pa.DataType:
    """SQLite values are read as int, float or text; PostgreSQL parses the text forms."""
    return {"bigint": pa.int64(), "double precision": pa.float64()}.get(pg_type, pa.string())


# --- static files -----------------------------------------------------------------------------


def file_tables(directory: Path) -> dict[str, Path]:
    """``{table: file}`` for the supported files in ``directory``; one file per table."""
    found: dict[str, Path] = {}
    for path in sorted(directory.iterdir()):
        if path.suffix.lower() not in FILE_SUFFIXES:
            continue
        if path.stem in found:
            raise UserError(f"two files define table {path.stem!r} in {directory}; keep one of them")
        found[path.stem] = path
    return found


def file_batches(path: Path, types: Mapping[str, pa.DataType] | None = None) -> Iterator[pa.RecordBatch]:
    """The file's rows as Arrow batches, CSV columns named in ``types`` read as those types. JSON
    arrays are parsed whole (reference data); JSON Lines, CSV and Parquet stream."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            yield from pq.ParquetFile(path).iter_batches(batch_size=BATCH_ROWS)
        elif suffix == ".csv":
            yield from _csv_batches(path, types or {})
        elif suffix in (".jsonl", ".ndjson"):
            yield from pa_json.open_json(path)
        else:
            yield from _json_array_batches(path)
    except (pa.ArrowInvalid, json.JSONDecodeError) as exc:
        raise UserError(f"cannot parse {path}: {first_line(exc)}; fix the file") from None


def _json_array_batches(path: Path) -> Iterator[pa.RecordBatch]:
    """A JSON array of objects as batches of one schema, read as the JSON Lines it holds.

    Converting the objects in Python took the columns from the first object of each batch, so a
    key the first object lacked was silently dropped. The array is parsed whole anyway, so its
    objects go to the JSON Lines reader at once, which takes the union of all keys and one type
    per key over every row, exactly as for a ``.jsonl`` file: integers next to floats become
    double; a key holding text in one row and numbers in another is a one-line error, and so is
    an integer beyond 64 bits. Columns come in the order the keys first appear.
    """
    records = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise UserError(f"{path} must hold a JSON array of objects (or use .jsonl, one object a line)")
    if not records:
        return
    lines = [json.dumps(r, ensure_ascii=False).encode() for r in records]
    _refuse_wide_integers(path, lines, "object")
    table = pa_json.read_json(pa.BufferReader(b"\n".join(lines)))
    # the reader orders the columns as its parallel blocks met them; the table has them as written
    keys = dict.fromkeys(key for record in records for key in record)
    yield from table.select(list(keys)).to_batches(max_chunksize=BATCH_ROWS)


# 2**63 has 19 digits: an integer written with fewer fits in 64 bits
_LONG_DIGITS = re.compile(rb"\d{19,}")


class _WideInteger(str):
    """A JSON integer beyond 64 bits, kept as its text (Python would convert any length)."""


def _json_integer(text: str) -> int | _WideInteger:
    value = int(text) if len(text) <= 20 else None
    return value if value is not None and -(2**63) <= value < 2**63 else _WideInteger(text)


def _wide_integer(value: object, key: str = "") -> tuple[str, str] | None:
    """The key path (``meta.ids[1]``) and text of the first integer beyond 64 bits in a JSON value."""
    if isinstance(value, _WideInteger):
        return key, value
    items: Iterable[tuple[str | int, object]] = ()
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    for name, item in items:
        path = f"{key}[{name}]" if isinstance(name, int) else f"{key}.{name}" if key else name
        if found := _wide_integer(item, path):
            return found
    return None


def _refuse_wide_integers(path: Path, lines: Iterable[bytes], unit: str) -> None:
    """A one-line error naming the first ``unit`` (a JSON Lines line, an array's object) that holds
    an integer beyond 64 bits, and its key: pyarrow's JSON reader rounds such an integer to a
    double without a word, and no Arrow integer holds it. Only lines with 19 digits in a row are
    parsed, so a file without such numbers costs one streamed regex scan."""
    for number, line in enumerate(lines, 1):
        if not _LONG_DIGITS.search(line):
            continue
        try:
            record = json.loads(line, parse_int=_json_integer)
        except ValueError:
            continue  # not JSON: the file's reader reports it
        if found := _wide_integer(record):
            key, text = found
            shown = text if len(text) <= 40 else f"{text[:20]}... ({len(text.lstrip('-'))} digits)"
            raise UserError(
                f"{path}, {unit} {number}: {key} holds the integer {shown}, beyond 64 bits, which would "
                "load rounded; write it as a JSON string to load it as text"
            )


def _open_csv(path: Path, types: Mapping[str, pa.DataType]) -> pa_csv.CSVStreamingReader:
    # as in PostgreSQL's CSV: an empty field is NULL, a quoted empty one is ""
    options = pa_csv.ConvertOptions(
        column_types=dict(types), strings_can_be_null=True, quoted_strings_can_be_null=False
    )
    return pa_csv.open_csv(path, convert_options=options)


def _csv_batches(path: Path, types: Mapping[str, pa.DataType]) -> Iterator[pa.RecordBatch]:
    """A CSV file's batches. pyarrow infers each undeclared column's type from the first block
    (about 1 MB) of rows: a value further down that type cannot hold is a one-line error naming
    the column and how to declare its type."""
    reader = _open_csv(path, types)
    try:
        yield from reader
    except pa.ArrowInvalid as exc:
        message = first_line(exc)
        number = re.match(r"In CSV column #(\d+)", message)
        if number is None:
            raise
        column = reader.schema.names[int(number.group(1))]
        raise UserError(
            f"cannot parse {path}: {message} (column {column}); fix the file, or declare the column's "
            f"type with the mapping's cast (cast: {{{column}: text}} reads it as written)"
        ) from None


def declare_types(info: TableInfo, types: Mapping[str, str]) -> TableInfo:
    """The file table with ``types`` (source column → PostgreSQL type) as the types its CSV reader
    converts those columns to, instead of inferring them from the first rows: a zip code
    ``00123`` read as the integer 123, or a column of numbers that turns to text further down,
    failing. JSON and Parquet values carry their own types: their tables are returned as they are."""
    if not types or Path(info.path or "").suffix.lower() != ".csv":
        return info
    columns = tuple(
        replace(c, pg_type=types[c.name], declared=True) if c.name in types else c for c in info.columns
    )
    return replace(info, columns=columns)


def file_describe(path: Path) -> TableInfo:
    """The file's columns. A CSV's come from its header, so a header-only file is an empty table
    with those columns (typed text), not a table without columns. A JSON Lines file is scanned
    whole for integers beyond 64 bits, once per run (before anything is loaded)."""
    if path.suffix.lower() == ".parquet":
        schema = pq.read_schema(path)
    elif path.suffix.lower() == ".csv":
        try:
            schema = _open_csv(path, {}).schema
        except pa.ArrowInvalid as exc:
            raise UserError(f"cannot parse {path}: {first_line(exc)}; fix the file") from None
    else:
        first = next(file_batches(path), None)
        schema = first.schema if first is not None else pa.schema([])
        if path.suffix.lower() in (".jsonl", ".ndjson"):
            with path.open("rb") as lines:
                _refuse_wide_integers(path, lines, "line")
    columns = tuple(Column(f.name, arrow_to_pg(f.type)) for f in schema)
    return TableInfo(path.stem, columns, path=str(path))


def file_row_count(info: TableInfo) -> int:
    path = Path(info.path or "")
    if path.suffix.lower() == ".parquet":
        return pq.ParquetFile(path).metadata.num_rows
    return sum(batch.num_rows for batch in file_batches(path, info.read_types))


def file_chunk_batches(info: TableInfo, chunk: Chunk, cursor: str | None = None) -> Iterator[pa.RecordBatch]:
    """The rows ``[lo, hi)`` of the file, by position, streamed and sliced batch by batch; with
    ``cursor``, only those in the chunk's cursor window."""
    low = int(chunk.lo[0]) if chunk.lo else 0
    high = int(chunk.hi[0]) if chunk.hi else None
    offset = 0
    for batch in file_batches(Path(info.path or ""), info.read_types):
        end = offset + batch.num_rows
        if end > low and (high is None or offset < high):
            start = max(low - offset, 0)
            stop = batch.num_rows if high is None else min(high - offset, batch.num_rows)
            rows = batch.slice(start, stop - start)
            if cursor is not None and chunk.cursor_hi is not None:
                rows = rows.filter(_cursor_mask(rows, info, cursor, chunk.cursor_lo, chunk.cursor_hi))
            yield rows
        offset = end
        if high is not None and offset >= high:
            return


def _cursor_mask(batch: pa.RecordBatch, info: TableInfo, cursor: str, low: str | None, high: str | None) -> pa.Array:
    """Which rows of a file batch lie in ``low < cursor <= high`` (None = open); rows whose cursor
    is null lie only in a first pass's window (no ``low``), as in ``Chunk.pg_filter``. The text
    bounds are cast to the column's Arrow type."""
    column = batch.column(cursor)
    try:
        mask = pc.is_valid(column)
        for bound, compare in ((low, pc.greater), (high, pc.less_equal)):
            if bound is not None:
                mask = pc.and_kleene(mask, compare(column, literal_array([bound]).cast(column.type)[0]))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise UserError(
            f"cursor column {info.name}.{cursor} cannot be compared with the saved cursor {low or high!r} "
            f"({first_line(exc)}); pick a cursor column of numbers, timestamps or text, or use mode='full'"
        ) from None
    return pc.fill_null(pc.or_(mask, pc.is_null(column)) if low is None else mask, literal_array([False])[0])


def file_rows_since(info: TableInfo, cursor: str, since: str | None) -> tuple[str | None, int, int]:
    """For an incremental pass over a file: the highest cursor value (as text), the rows past
    ``since``, and all rows; one streamed pass, compared column-wise."""
    top: pa.Scalar | None = None
    past = rows = 0
    for batch in file_batches(Path(info.path or ""), info.read_types):
        rows += batch.num_rows
        past += pc.sum(_cursor_mask(batch, info, cursor, since, None)).as_py() or 0
        if (batch_top := pc.max(batch.column(cursor))).is_valid:
            top = batch_top if top is None or pc.greater(batch_top, top).as_py() else top
    return None if top is None else top.cast(pa.string()).as_py(), past, rows


# --- one entry point per operation ------------------------------------------------------------


def list_tables(source_url: str) -> list[str]:
    """All tables of the source: ``schema.table`` for PostgreSQL (see :func:`qualified_name`),
    bare names otherwise."""
    kind = source_kind(source_url)
    if kind == "postgres":
        from tasks.integrity import user_tables

        with connection(validate_postgres_url(source_url)) as conn:
            return [qualified_name(s, t) for s, t in user_tables(conn)]
    if kind == "sqlite":
        with sqlite_connect(source_url) as conn:
            return sqlite_tables(conn)
    return list(file_tables(source_path(source_url)))


def describe(source_url: str, table: str) -> TableInfo:
    kind = source_kind(source_url)
    if kind == "postgres":
        with connection(validate_postgres_url(source_url)) as conn:
            return pg_describe(conn, *split_name(table))
    if kind == "sqlite":
        with sqlite_connect(source_url) as conn:
            return sqlite_describe(conn, table)
    files = file_tables(source_path(source_url))
    if table not in files:
        raise UserError(
            f"no file for table {table!r} in {source_url}; expected {table}.jsonl/.json/.csv/.parquet"
        )
    return file_describe(files[table])


def pg_chunk_query(info: TableInfo, chunk: Chunk, cursor: str | None) -> tuple[sql.Composed, list[str]]:
    """``SELECT <data columns> FROM table WHERE <chunk bounds>`` and its parameters."""
    where, params = chunk.pg_filter(info.key, cursor)
    query = sql.SQL("SELECT {} FROM {} WHERE {}").format(
        sql.SQL(", ").join(sql.Identifier(c) for c in info.copy_columns), info.ident, where
    )
    return query, params


def read_chunk(
    source_url: str, info: TableInfo, chunk: Chunk, cursor: str | None, as_text: Collection[str] = ()
) -> Iterator[pa.RecordBatch]:
    """Stream one chunk of the source table as Arrow batches.

    From PostgreSQL, ``as_text`` columns are read as the server's text form and written back
    as such: a mapping that does not touch them saves parsing and re-printing every value
    (the text of a value is valid input of its own type, with the pinned session settings).
    From SQLite, they are read as text whatever the column holds. Files keep their own types.
    """
    kind = source_kind(source_url)
    if kind == "sqlite":
        yield from sqlite_batches(source_url, info, chunk, as_text, cursor)
        return
    if kind == "files":
        yield from file_chunk_batches(info, chunk, cursor)
        return
    query, params = pg_chunk_query(info, chunk, cursor)
    with connection(validate_postgres_url(source_url), utc=True) as conn:
        yield from read_csv_batches(conn, query, info.arrow_schema(as_text), params)


def row_count(source_url: str, info: TableInfo, window: Chunk | None = None, cursor: str | None = None) -> int:
    """Exact row count of a source table, counted where the data lives; with ``window`` (a chunk
    without key bounds) and its ``cursor`` column, of the rows in its cursor window only."""
    kind = source_kind(source_url)
    low, high = (window.cursor_lo, window.cursor_hi) if window else (None, None)
    if kind == "files":
        if cursor is None or high is None:
            return file_row_count(info)
        batches = file_batches(Path(info.path or ""), info.read_types)
        return sum(pc.sum(_cursor_mask(b, info, cursor, low, high)).as_py() or 0 for b in batches)
    if kind == "sqlite":
        bounds = _sqlite_cursor_window(cursor, low, high) if cursor else []
        condition = " AND ".join(c for c, _ in bounds) or "1"
        with sqlite_connect(source_url) as conn:
            query = f"SELECT count(*) FROM {_sqlite_ident(info.name)} WHERE {condition}"  # noqa: S608 - quoted identifier, bound values
            return conn.execute(query, [value for _, value in bounds]).fetchone()[0]
    where, params = window.pg_filter(info.key, cursor) if window else (sql.SQL("true"), [])
    with connection(validate_postgres_url(source_url)) as conn:
        return one_row(conn, sql.SQL("SELECT count(*) FROM {} WHERE {}").format(info.ident, where), params)[0]
