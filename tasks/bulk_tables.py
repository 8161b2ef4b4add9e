"""The tables of a bulk run: which, where they go, their persisted plans, and their completion.

Before the load: target tables are created (upserting modes also build their keys) and the
chunk plans persisted; the plans and the emptying of the target tables commit together, so a
run that crashes later resumes from the persisted plan and never empties a table it has
started loading. After the load: indexes and keys, foreign keys (``NOT VALID`` then
``VALIDATE``), sequences, incremental cursors.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field, replace

import psycopg
import pyarrow as pa
from psycopg import sql

from tasks.bulk_sources import (
    SourceKind,
    TableInfo,
    declare_types,
    describe,
    list_tables,
    pg_describe,
    qualified_name,
    resolve_table_name,
    source_kind,
    split_name,
)
from tasks.chunk_checkpoint import (
    ChunkCheckpoint,
    committed_chunks,
    last_cursor,
    load_plan,
    mark_table_completed,
    save_cursor,
    save_plan,
)
from tasks.chunk_plan import Chunk, plan_table
from tasks.column_mapping import TableMapping, generated_as_values, mapped_table
from tasks.db import connection, one_row
from tasks.errors import UserError
from tasks.pg_arrow_types import pg_to_arrow
from tasks.schema_copy import (
    ColumnDefinition,
    add_foreign_keys,
    build_indexes_and_keys,
    column_definitions,
    copy_table_ddl,
    create_mapped_table,
    create_table_like,
    reset_sequences,
    source_foreign_keys,
    table_exists,
    truncate,
)


@dataclass(frozen=True)
class TableSpec:
    """A source table, its mapping and its target table (columns and key in target terms).

    ``identical``: a PostgreSQL table copied with its columns and types unchanged, maybe under
    another name (a mapping with only a ``target``): it gets the source's own CHECKs, indexes,
    keys and foreign keys. ``retyped``: its columns that an existing target table holds in other
    types; binary COPY would hand the target the source type's bytes to reinterpret, so such a
    table travels as text, which the target's types parse. ``generation``: a mapped PostgreSQL
    table's generated columns, as defined in the source, for those its target keeps generated;
    ``generated_values``: those the target keeps as values (see ``generated_as_values``)."""

    source: TableInfo
    target: TableInfo
    target_schema: str
    mapping: TableMapping | None
    cursor: str | None
    identical: bool
    retyped: tuple[str, ...] = ()
    generation: tuple[ColumnDefinition, ...] = ()
    generated_values: tuple[str, ...] = ()

    @property
    def target_ident(self) -> sql.Identifier:
        return sql.Identifier(self.target_schema, self.target.name)

    @property
    def target_label(self) -> str:
        return qualified_name(self.target_schema, self.target.name)

    def generation_clauses(self) -> dict[str, sql.Composable]:
        """The generation clause of each column the target keeps generated, by target name."""
        rename = self.mapping.rename if self.mapping else {}
        return {rename.get(d.name, d.name): d.clause() for d in self.generation}

    @property
    def dumped(self) -> bool:
        """Whether the target table is created from the source's ``pg_dump`` DDL, which names the
        source table: only for an identical copy under the same name."""
        return self.identical and self.target_label == self.source.qualified


@dataclass(frozen=True)
class TablePlan:
    spec: TableSpec
    chunks: list[Chunk]
    committed: dict[str, ChunkCheckpoint] = field(default_factory=dict)

    @property
    def est_rows(self) -> int:
        return sum(c.est_rows for c in self.chunks)

    @property
    def window(self) -> Chunk | None:
        """The cursor window of an incremental pass past a saved cursor, over the whole table (no
        key bounds): the rows this pass answers for, since rows before it may be gone from the
        source (deletes are not copied). None for full and seed loads and a first pass, which
        answer for the whole table."""
        if not self.chunks or self.chunks[0].cursor_lo is None:
            return None
        return replace(self.chunks[0], lo=None, hi=None)


def table_specs(
    source_url: str,
    tables: list[str] | None,
    mapping: dict[str, TableMapping],
    target_schema: str,
    mode: str,
    cursor_column: str | None,
) -> list[TableSpec]:
    """Resolve ``tables`` (None = all) against the source and the mapping."""
    kind = source_kind(source_url)
    available = list_tables(source_url)
    names = tables or available
    if kind == "postgres" and tables:
        names = [resolve_table_name(n, available) for n in tables]
    missing = [n for n in names if n not in available]
    if missing:
        raise UserError(f"source has no tables {missing}; available: {', '.join(available) or 'none'}")
    # A mapping keyed by a misspelt table would otherwise be ignored: the table copied unmapped.
    known = {*available, *(split_name(n)[1] for n in available if kind == "postgres")}
    if unmatched := sorted(set(mapping) - known):
        raise UserError(
            f"mapping names tables the source does not have: {unmatched}; "
            f"key it by source table ({', '.join(available) or 'none'})"
        )
    specs = []
    for name in names:
        source = describe(source_url, name)
        table_map = mapping.get(name) or mapping.get(source.name)
        if table_map:  # a CSV column cast is read as its type, not inferred then converted
            source = declare_types(source, table_map.source_casts(source.copy_columns))
        generation: tuple[ColumnDefinition, ...] = ()
        as_values: tuple[str, ...] = ()
        if table_map and table_map.transforms and any(c.generated for c in source.columns):
            source, generation, as_values = _mapped_generation(source_url, source, table_map)
        target = mapped_table(source, table_map)
        schema = source.schema or target_schema
        if table_map and table_map.target:
            schema, target_name = split_name(table_map.target, schema)
            target = TableInfo(target_name, target.columns, target.key, target.schema, target.path)
        cursor = (table_map.cursor if table_map else None) or cursor_column
        if mode == "incremental":
            cursor = incremental_cursor(kind, source, target, cursor)
        if mode == "seed" and not target.key:
            raise UserError(
                f"seed mode upserts by key but {source.qualified} has none; set the mapping's `key`"
            )
        identical = kind == "postgres" and (table_map is None or not table_map.transforms)
        cursor = cursor if mode == "incremental" else None
        specs.append(
            TableSpec(source, target, schema, table_map, cursor, identical, (), generation, as_values)
        )
    _ensure_distinct_targets(specs)
    return specs


def _mapped_generation(
    source_url: str, source: TableInfo, mapping: TableMapping
) -> tuple[TableInfo, tuple[ColumnDefinition, ...], tuple[str, ...]]:
    """A mapped PostgreSQL table's generated columns: the source with those the target keeps as
    values made data columns, the definitions of those it keeps generated, and the former's names."""
    with connection(source_url) as conn:
        definitions = [d for d in column_definitions(conn, source) if d.generated]
    mapped = generated_as_values(source, mapping, {d.name: d.reads for d in definitions})
    generated = {c.name for c in mapped.columns if c.generated}
    kept = tuple(
        d
        for d in definitions
        if d.name in generated and mapping.rename.get(d.name, d.name) not in mapping.drop
    )
    return mapped, kept, tuple(d.name for d in definitions if d.name not in generated)


