"""Turn a migration file into the exact statements of each phase: start (expand), complete (contract), rollback.

The model is pgroll's/reshape's expand/contract with versioned schemas:

- Start only adds: new columns, *shadow* columns ``_fy_new_<col>`` for altered columns, a trigger
  per table that keeps old and new columns in sync (old-version writes fill the new column through
  ``up``, new-version writes fill the old one through ``down``), constraints ``NOT VALID`` then
  ``VALIDATE``, indexes ``CONCURRENTLY``, and a schema of views ``<schema>_<migration>`` that shows
  the new version. Applications choose a version with ``search_path``; the physical schema (or the
  previous migration's view schema) stays the old version.
- Complete switches to the final physical names in short transactions and drops the triggers,
  shadow columns and the previous version's views.
- Rollback drops everything start created; every rollback statement is idempotent, so it works
  from any point of a partial start.

Names in a migration file refer to the tables and columns as they are before the migration
(plus the columns it adds). Each step is rendered once, here, to SQL text; the runner executes
exactly what ``flowyard online plan`` prints and what the lint checked.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from psycopg import sql
from pydantic import BaseModel, model_validator

from tasks.ddl_lint import Token, is_volatile_expression, tokenize
from tasks.errors import UserError
from tasks.online_catalog import (
    ColumnInfo,
    ConstraintInfo,
    IndexInfo,
    SchemaSnapshot,
    SequenceOptions,
    TableInfo,
)
from tasks.online_spec import (
    AddColumn,
    AlterColumn,
    Column,
    CreateIndex,
    CreateTable,
    DropColumn,
    DropIndex,
    DropTable,
    MigrationSpec,
    Operation,
    RawSql,
    RenameColumn,
    RenameTable,
)

Phase = Literal["start", "complete", "rollback"]
PHASES: tuple[Phase, ...] = ("start", "complete", "rollback")
SHADOW_PREFIX = "_fy_new_"
_MAX_NAME_BYTES = 63  # NAMEDATALEN - 1


class BackfillTarget(BaseModel):
    """A table to backfill in keyset batches, by set-based ``UPDATE ... SET <assignments>``.

    The assignments are the old-version halves of the sync trigger (``new := up``), evaluated
    in SQL over the old column names, which is far faster than firing the trigger per row.
    """

    schema_name: str
    table: str
    key_columns: list[str]
    """The primary key (or a unique NOT NULL key), in index order: batches compare it as a row value."""
    key_types: list[str]
    assignments: list[str]
    columns: list[str] = []
    """The columns the assignments fill (new and shadow columns), which complete swaps in: it checks
    they are still there first. Plans persisted before it existed have none."""

    @model_validator(mode="before")
    @classmethod
    def _single_key_plans(cls, data: Any) -> Any:
        """Plans persisted before composite keys name one ``key``/``key_type``; they still resume."""
        if isinstance(data, dict) and "key" in data:
            rest = {k: v for k, v in data.items() if k not in ("key", "key_type")}
            data = {**rest, "key_columns": [data["key"]], "key_types": [data["key_type"]]}
        return data


class Step(BaseModel):
    """One unit of work: its statements run in one transaction unless ``kind`` says otherwise."""

    title: str
    kind: Literal["sql", "concurrent", "backfill"] = "sql"
    statements: list[str] = []
    only_if: str | None = None
    """A query returning one boolean; false means the step already happened (resume after a crash)."""
    long_running: bool = False
    """Scans the table without blocking writes (VALIDATE, CONCURRENTLY): long statement timeout."""
    raw_sql_index: int | None = None
    unsafe: bool = False
    index: str | None = None
    backfill: BackfillTarget | None = None
    contracts: str | None = None
    """The table whose sync trigger this complete step drops: a resumed complete checks the sync of
    the tables it has yet to contract. Plans persisted before it existed have none."""


class ExpressionCheck(BaseModel):
    """A read-only query that parses a user's SQL expression against the live catalog.

    The sync trigger compiles ``up``/``down`` only when a row is first written, so a typo (an
    unknown column, function or operator) would otherwise pass start's DDL and then fail every
    application write to the table until rollback. Each check selects the expression over the
    same names the trigger gives it, with ``WHERE false``: PostgreSQL resolves every name and
    operator but reads no row.
    """

    where: str
    """The migration field the expression comes from, as errors name it."""
    query: str
    after_raw_sql: bool = False
    """An earlier ``raw_sql`` operation may create what it names (an enum type, a function):
    before start it can only fail for a name that does not exist yet, so start runs it again
    right after the raw_sql, before any trigger uses it."""


class Plan(BaseModel):
    migration: str
    schema_name: str
    version_schema: str
    previous_schema: str | None
    checks: list[ExpressionCheck] = []
    """Run read-only before start; plans persisted before they existed have none."""
    down_filled: dict[str, list[str]] = {}
    """Per table, the nullable columns the migration drops that the sync trigger fills through
    their ``down`` for writes through the new version, which no longer has them. Rollback keeps
    them, so it checks that trigger first (a NOT NULL one refuses such writes instead of losing
    them; one with a default gets it, and the trigger fills only a NULL, so it loses nothing).
    Plans persisted before it existed have none."""
    start: list[Step]
    complete: list[Step]
    rollback: list[Step]

    def steps(self, phase: Phase) -> list[Step]:
        return {"start": self.start, "complete": self.complete, "rollback": self.rollback}[phase]


def pg_name(text: str) -> str:
    """``text`` as a PostgreSQL name that stays unique when it is too long to fit.

    PostgreSQL cuts names to 63 bytes (a NOTICE, no error), so two long derived names, such as
    ``_fy_new_`` plus two column names that differ only at the end, would become one, and a name
    the plan compares in Python would no longer match the catalog's. A name that does not fit
    keeps its head and ends in a hash of the whole (cut on a UTF-8 boundary).
    """
    raw = text.encode()
    if len(raw) <= _MAX_NAME_BYTES:
        return text
    digest = hashlib.sha256(raw).hexdigest()[:10]
    return raw[: _MAX_NAME_BYTES - len(digest) - 1].decode(errors="ignore") + "_" + digest


def sync_trigger_name(migration: str) -> str:
    """The name of the sync trigger ``migration`` puts on each table it keeps in sync."""
    return pg_name(f"_fy_sync_{migration}")


def version_schema_name(schema: str, migration: str) -> str:
    return pg_name(f"{schema}_{migration}")


def _identity_options(name: sql.Identifier, options: SequenceOptions) -> sql.Composed:
    """``SEQUENCE NAME … START WITH … INCREMENT BY … MINVALUE|NO MINVALUE … CACHE … [NO] CYCLE``."""

    def bound(keyword: str, value: int | None) -> sql.Composable:
        if value is None:
            return sql.SQL("NO ") + sql.SQL(keyword)
        return sql.SQL(keyword) + sql.SQL(" ") + sql.Literal(value)

    return sql.SQL("SEQUENCE NAME {} START WITH {} INCREMENT BY {} {} {} CACHE {} {}").format(
        name,
        sql.Literal(options.start),
        sql.Literal(options.increment),
        bound("MINVALUE", options.min),
        bound("MAXVALUE", options.max),
        sql.Literal(options.cache),
        sql.SQL("CYCLE" if options.cycle else "NO CYCLE"),
    )


def _render(statement: sql.Composable) -> str:
    return statement.as_string(None)


def _shadow(column: str) -> str:
    return pg_name(f"{SHADOW_PREFIX}{column}")


def _temp_name(name: str) -> str:
    """The expand-phase name of an index or constraint rebuilt on a shadow column."""
    return pg_name(f"_fy_{name}")


def _fragment(text: str) -> sql.Composable:
    """A user-supplied SQL fragment (type, default, expression), parenthesised where it is an expression."""
    return sql.SQL(text)


def _expr(text: str) -> sql.Composable:
    return sql.SQL("({})").format(_fragment(text))


INTEGER_TYPES = {"smallint", "int2", "integer", "int", "int4", "bigint", "int8"}


def _neighbour(tokens: list[Token], i: int, step: int) -> Token | None:
    """The nearest token before (``step`` -1) or after (+1) ``tokens[i]`` that is not space or a comment."""
    i += step
    while 0 <= i < len(tokens) and tokens[i].kind in ("space", "comment"):
        i += step
    return tokens[i] if 0 <= i < len(tokens) else None


def _is_column_reference(tokens: list[Token], i: int) -> bool:
    """Not a qualified name's tail (``t.c``), a qualifier (``c.x``), a type (``::c``, ``AS c``) or a call (``c(``)."""
    before, after = _neighbour(tokens, i, -1), _neighbour(tokens, i, 1)
    if before is not None and (before.text in (".", "::") or before.name == "as" and before.kind == "word"):
        return False
    return after is None or after.text not in (".", "(")


