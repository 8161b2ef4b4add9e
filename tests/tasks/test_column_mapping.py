"""Mappings are applied to whole Arrow batches, with one-line errors for user mistakes."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from decimal import Decimal

import psycopg
import pyarrow as pa
import pytest

from tasks.bulk_sources import Column, TableInfo
from tasks.column_mapping import apply_mapping, evaluate, mapped_table, parse_mapping
from tasks.errors import UserError
from tests.conftest import ROOT

INFO = TableInfo(
    "events",
    (
        Column("id", "bigint", True),
        Column("user_id", "integer"),
        Column("kind", "text"),
        Column("amount", "numeric(12,2)"),
    ),
    ("id",),
    "public",
)
BATCH = pa.RecordBatch.from_pydict(
    {
        "id": pa.array([1, 2, 3, 4], pa.int64()),
        "user_id": pa.array([10, None, 30, 40], pa.int32()),
        "kind": ["click", "debug", None, "buy"],
        "amount": pa.array([Decimal("1.25"), Decimal("2.50"), None, Decimal("4.00")], pa.decimal128(12, 2)),
    }
)


def test_rename_cast_compute_filter_drop_in_one_pass():
    spec = parse_mapping(
        {
            "events": {
                "rename": {"user_id": "account_id"},
                "cast": {"amount": "double precision"},
                "compute": {"cents": "round(amount * 100)", "flag": "kind in ['click', 'buy']"},
                "types": {"cents": "bigint"},
                "filter": "kind != 'debug'",
                "drop": ["kind"],
            }
        }
    )["events"]
    out = apply_mapping(BATCH, spec)
    assert out.schema.names == ["id", "account_id", "amount", "cents", "flag"]
    assert out.to_pydict() == {
        "id": [1, 4],
        "account_id": [10, 40],
        "amount": [1.25, 4.0],
        "cents": [125, 400],
        "flag": [True, True],
    }, "a NULL filter result drops the row"
    target = mapped_table(INFO, spec)
    assert [(c.name, c.pg_type) for c in target.columns] == [
        ("id", "bigint"),
        ("account_id", "integer"),
        ("amount", "double precision"),
        ("cents", "bigint"),
        ("flag", "boolean"),
    ]
    assert target.key == ("id",)


def test_expressions_use_arrow_compute_not_python_eval():
    assert evaluate("-amount + 1", BATCH).to_pylist() == [
        Decimal("-0.25"),
        Decimal("-1.50"),
        None,
        Decimal("-3.00"),
    ]
    assert evaluate("utf8_upper(kind)", BATCH).to_pylist() == ["CLICK", "DEBUG", None, "BUY"]
    with pytest.raises(UserError, match="unsupported mapping expression part"):
        evaluate("__import__('os').system('true')", BATCH)
    with pytest.raises(UserError, match="unknown column 'nope'"):
        evaluate("nope + 1", BATCH)


def test_user_mistakes_are_one_line_errors():
    with pytest.raises(UserError, match=r"invalid mapping at events\.renmae"):
        parse_mapping({"events": {"renmae": {}}})
    with pytest.raises(UserError, match="drops key columns"):
        mapped_table(INFO, parse_mapping({"events": {"drop": ["id"]}})["events"])
    with pytest.raises(UserError, match="unknown columns"):
        mapped_table(INFO, parse_mapping({"events": {"rename": {"missing": "x"}}})["events"])
    with pytest.raises(UserError, match="cannot cast column 'kind' to integer") as err:
        apply_mapping(BATCH, parse_mapping({"events": {"cast": {"kind": "integer"}}})["events"])
    assert "\n" not in str(err.value)


def test_untouched_columns_are_those_no_cast_or_expression_reads():
    """Columns only renamed, dropped or passed along may travel as text; the others are parsed."""
    mapping = parse_mapping(
        {
            "events": {
                "rename": {"user_id": "account_id", "kind": "category"},
                "cast": {"amount": "double precision"},
                "compute": {"big": "account_id > 10"},
                "filter": "category != 'debug'",
                "drop": ["id"],
            }
        }
    )["events"]
    assert mapping.untouched(["id", "user_id", "kind", "amount"]) == {"id"}
    only_rename = parse_mapping({"events": {"rename": {"user_id": "account_id"}}})["events"]
    assert only_rename.untouched(["id", "user_id"]) == {"id", "user_id"}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"compute": {"c": "nosuchfn(amount)"}}, "unknown function 'nosuchfn'"),
        ({"cast": {"amnt": "double precision"}}, r"unknown columns \['amnt'\]"),
        ({"rename": {"amount": "total"}, "cast": {"amount": "bigint"}}, r"unknown columns \['amount'\]"),
        ({"compute": {"c": "amount * 2"}, "types": {"d": "bigint"}}, r"unknown columns \['d'\]"),
        ({"filter": "knd != 'debug'"}, "unknown column 'knd'"),
        ({"compute": {"amount": "amount * 2"}}, r"computes columns the table already has: \['amount'\]"),
        ({"rename": {"kind": "k"}, "compute": {"k": "utf8_upper(k)"}}, r"already has: \['k'\]"),
    ],
)
def test_mapping_typos_fail_once_when_the_table_is_planned(spec, message):
    """Misspelt functions, cast/types columns and filter names are one-line errors before any
    chunk runs, not a traceback (unknown function) or a silently ignored entry (cast, types)."""
    with pytest.raises(UserError, match=message) as err:
        mapped_table(INFO, parse_mapping({"events": spec})["events"])
    assert "\n" not in str(err.value)


def test_numeric_cast_to_float_rounds_as_postgresql_does(fresh_db):
    """Casting numeric to double precision or real gives exactly what PostgreSQL's own cast gives."""
    with psycopg.connect(fresh_db) as conn:
        rows = conn.execute(
            "SELECT v::text, v::double precision, v::real FROM"
            " (SELECT round((random() * 2e8 - 1e8)::numeric, 2)::numeric(12,2) AS v"
            "  FROM generate_series(1, 5000)) s"
        ).fetchall()
    batch = pa.RecordBatch.from_pydict({"v": pa.array([Decimal(r[0]) for r in rows], pa.decimal128(12, 2))})
    as_double = apply_mapping(batch, parse_mapping({"t": {"cast": {"v": "double precision"}}})["t"])
    as_real = apply_mapping(batch, parse_mapping({"t": {"cast": {"v": "real"}}})["t"])
    assert as_double.column("v").to_pylist() == [r[1] for r in rows]
    # a real arrives from PostgreSQL as its shortest text, parsed as a double: compare as float32
    assert as_real.column("v").to_pylist() == [struct.unpack("f", struct.pack("f", r[2]))[0] for r in rows]


