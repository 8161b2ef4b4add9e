"""A read-only snapshot of one schema's tables, as the online-migration planner needs it.

The planner renders every statement up front (so ``flowyard online plan`` can print them and
the lint can check them), which needs the columns, types, defaults and keys of each table.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import psycopg


@dataclass
class ColumnInfo:
    name: str
    type: str
    not_null: bool
    default: str | None
    indexed: bool
    """Part of an index or a constraint other than NOT NULL: a shadow swap would lose it."""


@dataclass
class TableInfo:
    name: str
    columns: list[ColumnInfo] = field(default_factory=list)
    primary_key: list[str] = field(default_factory=list)

    def column(self, name: str) -> ColumnInfo | None:
        return next((c for c in self.columns if c.name == name), None)


@dataclass
class SchemaSnapshot:
    schema: str
    tables: dict[str, TableInfo]
    indexes: set[str]


def snapshot(conn: psycopg.Connection, schema: str) -> SchemaSnapshot:
    """Tables (ordinary and partitioned), columns, primary keys and index names of ``schema``."""
    tables: dict[str, TableInfo] = {}
    rows = conn.execute(
        """
        SELECT c.relname, a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
               pg_get_expr(d.adbin, d.adrelid),
               EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND a.attnum = ANY (i.indkey))
               OR EXISTS (SELECT 1 FROM pg_constraint k
                          WHERE (k.conrelid = c.oid AND a.attnum = ANY (k.conkey) AND k.contype <> 'n')
                             OR (k.confrelid = c.oid AND a.attnum = ANY (k.confkey))),
               EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary AND a.attnum = ANY (i.indkey))
        FROM pg_class c
        JOIN pg_namespace n ON n.oid = c.relnamespace
        JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
        LEFT JOIN pg_attrdef d ON d.adrelid = c.oid AND d.adnum = a.attnum
        WHERE n.nspname = %s AND c.relkind IN ('r', 'p')
        ORDER BY c.relname, a.attnum
        """,
        (schema,),
    ).fetchall()
    for table, column, type_, not_null, default, indexed, in_pk in rows:
        info = tables.setdefault(table, TableInfo(table))
        info.columns.append(ColumnInfo(column, type_, not_null, default, indexed))
        if in_pk:
            info.primary_key.append(column)
    indexes = {
        row[0]
        for row in conn.execute(
            "SELECT indexname FROM pg_indexes WHERE schemaname = %s", (schema,)
        ).fetchall()
    }
    return SchemaSnapshot(schema, tables, indexes)
