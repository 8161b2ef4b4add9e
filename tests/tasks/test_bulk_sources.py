"""Bulk-copy sources read from real SQLite files."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys

import pyarrow as pa
import pytest

from tasks.bulk_sources import (
    BATCH_ROWS,
    declare_types,
    file_batches,
    file_chunk_batches,
    file_describe,
    file_row_count,
    qualified_name,
    resolve_table_name,
    split_name,
    sqlite_batches,
    sqlite_connect,
    sqlite_describe,
)
from tasks.chunk_plan import Chunk, plan_table
from tasks.errors import UserError
from tests.conftest import ROOT

WHOLE = Chunk(0, "rowid", None, None)


def _read(url: str, table: str) -> list[dict[str, object]]:
    with sqlite_connect(url) as conn:
        info = sqlite_describe(conn, table)
    return [row for batch in sqlite_batches(url, info, WHOLE) for row in batch.to_pylist()]


def test_sqlite_numeric_boolean_and_untyped_columns_holding_numbers_read_as_text(tmp_path):
    """SQLite keeps integers and reals in NUMERIC, BOOLEAN, DATETIME and untyped columns; they
    are read as PostgreSQL input text (BLOBs as bytea hex) instead of failing the chunk."""
    url = f"sqlite:///{tmp_path / 'legacy.db'}"
    with sqlite3.connect(tmp_path / "legacy.db") as db:
        db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, price NUMERIC, flag BOOLEAN, at DATETIME, misc)")
        db.executemany(
            "INSERT INTO t VALUES (?, ?, ?, ?, ?)",
            [(1, 2.5, 1, 1700000000, "x"), (2, 3, 0, "2024-01-01 00:00:00", b"\x01\xff"), (3, None, None, None, 7)],
        )
    assert _read(url, "t") == [
        {"id": 1, "price": "2.5", "flag": "1", "at": "1700000000", "misc": "x"},
        {"id": 2, "price": "3", "flag": "0", "at": "2024-01-01 00:00:00", "misc": "\\x01ff"},
        {"id": 3, "price": None, "flag": None, "at": None, "misc": "7"},
    ]


def test_sqlite_value_that_does_not_fit_an_integer_column_names_the_column(tmp_path):
    url = f"sqlite:///{tmp_path / 'legacy.db'}"
    with sqlite3.connect(tmp_path / "legacy.db") as db:
        db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, n INT)")
        db.execute("INSERT INTO t VALUES (1, 'notanint')")
    with pytest.raises(UserError, match=r"SQLite column t\.n holds a value") as err:
        _read(url, "t")
    assert "\n" not in str(err.value)


def test_sqlite_real_in_an_integer_column_is_unfit_not_truncated(tmp_path):
    """SQLite keeps 2.9999 as REAL in an INTEGER column; it used to load as 2, silently."""
    url = f"sqlite:///{tmp_path / 'legacy.db'}"
    with sqlite3.connect(tmp_path / "legacy.db") as db:
        db.execute("CREATE TABLE r (id INTEGER PRIMARY KEY, n INTEGER)")
        db.executemany("INSERT INTO r VALUES (?, ?)", [(1, 3), (2, 2.9999), (3, -1.7)])
    with pytest.raises(UserError) as err:
        _read(url, "r")
    assert str(err.value) == (
        "SQLite column r.n holds a value that does not fit its declared type (2.9999 is not an integer); "
        "fix the value in the SQLite file or declare the column's type to match its values, or rerun with "
        "quarantine=True to load the rest"
    )


@pytest.mark.parametrize(
    ("columns", "chunks"), [("rowid TEXT, v INTEGER", 3), ("rowid TEXT, _ROWID_ INTEGER, oid REAL, v INTEGER", 1)]
)
def test_sqlite_column_named_rowid_does_not_hide_the_rowid_chunks_go_by(tmp_path, columns, chunks):
    """A column named rowid hides SQLite's rowid under that name: planning failed with a TypeError
    (its text max + 1). The rowid's other names are used; with all three taken, one chunk."""
    url = f"sqlite:///{tmp_path / 'legacy.db'}"
    with sqlite3.connect(tmp_path / "legacy.db") as db:
        db.execute(f"CREATE TABLE t ({columns})")
        db.executemany("INSERT INTO t (rowid, v) VALUES (?, ?)", [(f"r{i}", i) for i in range(5)])
        db.execute("UPDATE t SET rowid = NULL WHERE v = 4")
    with sqlite_connect(url) as conn:
        info = sqlite_describe(conn, "t")
    plan = plan_table(url, info, 2)
    rows = [row for chunk in plan for batch in sqlite_batches(url, info, chunk) for row in batch.to_pylist()]
    assert (len(plan), [(row["rowid"], row["v"]) for row in rows]) == (
        chunks,
        [("r0", 0), ("r1", 1), ("r2", 2), ("r3", 3), (None, 4)],
    )


