"""A read-only snapshot of one schema's tables, as the online-migration planner needs it.

The planner renders every statement up front (so ``flowyard online plan`` can print them and
the lint can check them), which needs the columns, types, defaults, keys, indexes and
constraints of each table: a shadow-column swap must rebuild every index and constraint that
involves the column it replaces.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import psycopg

_INTEGER_RANGE = {"smallint": 2**15, "integer": 2**31, "bigint": 2**63}


@dataclass(frozen=True)
class SequenceOptions:
    """An identity sequence's options, as its column's successor must get them.

    ``min``/``max`` are None where they are the defaults for the sequence's type and
    direction: a successor of a wider type then gets that type's defaults (an ``integer``
    identity widened to ``bigint`` must not stay capped at 2^31-1), while a bound the user
    chose is kept.
    """

    start: int
    increment: int
    min: int | None
    max: int | None
    cache: int
    cycle: bool

    @classmethod
    def from_catalog(cls, row: list[str]) -> SequenceOptions:
        """From ``[type, start, increment, min, max, cache, cycle]`` as ``pg_sequence`` has them."""
        type_name, start, increment, low, high, cache = row[0], *map(int, row[1:6])
        span = _INTEGER_RANGE[type_name]
        default_low, default_high = (1, span - 1) if increment > 0 else (-span, -1)
        return cls(
            start=start,
            increment=increment,
            min=None if low == default_low else low,
            max=None if high == default_high else high,
            cache=cache,
            cycle=row[6] == "true",
        )


@dataclass
class ColumnInfo:
    name: str
    type: str
    not_null: bool
    default: str | None
    identity: str = ""
    """``a`` (ALWAYS), ``d`` (BY DEFAULT) or empty."""
    sequence: list[str] | None = None
    """Schema and name of the sequence the column owns (serial or identity): a swap must keep it alive."""
    sequence_options: SequenceOptions | None = None
    """Set for identity columns only (a serial's sequence is handed over whole)."""


@dataclass
class IndexInfo:
    name: str
    definition: str
    """``pg_get_indexdef``: ``CREATE [UNIQUE] INDEX name ON schema.table USING method (...) ...``."""
    columns: list[str]
    """Every column the index depends on: keys, INCLUDE, expressions and predicate."""
    constraint_type: str | None = None
    """``p`` (primary key), ``u`` (unique), ``x`` (exclusion) when a constraint owns the index."""
    constraint: str | None = None
    deferrable: bool = False


@dataclass
class ConstraintInfo:
    """A CHECK (``c``) or FOREIGN KEY (``f``) constraint of ``table``."""

    name: str
    table: str
    type: str
    definition: str
    """``pg_get_constraintdef``: ``CHECK (...)`` or ``FOREIGN KEY (...) REFERENCES t(...) ...``."""
    columns: list[str]
    ref_table: str | None
    ref_columns: list[str]
    validated: bool


@dataclass(frozen=True)
class OutsideUse:
    """An object the planner does not rebuild that uses a table or one of its columns: a view or
    materialized view (any schema), or a foreign key from another schema. DROP COLUMN/TABLE fails on it."""

    schema: str
    """The schema the using object lives in."""
    description: str
    """``view reports.daily`` or ``foreign key billing.invoices_order_fkey``."""
    column: str | None
    """None when the whole table is used (a view's whole-row reference)."""


@dataclass
class TableInfo:
    name: str
    columns: list[ColumnInfo] = field(default_factory=list)
    primary_key: list[str] = field(default_factory=list)
    """In key order."""
    unique_keys: list[list[str]] = field(default_factory=list)
    """Non-partial unique indexes on NOT NULL plain columns: keyset alternatives to a primary key."""
    indexes: list[IndexInfo] = field(default_factory=list)
    constraints: list[ConstraintInfo] = field(default_factory=list)
    """CHECK and FOREIGN KEY constraints of this table."""
    referenced_by: list[ConstraintInfo] = field(default_factory=list)
    """FOREIGN KEYs of any table of the schema that reference this one."""
    outside_uses: list[OutsideUse] = field(default_factory=list)
    partitioned: bool = False

    def uses_of(self, column: str | None = None) -> list[OutsideUse]:
        """What uses ``column`` (or, with None, the table at all), each object once."""
        uses = {u.description: u for u in self.outside_uses if column is None or u.column in (column, None)}
        return sorted(uses.values(), key=lambda u: u.description)

    def column(self, name: str) -> ColumnInfo | None:
        return next((c for c in self.columns if c.name == name), None)


@dataclass
class SchemaSnapshot:
    schema: str
    tables: dict[str, TableInfo]
    indexes: set[str]
    server_version: int
    """``server_version_num`` of the target: what its DDL may use (see ``_Planner.refuse_key_before_18``)."""


_COLUMNS = """
SELECT c.relname, c.relkind = 'p', a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull, pg_get_expr(d.adbin, d.adrelid),
       a.attidentity::text,
       (SELECT ARRAY[sn.nspname, s.relname]::text[] FROM pg_class s JOIN pg_namespace sn ON sn.oid = s.relnamespace
        WHERE s.oid = pg_get_serial_sequence(format('%%I.%%I', n.nspname, c.relname), a.attname)::regclass),
       (SELECT ARRAY[format_type(seqtypid, NULL), seqstart::text, seqincrement::text, seqmin::text, seqmax::text,
                     seqcache::text, seqcycle::text]
        FROM pg_sequence WHERE a.attidentity <> ''
         AND seqrelid = pg_get_serial_sequence(format('%%I.%%I', n.nspname, c.relname), a.attname)::regclass)
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
LEFT JOIN pg_attrdef d ON d.adrelid = c.oid AND d.adnum = a.attnum
WHERE n.nspname = %s AND c.relkind IN ('r', 'p')
ORDER BY c.relname, a.attnum
"""

_INDEXES = """
SELECT t.relname, ic.relname, pg_get_indexdef(i.indexrelid),
       ARRAY(SELECT a.attname FROM pg_attribute a WHERE a.attrelid = t.oid AND a.attnum > 0 AND (
             a.attnum = ANY (i.indkey) OR EXISTS (
                 SELECT 1 FROM pg_depend dep WHERE dep.classid = 'pg_class'::regclass AND dep.objid = i.indexrelid
                 AND dep.refclassid = 'pg_class'::regclass AND dep.refobjid = t.oid AND dep.refobjsubid = a.attnum))
             ORDER BY a.attnum),
       k.contype::text, k.conname, coalesce(k.condeferrable, false),
       i.indisunique AND i.indpred IS NULL AND i.indexprs IS NULL AND NOT EXISTS (
           SELECT 1 FROM pg_attribute a WHERE a.attrelid = t.oid AND a.attnum = ANY (i.indkey) AND NOT a.attnotnull),
       ARRAY(SELECT a.attname FROM unnest(i.indkey[0:i.indnkeyatts - 1]) WITH ORDINALITY u(attnum, ord)
             JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = u.attnum ORDER BY u.ord)
FROM pg_index i
JOIN pg_class ic ON ic.oid = i.indexrelid
JOIN pg_class t ON t.oid = i.indrelid
JOIN pg_namespace n ON n.oid = t.relnamespace
LEFT JOIN pg_constraint k ON k.conindid = i.indexrelid AND k.conrelid = t.oid AND k.contype IN ('p', 'u', 'x')
WHERE n.nspname = %s AND t.relkind IN ('r', 'p')
ORDER BY t.relname, ic.relname
"""

_CONSTRAINTS = """
SELECT t.relname, k.conname, k.contype::text, pg_get_constraintdef(k.oid),
       ARRAY(SELECT a.attname FROM unnest(k.conkey) WITH ORDINALITY u(attnum, ord)
             JOIN pg_attribute a ON a.attrelid = k.conrelid AND a.attnum = u.attnum ORDER BY u.ord),
       CASE WHEN r.relnamespace = t.relnamespace THEN r.relname END,
       ARRAY(SELECT a.attname FROM unnest(k.confkey) WITH ORDINALITY u(attnum, ord)
             JOIN pg_attribute a ON a.attrelid = k.confrelid AND a.attnum = u.attnum ORDER BY u.ord),
       k.convalidated
FROM pg_constraint k
JOIN pg_class t ON t.oid = k.conrelid
JOIN pg_namespace n ON n.oid = t.relnamespace
LEFT JOIN pg_class r ON r.oid = k.confrelid
WHERE n.nspname = %s AND k.contype IN ('c', 'f') AND t.relkind IN ('r', 'p')
ORDER BY t.relname, k.conname
"""

# A view's rewrite rule depends on each column it reads (refobjsubid = attnum) or on the whole
# table; a foreign key from another schema on each referenced column (same-schema ones are rebuilt).
_OUTSIDE_USES = """
SELECT DISTINCT t.relname, vn.nspname, format('view %%I.%%I', vn.nspname, v.relname), a.attname
FROM pg_depend d
JOIN pg_rewrite w ON d.classid = 'pg_rewrite'::regclass AND w.oid = d.objid
JOIN pg_class v ON v.oid = w.ev_class
JOIN pg_namespace vn ON vn.oid = v.relnamespace
JOIN pg_class t ON d.refclassid = 'pg_class'::regclass AND t.oid = d.refobjid
JOIN pg_namespace n ON n.oid = t.relnamespace
LEFT JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = d.refobjsubid AND d.refobjsubid > 0
WHERE n.nspname = %(schema)s AND t.relkind IN ('r', 'p') AND v.oid <> t.oid AND d.deptype = 'n'
UNION
SELECT r.relname, cn.nspname, format('foreign key %%I.%%I', cn.nspname, k.conname), a.attname
FROM pg_constraint k
JOIN pg_class r ON r.oid = k.confrelid
JOIN pg_namespace rn ON rn.oid = r.relnamespace
JOIN pg_class c ON c.oid = k.conrelid
JOIN pg_namespace cn ON cn.oid = c.relnamespace
JOIN pg_attribute a ON a.attrelid = r.oid AND a.attnum = ANY (k.confkey)
WHERE k.contype = 'f' AND rn.nspname = %(schema)s AND cn.nspname <> %(schema)s
"""


def snapshot(conn: psycopg.Connection, schema: str) -> SchemaSnapshot:
    """Tables (ordinary and partitioned), columns, keys, indexes and constraints of ``schema``."""
    tables: dict[str, TableInfo] = {}
    for table, partitioned, name, type_, not_null, default, identity, sequence, options in conn.execute(
        _COLUMNS, (schema,)
    ).fetchall():
        tables.setdefault(table, TableInfo(table, partitioned=partitioned)).columns.append(
            ColumnInfo(
                name,
                type_,
                not_null,
                default,
                identity,
                sequence,
                sequence_options=SequenceOptions.from_catalog(options) if options else None,
            )
        )
    for table, name, definition, columns, con_type, con_name, deferrable, keyset, keys in conn.execute(
        _INDEXES, (schema,)
    ).fetchall():
        info = tables[table]
        info.indexes.append(IndexInfo(name, definition, columns, con_type, con_name, deferrable))
        if con_type == "p":
            info.primary_key = keys
        elif keyset:
            info.unique_keys.append(keys)
    for table, *row in conn.execute(_CONSTRAINTS, (schema,)).fetchall():
        constraint = ConstraintInfo(row[0], table, *row[1:])
        tables[table].constraints.append(constraint)
        if constraint.ref_table in tables:
            tables[constraint.ref_table].referenced_by.append(constraint)
    for table, *use in conn.execute(_OUTSIDE_USES, {"schema": schema}).fetchall():
        if table in tables:  # a table without columns has no entry and nothing to alter
            tables[table].outside_uses.append(OutsideUse(*use))
    indexes = {
        row[0]
        for row in conn.execute(
            "SELECT indexname FROM pg_indexes WHERE schemaname = %s", (schema,)
        ).fetchall()
    }
    return SchemaSnapshot(schema, tables, indexes, conn.info.server_version)
