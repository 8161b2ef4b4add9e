"""Target tables for a bulk copy: created before the data, indexes and constraints after it.

As pgcopydb does, a PG→PG copy takes the *pre-data* DDL from ``pg_dump`` (tables, owned
sequences, defaults, CHECK and NOT NULL) so the target table is identical, loads the
rows, then builds indexes and key constraints from the source catalogs, adds foreign keys
``NOT VALID`` and validates them (no long exclusive lock), and moves sequences past the
loaded maximum. Mapped, SQLite and file sources get a ``CREATE TABLE`` from the mapped
PostgreSQL types and a primary key on the declared key. A partitioned table comes with its
partitions. Upserting loads (incremental, seed) get their keys before the data instead.

Every step is idempotent (existing tables, indexes and constraints are kept), so a resumed
run can repeat it.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

import psycopg
from psycopg import sql

from tasks.bulk_sources import Column, TableInfo
from tasks.db import connection, libpq_target, mask_url, one_row
from tasks.embedded_pg import BIN_DIR
from tasks.errors import UserError, tool_error


@dataclass(frozen=True)
class ForeignKey:
    table: sql.Identifier
    name: str
    definition: str


def table_exists(conn: psycopg.Connection, schema: str, name: str) -> bool:
    row = conn.execute(
        "SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = %s AND c.relname = %s AND c.relkind IN ('r', 'p')",
        (schema, name),
    ).fetchone()
    return row is not None


def copy_table_ddl(source_url: str, target_url: str, tables: Sequence[TableInfo]) -> None:
    """Create ``tables`` in the target from the source's pre-data DDL (``pg_dump | psql``)."""
    if not tables:
        return
    patterns = _dump_patterns(source_url, tables)
    source_uri, source_env = libpq_target(source_url)
    dump = subprocess.run(
        [
            str(BIN_DIR / "pg_dump"),
            "--no-password",
            "--schema-only",
            "--section=pre-data",
            "--no-owner",
            "--no-privileges",
            "--no-comments",
            *patterns,
            "--dbname",
            source_uri,
        ],
        env=source_env,
        capture_output=True,
        text=True,
        check=False,
    )
    if dump.returncode != 0:
        raise UserError(
            f"pg_dump of the source DDL failed ({mask_url(source_url)}): {tool_error(dump.stderr, dump.returncode)}"
        )
    with connection(target_url) as conn:
        for schema in sorted({t.schema for t in tables if t.schema}):
            conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
        target_version = conn.info.server_version
    target_uri, target_env = libpq_target(target_url)
    restore = subprocess.run(
        [
            str(BIN_DIR / "psql"),
            "--no-password",
            "--no-psqlrc",
            "--quiet",
            "-v",
            "ON_ERROR_STOP=1",
            "--single-transaction",
            "--dbname",
            target_uri,
            "-f",
            "-",
        ],
        env=target_env,
        input=replayable_on(dump.stdout, target_version),
        capture_output=True,
        text=True,
        check=False,
    )
    if restore.returncode != 0:
        raise UserError(
            f"creating target tables failed ({mask_url(target_url)}): {tool_error(restore.stderr, restore.returncode)}; "
            "create missing types/extensions in the target first"
        )


def _dump_patterns(source_url: str, tables: Sequence[TableInfo]) -> list[str]:
    """``pg_dump`` options naming ``tables``: a partitioned table with its partitions
    (``--table-and-children``), since its rows can only land in partitions; they are copied
    through the parent, which is why ``integrity.user_tables`` never lists partitions as tables.
    Any other table alone, so an inheritance child that was not asked for is not created."""
    with connection(source_url) as conn:
        partitioned = set(
            conn.execute(
                "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                "JOIN unnest(%s::text[], %s::text[]) t(nsp, rel) ON n.nspname = t.nsp AND c.relname = t.rel "
                "WHERE c.relkind = 'p'",
                ([t.schema for t in tables], [t.name for t in tables]),
            ).fetchall()
        )
    return [
        arg
        for t in tables
        for arg in (
            "--table-and-children" if (t.schema, t.name) in partitioned else "-t",
            f'"{t.schema}"."{t.name}"',
        )
    ]


# pg_dump 17 and later open every script with this setting, which servers before 17 reject.
_TRANSACTION_TIMEOUT = "SET transaction_timeout = 0;\n"


def replayable_on(script: str, server_version: int) -> str:
    """A ``pg_dump`` script the target server accepts: the bundled pg_dump (18) writes
    ``SET transaction_timeout``, a setting PostgreSQL 14-16 does not know, so ``psql
    ON_ERROR_STOP`` would refuse every copy into those servers before creating anything."""
    if server_version >= 170000:
        return script
    return script.replace(_TRANSACTION_TIMEOUT, "", 1)