def test_sqlite_generated_columns_are_data_and_hidden_virtual_table_columns_stay_out(tmp_path):
    """``PRAGMA table_info`` did not list generated columns, so their values were never read.
    They are plain data columns now (not ``generated``: the target gets their values); the
    hidden columns of a virtual table (FTS5's own ``rank`` and table-named column) are no data."""
    url = f"sqlite:///{tmp_path / 'legacy.db'}"
    with sqlite3.connect(tmp_path / "legacy.db") as db:
        db.execute(
            "CREATE TABLE t (id INTEGER PRIMARY KEY, a INT, b INT GENERATED ALWAYS AS (a * 2) STORED, "
            "c TEXT AS ('v' || a) VIRTUAL NOT NULL)"
        )
        db.executemany("INSERT INTO t (id, a) VALUES (?, ?)", [(1, 3), (2, 0)])
        db.execute("CREATE VIRTUAL TABLE docs USING fts5(body)")
        db.execute("INSERT INTO docs (body) VALUES ('hello')")
    with sqlite_connect(url) as conn:
        info = sqlite_describe(conn, "t")
        docs = sqlite_describe(conn, "docs")
    assert [(c.name, c.pg_type, c.not_null, c.generated) for c in info.columns] == [
        ("id", "bigint", False, False),
        ("a", "bigint", False, False),
        ("b", "bigint", False, False),
        ("c", "text", True, False),
    ]
    assert info.copy_columns == ["id", "a", "b", "c"]
    assert _read(url, "t") == [{"id": 1, "a": 3, "b": 6, "c": "v3"}, {"id": 2, "a": 0, "b": 0, "c": "v0"}]
    assert [c.name for c in docs.columns] == ["body"]


def test_header_only_csv_is_an_empty_table_with_the_header_columns(tmp_path):
    """It used to describe as a table without columns, which the copy refused to create."""
    (tmp_path / "plans.csv").write_text("id,name\n")
    info = file_describe(tmp_path / "plans.csv")
    assert [c.name for c in info.columns] == ["id", "name"]
    assert file_row_count(info) == 0


def _zips_csv(path, rows):
    """Zip codes that look like integers for more than pyarrow's first block (about 1 MB) of rows,
    then one that does not."""
    lines = ["zip,n", "00123,0"] + [f"{10000 + i},{i}" for i in range(1, rows)] + ["K1A0B1,-1"]
    path.write_text("\n".join(lines) + "\n")


def test_csv_declared_column_is_read_as_its_type_not_inferred(tmp_path):
    """An undeclared zip code column was inferred as integers (``00123`` became 123) from the first
    block, and a value further down that was not one failed the file with "fix the file"."""
    path = tmp_path / "zips.csv"
    _zips_csv(path, 150_000)
    inferred = file_describe(path)
    assert [(c.name, c.pg_type) for c in inferred.columns] == [("zip", "bigint"), ("n", "bigint")]
    with pytest.raises(UserError) as err:
        file_row_count(inferred)
    message = str(err.value)
    assert "'K1A0B1'" in message and "(column zip)" in message and "cast: {zip: text}" in message
    assert "\n" not in message

    info = declare_types(inferred, {"zip": "text"})
    assert [(c.name, c.pg_type, c.declared) for c in info.columns] == [
        ("zip", "text", True),
        ("n", "bigint", False),
    ]
    assert file_row_count(info) == 150_001
    rows = [row for batch in file_chunk_batches(info, Chunk(0, "ordinal", None, None)) for row in batch.to_pylist()]
    assert rows[0] == {"zip": "00123", "n": 0} and rows[-1] == {"zip": "K1A0B1", "n": -1}
    assert declare_types(inferred, {"n": "numeric(12,2)"}).read_types == {"n": pa.decimal128(12, 2)}


