"""A lint for DDL that is unsafe on a live database: long locks, table rewrites, blocking scans.

Each rule names one known way a schema change stalls or breaks production:

- ``volatile-default``: ADD COLUMN with a volatile DEFAULT (random(), gen_random_uuid(), nextval,
  serial) rewrites the whole table under an ACCESS EXCLUSIVE lock.
- ``stored-generated-column``: ADD COLUMN ... GENERATED ... STORED rewrites the table.
- ``alter-type-rewrite``: ALTER COLUMN ... TYPE may rewrite the table and rebuild its indexes.
- ``set-not-null-unvalidated``: SET NOT NULL scans the table under ACCESS EXCLUSIVE unless a
  validated CHECK (col IS NOT NULL) already proves it.
- ``index-not-concurrent`` / ``drop-index-not-concurrent`` / ``reindex-not-concurrent``: blocks writes
  for the whole build.
- ``constraint-validated``: a CHECK or FOREIGN KEY added without NOT VALID scans the table under lock.
- ``unique-without-index``: ADD UNIQUE / PRIMARY KEY builds its index under ACCESS EXCLUSIVE.
- ``missing-lock-timeout``: a lock-taking statement with no lock_timeout queues every writer
  behind it for as long as it waits.
- ``table-rewrite``: VACUUM FULL, CLUSTER, SET TABLESPACE, SET LOGGED/UNLOGGED.
- ``explicit-lock``: LOCK TABLE.
- ``refresh-not-concurrent``: REFRESH MATERIALIZED VIEW without CONCURRENTLY blocks readers.
- ``concurrently-in-transaction``: a CONCURRENTLY statement in a multi-statement script fails.
- ``breaking-change`` (expand phase only): RENAME, DROP COLUMN/TABLE, TRUNCATE break the old
  application version while it still runs; contract does these.

Statements on tables created earlier in the same script are exempt from the lock rules: nobody
else uses a table that did not exist.

The rules are regular expressions, but over a normalized text built by a small SQL tokenizer
(:func:`tokenize`): literals (also ``E'...'`` and dollar-quoted) are blanked and quoted
identifiers hex-encoded, so a name or a string that spells a keyword (``"rename"``,
``'random()'``) is never taken for one, and quoted names keep their case.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

VOLATILE_FUNCTIONS = (
    "random",
    "gen_random_uuid",
    "uuid_generate_v1",
    "uuid_generate_v1mc",
    "uuid_generate_v4",
    "uuidv4",
    "uuidv7",
    "clock_timestamp",
    "timeofday",
    "nextval",
    "setseed",
    "txid_current",
)
_VOLATILE = re.compile(r"\b(" + "|".join(VOLATILE_FUNCTIONS) + r")\s*\(", re.IGNORECASE)
_NAME = r'(?:"[^"]+"|[A-Z_][A-Z0-9_$]*)'
_QUALIFIED = rf"({_NAME}(?:\s*\.\s*{_NAME})?)"
_LOCK_TAKING = re.compile(
    r"^(ALTER\s+(TABLE|INDEX|TYPE|SEQUENCE|VIEW|MATERIALIZED)|CREATE\s+(UNIQUE\s+)?INDEX|CREATE\s+(OR\s+REPLACE\s+)?"
    r"(CONSTRAINT\s+)?TRIGGER|DROP\s+(TABLE|INDEX|TRIGGER|VIEW|TYPE|SCHEMA|FUNCTION)|TRUNCATE|LOCK\b|VACUUM\s+FULL|"
    r"CLUSTER|REINDEX|REFRESH|COMMENT\s+ON\s+(TABLE|COLUMN))"
)


def is_volatile_expression(expression: str) -> bool:
    """Whether a SQL expression calls a known volatile function (so as a DEFAULT it rewrites the table)."""
    return bool(_VOLATILE.search(_normalize(expression)))


@dataclass(frozen=True)
class Finding:
    rule: str
    message: str
    statement: str

    def __str__(self) -> str:
        head = " ".join(self.statement.split())
        return f"{self.rule}: {self.message} [{head[:100]}{'…' if len(head) > 100 else ''}]"


@dataclass
class LintContext:
    """What earlier statements established: lock_timeout set, new tables, proven NOT NULL checks."""

    lock_timeout_set: bool = False
    expand_phase: bool = False
    created_tables: set[str] = field(default_factory=set)
    not_valid_checks: dict[str, tuple[str, str]] = field(default_factory=dict)
    validated_not_null: set[tuple[str, str]] = field(default_factory=set)


_TOKEN = re.compile(
    r"""
    (?P<space>\s+)
    |(?P<comment>--[^\n]*|/\*.*?(?:\*/|\Z))
    |(?P<string>[eE]'(?:[^'\\]|\\.|'')*'?|(?:[uU]&|[bBxXnN])?'(?:[^']|'')*'?
        |\$(?P<tag>[A-Za-z_][A-Za-z_0-9]*|)\$.*?(?:\$(?P=tag)\$|\Z))
    |(?P<quoted>"(?:[^"]|"")*"?)
    |(?P<word>[A-Za-z_\x80-\U0010ffff][\w$]*)
    |(?P<number>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
    |(?P<op>::|\S)
    """,
    re.VERBOSE | re.DOTALL,
)
_KINDS = ("space", "comment", "string", "quoted", "word", "number", "op")


@dataclass(frozen=True)
class Token:
    """One lexical token of SQL: space, comment, string (any literal form), quoted (identifier), word, number, op."""

    kind: str
    text: str

    @property
    def name(self) -> str | None:
        """The identifier this token spells (unquoted words fold to lower case, as PostgreSQL does), else None."""
        if self.kind == "word":
            return self.text.lower()
        if self.kind == "quoted":
            return self.text[1:-1].replace('""', '"')
        return None


def tokenize(text: str) -> list[Token]:
    """SQL tokens, so rules and rewrites never look inside literals, quoted identifiers or comments."""
    return [
        Token(next(kind for kind in _KINDS if m.group(kind) is not None), m.group())
        for m in _TOKEN.finditer(text)
    ]


def split_statements(script: str) -> list[str]:
    """Split a SQL script on top-level semicolons (respecting quotes, dollar quotes and comments)."""
    statements: list[str] = [""]
    for token in tokenize(script):
        if token.kind == "op" and token.text == ";":
            statements.append("")
        elif token.kind != "comment":
            statements[-1] += token.text
    return [s.strip() for s in statements if s.strip()]


def _normalize(statement: str) -> str:
    """One line, keywords upper-cased, literals blanked, quoted identifiers hex-encoded (lower case).

    The rules are regular expressions over this text: a literal or a quoted identifier that
    spells a keyword (``'random()'``, ``"rename"``) can no longer look like one, and
    :func:`_bare` decodes the identifiers back.
    """
    parts = []
    for token in tokenize(statement):
        if token.kind == "string":
            parts.append("''")
        elif token.kind == "quoted":
            parts.append(f'"{(token.name or "").encode().hex()}"')
        elif token.kind in ("space", "comment"):
            parts.append(" ")
        else:
            parts.append(token.text.upper())
    return " ".join("".join(parts).split())


def _bare(name: str) -> str:
    """The unqualified name of a (possibly qualified) identifier in :func:`_normalize` d text."""
    last = re.split(r"\s*\.\s*", name)[-1]
    return bytes.fromhex(last[1:-1]).decode() if last.startswith('"') else last.lower()


def lint_statements(statements: Iterable[str], context: LintContext | None = None) -> list[Finding]:
    """Check each statement in order against every rule; ``context`` carries state across calls."""
    ctx = context or LintContext()
    statements = list(statements)
    findings: list[Finding] = []
    in_script = sum(not re.match(r"^\s*(SET|RESET)\b", st, re.IGNORECASE) for st in statements) > 1
    for statement in statements:
        findings.extend(_lint_one(statement, _normalize(statement), ctx, in_script=in_script))
    return findings


def _lint_one(raw: str, s: str, ctx: LintContext, *, in_script: bool) -> list[Finding]:
    found: list[Finding] = []

    def flag(rule: str, message: str) -> None:
        found.append(Finding(rule, message, raw))

    if m := re.match(
        r"^(SET|RESET)\s+(SESSION\s+|LOCAL\s+)?LOCK_TIMEOUT\b\s*(?:=|TO)?\s*'?(\w*)", raw.strip().upper()
    ):
        ctx.lock_timeout_set = m.group(1) == "SET" and m.group(3) not in ("", "0", "DEFAULT")
        return found
    if "SET_CONFIG" in s and "LOCK_TIMEOUT" in s:
        ctx.lock_timeout_set = True
        return found
    table = _target_table(s)
    if m := re.match(rf"^CREATE\s+(?:UNLOGGED\s+)?TABLE\s+(?:IF\s+NOT\s+EXISTS\s+)?{_QUALIFIED}", s):
        ctx.created_tables.add(_bare(m.group(1)))
        return found
    new_table = table is not None and table in ctx.created_tables
    concurrently = re.search(r"\bCONCURRENTLY\b", s) is not None
    if _LOCK_TAKING.match(s) and not ctx.lock_timeout_set and not new_table:
        flag(
            "missing-lock-timeout",
            "set lock_timeout first (e.g. SET lock_timeout = '200ms') so waiting DDL cannot stall writers",
        )
    if concurrently and in_script:
        flag(
            "concurrently-in-transaction",
            "CONCURRENTLY cannot run inside a multi-statement transaction; give it its own step",
        )
    if ctx.expand_phase:
        if (
            re.search(r"\bRENAME\b", s)
            or re.search(r"\bDROP\s+COLUMN\b", s)
            or re.match(r"^(DROP\s+TABLE|TRUNCATE)", s)
        ):
            flag(
                "breaking-change",
                "renaming or dropping breaks the old application version during expand; use rename_column/drop_column/drop_table operations",
            )
    if s.startswith(("VACUUM FULL", "CLUSTER")) or re.search(r"\bSET\s+(TABLESPACE|LOGGED|UNLOGGED)\b", s):
        flag("table-rewrite", "rewrites the whole table under ACCESS EXCLUSIVE")
    if s.startswith("LOCK "):
        flag(
            "explicit-lock",
            "explicit LOCK TABLE blocks the application; let each statement take its own short lock",
        )
    if s.startswith("REFRESH MATERIALIZED VIEW") and not concurrently:
        flag("refresh-not-concurrent", "use REFRESH MATERIALIZED VIEW CONCURRENTLY (needs a unique index)")
    if re.match(r"^REINDEX\b", s) and not concurrently:
        flag("reindex-not-concurrent", "use REINDEX ... CONCURRENTLY")
    if re.match(r"^CREATE\s+(UNIQUE\s+)?INDEX\b", s) and not concurrently and not new_table:
        flag("index-not-concurrent", "build indexes with CREATE INDEX CONCURRENTLY outside a transaction")
    if re.match(r"^DROP\s+INDEX\b", s) and not concurrently:
        flag("drop-index-not-concurrent", "use DROP INDEX CONCURRENTLY")
    if s.startswith("ALTER TABLE") and not new_table:
        found.extend(
            Finding(rule, message, raw) for rule, message in _alter_table_rules(raw, s, table or "", ctx)
        )
    return found


def _target_table(s: str) -> str | None:
    m = re.match(rf"^ALTER\s+TABLE\s+(?:IF\s+EXISTS\s+)?(?:ONLY\s+)?{_QUALIFIED}", s) or re.match(
        rf"^CREATE\s+(?:UNIQUE\s+)?INDEX\s+(?:CONCURRENTLY\s+)?(?:IF\s+NOT\s+EXISTS\s+)?(?:{_NAME}\s+)?ON\s+(?:ONLY\s+)?{_QUALIFIED}",
        s,
    )
    return _bare(m.group(1)) if m else None


def _alter_table_rules(raw: str, s: str, table: str, ctx: LintContext) -> list[tuple[str, str]]:
    rules: list[tuple[str, str]] = []
    for clause in _clauses(s):
        if m := re.match(
            r"^ADD\s+(?:COLUMN\s+)?(?:IF\s+NOT\s+EXISTS\s+)?(?!CONSTRAINT\b|CHECK\b|FOREIGN\b|UNIQUE\b|PRIMARY\b)\S+\s+(.*)",
            clause,
        ):
            rest = m.group(1)
            if re.search(r"\b(SMALL|BIG)?SERIAL\b", rest) or (
                (d := re.search(r"\bDEFAULT\b(.*)", rest)) and _VOLATILE.search(d.group(1))
            ):
                rules.append(
                    (
                        "volatile-default",
                        "a volatile default rewrites the table; add the column without it, SET DEFAULT, then backfill in batches",
                    )
                )
            if re.search(r"\bGENERATED\b.*\bSTORED\b", rest):
                rules.append(
                    (
                        "stored-generated-column",
                        "a stored generated column rewrites the table; add a plain column and backfill",
                    )
                )
            if re.search(r"\b(REFERENCES|CHECK)\b", rest):
                rules.append(
                    (
                        "constraint-validated",
                        "an inline CHECK/REFERENCES on a new column of a live table is validated under lock; add it NOT VALID, then VALIDATE",
                    )
                )
            if re.search(r"\b(UNIQUE|PRIMARY\s+KEY)\b", rest):
                rules.append(
                    (
                        "unique-without-index",
                        "an inline UNIQUE/PRIMARY KEY builds its index under lock; build it CONCURRENTLY and attach it",
                    )
                )
        elif m := re.match(
            r"^ADD\s+(?:CONSTRAINT\s+(\S+)\s+)?(CHECK|FOREIGN\s+KEY|UNIQUE|PRIMARY\s+KEY)\b(.*)", clause
        ):
            kind, rest = m.group(2), m.group(3)
            if kind in ("UNIQUE", "PRIMARY KEY") or kind.startswith("PRIMARY"):
                if "USING INDEX" not in rest:
                    rules.append(
                        (
                            "unique-without-index",
                            "build a unique index CONCURRENTLY, then ADD CONSTRAINT ... USING INDEX",
                        )
                    )
            elif "NOT VALID" not in rest:
                rules.append(
                    (
                        "constraint-validated",
                        "add the constraint NOT VALID, then VALIDATE CONSTRAINT in a separate statement",
                    )
                )
            elif (
                kind == "CHECK"
                and m.group(1)
                and (nn := re.match(r"^\s*\(\s*\(?\s*(\S+?)\s*\)?\s+IS\s+NOT\s+NULL\s*\)", rest))
            ):
                ctx.not_valid_checks[_bare(m.group(1))] = (table, _bare(nn.group(1)))
        elif m := re.match(r"^VALIDATE\s+CONSTRAINT\s+(\S+)", clause):
            proven = ctx.not_valid_checks.get(_bare(m.group(1)))
            if proven:
                ctx.validated_not_null.add(proven)
        elif m := re.match(r"^RENAME\s+(?:COLUMN\s+)?(\S+)\s+TO\s+(\S+)", clause):
            if (table, _bare(m.group(1))) in ctx.validated_not_null:
                ctx.validated_not_null.add((table, _bare(m.group(2))))
        elif re.match(r"^ALTER\s+(?:COLUMN\s+)?(\S+)\s+(?:SET\s+DATA\s+)?TYPE\b", clause):
            rules.append(
                (
                    "alter-type-rewrite",
                    "changing a column type may rewrite the table; use alter_column with a shadow column and up/down",
                )
            )
        elif m := re.match(r"^ALTER\s+(?:COLUMN\s+)?(\S+)\s+SET\s+NOT\s+NULL", clause):
            if (table, _bare(m.group(1))) not in ctx.validated_not_null:
                rules.append(
                    (
                        "set-not-null-unvalidated",
                        "SET NOT NULL scans the table under lock; first add CHECK (col IS NOT NULL) NOT VALID and VALIDATE it",
                    )
                )
    return rules


def _clauses(s: str) -> list[str]:
    """The comma-separated actions of an ALTER TABLE, after its table name (commas inside parentheses kept)."""
    body = re.sub(rf"^ALTER\s+TABLE\s+(?:IF\s+EXISTS\s+)?(?:ONLY\s+)?{_QUALIFIED}\s*", "", s)
    parts: list[str] = []
    current: list[str] = []
    depth = 0
    for ch in body:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            parts.append("".join(current).strip())
            current = []
        else:
            current.append(ch)
    parts.append("".join(current).strip())
    return [p for p in parts if p]