def create_mapped_table(conn: psycopg.Connection, schema: str, table: TableInfo) -> None:
    """``CREATE TABLE`` with the mapped column types (constraints come after the load)."""
    if not table.columns:
        raise UserError(f"source table {table.qualified} has no columns; nothing to create")
    for column in table.columns:
        _check_type(conn, table.name, column)
    columns = sql.SQL(", ").join(
        sql.SQL("{} {}{}").format(
            sql.Identifier(c.name), sql.SQL(c.pg_type), sql.SQL(" NOT NULL" if c.not_null else "")
        )
        for c in table.columns
    )
    conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
    conn.execute(
        sql.SQL("CREATE TABLE IF NOT EXISTS {}.{} ({})").format(
            sql.Identifier(schema), sql.Identifier(table.name), columns
        )
    )


def _check_type(conn: psycopg.Connection, table: str, column: Column) -> None:
    """Refuse a column type the target does not know, before it is spliced into ``CREATE TABLE``.

    Types come from mappings (``cast``, ``types``) as SQL text that no ``Identifier`` can quote
    (``numeric(10,2)``, ``double precision``): PostgreSQL's own type-name parser vets each one,
    so a typo is a one-line error and anything but a type name never reaches the DDL.
    """
    try:
        with conn.transaction():
            known = one_row(conn, "SELECT to_regtype(%s) IS NOT NULL", (column.pg_type,))[0]
    except psycopg.errors.SyntaxError:
        known = False
    if not known:
        raise UserError(
            f"column {table}.{column.name} has type {column.pg_type!r}, which the target does not know; "
            "fix the type in the mapping (cast/types), e.g. bigint, double precision, numeric(12,2), text"
        )


def truncate(conn: psycopg.Connection, tables: Sequence[sql.Identifier]) -> None:
    """Empty the tables a new full copy loads, in one statement (so foreign keys among them allow it)."""
    if tables:
        try:
            conn.execute(sql.SQL("TRUNCATE {}").format(sql.SQL(", ").join(tables)))
        except psycopg.errors.FeatureNotSupported as exc:
            raise UserError(
                f"cannot empty the target tables: {exc.diag.message_primary}; include the referencing "
                "tables in `tables` or drop their foreign keys"
            ) from None


def _existing(conn: psycopg.Connection, query: str, params: tuple[object, ...]) -> set[str]:
    return {row[0] for row in conn.execute(query, params).fetchall()}


def build_indexes_and_keys(
    source: psycopg.Connection | None,
    target: psycopg.Connection,
    source_info: TableInfo,
    schema: str,
    target_info: TableInfo,
    *,
    with_indexes: bool = True,
) -> list[str]:
    """Indexes and primary/unique/exclusion constraints; returns what was built.

    With a PostgreSQL ``source`` copied unchanged, they are the source's own definitions; otherwise
    a primary key on the mapped key. They come after a full load (cheaper than maintaining them
    row by row); upserts need the unique key before it, so those build it with ``with_indexes=False``
    and leave the other indexes to after the load.
    """
    table = sql.Identifier(schema, target_info.name)
    constraints = _existing(
        target, "SELECT conname FROM pg_constraint WHERE conrelid = %s::regclass", (table.as_string(target),)
    )
    indexes = _existing(
        target,
        "SELECT indexrelid::regclass::text FROM pg_index WHERE indrelid = %s::regclass",
        (table.as_string(target),),
    )
    built: list[str] = []
    if source is None:
        has_pk = target.execute(
            "SELECT 1 FROM pg_index WHERE indrelid = %s::regclass AND indisprimary",
            (table.as_string(target),),
        ).fetchone()
        if target_info.key and not has_pk:
            add_primary_key(target, schema, target_info)
            built.append("primary key")
        return built
    source_table = source_info.ident.as_string(source)
    for name, definition in source.execute(
        """
        SELECT con.conname, pg_get_constraintdef(con.oid) FROM pg_constraint con
        WHERE con.conrelid = %s::regclass AND con.contype IN ('p', 'u', 'x') ORDER BY con.contype, con.conname
        """,
        (source_table,),
    ).fetchall():
        if name not in constraints:
            target.execute(
                sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} {}").format(
                    table, sql.Identifier(name), sql.SQL(definition)
                )
            )
            built.append(name)
    if not with_indexes:
        return built
    for name, quoted, definition in source.execute(
        """
        SELECT i.indexrelid::regclass::text, quote_ident(ic.relname), pg_get_indexdef(i.indexrelid)
        FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid
        WHERE i.indrelid = %s::regclass
          AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = i.indexrelid)
        """,
        (source_table,),
    ).fetchall():
        if name not in indexes:
            target.execute(sql.SQL(_on_partitions_too(definition, quoted)))
            built.append(name)
    return built


def _on_partitions_too(definition: str, quoted_name: str) -> str:
    """An index definition that also indexes a partitioned table's partitions.

    ``pg_get_indexdef`` spells a partitioned table's index ``CREATE INDEX i ON ONLY t``: replayed as
    is, it is an invalid index on the parent alone (pg_dump attaches each partition's index after
    it). Without ``ONLY``, PostgreSQL builds it on every partition and attaches them. The index name
    comes first and is quoted, so the first match is the real clause.
    """
    return definition.replace(f"INDEX {quoted_name} ON ONLY ", f"INDEX {quoted_name} ON ", 1)


DUPLICATES_SHOWN = 5