def rename_identifier(expression: str, old: str, new: str) -> str:
    """Rewrite references to column ``old`` as ``new`` in an SQL expression, token by token.

    String literals (also ``E'...'`` and dollar-quoted), comments, other quoted identifiers,
    qualified names, casts and function calls are left alone; an unquoted name matches after
    folding to lower case, a quoted one exactly, as PostgreSQL resolves them.
    """
    tokens = tokenize(expression)
    quoted = _render(sql.Identifier(new))
    return "".join(
        quoted if t.name == old and _is_column_reference(tokens, i) else t.text for i, t in enumerate(tokens)
    )


def _split_at(definition: str, keyword: str) -> tuple[str, str]:
    """A catalog definition cut before its first ``keyword`` token (REFERENCES, USING), outside names and literals."""
    tokens = tokenize(definition)
    cut = next(i for i, t in enumerate(tokens) if t.kind == "word" and t.name == keyword)
    return "".join(t.text for t in tokens[:cut]), "".join(t.text for t in tokens[cut:])


@dataclass
class _Sync:
    """One trigger action: ``target := expression`` for old-version writes or new-version writes."""

    target: str
    expression: str
    new_version: bool
    only_when_null: bool
    source: str | None = None
    """The migration field the expression comes from; None when flowyard generated it."""
    after_raw_sql: bool = False


@dataclass
class _TableWork:
    """Everything a migration does to one physical table."""

    info: TableInfo
    view_name: str
    view_columns: dict[str, str]
    """New-version column name → physical column."""
    added_types: dict[str, str] = field(default_factory=dict)
    """Type of each physical column start adds (new and shadow columns)."""
    shadows: dict[str, str] = field(default_factory=dict)
    syncs: list[_Sync] = field(default_factory=list)
    before_swap: list[str] = field(default_factory=list)
    """Keep what the old column's drop would take along: other tables' FKs to it, its sequence."""
    swap_statements: list[sql.Composable] = field(default_factory=list)
    not_null_statements: list[sql.Composable] = field(default_factory=list)
    attach_statements: list[str] = field(default_factory=list)
    """Give rebuilt keys, indexes, constraints and sequences their final names and types."""
    cleanup_statements: list[sql.Composable] = field(default_factory=list)
    dropped: bool = False


