"""Target tables for a bulk copy: created before the data, indexes and constraints after it.

As pgcopydb does, a PG→PG copy takes the *pre-data* DDL from ``pg_dump`` (tables, owned
sequences, defaults, CHECK and NOT NULL) so the target table is identical, loads the
rows, then builds indexes and key constraints from the source catalogs, adds foreign keys
``NOT VALID`` and validates them (no long exclusive lock), and moves sequences past the
loaded maximum. Mapped, SQLite and file sources get a ``CREATE TABLE`` from the mapped
PostgreSQL types and a primary key on the declared key. A partitioned table comes with its
partitions. A PG→PG table copied unchanged under another name cannot take ``pg_dump``'s DDL
(it names the source table): it is created from the source catalog's column definitions
(types, collations, defaults, identity, generation expressions, a serial column's own
sequence) with the source's CHECK constraints, and gets the source's indexes and keys under
names PostgreSQL picks for it.
Upserting loads (incremental, seed) get their keys before the data instead.

Every step is idempotent (existing tables, indexes and constraints are kept), so a resumed
run can repeat it.
"""

from __future__ import annotations

import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import psycopg
from psycopg import sql

from tasks.bulk_sources import Column, TableInfo, quoted_name
from tasks.db import connection, libpq_target, mask_url, one_row
from tasks.embedded_pg import BIN_DIR
from tasks.errors import UserError, tool_error
from tasks.integrity import IndexShape, index_shapes


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
    source_uri, source_env = libpq_target(source_url, reader=True)
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
            quoted_name(t.schema or "public", t.name),
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


def create_mapped_table(
    conn: psycopg.Connection,
    schema: str,
    table: TableInfo,
    clauses: Mapping[str, sql.Composable] | None = None,
) -> None:
    """``CREATE TABLE`` with the mapped column types (constraints come after the load).

    ``clauses`` adds to a column's definition what its type leaves out (collation, default,
    identity, generation expression), for a table copied unchanged under another name."""
    if not table.columns:
        raise UserError(f"source table {table.qualified} has no columns; nothing to create")
    for column in table.columns:
        _check_type(conn, table.name, column)
    extra = clauses or {}
    columns = sql.SQL(", ").join(
        sql.SQL("{} {}{}{}").format(
            sql.Identifier(c.name),
            sql.SQL(c.pg_type),
            extra.get(c.name, sql.SQL("")),
            sql.SQL(" NOT NULL" if c.not_null else ""),
        )
        for c in table.columns
    )
    conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
    conn.execute(
        sql.SQL("CREATE TABLE IF NOT EXISTS {}.{} ({})").format(
            sql.Identifier(schema), sql.Identifier(table.name), columns
        )
    )


@dataclass(frozen=True)
class SequenceOptions:
    """A sequence's parameters, as ``pg_sequence`` holds them."""

    data_type: str
    start: int
    increment: int
    minimum: int
    maximum: int
    cache: int
    cycle: bool

    def clause(self) -> sql.Composed:
        """The options as ``CREATE SEQUENCE`` and ``AS IDENTITY (…)`` take them (without ``AS``)."""
        return sql.SQL("START WITH {} INCREMENT BY {} MINVALUE {} MAXVALUE {} CACHE {} {}").format(
            sql.Literal(self.start),
            sql.Literal(self.increment),
            sql.Literal(self.minimum),
            sql.Literal(self.maximum),
            sql.Literal(self.cache),
            sql.SQL("CYCLE" if self.cycle else "NO CYCLE"),
        )


@dataclass(frozen=True)
class ColumnDefinition:
    """What ``format_type`` leaves out of a source column: collation, default, identity, generation.

    A ``serial``/``bigserial`` column owns the sequence it takes its default from: the copy gets
    a sequence of its own with the same options, since the source's is not in the target (or,
    in the same database, belongs to the source table). ``reads``: the columns a generation
    expression reads, which a mapping must keep as they are for the copy to stay generated."""

    name: str
    collation: tuple[str, str] | None
    identity: str  # '' none, 'a' ALWAYS, 'd' BY DEFAULT
    generated: str  # '' none, 's' STORED, 'v' VIRTUAL
    expression: str | None  # the default, or the generation expression
    sequence: SequenceOptions | None  # of the identity, or of the serial default
    reads: tuple[str, ...] = ()

    @property
    def serial_sequence(self) -> SequenceOptions | None:
        """The options of a serial column's own sequence (None for an identity's or no sequence)."""
        return None if self.identity else self.sequence

    def clause(self) -> sql.Composed:
        """The definition after the type; a serial default is set once its sequence exists."""
        parts: list[sql.Composable] = []
        if self.collation:
            parts.append(sql.SQL("COLLATE {}").format(sql.Identifier(*self.collation)))
        if self.generated:
            kind = "STORED" if self.generated == "s" else "VIRTUAL"
            parts.append(
                sql.SQL("GENERATED ALWAYS AS ({}) {}").format(sql.SQL(self.expression or ""), sql.SQL(kind))
            )
        elif self.identity and self.sequence:
            kind = "ALWAYS" if self.identity == "a" else "BY DEFAULT"
            parts.append(
                sql.SQL("GENERATED {} AS IDENTITY ({})").format(sql.SQL(kind), self.sequence.clause())
            )
        elif self.expression and not self.serial_sequence:
            parts.append(sql.SQL("DEFAULT {}").format(sql.SQL(self.expression)))
        return sql.SQL("").join(sql.SQL(" {}").format(p) for p in parts)