def key_text(key: Sequence[str]) -> sql.Composable:
    """SQL text ``k1=v1, k2=v2`` of a row's key: how error messages name a row."""
    return sql.SQL(" || ', ' || ").join(
        sql.SQL("{} || '=' || coalesce({}::text, 'NULL')").format(sql.Literal(k), sql.Identifier(k))
        for k in key
    )


def duplicate_keys(conn: psycopg.Connection, rows: sql.Composable, key: Sequence[str], limit: int) -> str:
    """The first ``limit`` key values that ``rows`` holds more than once, as ``k=v (n rows); …``."""
    columns = sql.SQL(", ").join(sql.Identifier(k) for k in key)
    found = conn.execute(
        sql.SQL(
            "SELECT {} || ' (' || count(*) || ' rows)' FROM {} GROUP BY {} HAVING count(*) > 1 ORDER BY {} LIMIT %s"
        ).format(key_text(key), rows, columns, columns),
        (limit,),
    ).fetchall()
    more = " and maybe more" if len(found) >= limit else ""
    return "; ".join(r[0] for r in found) + more


def add_primary_key(target: psycopg.Connection, schema: str, info: TableInfo) -> None:
    """``ADD PRIMARY KEY`` on ``info.key``. Rows that repeat a key value or lack one are the source's
    fault: a one-line error names the first few such values (or the column) and the fix, where
    PostgreSQL's error would end the run in a traceback."""
    table = sql.Identifier(schema, info.name)
    try:
        with target.transaction():
            target.execute(
                sql.SQL("ALTER TABLE {} ADD PRIMARY KEY ({})").format(
                    table, sql.SQL(", ").join(sql.Identifier(k) for k in info.key)
                )
            )
    except psycopg.errors.UniqueViolation:
        repeated = duplicate_keys(target, table, info.key, DUPLICATES_SHOWN)
        raise UserError(
            f"cannot add the primary key ({', '.join(info.key)}) to {schema}.{info.name}: the copied rows "
            f"repeat key values: {repeated}; dedupe the source and rerun with restart=True (--restart), "
            "or drop the repeated rows with a mapping filter"
        ) from None
    except psycopg.errors.NotNullViolation as exc:
        raise UserError(
            f"cannot add the primary key ({', '.join(info.key)}) to {schema}.{info.name}: "
            f"{exc.diag.message_primary}; fill in the key in the source and rerun with restart=True "
            "(--restart), or drop those rows with a mapping filter"
        ) from None


def source_foreign_keys(source: psycopg.Connection, info: TableInfo) -> list[ForeignKey]:
    rows = source.execute(
        "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint "
        "WHERE conrelid = %s::regclass AND contype = 'f' ORDER BY conname",
        (info.ident.as_string(source),),
    ).fetchall()
    return [ForeignKey(info.ident, name, definition) for name, definition in rows]


def add_foreign_keys(target: psycopg.Connection, keys: Sequence[ForeignKey]) -> list[str]:
    """Add each foreign key ``NOT VALID`` (instant), then ``VALIDATE`` it (no exclusive lock).

    A key whose rows do not validate fails with a one-line message naming it.
    """
    added = []
    for key in keys:
        exists = target.execute(
            "SELECT 1 FROM pg_constraint WHERE conrelid = %s::regclass AND conname = %s",
            (key.table.as_string(target), key.name),
        ).fetchone()
        if exists:
            continue
        definition = key.definition.removesuffix(" NOT VALID")
        try:
            target.execute(
                sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} {} NOT VALID").format(
                    key.table, sql.Identifier(key.name), sql.SQL(definition)
                )
            )
        except psycopg.errors.UndefinedTable:
            continue  # the referenced table was not copied and does not exist in the target
        if definition != key.definition:
            continue
        try:
            with target.transaction():
                target.execute(
                    sql.SQL("ALTER TABLE {} VALIDATE CONSTRAINT {}").format(
                        key.table, sql.Identifier(key.name)
                    )
                )
        except psycopg.errors.ForeignKeyViolation as exc:
            raise UserError(
                f"foreign key {key.name} on {key.table.as_string(target)} does not hold in the copied data: "
                f"{exc.diag.message_detail or exc.diag.message_primary}; fix the source rows or leave the table out"
            ) from None
        added.append(key.name)
    return added


def reset_sequences(target: psycopg.Connection, schema: str, table: TableInfo) -> list[str]:
    """Move every serial/identity sequence of the table to the loaded maximum."""
    moved = []
    qualified = sql.Identifier(schema, table.name).as_string(target)
    for column in table.columns:
        sequence = one_row(target, "SELECT pg_get_serial_sequence(%s, %s)", (qualified, column.name))[0]
        if sequence is None:
            continue
        target.execute(
            sql.SQL("SELECT setval({}::regclass, coalesce(max({}), 1), max({}) IS NOT NULL) FROM {}").format(
                sql.Literal(sequence),
                sql.Identifier(column.name),
                sql.Identifier(column.name),
                sql.Identifier(schema, table.name),
            )
        )
        moved.append(sequence)
    return moved
