"""Integrity checks run after anything that changes a database: row counts, NOT NULL, foreign keys, indexes.

Shared by the deploy, bulk-copy and sync pipelines. Every check is one query per table or
constraint that runs inside PostgreSQL; nothing is pulled into Python but the counts. A copy
is also checked against its source: every index and key constraint present (compared by
shape, since a copy under another name has other index names) or its declared key enforced.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import psycopg
from psycopg import sql

from tasks.db import one_row


@dataclass(frozen=True)
class Problem:
    check: str
    table: str
    detail: str
    count: int


@dataclass(frozen=True)
class IntegrityReport:
    row_counts: dict[str, int]
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def user_tables(conn: psycopg.Connection, schemas: list[str] | None = None) -> list[tuple[str, str]]:
    """(schema, table) of ordinary and partitioned tables outside system and flowyard schemas."""
    rows = conn.execute(
        """
        SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition
          AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'flowyard') AND n.nspname NOT LIKE 'pg\\_%%'
          AND (%(schemas)s::text[] IS NULL OR n.nspname = ANY(%(schemas)s::text[]))
        ORDER BY 1, 2
        """,
        {"schemas": schemas},
    ).fetchall()
    return [(r[0], r[1]) for r in rows]


def row_counts(conn: psycopg.Connection, schemas: list[str] | None = None) -> dict[str, int]:
    """Exact ``count(*)`` per table, keyed ``schema.table``."""
    counts = {}
    for schema, table in user_tables(conn, schemas):
        query = sql.SQL("SELECT count(*) FROM {}.{}").format(sql.Identifier(schema), sql.Identifier(table))
        counts[f"{schema}.{table}"] = one_row(conn, query)[0]
    return counts


def not_null_violations(conn: psycopg.Connection, schemas: list[str] | None = None) -> list[Problem]:
    """Rows holding NULL in a NOT NULL column (possible after ``NOT VALID`` tricks or catalog edits)."""
    columns = conn.execute(
        """
        SELECT n.nspname, c.relname, a.attname FROM pg_attribute a
        JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE a.attnotnull AND a.attnum > 0 AND NOT a.attisdropped AND c.relkind IN ('r', 'p')
          AND NOT c.relispartition
          AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'flowyard') AND n.nspname NOT LIKE 'pg\\_%%'
          AND (%(schemas)s::text[] IS NULL OR n.nspname = ANY(%(schemas)s::text[]))
        ORDER BY 1, 2, 3
        """,
        {"schemas": schemas},
    ).fetchall()
    problems = []
    for schema, table, column in columns:
        query = sql.SQL("SELECT count(*) FROM {}.{} WHERE {} IS NULL").format(
            sql.Identifier(schema), sql.Identifier(table), sql.Identifier(column)
        )
        count = one_row(conn, query)[0]
        if count:
            problems.append(Problem("not_null", f"{schema}.{table}", f"{column} is NULL", count))
    return problems


def foreign_key_orphans(conn: psycopg.Connection, schemas: list[str] | None = None) -> list[Problem]:
    """Rows whose foreign key points at no parent row (e.g. after loading with constraints deferred).

    As PostgreSQL checks the key: under MATCH SIMPLE a row with any key column NULL passes;
    under MATCH FULL only one with every key column NULL does, and a mix of NULL and set
    columns counts as an orphan (a ``NOT VALID`` key let it in)."""
    constraints = conn.execute(
        """
        SELECT con.conname, cn.nspname, c.relname, pn.nspname, p.relname,
               array(SELECT attname FROM unnest(con.conkey) WITH ORDINALITY k(n, i)
                     JOIN pg_attribute ON attrelid = con.conrelid AND attnum = k.n ORDER BY k.i),
               array(SELECT attname FROM unnest(con.confkey) WITH ORDINALITY k(n, i)
                     JOIN pg_attribute ON attrelid = con.confrelid AND attnum = k.n ORDER BY k.i),
               con.confmatchtype = 'f'
        FROM pg_constraint con
        JOIN pg_class c ON c.oid = con.conrelid JOIN pg_namespace cn ON cn.oid = c.relnamespace
        JOIN pg_class p ON p.oid = con.confrelid JOIN pg_namespace pn ON pn.oid = p.relnamespace
        WHERE con.contype = 'f' AND cn.nspname <> 'flowyard'
          AND (%(schemas)s::text[] IS NULL OR cn.nspname = ANY(%(schemas)s::text[]))
        ORDER BY 2, 3, 1
        """,
        {"schemas": schemas},
    ).fetchall()
    problems = []
    for name, cschema, ctable, pschema, ptable, ccols, pcols, match_full in constraints:
        join = sql.SQL(" AND ").join(
            sql.SQL("p.{} = c.{}").format(sql.Identifier(pc), sql.Identifier(cc))
            for cc, pc in zip(ccols, pcols, strict=True)
        )
        columns = sql.SQL(", ").join(sql.SQL("c.{}").format(sql.Identifier(cc)) for cc in ccols)
        # The rows the key applies to: no key column NULL (SIMPLE), not all of them (FULL).
        applies = sql.SQL("num_nulls({}) {}").format(
            columns, sql.SQL("< {}").format(len(ccols)) if match_full else sql.SQL("= 0")
        )
        query = sql.SQL(
            "SELECT count(*) FROM {}.{} c WHERE {} AND NOT EXISTS (SELECT 1 FROM {}.{} p WHERE {})"
        ).format(
            sql.Identifier(cschema),
            sql.Identifier(ctable),
            applies,
            sql.Identifier(pschema),
            sql.Identifier(ptable),
            join,
        )
        count = one_row(conn, query)[0]
        if count:
            problems.append(
                Problem("fk_orphans", f"{cschema}.{ctable}", f"{name} → {pschema}.{ptable}", count)
            )
    return problems


def invalid_indexes(conn: psycopg.Connection, schemas: list[str] | None = None) -> list[Problem]:
    """Indexes left invalid (e.g. by a failed ``CREATE INDEX CONCURRENTLY``)."""
    rows = conn.execute(
        """
        SELECT n.nspname, t.relname, i.relname FROM pg_index x
        JOIN pg_class i ON i.oid = x.indexrelid JOIN pg_class t ON t.oid = x.indrelid
        JOIN pg_namespace n ON n.oid = t.relnamespace
        WHERE NOT x.indisvalid AND n.nspname <> 'flowyard'
          AND (%(schemas)s::text[] IS NULL OR n.nspname = ANY(%(schemas)s::text[]))
        """,
        {"schemas": schemas},
    ).fetchall()
    return [Problem("invalid_index", f"{s}.{t}", f"index {i} is invalid", 1) for s, t, i in rows]


def check_integrity(conn: psycopg.Connection, schemas: list[str] | None = None) -> IntegrityReport:
    """All checks at once: row counts plus NOT NULL, foreign-key and index problems."""
    problems = (
        not_null_violations(conn, schemas)
        + foreign_key_orphans(conn, schemas)
        + invalid_indexes(conn, schemas)
    )
    return IntegrityReport(row_counts(conn, schemas), problems)


@dataclass(frozen=True)
class IndexShape:
    """An index or key constraint without its own name or its table's: the same index on a
    table copied under another name (where PostgreSQL names it after the new table) has the
    same shape. ``body`` is the constraint's definition (``PRIMARY KEY (id)``) or, for a plain
    index, its definition from ``USING`` on (``USING btree (lower(sku)) WHERE …``)."""

    name: str
    constraint: bool
    unique: bool
    body: str

    @property
    def shape(self) -> tuple[bool, bool, str]:
        return self.constraint, self.unique, self.body

    @property
    def describe(self) -> str:
        if self.constraint:
            return f"constraint {self.name} ({self.body})"
        return f"{'unique ' if self.unique else ''}index {self.name} ({self.body})"


def index_shapes(conn: psycopg.Connection, table: sql.Identifier) -> list[IndexShape]:
    """The table's indexes and primary key/unique/exclusion constraints, constraints first.

    ``pg_get_indexdef`` always spells ``CREATE [UNIQUE] INDEX <name> ON [ONLY] <schema>.<table>
    USING …`` with both names quoted as ``quote_ident`` quotes them, so cutting at the end of
    that exact head (its first occurrence: only ``CREATE [UNIQUE]`` precedes it) leaves the
    name-free rest; key constraints are compared by ``pg_get_constraintdef``, which names
    neither the constraint nor its table.
    """
    rows = conn.execute(
        """
        SELECT ic.relname, con.oid IS NOT NULL, x.indisunique,
               coalesce(pg_get_constraintdef(con.oid), substr(d.def, strpos(d.def, d.head) + length(d.head)))
        FROM pg_index x
        JOIN pg_class ic ON ic.oid = x.indexrelid
        JOIN pg_class t ON t.oid = x.indrelid JOIN pg_namespace n ON n.oid = t.relnamespace
        LEFT JOIN pg_constraint con
          ON con.conrelid = x.indrelid AND con.conindid = x.indexrelid AND con.contype IN ('p', 'u', 'x')
        CROSS JOIN LATERAL (
            SELECT pg_get_indexdef(x.indexrelid) AS def,
                   ' INDEX ' || quote_ident(ic.relname) || ' ON '
                   || CASE WHEN ic.relkind = 'I' THEN 'ONLY ' ELSE '' END
                   || quote_ident(n.nspname) || '.' || quote_ident(t.relname) || ' ' AS head
        ) d
        WHERE x.indrelid = %s::regclass
        ORDER BY con.contype NULLS LAST, ic.relname
        """,
        (table.as_string(conn),),
    ).fetchall()
    return [IndexShape(*row) for row in rows]


def missing_indexes(
    source: psycopg.Connection,
    source_table: sql.Identifier,
    target: psycopg.Connection,
    schema: str,
    table: str,
) -> list[Problem]:
    """Indexes and key constraints of ``source_table`` that its copy ``schema.table`` lacks."""
    present = {i.shape for i in index_shapes(target, sql.Identifier(schema, table))}
    return [
        Problem("index_missing", f"{schema}.{table}", f"no {i.describe} as in the source", 1)
        for i in index_shapes(source, source_table)
        if i.shape not in present
    ]


def has_unique_key(conn: psycopg.Connection, table: sql.Identifier, key: Sequence[str]) -> bool:
    """Whether a unique index (a primary key's or any other) covers exactly the ``key`` columns."""
    if not key:
        return False
    row = conn.execute(
        """
        SELECT 1 FROM pg_index i WHERE i.indrelid = %s::regclass AND i.indisunique
          AND (SELECT array_agg(attname::text ORDER BY attname) FROM pg_attribute
               WHERE attrelid = i.indrelid AND attnum = ANY(i.indkey)) = %s::text[]
        """,
        (table.as_string(conn), sorted(key)),
    ).fetchone()
    return row is not None


def missing_key(conn: psycopg.Connection, schema: str, table: str, key: Sequence[str]) -> list[Problem]:
    """The declared ``key`` of a copied table (mapped, SQLite, files) not enforced by its primary
    key or a unique index (an existing target table may enforce it with a unique constraint)."""
    if not key or has_unique_key(conn, sql.Identifier(schema, table), key):
        return []
    detail = f"no primary key or unique index on ({', '.join(key)})"
    return [Problem("key_missing", f"{schema}.{table}", detail, 1)]