# Catalog text (pg_get_expr, regtype) is PostgreSQL's own deparsing, spliced like add_checks'
# pg_get_constraintdef: it is valid SQL naming the source's objects. The columns a generation
# expression reads are dependencies of its pg_attrdef row from PostgreSQL 18 on, of the
# generated column itself before.
_COLUMN_DEFINITIONS = """
SELECT a.attname, cn.nspname, co.collname, a.attidentity, a.attgenerated, pg_get_expr(d.adbin, d.adrelid),
       array(SELECT r.attname FROM pg_depend dep
             JOIN pg_attribute r ON r.attrelid = dep.refobjid AND r.attnum = dep.refobjsubid
             WHERE dep.refclassid = 'pg_class'::regclass AND dep.refobjid = a.attrelid AND r.attnum <> a.attnum
               AND (dep.classid = 'pg_attrdef'::regclass AND dep.objid = d.oid
                    OR dep.classid = 'pg_class'::regclass AND dep.objid = a.attrelid AND dep.objsubid = a.attnum)
             ORDER BY r.attnum),
       s.seqtypid::regtype::text, s.seqstart, s.seqincrement, s.seqmin, s.seqmax, s.seqcache, s.seqcycle
FROM pg_attribute a
JOIN pg_type t ON t.oid = a.atttypid
LEFT JOIN pg_collation co ON co.oid = a.attcollation AND a.attcollation <> t.typcollation
LEFT JOIN pg_namespace cn ON cn.oid = co.collnamespace
LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
LEFT JOIN pg_sequence s ON s.seqrelid = pg_get_serial_sequence(a.attrelid::regclass::text, a.attname)::regclass
WHERE a.attrelid = %s::regclass AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum
"""


def column_definitions(source: psycopg.Connection, info: TableInfo) -> list[ColumnDefinition]:
    """Each source column's collation (when not its type's), default, identity and generation
    (with the columns its expression reads, as ``pg_depend`` records them)."""
    definitions = []
    for name, coll_schema, coll, identity, generated, expression, reads, *seq in source.execute(
        _COLUMN_DEFINITIONS, (info.ident.as_string(source),)
    ).fetchall():
        sequence = SequenceOptions(*seq) if seq[0] is not None else None
        collation = (coll_schema, coll) if coll else None
        definitions.append(
            ColumnDefinition(name, collation, identity, generated, expression, sequence, tuple(reads))
        )
    return definitions


def create_table_like(
    source: psycopg.Connection, target: psycopg.Connection, info: TableInfo, schema: str, name: str
) -> None:
    """Source table ``info``, copied unchanged under another name, with its columns as defined
    there (collation, default, identity, generation expression, own serial sequence) and its
    CHECK constraints. ``pg_dump``'s DDL does all this for a copy under the same name, but names
    the source table throughout."""
    definitions = column_definitions(source, info)
    table = sql.Identifier(schema, name)
    try:
        with target.transaction():
            create_mapped_table(
                target, schema, TableInfo(name, info.columns), {d.name: d.clause() for d in definitions}
            )
            for column in definitions:
                if options := column.serial_sequence:
                    _add_serial_sequence(target, schema, name, column.name, options)
            add_checks(source, target, info, table)
    except (
        psycopg.errors.UndefinedFunction,
        psycopg.errors.UndefinedObject,
        psycopg.errors.UndefinedTable,
    ) as exc:
        raise UserError(
            f"cannot create {schema}.{name} like {info.qualified}: {exc.diag.message_primary} in the target "
            "(a default, generated column or CHECK uses it); create it in the target first"
        ) from None