class _Planner:
    def __init__(self, spec: MigrationSpec, snap: SchemaSnapshot, previous_schema: str | None) -> None:
        self.spec = spec
        self.snap = snap
        self.schema = snap.schema
        self.vschema = version_schema_name(snap.schema, spec.name)
        self.previous = previous_schema
        self.tables: dict[str, _TableWork] = {
            name: _TableWork(info, name, {c.name: c.name for c in info.columns})
            for name, info in snap.tables.items()
        }
        self.checks: list[ExpressionCheck] = []
        self.down_filled: dict[str, list[str]] = {}
        self.raw_sql_seen = False
        self.structural: list[Step] = []
        self.not_valid: list[Step] = []
        self.indexes: list[Step] = []
        self.validate: list[Step] = []
        self.after_indexes: list[Step] = []
        """NOT VALID foreign keys that need a unique index built in this start (other tables' FKs to a shadow key)."""
        self.rollback_first: list[Step] = []
        self.complete_early: list[Step] = []
        self.complete_late: list[Step] = []
        self.rollback_ops: list[Step] = []
        self.rollback_indexes: list[Step] = []
        self.table_renames: list[Step] = []

    # -- helpers -----------------------------------------------------------------------------
    def sync(
        self, target: str, expression: str, new_version: bool, only_when_null: bool, source: str | None
    ) -> _Sync:
        """A trigger action of the operation being planned (after a raw_sql one or not)."""
        return _Sync(target, expression, new_version, only_when_null, source, self.raw_sql_seen)

    def tbl(self, table: str) -> sql.Composable:
        return sql.Identifier(self.schema, table)

    def type_checks(self, where: str, type_: str, default: str | None) -> None:
        """Check a column type and its default, named ``<where>type'`` and ``<where>default'``."""
        checks = {"type": sql.SQL("NULL")} | ({"default": _expr(default)} if default is not None else {})
        self.checks += [
            ExpressionCheck(
                where=f"{where}{name}'",
                query=_render(
                    sql.SQL("SELECT CAST({} AS {}) WHERE false").format(value, _fragment(type_))
                ),
                after_raw_sql=self.raw_sql_seen,
            )
            for name, value in checks.items()
        ]

    def deferred_checks_step(self, checks: list[ExpressionCheck]) -> list[Step]:
        """The checks that name what a raw_sql operation may create, run again in start after
        the raw_sql and before any trigger: a read-only step, its failure one line like any step's."""
        deferred = [c.query for c in checks if c.after_raw_sql]
        if not deferred:
            return []
        search_path = _render(sql.SQL("SET LOCAL search_path = {}").format(sql.Identifier(self.schema)))
        return [Step(title="check the expressions that follow raw_sql operations", statements=[search_path, *deferred])]

    def expression_checks(self, work: _TableWork) -> list[ExpressionCheck]:
        """Each user ``up`` over the old version's columns, each ``down`` over the new version's.

        These are the names the trigger's two halves declare; a column start has yet to add
        stands in as a typed NULL.
        """
        old = self.tbl(work.info.name)
        new = sql.SQL("(SELECT {} FROM {}) AS _fy_new_version").format(
            sql.SQL(", ").join(
                sql.SQL("{} AS {}").format(
                    sql.SQL("CAST(NULL AS {})").format(_fragment(work.added_types[phys]))
                    if phys in work.added_types
                    else sql.Identifier(phys),
                    sql.Identifier(name),
                )
                for name, phys in work.view_columns.items()
            ),
            old,
        )
        return [
            ExpressionCheck(
                where=s.source,
                query=_render(
                    sql.SQL("SELECT {} FROM {} WHERE false").format(
                        _expr(s.expression), new if s.new_version else old
                    )
                ),
                after_raw_sql=s.after_raw_sql,
            )
            for s in work.syncs
            if s.source is not None
        ]

    def work(self, index: int, kind: str, table: str) -> _TableWork:
        work = self.tables.get(table)
        if work is None or work.dropped:
            raise UserError(f"operation {index} ({kind}): table {self.schema}.{table} does not exist")
        return work

    def column(self, index: int, kind: str, work: _TableWork, column: str) -> None:
        if work.info.column(column) is None and column not in work.view_columns.values():
            raise UserError(f"operation {index} ({kind}): column {work.info.name}.{column} does not exist")

    def physical(self, work: _TableWork, column: str) -> str:
        return work.shadows.get(column, column)

    def exists_query(self, query: str, *params: str) -> str:
        return _render(sql.SQL(query).format(*[sql.Literal(p) for p in params]))

    def column_exists(self, table: str, column: str) -> str:
        return self.exists_query(
            "SELECT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass({}) AND attname = {} "
            "AND attnum > 0 AND NOT attisdropped)",
            _render(self.tbl(table)),
            column,
        )

    def constraint_missing(self, table: str, name: str) -> str:
        return self.exists_query(
            "SELECT NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conrelid = to_regclass({}) AND conname = {})",
            _render(self.tbl(table)),
            name,
        )

    def alter(self, table: str, *actions: sql.Composable) -> str:
        return _render(sql.SQL("ALTER TABLE {} {}").format(self.tbl(table), sql.SQL(", ").join(actions)))

    def refuse_key_before_18(self, where: str, table: str, name: str) -> None:
        """PostgreSQL 14-17 refuse a foreign key ``NOT VALID`` on a partitioned table (18 takes it),
        and one added valid would hold both tables' locks while it checks every row: such a key is
        refused before anything runs, not at start's NOT VALID step after the schema was changed."""
        info = self.snap.tables.get(table)
        if self.snap.server_version < 180000 and info is not None and info.partitioned:
            raise UserError(
                f"{where}: foreign key {name} on partitioned table {self.schema}.{table} cannot be added "
                f"NOT VALID before PostgreSQL 18 (this server runs PostgreSQL {self.snap.server_version // 10000}); add it to "
                "each partition by hand instead, or upgrade the server"
            )

    def add_not_valid(
        self,
        table: str,
        name: str,
        definition: sql.Composable,
        *,
        validate: bool = True,
        after_indexes: bool = False,
    ) -> None:
        (self.after_indexes if after_indexes else self.not_valid).append(
            Step(
                title=f"add constraint {name} NOT VALID on {table}",
                statements=[
                    self.alter(
                        table,
                        sql.SQL("ADD CONSTRAINT {} {} NOT VALID").format(sql.Identifier(name), definition),
                    )
                ],
                only_if=self.constraint_missing(table, name),
            )
        )
        if not validate:
            return
        self.validate.append(
            Step(
                title=f"validate constraint {name} on {table}",
                statements=[
                    self.alter(table, sql.SQL("VALIDATE CONSTRAINT {}").format(sql.Identifier(name)))
                ],
                long_running=True,
            )
        )

    def concurrent_index(self, name: str, definition: sql.Composable) -> None:
        self.indexes.append(
            Step(
                title=f"build index {name} concurrently",
                kind="concurrent",
                index=name,
                statements=[_render(definition)],
                long_running=True,
            )
        )
        self.rollback_indexes.append(self.drop_index_step(name))

    def drop_index_step(self, name: str) -> Step:
        return Step(
            title=f"drop index {name}",
            kind="concurrent",
            statements=[
                _render(
                    sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(sql.Identifier(self.schema, name))
                )
            ],
        )

    def constraints(
        self, where: str, table: str, column: str, physical: str, col: Column | AlterColumn
    ) -> None:
        """CHECK / FOREIGN KEY NOT VALID + VALIDATE, UNIQUE via a concurrent index attached at complete."""
        if col.check is not None:
            expression = rename_identifier(col.check.constraint, column, physical)
            self.add_not_valid(
                table,
                col.check.name or f"{table}_{column}_check",
                sql.SQL("CHECK {}").format(_expr(expression)),
            )
        if col.references is not None:
            ref = col.references
            if ref.table not in self.snap.tables and not any(
                w.info.name == ref.table for w in self.tables.values()
            ):
                raise UserError(f"references: table {self.schema}.{ref.table} does not exist")
            name = ref.name or f"{table}_{column}_fkey"
            self.refuse_key_before_18(where, table, name)
            self.add_not_valid(
                table,
                name,
                sql.SQL("FOREIGN KEY ({}) REFERENCES {} ({}) ON DELETE {}").format(
                    sql.Identifier(physical),
                    self.tbl(ref.table),
                    sql.Identifier(ref.column),
                    sql.SQL(ref.on_delete),
                ),
            )
        if col.unique is not None:
            name = col.unique.name or f"{table}_{column}_key"
            self.concurrent_index(
                name,
                sql.SQL("CREATE UNIQUE INDEX CONCURRENTLY {} ON {} ({})").format(
                    sql.Identifier(name), self.tbl(table), sql.Identifier(physical)
                ),
            )
            self.complete_early.append(
                Step(
                    title=f"attach unique constraint {name} on {table}",
                    statements=[
                        self.alter(
                            table,
                            sql.SQL("ADD CONSTRAINT {} UNIQUE USING INDEX {}").format(
                                sql.Identifier(name), sql.Identifier(name)
                            ),
                        )
                    ],
                    only_if=self.constraint_missing(table, name),
                )
            )

    def not_null_check(self, work: _TableWork, column: str, physical: str) -> None:
        """NOT NULL without a long lock: CHECK NOT VALID, VALIDATE, then SET NOT NULL at complete."""
        table = work.info.name
        name = pg_name(f"_fy_nn_{column}")
        self.add_not_valid(table, name, sql.SQL("CHECK ({} IS NOT NULL)").format(sql.Identifier(physical)))
        work.not_null_statements.append(
            sql.SQL("ALTER COLUMN {} SET NOT NULL").format(sql.Identifier(column))
        )
        work.cleanup_statements.append(sql.SQL("DROP CONSTRAINT IF EXISTS {}").format(sql.Identifier(name)))

    def refuse_outside_uses(self, where: str, info: TableInfo, column: str | None) -> None:
        """Complete drops the old column (or the table), which a user's view or another schema's
        foreign key would block halfway through the contract; say so before anything runs.
        flowyard's own version views are rebuilt, so they do not count."""
        ours = {self.vschema, self.previous}
        if uses := [u.description for u in info.uses_of(column) if u.schema not in ours]:
            them = "it" if len(uses) == 1 else "them"
            raise UserError(
                f"{where} is used by {', '.join(uses)}, which complete would have to drop: "
                f"drop {them} first and recreate {them} after the migration completes"
            )

    def rebuild_dependents(
        self, i: int, work: _TableWork, column: str, shadow: str, new_type: str | None
    ) -> None:
        """Give the shadow column everything the old column has, since the swap's DROP COLUMN takes it along.

        Indexes are built CONCURRENTLY on the shadow (unique ones attached as PRIMARY KEY/UNIQUE USING
        INDEX at complete), CHECK and FOREIGN KEY constraints are added NOT VALID and VALIDATEd, other
        tables' foreign keys to the column get a twin against the shadow's unique index; each carries
        a ``_fy_`` name during expand and takes the original name back at complete. An owned sequence
        is handed to the shadow before the drop and widened with the type.
        """
        info, table = work.info, work.info.name
        where = f"operation {i} (alter_column): {table}.{column}"
        old = info.column(column)
        assert old is not None
        self.refuse_outside_uses(where, info, column)
        for fk in info.referenced_by:
            if fk.table == table and column in fk.columns + fk.ref_columns:
                raise UserError(
                    f"{where}: self-referencing foreign key {fk.name} is not supported; drop it first and add it after"
                )
        for index in (x for x in info.indexes if column in x.columns):
            self.rebuild_index(where, work, index, column, shadow)
        for constraint in (c for c in info.constraints if column in c.columns):
            if constraint.type == "f":  # rename the referencing side only
                self.refuse_key_before_18(where, table, constraint.name)
                head, tail = _split_at(constraint.definition, "references")
                definition = rename_identifier(head, column, shadow) + tail
            else:
                definition = rename_identifier(constraint.definition, column, shadow)
            temp = _temp_name(constraint.name)
            self.add_not_valid(table, temp, _fragment(definition), validate=constraint.validated)
            work.attach_statements.append(self.rename_constraint(table, temp, constraint.name))
        for fk in (c for c in info.referenced_by if column in c.ref_columns):
            self.rebuild_incoming_fk(where, work, fk, column, shadow)
        if old.sequence is not None and old.identity:
            self.move_identity(work, old, shadow)
        elif old.sequence is not None:
            sequence = sql.Identifier(*old.sequence)
            work.before_swap.append(
                _render(
                    sql.SQL("ALTER SEQUENCE {} OWNED BY {}.{}").format(
                        sequence, self.tbl(table), sql.Identifier(shadow)
                    )
                )
            )
            if new_type is not None and " ".join(new_type.lower().split()) in INTEGER_TYPES:
                work.attach_statements.append(
                    _render(sql.SQL("ALTER SEQUENCE {} AS {}").format(sequence, _fragment(new_type)))
                )

    def move_identity(self, work: _TableWork, old: ColumnInfo, shadow: str) -> None:
        """An identity sequence cannot change columns: give the shadow its own, continuing where the old one is.

        Before the old column (and its sequence) is dropped, the shadow becomes NOT NULL (proven by
        its validated CHECK), trades the ``nextval`` default it had during expand for an identity of
        the same kind and options (start, increment, user-set bounds, cache, cycle), and its sequence
        is set to the old one's position; after the swap the new sequence takes the old name.
        """
        table, column = work.info.name, sql.Identifier(shadow)
        assert old.sequence is not None and old.sequence_options is not None
        seq_schema, seq_name = old.sequence
        temp = sql.Identifier(seq_schema, _temp_name(seq_name))
        work.before_swap += [
            self.alter(table, sql.SQL("ALTER COLUMN {} SET NOT NULL").format(column)),
            self.alter(table, sql.SQL("ALTER COLUMN {} DROP DEFAULT").format(column)),
            self.alter(
                table,
                sql.SQL("ALTER COLUMN {} ADD GENERATED {} AS IDENTITY ({})").format(
                    column,
                    sql.SQL("ALWAYS" if old.identity == "a" else "BY DEFAULT"),
                    _identity_options(temp, old.sequence_options),
                ),
            ),
            _render(
                sql.SQL("SELECT setval({}::regclass, s.last_value, s.is_called) FROM {} s").format(
                    sql.Literal(_render(temp)), sql.Identifier(*old.sequence)
                )
            ),
        ]
        work.attach_statements.append(
            _render(sql.SQL("ALTER SEQUENCE {} RENAME TO {}").format(temp, sql.Identifier(seq_name)))
        )

    def rebuild_index(self, where: str, work: _TableWork, index: IndexInfo, column: str, shadow: str) -> None:
        """The same index on the shadow, built CONCURRENTLY; at complete it takes the original name (or constraint)."""
        if work.info.partitioned:
            raise UserError(
                f"{where} is indexed ({index.name}) on a partitioned table, where indexes cannot be built "
                "CONCURRENTLY; alter it per partition or drop the index first"
            )
        if index.constraint_type == "x" or index.deferrable:
            raise UserError(
                f"{where} is part of exclusion or deferrable constraint {index.constraint}; drop it first and recreate it after"
            )
        if others := [c for c in index.columns if c != column and c in work.shadows]:
            raise UserError(
                f"{where}: index {index.name} also covers {', '.join(others)}, altered by an earlier operation; "
                "alter them in separate migrations"
            )
        temp = _temp_name(index.name)
        unique = index.definition.startswith("CREATE UNIQUE")
        tail = rename_identifier(_split_at(index.definition, "using")[1], column, shadow)
        self.concurrent_index(
            temp,
            sql.SQL("CREATE {}INDEX CONCURRENTLY {} ON {} {}").format(
                sql.SQL("UNIQUE " if unique else ""),
                sql.Identifier(temp),
                self.tbl(work.info.name),
                _fragment(tail),
            ),
        )
        if index.constraint_type is None:
            work.attach_statements.append(
                _render(
                    sql.SQL("ALTER INDEX {} RENAME TO {}").format(
                        sql.Identifier(self.schema, temp), sql.Identifier(index.name)
                    )
                )
            )
            return
        work.attach_statements.append(
            self.alter(
                work.info.name,
                sql.SQL("ADD CONSTRAINT {} {} USING INDEX {}").format(
                    sql.Identifier(index.constraint or index.name),
                    sql.SQL("PRIMARY KEY" if index.constraint_type == "p" else "UNIQUE"),
                    sql.Identifier(temp),
                ),
            )
        )

    def rebuild_incoming_fk(
        self, where: str, work: _TableWork, fk: ConstraintInfo, column: str, shadow: str
    ) -> None:
        """Another table's FK to the column: a twin against the shadow's unique index, NOT VALID then VALIDATE.

        At complete the old FK is dropped before the column (DROP COLUMN would refuse) and the twin
        takes its name, all in the table's one short contract transaction.
        """
        if fk.table in self.tables and self.tables[fk.table].shadows:
            raise UserError(
                f"{where}: foreign key {fk.table}.{fk.name} references it from a table this migration also alters; "
                "alter them in separate migrations"
            )
        self.refuse_key_before_18(where, fk.table, fk.name)
        temp = _temp_name(fk.name)
        head, tail = _split_at(fk.definition, "references")
        definition = head + rename_identifier(tail, column, shadow)
        self.add_not_valid(fk.table, temp, _fragment(definition), validate=fk.validated, after_indexes=True)
        drop_twin = self.alter(fk.table, sql.SQL("DROP CONSTRAINT IF EXISTS {}").format(sql.Identifier(temp)))
        self.rollback_first.append(
            Step(title=f"drop foreign key {temp} on {fk.table}", statements=[drop_twin])
        )
        work.before_swap.append(
            self.alter(fk.table, sql.SQL("DROP CONSTRAINT {}").format(sql.Identifier(fk.name)))
        )
        work.attach_statements.append(self.rename_constraint(fk.table, temp, fk.name))

    def rename_constraint(self, table: str, old: str, new: str) -> str:
        return self.alter(
            table, sql.SQL("RENAME CONSTRAINT {} TO {}").format(sql.Identifier(old), sql.Identifier(new))
        )

    # -- operations ----------------------------------------------------------------------------
    def add_column(self, i: int, op: AddColumn) -> None:
        work = self.work(i, "add_column", op.table)
        c = op.column
        if work.info.column(c.name) is not None or c.name in work.view_columns:
            raise UserError(
                f"operation {i} (add_column): field 'column.name': {op.table}.{c.name} already exists"
            )
        table, col = op.table, sql.Identifier(c.name)
        fill = op.up or (c.default if c.default and is_volatile_expression(c.default) else None)
        actions = [sql.SQL("ADD COLUMN IF NOT EXISTS {} {}").format(col, _fragment(c.type))]
        if c.default is not None and fill is None:
            actions[0] = sql.SQL("{} DEFAULT {}").format(actions[0], _expr(c.default))
            if not c.nullable:
                actions[0] = sql.SQL("{} NOT NULL").format(actions[0])
        elif c.default is not None:
            actions.append(sql.SQL("ALTER COLUMN {} SET DEFAULT {}").format(col, _expr(c.default)))
        self.structural.append(
            Step(title=f"add column {table}.{c.name}", statements=[self.alter(table, *actions)])
        )
        self.rollback_ops.append(
            Step(
                title=f"drop added column {table}.{c.name}",
                statements=[self.alter(table, sql.SQL("DROP COLUMN IF EXISTS {}").format(col))],
            )
        )
        work.view_columns[c.name] = c.name
        work.added_types[c.name] = c.type
        self.type_checks(f"operation {i} (add_column): field 'column.", c.type, c.default)
        if fill is not None:
            field_name = "up" if op.up else "column.default"
            work.syncs.append(
                self.sync(c.name, fill, False, True, f"operation {i} (add_column): field '{field_name}'")
            )
            if not c.nullable:
                self.not_null_check(work, c.name, c.name)
        self.constraints(f"operation {i} (add_column)", table, c.name, c.name, c)

    def drop_column(self, i: int, op: DropColumn) -> None:
        work = self.work(i, "drop_column", op.table)
        info = work.info.column(op.column)
        if info is None:
            raise UserError(f"operation {i} (drop_column): column {op.table}.{op.column} does not exist")
        self.refuse_outside_uses(f"operation {i} (drop_column): {op.table}.{op.column}", work.info, op.column)
        if info.not_null and info.default is None and op.down is None:
            raise UserError(
                f"operation {i} (drop_column): field 'down': {op.table}.{op.column} is NOT NULL without a default; "
                "give down so new-version inserts can fill it"
            )
        work.view_columns = {k: v for k, v in work.view_columns.items() if v != op.column}
        if op.down is not None:
            work.syncs.append(self.sync(op.column, op.down, True, True, f"operation {i} (drop_column): field 'down'"))
            if not info.not_null and info.default is None:
                self.down_filled.setdefault(work.info.name, []).append(op.column)
        self.complete_late.append(
            Step(
                title=f"drop column {op.table}.{op.column}",
                statements=[
                    self.alter(
                        op.table, sql.SQL("DROP COLUMN IF EXISTS {}").format(sql.Identifier(op.column))
                    )
                ],
            )
        )

    def rename_column(self, i: int, op: RenameColumn) -> None:
        work = self.work(i, "rename_column", op.table)
        self.column(i, "rename_column", work, op.from_)
        if op.to in work.view_columns:
            raise UserError(f"operation {i} (rename_column): field 'to': {op.table}.{op.to} already exists")
        work.view_columns = {(op.to if k == op.from_ else k): v for k, v in work.view_columns.items()}
        self.complete_late.append(
            Step(
                title=f"rename column {op.table}.{op.from_} to {op.to}",
                statements=[
                    self.alter(
                        op.table,
                        sql.SQL("RENAME COLUMN {} TO {}").format(
                            sql.Identifier(op.from_), sql.Identifier(op.to)
                        ),
                    )
                ],
                only_if=self.column_exists(op.table, op.from_),
            )
        )

    def alter_column(self, i: int, op: AlterColumn) -> None:
        work = self.work(i, "alter_column", op.table)
        info = work.info.column(op.column)
        if info is None:
            raise UserError(f"operation {i} (alter_column): column {op.table}.{op.column} does not exist")
        table, col = op.table, sql.Identifier(op.column)
        if not op.needs_shadow:
            self.type_checks(f"operation {i} (alter_column): field '", info.type, op.default)
            actions = []
            if op.default is not None:
                actions.append(sql.SQL("ALTER COLUMN {} SET DEFAULT {}").format(col, _expr(op.default)))
            if op.nullable:
                actions.append(sql.SQL("ALTER COLUMN {} DROP NOT NULL").format(col))
            self.complete_late.append(
                Step(title=f"alter column {table}.{op.column}", statements=[self.alter(table, *actions)])
            )
            return
        if op.column in work.shadows:
            raise UserError(
                f"operation {i} (alter_column): column {table}.{op.column} is already altered by an earlier operation"
            )
        shadow = _shadow(op.column)
        work.shadows[op.column] = shadow
        new_type = op.type or info.type
        default = op.default if op.default is not None else (info.default if op.type is None else None)
        if default is None and info.sequence is not None:  # a serial column keeps numbering from its sequence
            default = _render(
                sql.SQL("nextval({}::regclass)").format(sql.Literal(_render(sql.Identifier(*info.sequence))))
            )
        actions = [
            sql.SQL("ADD COLUMN IF NOT EXISTS {} {}").format(sql.Identifier(shadow), _fragment(new_type))
        ]
        if default is not None:
            actions.append(
                sql.SQL("ALTER COLUMN {} SET DEFAULT {}").format(sql.Identifier(shadow), _expr(default))
            )
        self.structural.append(
            Step(
                title=f"add shadow column {table}.{shadow} ({new_type})",
                statements=[self.alter(table, *actions)],
            )
        )
        self.rollback_ops.append(
            Step(
                title=f"drop shadow column {table}.{shadow}",
                statements=[
                    self.alter(table, sql.SQL("DROP COLUMN IF EXISTS {}").format(sql.Identifier(shadow)))
                ],
            )
        )
        work.view_columns = {k: (shadow if v == op.column else v) for k, v in work.view_columns.items()}
        work.added_types[shadow] = new_type
        where = f"operation {i} (alter_column): field '"
        self.type_checks(where, new_type, op.default)
        logical = next(k for k, v in work.view_columns.items() if v == shadow)
        work.syncs += [
            self.sync(shadow, op.up or op.column, False, False, f"{where}up'" if op.up else None),
            self.sync(op.column, op.down or logical, True, False, f"{where}down'" if op.down else None),
        ]
        work.swap_statements += [
            sql.SQL("DROP COLUMN {}").format(col),
            sql.SQL("RENAME COLUMN {} TO {}").format(sql.Identifier(shadow), col),
        ]
        if op.nullable is False or (op.nullable is None and info.not_null):
            self.not_null_check(work, op.column, shadow)
        self.rebuild_dependents(i, work, op.column, shadow, op.type)
        self.constraints(f"operation {i} (alter_column)", table, op.column, shadow, op)

    def create_index(self, i: int, op: CreateIndex) -> None:
        work = self.work(i, "create_index", op.table)
        if op.name in self.snap.indexes:
            raise UserError(
                f"operation {i} (create_index): field 'name': index {self.schema}.{op.name} already exists"
            )
        for column in op.columns:
            self.column(i, "create_index", work, column)
        self.concurrent_index(
            op.name,
            sql.SQL("CREATE {}INDEX CONCURRENTLY {} ON {} USING {} ({})").format(
                sql.SQL("UNIQUE " if op.unique else ""),
                sql.Identifier(op.name),
                self.tbl(op.table),
                sql.SQL(op.method),
                sql.SQL(", ").join(sql.Identifier(self.physical(work, c)) for c in op.columns),
            ),
        )

    def drop_index(self, i: int, op: DropIndex) -> None:
        if op.name not in self.snap.indexes:
            raise UserError(
                f"operation {i} (drop_index): field 'name': index {self.schema}.{op.name} does not exist"
            )
        self.complete_late.append(self.drop_index_step(op.name))

    def create_table(self, i: int, op: CreateTable) -> None:
        if op.name in self.tables:
            raise UserError(
                f"operation {i} (create_table): field 'name': table {self.schema}.{op.name} already exists"
            )
        for n, c in enumerate(op.columns):
            self.type_checks(f"operation {i} (create_table): field 'columns.{n}.", c.type, c.default)
        defs = [self.column_definition(c) for c in op.columns]
        keys = [sql.Identifier(c.name) for c in op.columns if c.primary_key]
        if keys:
            defs.append(sql.SQL("PRIMARY KEY ({})").format(sql.SQL(", ").join(keys)))
        self.structural.append(
            Step(
                title=f"create table {op.name}",
                statements=[
                    _render(
                        sql.SQL("CREATE TABLE IF NOT EXISTS {} ({})").format(
                            self.tbl(op.name), sql.SQL(", ").join(defs)
                        )
                    )
                ],
            )
        )
        self.rollback_ops.append(
            Step(
                title=f"drop created table {op.name}",
                statements=[_render(sql.SQL("DROP TABLE IF EXISTS {}").format(self.tbl(op.name)))],
            )
        )
        info = TableInfo(op.name)
        self.tables[op.name] = _TableWork(info, op.name, {c.name: c.name for c in op.columns})

    def column_definition(self, c: Column) -> sql.Composable:
        parts = [sql.Identifier(c.name), _fragment(c.type)]
        if c.default is not None:
            parts.append(sql.SQL("DEFAULT {}").format(_expr(c.default)))
        if not c.nullable:
            parts.append(sql.SQL("NOT NULL"))
        if c.unique is not None:
            parts.append(sql.SQL("UNIQUE"))
        if c.check is not None:
            parts.append(sql.SQL("CHECK {}").format(_expr(c.check.constraint)))
        if c.references is not None:
            parts.append(
                sql.SQL("REFERENCES {} ({}) ON DELETE {}").format(
                    self.tbl(c.references.table),
                    sql.Identifier(c.references.column),
                    sql.SQL(c.references.on_delete),
                )
            )
        return sql.SQL(" ").join(parts)

    def drop_table(self, i: int, op: DropTable) -> None:
        work = self.work(i, "drop_table", op.name)
        self.refuse_outside_uses(f"operation {i} (drop_table): {op.name}", work.info, None)
        work.dropped = True
        self.complete_late.append(
            Step(
                title=f"drop table {op.name}",
                statements=[_render(sql.SQL("DROP TABLE IF EXISTS {}").format(self.tbl(op.name)))],
            )
        )

    def rename_table(self, i: int, op: RenameTable) -> None:
        work = self.work(i, "rename_table", op.from_)
        if any(w.view_name == op.to and not w.dropped for w in self.tables.values()):
            raise UserError(
                f"operation {i} (rename_table): field 'to': table {self.schema}.{op.to} already exists"
            )
        work.view_name = op.to
        self.table_renames.append(
            Step(
                title=f"rename table {op.from_} to {op.to}",
                statements=[self.alter(op.from_, sql.SQL("RENAME TO {}").format(sql.Identifier(op.to)))],
                only_if=self.exists_query("SELECT to_regclass({}) IS NOT NULL", _render(self.tbl(op.from_))),
            )
        )

    def raw_sql(self, i: int, op: RawSql) -> None:
        self.raw_sql_seen = True
        self.structural.append(
            Step(title=f"raw_sql operation {i}", statements=[op.up], raw_sql_index=i, unsafe=op.unsafe)
        )
        if op.down is not None:
            self.rollback_ops.append(
                Step(
                    title=f"raw_sql operation {i} (down)",
                    statements=[op.down],
                    raw_sql_index=i,
                    unsafe=op.unsafe,
                )
            )

    # -- whole-table steps -------------------------------------------------------------------------
    def sync_functions(self, table: str) -> dict[str, sql.Composable]:
        """The trigger function and its two halves (old-version writes, new-version writes) of ``table``."""
        return {
            kind: sql.Identifier(self.vschema, pg_name(f"_fy_{kind}_{table}")) for kind in ("sync", "up", "down")
        }

    def trigger_step(self, work: _TableWork) -> Step:
        """One BEFORE INSERT OR UPDATE trigger per table; the session's search_path says which version writes.

        The trigger itself only decides the direction (it must see the caller's search_path); the
        ``up``/``down`` expressions run in two helper functions pinned to the table's schema, so user
        types and functions resolve whatever search_path the writing application uses.
        """
        table = work.info.name
        functions = self.sync_functions(table)
        row = sql.Identifier("_fy_row")

        def half(name: sql.Composable, names: dict[str, str], new_version: bool) -> str:
            declare = sql.SQL(" ").join(
                sql.SQL("{} {}.{}.{}%TYPE := {}.{};").format(
                    sql.Identifier(var),
                    sql.Identifier(self.schema),
                    sql.Identifier(table),
                    sql.Identifier(phys),
                    row,
                    sql.Identifier(phys),
                )
                for var, phys in names.items()
            )
            parts = []
            for s in (s for s in work.syncs if s.new_version == new_version):
                assign = sql.SQL("{}.{} := {};").format(row, sql.Identifier(s.target), _expr(s.expression))
                if s.only_when_null:
                    assign = sql.SQL("IF {}.{} IS NULL THEN {} END IF;").format(
                        row, sql.Identifier(s.target), assign
                    )
                parts.append(assign)
            body = sql.SQL("DECLARE {} BEGIN {} RETURN {}; END").format(
                declare, sql.SQL(" ").join(parts), row
            )
            return _render(
                sql.SQL(
                    "CREATE OR REPLACE FUNCTION {}({} {}) RETURNS {} LANGUAGE plpgsql SET search_path = {} AS {}"
                ).format(
                    name,
                    row,
                    self.tbl(table),
                    self.tbl(table),
                    sql.Identifier(self.schema),
                    sql.Literal(_render(body)),
                )
            )

        dispatch = sql.SQL(
            "BEGIN IF coalesce((current_schemas(false))[1] = {}, false) THEN NEW := {}(NEW); "
            "ELSE NEW := {}(NEW); END IF; RETURN NEW; END"
        ).format(sql.Literal(self.vschema), functions["down"], functions["up"])
        trigger = sql.Identifier(sync_trigger_name(self.spec.name))
        return Step(
            title=f"sync trigger on {table}",
            statements=[
                half(functions["up"], {c.name: c.name for c in work.info.columns}, new_version=False),
                half(functions["down"], work.view_columns, new_version=True),
                _render(
                    sql.SQL("CREATE OR REPLACE FUNCTION {}() RETURNS trigger LANGUAGE plpgsql AS {}").format(
                        functions["sync"], sql.Literal(_render(dispatch))
                    )
                ),
                _render(
                    sql.SQL(
                        "CREATE OR REPLACE TRIGGER {} BEFORE INSERT OR UPDATE ON {} FOR EACH ROW "
                        "WHEN (current_setting('flowyard.backfill', true) IS DISTINCT FROM 'on') EXECUTE FUNCTION {}()"
                    ).format(trigger, self.tbl(table), functions["sync"])
                ),
            ],
        )

    def contract_table(self, work: _TableWork) -> Step | None:
        """Drop the trigger and swap shadow columns in one short transaction per table."""
        table = work.info.name
        statements = []
        if work.syncs:
            trigger = sql.Identifier(sync_trigger_name(self.spec.name))
            statements.append(
                _render(sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(trigger, self.tbl(table)))
            )
        statements += work.before_swap
        statements += [self.alter(table, action) for action in work.swap_statements]
        # One statement each: in a single ALTER TABLE, DROP CONSTRAINT would run before SET NOT NULL's
        # check and the validated CHECK could no longer spare it a full scan under ACCESS EXCLUSIVE;
        # a primary key attached USING INDEX needs the column NOT NULL already.
        statements += [self.alter(table, action) for action in work.not_null_statements]
        statements += work.attach_statements
        statements += [self.alter(table, action) for action in work.cleanup_statements]
        if not statements:
            return None
        only_if = self.column_exists(table, next(iter(work.shadows.values()))) if work.shadows else None
        return Step(
            title=f"contract {table}: drop sync trigger, switch to final columns",
            statements=statements,
            only_if=only_if,
            contracts=table if work.syncs else None,
        )

    def backfilled(self) -> list[_TableWork]:
        """Tables whose rows start rewrites: each gets a keyset backfill at start and an ANALYZE at complete."""
        return [w for w in self.tables.values() if any(not s.new_version for s in w.syncs)]

    def analyze_step(self, work: _TableWork) -> Step:
        """Statistics for the columns complete swapped in. A backfilled shadow column is new to
        ``pg_statistic`` until an ANALYZE reaches it, so right after complete the planner guesses
        for every query on it (a key column without statistics made whole-table scans of the next
        backfill's batches); autovacuum gets there only after its next nap, later on a busy server.
        ANALYZE reads a fixed-size sample and takes SHARE UPDATE EXCLUSIVE, which writers never wait on."""
        return Step(
            title=f"analyze {work.info.name}: statistics for the swapped-in columns",
            statements=[_render(sql.SQL("ANALYZE {}").format(self.tbl(work.info.name)))],
            long_running=True,
        )

    def backfill_step(self, work: _TableWork) -> Step:
        info = work.info
        keys = info.primary_key or min(info.unique_keys, key=len, default=[])
        if not keys:
            raise UserError(
                f"table {self.schema}.{info.name} has no primary key or unique NOT NULL key for the keyset backfill; "
                "add one first (CREATE UNIQUE INDEX CONCURRENTLY, then ADD PRIMARY KEY USING INDEX)"
            )
        types = {c.name: c.type for c in info.columns}
        target = BackfillTarget(
            schema_name=self.schema,
            table=info.name,
            key_columns=keys,
            key_types=[types[k] for k in keys],
            assignments=[
                _render(
                    sql.SQL("{} = coalesce({}, {})" if s.only_when_null else "{} = {}{}").format(
                        sql.Identifier(s.target),
                        sql.Identifier(s.target) if s.only_when_null else sql.SQL(""),
                        _expr(s.expression),
                    )
                )
                for s in work.syncs
                if not s.new_version
            ],
            columns=[s.target for s in work.syncs if not s.new_version],
        )
        return Step(
            title=f"backfill {info.name} in keyset batches",
            kind="backfill",
            backfill=target,
            long_running=True,
        )

    def views_step(self) -> Step:
        statements = []
        for work in self.tables.values():
            if work.dropped:
                continue
            columns = sql.SQL(", ").join(
                sql.SQL("{} AS {}").format(sql.Identifier(phys), sql.Identifier(name))
                for name, phys in work.view_columns.items()
            )
            statements.append(
                _render(
                    sql.SQL("CREATE OR REPLACE VIEW {} AS SELECT {} FROM {}").format(
                        sql.Identifier(self.vschema, work.view_name), columns, self.tbl(work.info.name)
                    )
                )
            )
        return Step(
            title=f"create version schema {self.vschema} (views of the new version)", statements=statements
        )

    def build(self) -> Plan:
        handlers: dict[type[Operation], Callable[[int, Any], None]] = {  # each takes its own operation type
            AddColumn: self.add_column,
            DropColumn: self.drop_column,
            RenameColumn: self.rename_column,
            AlterColumn: self.alter_column,
            CreateIndex: self.create_index,
            DropIndex: self.drop_index,
            CreateTable: self.create_table,
            DropTable: self.drop_table,
            RenameTable: self.rename_table,
            RawSql: self.raw_sql,
        }
        for i, op in enumerate(self.spec.operations):
            handlers[type(op)](i, op)
        synced = [w for w in self.tables.values() if w.syncs]
        backfilled = self.backfilled()
        schema_step = Step(
            title=f"create version schema {self.vschema}",
            statements=[
                _render(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(self.vschema)))
            ],
        )
        checks = [*self.checks, *(c for w in self.tables.values() for c in self.expression_checks(w))]
        start = [
            schema_step,
            *self.structural,
            *self.deferred_checks_step(checks),
            *[self.trigger_step(w) for w in synced],
            *[self.backfill_step(w) for w in backfilled],
            *self.not_valid,
            *self.indexes,
            *self.after_indexes,
            *self.validate,
            self.views_step(),
        ]
        complete: list[Step] = []
        if self.previous:
            complete.append(
                Step(
                    title=f"drop previous version schema {self.previous}",
                    statements=[
                        _render(
                            sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(self.previous))
                        )
                    ],
                )
            )
        complete += [s for w in self.tables.values() if (s := self.contract_table(w))]
        complete += [self.analyze_step(w) for w in backfilled if not w.dropped]
        complete += self.complete_early + self.complete_late + self.table_renames
        if synced:
            complete.append(
                Step(
                    title="drop sync trigger functions",
                    statements=[
                        _render(
                            sql.SQL("DROP FUNCTION IF EXISTS {}(), {}({}), {}({})").format(
                                fns["sync"],
                                fns["up"],
                                self.tbl(w.info.name),
                                fns["down"],
                                self.tbl(w.info.name),
                            )
                        )
                        for w in synced
                        if (fns := self.sync_functions(w.info.name))
                    ],
                )
            )
        rollback = [
            Step(
                title=f"drop version schema {self.vschema} (views, sync triggers)",
                statements=[
                    _render(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(self.vschema)))
                ],
            ),
            *self.rollback_first,
            *self.rollback_indexes,
            *reversed(self.rollback_ops),
        ]
        return Plan(
            migration=self.spec.name,
            schema_name=self.schema,
            version_schema=self.vschema,
            previous_schema=self.previous,
            checks=checks,
            down_filled=self.down_filled,
            start=start,
            complete=complete,
            rollback=rollback,
        )