def incremental_cursor(kind: SourceKind, source: TableInfo, target: TableInfo, cursor: str | None) -> str:
    """The cursor column of an incremental load (by default a single-column source key), refused
    in one line when there is none or no key to upsert by. PostgreSQL tables are chunked by
    their own key; SQLite and file tables by position, so the target's key (the mapping's
    ``key``) is enough. A file's cursor must be declared: neither row order nor a key says
    which rows changed."""
    if kind == "files" and cursor is None:
        raise UserError(
            f"incremental mode on file table {source.name} needs a cursor column whose values grow with "
            "every change (e.g. updated_at): set cursor_column or the mapping's `cursor`, or use mode='full'"
        )
    cursor = cursor or (source.key[0] if len(source.key) == 1 else None)
    keyed = source.key if kind == "postgres" else target.key
    if not keyed or cursor is None:
        key_fix = "" if kind == "postgres" else " (and the mapping's `key` if it has none)"
        raise UserError(
            f"incremental mode upserts by key the rows past a cursor column; {source.qualified} has key "
            f"{list(keyed)}: set cursor_column{key_fix} or use mode='full'"
        )
    if cursor not in {c.name for c in source.columns}:
        raise UserError(
            f"cursor column {cursor!r} is not a column of {source.qualified}; set cursor_column (or the "
            f"mapping's `cursor`) to one of: {', '.join(c.name for c in source.columns)}"
        )
    return cursor