def _add_serial_sequence(
    target: psycopg.Connection, schema: str, table: str, column: str, options: SequenceOptions
) -> None:
    """A sequence owned by the copied column, with the source sequence's options, as its default."""
    sequence = sql.Identifier(schema, _free_relation_name(target, schema, f"{table}_{column}_seq"))
    target.execute(
        sql.SQL("CREATE SEQUENCE {} AS {} {} OWNED BY {}").format(
            sequence, sql.SQL(options.data_type), options.clause(), sql.Identifier(schema, table, column)
        )
    )
    target.execute(
        sql.SQL("ALTER TABLE {} ALTER COLUMN {} SET DEFAULT nextval({}::regclass)").format(
            sql.Identifier(schema, table), sql.Identifier(column), sql.Literal(sequence.as_string(target))
        )
    )


def _free_relation_name(conn: psycopg.Connection, schema: str, wanted: str) -> str:
    """``wanted`` (cut to PostgreSQL's 63 bytes), or with a number appended if that name is taken."""
    for suffix in ("", *map(str, range(1, 1000))):
        name = wanted.encode()[: 63 - len(suffix)].decode(errors="ignore") + suffix
        taken = one_row(
            conn, "SELECT to_regclass(%s) IS NOT NULL", (sql.Identifier(schema, name).as_string(conn),)
        )[0]
        if not taken:
            return name
    raise UserError(f"no free name like {wanted!r} in schema {schema}; drop some of the relations named so")


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

    With a PostgreSQL ``source`` copied unchanged, they are the source's own definitions, under
    their own names, or, on a table copied under another name, under the names PostgreSQL gives
    them for that table (the source's index names may be taken in the target's schema, by the
    source table itself when both are one database). Otherwise a primary key on the mapped key.
    They come after a full load (cheaper than maintaining them row by row); upserts need the
    unique key before it, so those build it with ``with_indexes=False`` and leave the other
    indexes to after the load. One the target table already has (same shape) is kept; so is one
    of another shape under the same name, which the integrity check then reports.
    """
    table = sql.Identifier(schema, target_info.name)
    if source is None:
        has_pk = target.execute(
            "SELECT 1 FROM pg_index WHERE indrelid = %s::regclass AND indisprimary",
            (table.as_string(target),),
        ).fetchone()
        if target_info.key and not has_pk:
            add_primary_key(target, schema, target_info)
            return ["primary key"]
        return []
    renamed = (schema, target_info.name) != (source_info.schema, source_info.name)
    present = index_shapes(target, table)
    shapes, names = {i.shape for i in present}, {i.name for i in present}
    built: list[str] = []
    for index in index_shapes(source, source_info.ident):
        if index.shape in shapes or index.name in names or not (index.constraint or with_indexes):
            continue
        target.execute(_build_index(index, table, None if renamed else index.name))
        built.append(index.name)
    return built


def _build_index(index: IndexShape, table: sql.Identifier, name: str | None) -> sql.Composed:
    """The statement building ``index`` on ``table``, named ``name`` or (None) as PostgreSQL
    names it for that table. Spelt without ``ONLY``, an index on a partitioned table is built on
    every partition too and attached (``pg_get_indexdef``'s ``ON ONLY`` form, replayed as is,
    would leave an invalid index on the parent alone)."""
    named: sql.Composable = sql.SQL("")
    if name is not None:
        kind = sql.SQL("CONSTRAINT " if index.constraint else "")
        named = sql.SQL("{}{} ").format(kind, sql.Identifier(name))
    if index.constraint:
        return sql.SQL("ALTER TABLE {} ADD {}{}").format(table, named, sql.SQL(index.body))
    unique = sql.SQL("UNIQUE " if index.unique else "")
    return sql.SQL("CREATE {}INDEX {}ON {} {}").format(unique, named, table, sql.SQL(index.body))


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


def add_checks(
    source: psycopg.Connection, target: psycopg.Connection, info: TableInfo, table: sql.Identifier
) -> None:
    """The CHECK constraints of source table ``info`` on ``table``, its copy under another name
    (``pg_dump``'s DDL, which creates them for a copy under the same name, names the source table)."""
    for name, definition in source.execute(
        "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint "
        "WHERE conrelid = %s::regclass AND contype = 'c' ORDER BY conname",
        (info.ident.as_string(source),),
    ).fetchall():
        target.execute(
            sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} {}").format(
                table, sql.Identifier(name), sql.SQL(definition)
            )
        )