LITERALS_WITHOUT_PANDAS = r"""
import json, sys
import pyarrow as pa
from tasks.bulk_sources import Column, TableInfo
from tasks.column_mapping import apply_mapping, mapped_table, parse_mapping
info = TableInfo("t", (Column("n", "bigint"), Column("kind", "text"), Column("ok", "boolean")), ("n",), "public")
mapping = parse_mapping({"t": {
    "compute": {"cents": "n * 100", "half": "n * 0.5", "tag": "'légacy'", "flag": "ok == True",
                "picked": "kind in ['a', 'ç']", "small": "n in [1, 3]", "none": "None"},
    "filter": "kind != 'skip'",
}})["t"]
mapped_table(info, mapping)
import pyarrow.csv as pa_csv  # parsing text converts no Python values, so imports no pandas
batch = pa_csv.read_csv(
    pa.py_buffer("n,kind,ok\n1,a,true\n2,skip,false\n3,ç,\n".encode()),
    convert_options=pa_csv.ConvertOptions(column_types={"n": pa.int64(), "kind": pa.string(), "ok": pa.bool_()}),
).to_batches()[0]
assert "pandas" not in sys.modules
out = apply_mapping(batch, mapping)
print(json.dumps({"pandas": "pandas" in sys.modules, "rows": out.to_pylist()}, ensure_ascii=False))
"""


def test_literals_need_no_pandas_import_and_keep_their_types():
    """A literal in an expression is built from its bytes: converting it the usual way imports
    pandas into the copy process (~40 MB of RSS, the 5M-row peak over 300 MB)."""
    done = subprocess.run(
        [sys.executable, "-c", LITERALS_WITHOUT_PANDAS], cwd=ROOT, capture_output=True, text=True, check=True
    )
    result = json.loads(done.stdout)
    assert result["pandas"] is False
    assert result["rows"] == [
        {
            "n": 1,
            "kind": "a",
            "ok": True,
            "cents": 100,
            "half": 0.5,
            "tag": "légacy",
            "flag": True,
            "picked": True,
            "small": True,
            "none": None,
        },
        {
            "n": 3,
            "kind": "ç",
            "ok": None,
            "cents": 300,
            "half": 1.5,
            "tag": "légacy",
            "flag": None,
            "picked": True,
            "small": True,
            "none": None,
        },
    ]
