"""The unsafe-DDL lint: each rule fires on its pattern and stays quiet on the safe form."""

from __future__ import annotations

import pytest

from tasks.ddl_lint import LintContext, is_volatile_expression, lint_statements, split_statements

SET = "SET lock_timeout = '200ms'"

UNSAFE: dict[str, list[str]] = {
    "volatile-default": [SET, "ALTER TABLE t ADD COLUMN u uuid DEFAULT gen_random_uuid()"],
    "stored-generated-column": [SET, "ALTER TABLE t ADD COLUMN g int GENERATED ALWAYS AS (a * 2) STORED"],
    "alter-type-rewrite": [SET, "ALTER TABLE t ALTER COLUMN a TYPE bigint"],
    "set-not-null-unvalidated": [SET, "ALTER TABLE t ALTER COLUMN a SET NOT NULL"],
    "index-not-concurrent": [SET, "CREATE INDEX t_a ON t (a)"],
    "drop-index-not-concurrent": [SET, "DROP INDEX t_a"],
    "reindex-not-concurrent": [SET, "REINDEX INDEX t_a"],
    "constraint-validated": [SET, "ALTER TABLE t ADD CONSTRAINT t_fk FOREIGN KEY (a) REFERENCES p (id)"],
    "unique-without-index": [SET, "ALTER TABLE t ADD CONSTRAINT t_key UNIQUE (a)"],
    "missing-lock-timeout": ["ALTER TABLE t ADD COLUMN c int"],
    "table-rewrite": [SET, "VACUUM FULL t"],
    "explicit-lock": [SET, "LOCK TABLE t IN ACCESS EXCLUSIVE MODE"],
    "refresh-not-concurrent": [SET, "REFRESH MATERIALIZED VIEW mv"],
    "concurrently-in-transaction": ["CREATE INDEX CONCURRENTLY t_a ON t (a)", "SELECT 1"],
}

SAFE: dict[str, list[str]] = {
    "volatile-default": [SET, "ALTER TABLE t ADD COLUMN c int DEFAULT 0 NOT NULL"],
    "set-not-null-unvalidated": [
        SET,
        "ALTER TABLE t ADD CONSTRAINT t_a_nn CHECK (a IS NOT NULL) NOT VALID",
        "ALTER TABLE t VALIDATE CONSTRAINT t_a_nn",
        "ALTER TABLE t ALTER COLUMN a SET NOT NULL",
    ],
    "index-not-concurrent": [SET, "CREATE INDEX CONCURRENTLY t_a ON t (a)"],
    "constraint-validated": [
        SET,
        "ALTER TABLE t ADD CONSTRAINT t_fk FOREIGN KEY (a) REFERENCES p (id) NOT VALID",
    ],
    "unique-without-index": [SET, "ALTER TABLE t ADD CONSTRAINT t_key UNIQUE USING INDEX t_key"],
    "missing-lock-timeout": ["SET lock_timeout TO '1s'", "ALTER TABLE t ADD COLUMN c int"],
    "new-table": [
        "CREATE TABLE n (id int)",
        "CREATE INDEX n_id ON n (id)",
        "ALTER TABLE n ADD CONSTRAINT n_c CHECK (id > 0)",
    ],
}


@pytest.mark.parametrize("rule", list(UNSAFE))
def test_each_unsafe_pattern_is_caught(rule: str) -> None:
    assert rule in {f.rule for f in lint_statements(UNSAFE[rule])}


@pytest.mark.parametrize("case", list(SAFE))
def test_safe_forms_pass(case: str) -> None:
    assert lint_statements(SAFE[case]) == []


def test_lock_timeout_zero_counts_as_missing() -> None:
    assert [f.rule for f in lint_statements(["SET lock_timeout = 0", "ALTER TABLE t DROP CONSTRAINT c"])] == [
        "missing-lock-timeout"
    ]


def test_breaking_changes_only_during_expand() -> None:
    statements = [SET, "ALTER TABLE t RENAME COLUMN a TO b", "ALTER TABLE t DROP COLUMN c", "DROP TABLE old"]
    expand = lint_statements(statements, LintContext(expand_phase=True))
    assert [f.rule for f in expand] == ["breaking-change"] * 3
    assert lint_statements(statements, LintContext(expand_phase=False)) == []


def test_validated_not_null_follows_a_column_rename() -> None:
    statements = [
        SET,
        'ALTER TABLE t ADD CONSTRAINT nn CHECK ("_fy_new_a" IS NOT NULL) NOT VALID',
        "ALTER TABLE t VALIDATE CONSTRAINT nn",
        'ALTER TABLE t RENAME COLUMN "_fy_new_a" TO "a"',
        'ALTER TABLE t ALTER COLUMN "a" SET NOT NULL',
    ]
    assert lint_statements(statements) == []


def test_splitter_respects_quotes_dollar_quotes_and_comments() -> None:
    script = "SELECT ';' ; -- a;comment\nCREATE FUNCTION f() RETURNS int AS $$ SELECT 1; $$ LANGUAGE sql; /* x; */ SELECT 2"
    assert split_statements(script) == [
        "SELECT ';'",
        "CREATE FUNCTION f() RETURNS int AS $$ SELECT 1; $$ LANGUAGE sql",
        "SELECT 2",
    ]


def test_volatility_ignores_string_literals() -> None:
    assert is_volatile_expression("random() * 10")
    assert is_volatile_expression("nextval('s')")
    assert not is_volatile_expression("'random()'")
    assert not is_volatile_expression("now()")


# Inputs the regex-only lint misjudged before it tokenized: keywords inside quoted identifiers
# and E'' strings, substrings of names, and the case of quoted names.
MISJUDGED: dict[str, tuple[list[str], list[str]]] = {
    "quoted column named rename is no rename": ([SET, 'ALTER TABLE t ADD COLUMN "rename" text'], []),
    "quoted column with serial in its name is no serial": (
        [SET, 'ALTER TABLE t ADD COLUMN "order serial" int'],
        [],
    ),
    "escaped quote inside an E'' default": (
        [SET, "ALTER TABLE t ADD COLUMN c text DEFAULT E'it\\'s random()'"],
        [],
    ),
    "an index named concurrently_* is still built with a lock": (
        [SET, "CREATE INDEX concurrently_idx ON t (a)"],
        ["index-not-concurrent"],
    ),
    'a new table "T" does not exempt t': (
        ['CREATE TABLE "T" (id int)', SET, "CREATE INDEX t_id ON t (id)"],
        ["index-not-concurrent"],
    ),
    'a validated check on "A" does not prove a': (
        [
            SET,
            'ALTER TABLE t ADD CONSTRAINT nn CHECK ("A" IS NOT NULL) NOT VALID',
            "ALTER TABLE t VALIDATE CONSTRAINT nn",
            "ALTER TABLE t ALTER COLUMN a SET NOT NULL",
        ],
        ["set-not-null-unvalidated"],
    ),
}


@pytest.mark.parametrize("case", list(MISJUDGED))
def test_literals_and_quoted_identifiers_are_not_mistaken_for_keywords(case: str) -> None:
    statements, rules = MISJUDGED[case]
    assert [f.rule for f in lint_statements(statements, LintContext(expand_phase=True))] == rules


def test_splitter_respects_escaped_quotes_in_e_strings() -> None:
    assert split_statements("SELECT E'a\\';b'; SELECT 2") == ["SELECT E'a\\';b'", "SELECT 2"]