def test_json_types_are_not_declared_by_the_csv_reader_options(tmp_path):
    """JSON values carry their types (a cast converts them): only CSV columns are declared."""
    path = tmp_path / "zips.jsonl"
    path.write_text('{"zip": "00123"}\n')
    info = file_describe(path)
    assert declare_types(info, {"zip": "integer"}) == info


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (
            [json.dumps({"id": 1, "v": 2**63 - 1}), json.dumps({"id": 2, "v": 2**63})],
            r"ids\.jsonl, line 2: v holds the integer 9223372036854775808, beyond 64 bits, which would load rounded; "
            r"write it as a JSON string to load it as text$",
        ),
        (
            [json.dumps(r) for r in ({"id": 1, "v": -(2**63)}, {"id": 2}, {"id": 3, "meta": {"ids": [1, -(2**63) - 1]}})],
            r"ids\.jsonl, line 3: meta\.ids\[1\] holds the integer -9223372036854775809, beyond 64 bits",
        ),
        (
            ['{"id": 1}'] * 40_000 + ['{"id": 2, "v": ' + "9" * 5000 + "}"],
            r"ids\.jsonl, line 40001: v holds the integer 9{20}\.\.\. \(5000 digits\), beyond 64 bits",
        ),
    ],
)
def test_jsonl_integer_beyond_64_bits_is_a_one_line_error_naming_line_and_key(tmp_path, lines, message):
    """pyarrow's JSON Lines reader rounded such an integer to a double (or made it infinity)
    without a word, past the first block too: JSON arrays were refused, JSON Lines loaded wrong."""
    path = tmp_path / "ids.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=message) as err:
        file_describe(path)
    assert "\n" not in str(err.value)


def test_jsonl_long_digits_in_strings_and_floats_load(tmp_path):
    """Only integers are refused: 19 digits in a string, a float or a fitting integer are fine."""
    path = tmp_path / "ids.jsonl"
    records = [{"s": "12345678901234567890123", "f": 0.1234567890123456789012, "i": -(2**63)}]
    path.write_text(json.dumps(records[0]) + "\n")
    info = file_describe(path)
    assert [(c.name, c.pg_type) for c in info.columns] == [
        ("s", "text"),
        ("f", "double precision"),
        ("i", "bigint"),
    ]
    assert file_row_count(info) == 1


FILE_CURSOR_WINDOW = """
import json, sys
from pathlib import Path
from tasks.bulk_sources import file_chunk_batches, file_describe, file_rows_since
from tasks.chunk_plan import Chunk, plan_table

info = file_describe(Path(sys.argv[1]))
top, past, rows = file_rows_since(info, "changed", "2024-01-01 00:02:00")
window = Chunk(0, "ordinal", None, None, cursor_lo="2024-01-01 00:02:00", cursor_hi="2024-01-01 00:04:00")
batches = list(file_chunk_batches(info, window, "changed"))
pandas = "pandas" in sys.modules
ids = [row["id"] for batch in batches for row in batch.to_pylist()]
print(json.dumps({"pandas": pandas, "top": top, "past": past, "rows": rows, "ids": ids}))
"""


def test_file_cursor_window_needs_no_pandas_import(tmp_path):
    """An incremental file load compares the cursor column with the saved bounds: converting
    those bounds the usual way imported pandas into the copy process (~40 MB, ~1 s)."""
    path = tmp_path / "items.csv"
    lines = [f"{i},2024-01-01 00:0{i}:00" for i in range(1, 6)]
    path.write_text("id,changed\n" + "\n".join([*lines[:3], "9,", *lines[3:]]) + "\n")
    done = subprocess.run(
        [sys.executable, "-c", FILE_CURSOR_WINDOW, str(path)], cwd=ROOT, capture_output=True, text=True, check=True
    )
    result = json.loads(done.stdout)
    assert result == {"pandas": False, "top": "2024-01-01 00:05:00", "past": 3, "rows": 6, "ids": [3, 4]}