def source_foreign_keys(
    source: psycopg.Connection, info: TableInfo, table: sql.Identifier, copies: Mapping[str, sql.Identifier]
) -> list[ForeignKey]:
    """The foreign keys of source table ``info``, for its copy ``table``.

    A key referencing a table copied under another name (``copies``: source ``schema.table`` →
    target) references the copy instead. ``pg_get_constraintdef`` spells ``FOREIGN KEY (<columns>)
    REFERENCES <table>(…`` with the columns quoted as ``quote_ident`` quotes them and the table as
    ``regclass`` prints it, so that exact head is replaced, never a search for the name.
    """
    rows = source.execute(
        """
        SELECT con.conname, pg_get_constraintdef(con.oid), n.nspname || '.' || p.relname,
               'FOREIGN KEY (' || array_to_string(array(
                   SELECT quote_ident(attname) FROM unnest(con.conkey) WITH ORDINALITY k(num, i)
                   JOIN pg_attribute ON attrelid = con.conrelid AND attnum = k.num ORDER BY k.i
               ), ', ') || ') REFERENCES ',
               con.confrelid::regclass::text || '('
        FROM pg_constraint con
        JOIN pg_class p ON p.oid = con.confrelid JOIN pg_namespace n ON n.oid = p.relnamespace
        WHERE con.conrelid = %s::regclass AND con.contype = 'f' ORDER BY con.conname
        """,
        (info.ident.as_string(source),),
    ).fetchall()
    keys = []
    for name, definition, referenced, head, reference in rows:
        copy = copies.get(referenced)
        if copy is not None:
            if not definition.startswith(head + reference):
                raise UserError(
                    f"foreign key {name} of {info.qualified} references {referenced}, which is copied under "
                    f"another name, in a form flowyard cannot point at the copy ({definition}); "
                    f"copy {referenced} under its own name or add the key by hand"
                )
            definition = f"{head}{copy.as_string(source)}({definition.removeprefix(head + reference)}"
        keys.append(ForeignKey(table, name, definition))
    return keys


def _takes_not_valid_key(target: psycopg.Connection, table: sql.Identifier) -> bool:
    """Whether ``table`` may get a foreign key ``NOT VALID``: PostgreSQL 14-17 refuse that on a
    partitioned table ("cannot add NOT VALID foreign key on partitioned table"), which 18 allows."""
    if target.info.server_version >= 180000:
        return True
    query = "SELECT relkind <> 'p' FROM pg_class WHERE oid = %s::regclass"
    return bool(one_row(target, query, (table.as_string(target),))[0])


def add_foreign_keys(target: psycopg.Connection, keys: Sequence[ForeignKey]) -> list[str]:
    """Add each foreign key ``NOT VALID`` (instant), then ``VALIDATE`` it (no exclusive lock).
    On a partitioned table of PostgreSQL 14-17, which refuse ``NOT VALID`` there, the key is added
    validated in one statement (a key the source left unvalidated too: it cannot be otherwise).

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
        validated_now = not _takes_not_valid_key(target, key.table)
        try:
            target.execute(
                sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} {}{}").format(
                    key.table,
                    sql.Identifier(key.name),
                    sql.SQL(definition),
                    sql.SQL("" if validated_now else " NOT VALID"),
                )
            )
            if not validated_now and definition == key.definition:
                with target.transaction():
                    target.execute(
                        sql.SQL("ALTER TABLE {} VALIDATE CONSTRAINT {}").format(
                            key.table, sql.Identifier(key.name)
                        )
                    )
        except psycopg.errors.UndefinedTable:
            continue  # the referenced table was not copied and does not exist in the target
        except psycopg.errors.ForeignKeyViolation as exc:
            raise UserError(
                f"foreign key {key.name} on {key.table.as_string(target)} does not hold in the copied data: "
                f"{exc.diag.message_detail or exc.diag.message_primary}; fix the source rows or leave the table out"
            ) from None
        if validated_now or definition == key.definition:
            added.append(key.name)
    return added


def reset_sequences(target: psycopg.Connection, schema: str, table: TableInfo) -> list[str]:
    """Move every serial/identity sequence of the table to the loaded maximum (an empty table
    leaves it where it starts: resetting it to 1 would fail a sequence whose minimum is higher)."""
    moved = []
    qualified = sql.Identifier(schema, table.name).as_string(target)
    for column in table.columns:
        sequence = one_row(target, "SELECT pg_get_serial_sequence(%s, %s)", (qualified, column.name))[0]
        if sequence is None:
            continue
        target.execute(
            sql.SQL("SELECT setval({}::regclass, max({})) FROM {} HAVING max({}) IS NOT NULL").format(
                sql.Literal(sequence),
                sql.Identifier(column.name),
                sql.Identifier(schema, table.name),
                sql.Identifier(column.name),
            )
        )
        moved.append(sequence)
    return moved