def _ensure_distinct_targets(specs: list[TableSpec]) -> None:
    """Two source tables must not land in one target table."""
    seen: dict[str, str] = {}
    for spec in specs:
        other = seen.setdefault(spec.target_label, spec.source.qualified)
        if other != spec.source.qualified:
            raise UserError(
                f"{other} and {spec.source.qualified} both map to {spec.target_label}; rename one"
            )


def same_database(source_url: str, target_url: str) -> bool:
    """Whether both URLs reach one database of one running server.

    Host names, ports and socket paths cannot tell (one server answers on many addresses), and
    ``pg_control_system()``'s ``system_identifier`` is shared by every clone of a cluster (a
    restored backup, a promoted standby), whose databases have the same names too. Advisory locks
    are per database and need no privilege: a key the target's session holds can be taken by the
    source's session only when that session is connected to another database. Transaction-level
    locks, so a transaction-pooling proxy keeps each on its backend."""
    key = secrets.randbits(63)
    with connection(target_url) as target, connection(source_url) as source:
        target.execute("SELECT pg_advisory_xact_lock(%s)", (key,))
        return not one_row(source, "SELECT pg_try_advisory_xact_lock(%s)", (key,))[0]


def refuse_copies_onto_sources(source_url: str, target_url: str, specs: list[TableSpec]) -> None:
    """Within one database, a target table that is a table this copy reads would be emptied (a
    full load truncates its targets before any chunk is read) or overwritten while it is read:
    refuse that in one line, before anything is created or emptied."""
    if source_kind(source_url) != "postgres" or not same_database(source_url, target_url):
        return
    onto_self = [s.source.qualified for s in specs if s.target_label == s.source.qualified]
    if onto_self:
        others = [s.source.qualified for s in specs if s.target_label != s.source.qualified]
        one = len(onto_self) == 1
        them = "it" if one else "them"
        leave_out = f"leave {them} out (tables={others}) or " if others else ""
        raise UserError(
            f"source and target are the same database: {', '.join(onto_self)} would be copied onto "
            f"{'itself' if one else 'themselves'}; {leave_out}give {them} a mapping `target`"
        )
    read = {s.source.qualified for s in specs}
    if onto_read := [s for s in specs if s.target_label in read]:
        spec = onto_read[0]
        raise UserError(
            f"source and target are the same database: {spec.source.qualified} would be copied into "
            f"{spec.target_label}, which this copy also reads (and would empty first); give "
            f"{spec.source.qualified} a mapping `target` that no copied table has, or copy in two runs"
        )


def with_target_types(target_url: str, specs: list[TableSpec]) -> list[TableSpec]:
    """The specs fitted to target tables that already exist (one catalog query per such table):
    ``retyped`` set for identical copies (a source column such a table lacks is refused in one
    line), a mapped copy's generated source columns as the table holds them (see
    :func:`_existing_generation`), and a CSV file reading as text the columns such a table holds
    in a type that travels as text (see :func:`_text_columns`)."""
    with connection(target_url) as conn:
        return [
            _into_existing(conn, s) if table_exists(conn, s.target_schema, s.target.name) else s for s in specs
        ]


