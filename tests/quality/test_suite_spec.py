"""Users' own suites in YAML or Python, and one-line errors for bad definitions."""

from __future__ import annotations

import psycopg
import pytest

from quality.runner import GxSession, check_table
from quality.suite_spec import Rule, Suite, load_suite_file, parse_suite, resolve_suites
from tasks.errors import UserError
from tests.conftest import run_cli

ORDERS_YAML = """
suites:
  - name: orders
    table: shop.orders
    timestamp_column: placed_at
    rules:
      - {name: id_present, check: not_null, column: id, severity: critical}
      - {name: amount_range, check: range, column: amount, min: 0, max: 1000, severity: high}
      - {name: sku_shape, check: regex, column: sku, pattern: '^SKU-[0-9]{4}$', severity: medium}
      - {name: currency, check: in_set, column: currency, values: [EUR, USD], severity: low}
      - {name: few_rows, check: row_count, min: 1, max: 5, severity: low}
"""

# SUITES for the module:attr test
SUITES = [
    Suite(
        name="py-orders",
        table="shop.orders",
        rules=[Rule(name="id_present", check="not_null", column="id", severity="critical")],
    )
]


def test_yaml_suite_runs_against_a_user_table(fresh_db, tmp_path):
    path = tmp_path / "orders.yaml"
    path.write_text(ORDERS_YAML)
    with psycopg.connect(fresh_db, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA shop")
        conn.execute(
            "CREATE TABLE shop.orders (id int, amount numeric, sku text, currency text, placed_at timestamptz)"
        )
        conn.execute(
            "INSERT INTO shop.orders VALUES (1, 10, 'SKU-0001', 'EUR', now()), (NULL, -5, 'SKU-1', 'EUR', now()),"
            " (3, 2000, 'SKU-0003', 'GBP', now()), (4, NULL, NULL, NULL, now())"
        )
    [suite] = load_suite_file(path)

    result = check_table(GxSession(), fresh_db, suite)

    counts = {r.rule: r.unexpected_count for r in result.rules}
    assert counts == {"id_present": 1, "amount_range": 2, "sku_shape": 1, "currency": 1, "few_rows": 0}
    # rows: 100, 100-10-5-2=83, 100-5-1=94, 100 -> mean
    assert result.score == pytest.approx((100 + 83 + 94 + 100) / 4)
    assert result.target == "shop.orders"


def test_python_suites_resolve_by_module_attribute():
    assert [s.name for s in resolve_suites(["tests.quality.test_suite_spec:SUITES", "users"])] == [
        "py-orders",
        "users",
    ]


@pytest.mark.parametrize(
    ("definition", "message"),
    [
        (
            {
                "name": "orders",
                "table": "orders",
                "rules": [{"name": "sku", "check": "regex", "column": "sku", "severity": "high"}],
            },
            "suite 'orders' rule 'sku': field 'pattern' is required for check 'regex'",
        ),
        (
            {
                "name": "orders",
                "table": "orders",
                "rules": [
                    {"name": "sku", "check": "regex", "column": "sku", "pattern": "([", "severity": "high"}
                ],
            },
            "suite 'orders' rule 'sku' field 'pattern': invalid regular expression",
        ),
        (
            {
                "name": "orders",
                "table": "orders",
                "rules": [{"name": "id", "check": "not_null", "column": "id", "severity": "urgent"}],
            },
            "suite 'orders' rule 'id' field 'severity': Input should be 'critical', 'high', 'medium' or 'low'",
        ),
        (
            {
                "name": "orders",
                "table": "orders",
                "rules": [
                    {"name": "amt", "check": "range", "column": "a", "min": 5, "max": 1, "severity": "low"}
                ],
            },
            "suite 'orders' rule 'amt': field 'min' (5.0) is greater than 'max' (1.0)",
        ),
        (
            {
                "name": "orders",
                "table": "shop.orders.x",
                "rules": [{"name": "id", "check": "not_null", "column": "id", "severity": "low"}],
            },
            "suite 'orders' field 'table': must be table or schema.table",
        ),
        (
            {
                "name": "orders",
                "table": "orders",
                "rules": [
                    {
                        "name": "fk",
                        "check": "foreign_key",
                        "column": "c",
                        "references": "x",
                        "severity": "low",
                    }
                ],
            },
            "suite 'orders' rule 'fk' field 'references': must be table.column or schema.table.column",
        ),
    ],
)
def test_bad_definition_names_suite_rule_and_field(definition, message):
    with pytest.raises(UserError) as info:
        parse_suite(definition, "orders.yaml")
    text = str(info.value)
    assert text.startswith(message) and text.endswith("fix it in orders.yaml")
    assert "\n" not in text


def test_nan_bounds_are_refused(tmp_path):
    # nan compares false with everything: a range rule with min .nan passed validation and then
    # flagged every row of the table (PostgreSQL sorts NaN above all numbers).
    path = tmp_path / "nan.yaml"
    path.write_text(
        "name: orders\ntable: orders\nrules:\n"
        "  - {name: amt, check: range, column: a, min: .nan, max: 10, severity: low}\n"
    )
    with pytest.raises(UserError, match=r"^suite 'orders' rule 'amt' field 'min': must be a number, not nan;"):
        load_suite_file(path)


def test_bad_yaml_and_unknown_refs_are_one_line_errors(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: x\nrules: [\n")
    with pytest.raises(UserError, match=r"is not valid YAML at line \d+"):
        load_suite_file(broken)
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(b"name: caf\xe9\n")
    with pytest.raises(UserError, match=r"^cannot read suite file .*latin1.yaml: 'utf-8' codec can't decode"):
        load_suite_file(latin1)
    directory = tmp_path / "dir.yaml"
    directory.mkdir()
    with pytest.raises(UserError, match=r"^cannot read suite file .*dir.yaml: it is a directory"):
        load_suite_file(directory)
    with pytest.raises(UserError, match="unknown suite 'userz'"):
        resolve_suites(["userz"])
    with pytest.raises(UserError, match="given twice"):
        resolve_suites(["users", "users"])


def test_cli_validate_suite_reports_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "name: orders\ntable: orders\nrules:\n  - {name: sku, check: regex, column: sku, severity: high}\n"
    )
    proc = run_cli("quality", "validate-suite", str(bad))
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "suite 'orders' rule 'sku': field 'pattern' is required" in proc.stderr
    good = tmp_path / "good.yaml"
    good.write_text(ORDERS_YAML)
    proc = run_cli("quality", "validate-suite", str(good))
    assert proc.returncode == 0, proc.stderr
    assert "orders: 5 rules" in proc.stdout


@pytest.mark.parametrize(
    ("table", "rule", "message"),
    [
        ("nope", {"check": "not_null", "column": "id"}, "suite 'orders': table public.nope not found"),
        (
            "t",
            {"check": "not_null", "column": "nocol"},
            "suite 'orders' rule 'r': column 'nocol' is not in public.t (its columns: id); fix the rule's column",
        ),
        (
            "t",
            {"check": "not_null", "column": "ID"},
            "suite 'orders' rule 'r': column 'ID' is not in public.t (did you mean 'id'?); fix the rule's column",
        ),
        (
            "t",
            {"check": "foreign_key", "column": "id", "references": "missing.id"},
            "suite 'orders' rule 'r': referenced public.missing.id not found",
        ),
    ],
)
def test_suite_that_does_not_fit_the_database_fails_before_gx(fresh_db, table, rule, message):
    with psycopg.connect(fresh_db, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int)")
    suite = parse_suite(
        {"name": "orders", "table": table, "rules": [{"name": "r", "severity": "low", **rule}]}
    )
    with pytest.raises(UserError) as info:
        check_table(GxSession(), fresh_db, suite)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_a_missing_timestamp_column_is_one_line_naming_the_closest(fresh_db):
    """timestamp_column was never looked up: a misspelt one reached the privilege probe's SELECT and
    every check of the suite failed with psycopg's UndefinedColumn and a traceback."""
    with psycopg.connect(fresh_db, autocommit=True) as conn:
        conn.execute('CREATE TABLE t (id int, "Placed At" timestamptz)')
    suite = parse_suite(
        {
            "name": "orders",
            "table": "t",
            "timestamp_column": "placed at",
            "rules": [{"name": "r", "check": "not_null", "column": "id", "severity": "low"}],
        }
    )
    with pytest.raises(UserError) as info:
        check_table(GxSession(), fresh_db, suite)
    assert str(info.value) == (
        "suite 'orders': timestamp_column 'placed at' is not in public.t (did you mean 'Placed At'?); "
        "fix the suite's timestamp_column"
    )


def test_file_missing_a_rule_column_is_a_user_error(tmp_path):
    from quality.runner import check_file

    path = tmp_path / "u.csv"
    path.write_text("id\n1\n")
    suite = parse_suite(
        {
            "name": "u",
            "table": "u",
            "rules": [{"name": "r", "check": "not_null", "column": "email", "severity": "low"}],
        }
    )
    with pytest.raises(UserError, match=rf"suite 'u' rule 'r': column 'email' is not in {path}"):
        check_file(GxSession(), suite, path)