def build_plan(spec: MigrationSpec, snap: SchemaSnapshot, previous_schema: str | None = None) -> Plan:
    """Every statement of every phase, from the migration and a snapshot of the schema it changes."""
    if not snap.tables and not any(isinstance(op, CreateTable) for op in spec.operations):
        raise UserError(f"schema {snap.schema!r} has no tables; check the schema name (--schema)")
    return _Planner(spec, snap, previous_schema).build()


def format_plan(plan: Plan) -> str:
    """The plan as text: every statement, phase by phase (what ``flowyard online plan`` prints)."""
    lines = [
        f"-- migration {plan.migration} on schema {plan.schema_name}; new version: search_path={plan.version_schema}"
    ]
    if plan.checks:
        lines.append("\n-- ===== checks (read-only, before start runs anything) =====")
        lines.extend(f"-- {check.where}\n{check.query};" for check in plan.checks)
    for phase in PHASES:
        lines.append(f"\n-- ===== {phase} =====")
        for n, step in enumerate(plan.steps(phase), 1):
            note = {"concurrent": " (outside a transaction)", "backfill": "", "sql": " (one transaction)"}[
                step.kind
            ]
            lines.append(f"-- {phase} step {n}: {step.title}{note}")
            if step.backfill is not None:
                b = step.backfill
                lines.append(
                    f"--   keyset batches of {b.schema_name}.{b.table} ordered by ({', '.join(b.key_columns)}), each batch setting: "
                    + ", ".join(b.assignments)
                )
            lines.extend(f"{statement};" for statement in step.statements)
    return "\n".join(lines)