def _existing_generation(target: psycopg.Connection, spec: TableSpec) -> TableSpec:
    """A mapped copy into an existing table: the table's columns decide what becomes of the
    source's generated columns it keeps. One the table generates itself is not written (unless the
    mapping casts or reads it: PostgreSQL then refuses the values); a plain one takes the source's
    values; a missing one is refused in one line, rather than left out of the copy unsaid."""
    existing = {c.name: c for c in pg_describe(target, spec.target_schema, spec.target.name).columns}
    rename = spec.mapping.rename if spec.mapping else {}
    kept = {c.name for c in spec.target.columns}
    names = {
        g: rename.get(g, g)
        for g in [*(d.name for d in spec.generation), *spec.generated_values]
        if rename.get(g, g) in kept
    }
    if missing := [t for t in names.values() if t not in existing]:
        raise UserError(
            f"existing target table {spec.target_label} has no columns {missing} (generated in "
            f"{spec.source.qualified}); add them, drop the table so the copy creates it, or drop them in the mapping"
        )
    untouched = spec.mapping.untouched(set(names)) if spec.mapping else set(names)
    computed = {g for g, t in names.items() if existing[t].generated and g in untouched}
    generates = {t: g in computed for g, t in names.items()}  # by target name
    source = [replace(c, generated=c.name in computed) if c.name in names else c for c in spec.source.columns]
    columns = [
        replace(c, generated=generates[c.name]) if c.name in generates else c for c in spec.target.columns
    ]
    return replace(
        spec,
        source=replace(spec.source, columns=tuple(source)),
        target=replace(spec.target, columns=tuple(columns)),
        generated_values=tuple(g for g in names if g not in computed),
    )


def _into_existing(target: psycopg.Connection, spec: TableSpec) -> TableSpec:
    if spec.identical:
        return replace(spec, retyped=_retyped(target, spec))
    if spec.generation or spec.generated_values:
        return _existing_generation(target, spec)
    if spec.source.path:
        return replace(spec, source=declare_types(spec.source, _text_columns(target, spec)))
    return spec


def _text_columns(target: psycopg.Connection, spec: TableSpec) -> dict[str, str]:
    """File columns the mapping only passes along (or renames) into a column the existing target
    table holds in a type that travels as text (``text``, ``varchar``, ``uuid``, ``jsonb``,
    unconstrained ``numeric``...), with that type: such a column is the natural declaration of a
    seed, and reading the file's text as it is keeps ``00123`` and every digit of a long decimal,
    where an inferred integer or double would not. Columns of other types (integers, timestamps)
    keep their inferred Arrow types, converted as before; a mapping's cast takes precedence."""
    types = {c.name: c.pg_type for c in pg_describe(target, spec.target_schema, spec.target.name).columns}
    columns = [c.name for c in spec.source.columns if not c.generated and not c.declared]
    passed = spec.mapping.untouched(columns) if spec.mapping else set(columns)
    rename = spec.mapping.rename if spec.mapping else {}
    text: dict[str, str] = {}
    for name in columns:
        pg_type = types.get(rename.get(name, name))
        if name in passed and pg_type is not None and pg_to_arrow(pg_type) == pa.string():
            text[name] = pg_type
    return text


def _retyped(target: psycopg.Connection, spec: TableSpec) -> tuple[str, ...]:
    """Columns whose type (``format_type``, type modifiers included) differs in the existing target."""
    types = {c.name: c.pg_type for c in pg_describe(target, spec.target_schema, spec.target.name).columns}
    copied = spec.source.data_columns
    if missing := [c.name for c in copied if c.name not in types]:
        raise UserError(
            f"existing target table {spec.target_label} has no columns {missing} of {spec.source.qualified}; "
            "add them, drop the table so the copy creates it, or drop them in the mapping"
        )
    return tuple(c.name for c in copied if types[c.name] != c.pg_type)


def create_targets(source_url: str, target_url: str, specs: list[TableSpec]) -> None:
    """Create the target tables that do not exist yet: the source's DDL (``pg_dump``), the
    source's column definitions for an identical copy under another name, or mapped types."""
    with connection(target_url) as conn:
        absent = [s for s in specs if not table_exists(conn, s.target_schema, s.target.name)]
        for spec in absent:
            if not spec.identical:
                create_mapped_table(conn, spec.target_schema, spec.target, spec.generation_clauses())
        if renamed := [s for s in absent if s.identical and not s.dumped]:
            with connection(source_url) as source:
                for spec in renamed:
                    create_table_like(source, conn, spec.source, spec.target_schema, spec.target.name)
    copy_table_ddl(source_url, target_url, [s.source for s in absent if s.dumped])