def test_json_array_columns_are_the_union_of_all_keys_in_every_batch(tmp_path):
    """The columns used to come from the first object of each batch: a key it lacked was dropped
    without a word, and a later batch could describe other columns than the first."""
    records = [{"id": 1, "name": "a"}, {"id": 2, "name": "b", "email": "b@x.org"}]
    records += [{"id": i, "score": 1} for i in range(3, BATCH_ROWS + 2)] + [{"id": 0, "score": 2.5, "late": True}]
    path = tmp_path / "people.json"
    path.write_text(json.dumps(records))
    info = file_describe(path)
    assert [(c.name, c.pg_type) for c in info.columns] == [
        ("id", "bigint"),
        ("name", "text"),
        ("email", "text"),
        ("score", "double precision"),
        ("late", "boolean"),
    ]
    batches = list(file_batches(path))
    assert len(batches) > 1 and sum(b.num_rows for b in batches) == BATCH_ROWS + 2
    assert all(b.schema == batches[0].schema for b in batches)
    rows = [row for batch in batches for row in batch.to_pylist()]
    assert rows[:2] == [
        {"id": 1, "name": "a", "email": None, "score": None, "late": None},
        {"id": 2, "name": "b", "email": "b@x.org", "score": None, "late": None},
    ]
    assert rows[-1] == {"id": 0, "name": None, "email": None, "score": 2.5, "late": True}


@pytest.mark.parametrize(
    ("records", "message"),
    [
        (
            [{"id": 1, "v": 1}, {"id": 2, "v": "one"}],
            r"cannot parse .*mixed\.json: JSON parse error: Column\(/v\) changed from number to string in row 1; "
            r"fix the file",
        ),
        (
            [{"id": 1, "v": 1}, {"id": 2, "v": 2**64}],
            r"mixed\.json, object 2: v holds the integer 18446744073709551616, beyond 64 bits, which would load "
            r"rounded; write it as a JSON string to load it as text",
        ),
        ([{"id": 1}, [2]], r"mixed\.json must hold a JSON array of objects \(or use \.jsonl, one object a line\)"),
    ],
)
def test_json_array_values_no_column_type_holds_are_one_line_errors(tmp_path, records, message):
    """A key with numbers and text has no one type; an integer beyond int64 raised a bare
    OverflowError traceback (and the JSON Lines reader would round it to a double)."""
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps(records))
    with pytest.raises(UserError, match=message) as err:
        list(file_batches(path))
    assert "\n" not in str(err.value)


AVAILABLE = [qualified_name(*t) for t in [("public", "my.table"), ("my", "table"), ("public", 'we"ird'), ("a.b", "c")]]


def test_table_names_with_dots_and_quotes_parse_back_to_their_table():
    """Names were split at their last dot: public."my.table" became schema public.my, table table."""
    assert AVAILABLE == ['public."my.table"', "my.table", 'public."we""ird"', '"a.b".c']
    assert [split_name(name) for name in AVAILABLE] == [
        ("public", "my.table"),
        ("my", "table"),
        ("public", 'we"ird'),
        ("a.b", "c"),
    ]
    assert split_name("orders") == ("public", "orders") and split_name('"x.y"', "s") == ("s", "x.y")


@pytest.mark.parametrize(
    ("entry", "table"),
    [
        ('public."my.table"', 'public."my.table"'),
        ('"my"."table"', "my.table"),
        ('"we""ird"', 'public."we""ird"'),
        ("a.b.c", '"a.b".c'),
        ("public.nope", "public.nope"),
    ],
)
def test_tables_entry_names_the_one_table_it_can_mean(entry, table):
    assert resolve_table_name(entry, AVAILABLE) == table


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("my.table", """table name 'my.table' could be "public"."my.table" or "my"."table"; quote its parts to say which"""),
        (
            '"a"b',
            """table name '"a"b' is not schema.table: a part with a dot or a quote goes in double quotes, with "" """
            'for a quote inside, e.g. "my.schema"."a.b"',
        ),
        (
            '"a".b.c',
            """table name '"a".b.c' has 3 dot-separated parts; write schema.table, with a part that holds a dot in """
            'double quotes, e.g. "my.schema"."a.b"',
        ),
    ],
)
def test_tables_entry_that_is_ambiguous_or_malformed_is_one_line(entry, message):
    with pytest.raises(UserError) as err:
        resolve_table_name(entry, AVAILABLE)
    assert str(err.value) == message


def test_a_sqlite_source_that_is_a_fifo_is_one_line(tmp_path):
    """Checking a FIFO by opening it waited for a writer: the bulk copy hung for good (run in a
    subprocess, so the old behaviour fails the test instead of hanging it)."""
    fifo = tmp_path / "source.db"
    os.mkfifo(fifo)
    done = subprocess.run(
        [sys.executable, "-c", "import sys; from tasks.bulk_sources import source_kind; source_kind(sys.argv[1])", str(fifo)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert f"UserError: cannot read SQLite file {fifo}: it is not a regular file" in done.stderr