@dataclass(frozen=True)
class PlanDraft:
    """A table's chunks before the targets exist: ``persisted`` by an earlier attempt of this run
    (kept as they are), or planned now."""

    chunks: list[Chunk]
    persisted: bool


def draft_plans(
    source_url: str, target_url: str, run_key: str, lineage: str, specs: list[TableSpec], chunk_rows: int
) -> dict[str, PlanDraft]:
    """Each table's chunks, by source table: the plan this run persisted, or one planned now.

    Planning reads a source table whole where it has to (a file's rows are counted by parsing
    them), so it comes before :func:`create_targets`: a source that cannot be read, such as a CSV
    column whose inferred type fails further down, fails the run before any target table is
    created with what was inferred. Nothing is written here."""
    drafts = {}
    with connection(target_url) as conn:
        for spec in specs:
            name = spec.source.qualified
            if (chunks := load_plan(conn, run_key, name)) is not None:
                drafts[name] = PlanDraft(chunks, persisted=True)
                continue
            since = last_cursor(conn, lineage, name) if spec.cursor else None
            drafts[name] = PlanDraft(plan_table(source_url, spec.source, chunk_rows, spec.cursor, since), False)
    return drafts


def plan_tables(
    source_url: str, target_url: str, run_key: str, mode: str, specs: list[TableSpec], drafts: dict[str, PlanDraft]
) -> list[TablePlan]:
    """Each table's plan, a new one persisted now (a new full plan empties its target table)."""
    plans = []
    with connection(target_url) as conn:
        emptied: list[sql.Identifier] = []
        for spec in specs:
            name = spec.source.qualified
            draft = drafts[name]
            if not draft.persisted:
                save_plan(conn, run_key, name, spec.target_label, draft.chunks)
                if mode == "full":
                    emptied.append(spec.target_ident)
            if mode != "full":
                build_keys(source_url, conn, spec, with_indexes=False)
            plans.append(TablePlan(spec, draft.chunks, committed_chunks(conn, run_key, name)))
        truncate(conn, emptied)
    return plans


def finish_table(source_url: str, target_url: str, run_key: str, lineage: str, plan: TablePlan) -> list[str]:
    """After a table's chunks: indexes and keys, sequences, the cursor, and the table marked complete."""
    spec = plan.spec
    with connection(target_url) as target:
        built = build_keys(source_url, target, spec)
        built += reset_sequences(target, spec.target_schema, spec.target)
        if spec.cursor and plan.chunks and plan.chunks[0].cursor_hi is not None:
            save_cursor(target, lineage, spec.source.qualified, plan.chunks[0].cursor_hi, run_key)
        mark_table_completed(target, run_key, spec.source.qualified)
    return built


def build_keys(
    source_url: str, target: psycopg.Connection, spec: TableSpec, *, with_indexes: bool = True
) -> list[str]:
    """The target table's keys (and, ``with_indexes``, its other indexes): the source's own for
    an identical copy, else a primary key on the mapped key. Upserting loads build the keys before
    the data, so ``ON CONFLICT`` has its unique index and no duplicate can land."""
    if not spec.identical:
        return build_indexes_and_keys(
            None, target, spec.source, spec.target_schema, spec.target, with_indexes=with_indexes
        )
    with connection(source_url) as source:
        return build_indexes_and_keys(
            source, target, spec.source, spec.target_schema, spec.target, with_indexes=with_indexes
        )


def finish_foreign_keys(source_url: str, target_url: str, specs: list[TableSpec]) -> list[str]:
    """Foreign keys of the identical PG→PG copies, added NOT VALID then validated; one that
    references a table copied under another name references the copy."""
    copied = [s for s in specs if s.identical]
    if not copied:
        return []
    copies = {s.source.qualified: s.target_ident for s in copied if not s.dumped}
    with connection(source_url) as source:
        keys = [k for s in copied for k in source_foreign_keys(source, s.source, s.target_ident, copies)]
    with connection(target_url, autocommit=True) as target:
        return add_foreign_keys(target, keys)
