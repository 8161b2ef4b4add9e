"""Seed mode (seed 004): every table upserted in ONE transaction, parents before children.

The target's tables may already hold foreign keys (a re-seed, or keys the user added): a new
child row fails unless its new parent row landed first, so the tables load in the order of the
target's own foreign keys among the seeded tables (the only keys a load can violate; the
source's are added after the load, as in any copy), otherwise in the run's order (alphabetical).
A self-reference needs no order: each table is upserted in one statement, and PostgreSQL checks
even a key that is not deferrable at the end of the statement.

Tables whose keys form a cycle have no such order. When a cycle has a ``DEFERRABLE`` key, the
seed defers the deferrable constraints to its end (``SET CONSTRAINTS ALL DEFERRED``) and orders
by the others. A cycle of keys none of which is deferrable is broken at its first table: rows
that only update, or reference rows already there, still seed; rows that need the other order
fail in one line naming the cycle and the fix (make the keys ``DEFERRABLE``). Deferred checks run
before the commit (``SET CONSTRAINTS ALL IMMEDIATE``), so a violation is a one-line error too;
with quarantine, the rows they reject are quarantined and deleted first (``_quarantine_deferred``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import psycopg
from psycopg import sql

from tasks.bulk_sources import qualified_name
from tasks.chunk_checkpoint import ChunkCheckpoint, record_quarantined
from tasks.chunk_load import ChunkJob, ChunkRejected, load_chunk_in, quarantine_rows
from tasks.db import connection
from tasks.errors import UserError
from tasks.schema_copy import key_text

Table = tuple[str, str]  # (schema, name) in the target


@dataclass(frozen=True)
class ForeignKeyEdge:
    """Target table ``child`` references ``parent`` through constraint ``name``."""

    child: Table
    parent: Table
    name: str
    deferrable: bool


@dataclass(frozen=True)
class SeedOrder:
    """The seeded tables in load order; ``defer``: whether deferrable constraints wait for the end;
    ``cycles``: for each key of a cycle none of whose keys is deferrable, (child, constraint) →
    the cycle's tables from the child round to it again."""

    tables: list[Table]
    defer: bool
    cycles: dict[tuple[Table, str], list[Table]] = field(default_factory=dict)


_FOREIGN_KEYS = """
SELECT cn.nspname, c.relname, pn.nspname, p.relname, con.conname, con.condeferrable
FROM pg_constraint con
JOIN pg_class c ON c.oid = con.conrelid JOIN pg_namespace cn ON cn.oid = c.relnamespace
JOIN pg_class p ON p.oid = con.confrelid JOIN pg_namespace pn ON pn.oid = p.relnamespace
JOIN unnest(%(schemas)s::text[], %(names)s::text[]) ct(nsp, rel) ON ct.nsp = cn.nspname AND ct.rel = c.relname
JOIN unnest(%(schemas)s::text[], %(names)s::text[]) pt(nsp, rel) ON pt.nsp = pn.nspname AND pt.rel = p.relname
WHERE con.contype = 'f' AND con.conparentid = 0 AND con.conrelid <> con.confrelid
ORDER BY 1, 2, 5
"""


def foreign_key_edges(target: psycopg.Connection, tables: Sequence[Table]) -> list[ForeignKeyEdge]:
    """The target's foreign keys from one of ``tables`` to another (self-references left out:
    see the module docstring; keys of partitions left out: their parent's stands for them)."""
    params = {"schemas": [t[0] for t in tables], "names": [t[1] for t in tables]}
    return [
        ForeignKeyEdge((cs, cn), (ps, pn), name, deferrable)
        for cs, cn, ps, pn, name, deferrable in target.execute(_FOREIGN_KEYS, params).fetchall()
    ]


def _path(edges: Sequence[ForeignKeyEdge], start: Table, goal: Table) -> list[Table] | None:
    """Tables from ``start`` to ``goal`` following references (child to parent), or None."""
    trail: dict[Table, Table | None] = {start: None}
    todo = [start]
    while todo:
        table = todo.pop()
        if table == goal:
            path = [table]
            while (previous := trail[path[-1]]) is not None:
                path.append(previous)
            return path[::-1]
        for edge in edges:
            if edge.child == table and edge.parent not in trail:
                trail[edge.parent] = table
                todo.append(edge.parent)
    return None


def seed_order(tables: Sequence[Table], edges: Sequence[ForeignKeyEdge]) -> SeedOrder:
    """Parents first (see the module docstring); among tables ready together, ``tables``' order."""
    in_cycle = [e for e in edges if _path(edges, e.parent, e.child)]
    defer = any(e.deferrable for e in in_cycle)
    binding = [e for e in edges if not (defer and e.deferrable)]
    cycles = {}
    for edge in binding:
        if back := _path(binding, edge.parent, edge.child):
            cycles[edge.child, edge.name] = [edge.child, *back]
    order: list[Table] = []
    remaining = list(tables)
    while remaining:
        ready = [t for t in remaining if all(e.parent in order for e in binding if e.child == t)]
        on_cycle = [t for t in remaining if any(child == t for child, _ in cycles)]
        table = (ready or on_cycle or remaining)[0]
        order.append(table)
        remaining.remove(table)
    return SeedOrder(order, defer, cycles)


def load_seed(
    target: psycopg.Connection, jobs: Sequence[ChunkJob], flow_run_id: str | None
) -> list[ChunkCheckpoint]:
    """Load every job in ``target``'s open transaction, parents first; the caller commits."""
    tables = list(dict.fromkeys((j.target_schema, j.target.name) for j in jobs))
    order = seed_order(tables, foreign_key_edges(target, tables))
    if order.defer:
        target.execute("SET CONSTRAINTS ALL DEFERRED")
    checkpoints = []
    for job in sorted(jobs, key=lambda j: order.tables.index((j.target_schema, j.target.name))):
        try:
            checkpoints.append(load_chunk_in(target, job, flow_run_id))
        except ChunkRejected as exc:
            table = (job.target_schema, job.target.name)
            cycle = order.cycles.get((table, exc.constraint or ""))
            if cycle is None or order.tables.index(cycle[1]) < order.tables.index(table):
                raise  # not a key the order could not satisfy: its parent table loaded first
            raise UserError(_unordered(cycle, exc)) from None
    if jobs[0].quarantine:
        return _quarantine_deferred(target, jobs, checkpoints)
    _check_deferred(target)
    return checkpoints


def _check_deferred(target: psycopg.Connection) -> None:
    """Run the deferred checks now, not in the commit, so a violation is a one-line error."""
    try:
        target.execute("SET CONSTRAINTS ALL IMMEDIATE")
    except psycopg.errors.IntegrityError as exc:
        detail = f" ({exc.diag.message_detail.rstrip('.')})" if exc.diag.message_detail else ""
        raise UserError(_violation(f"{exc.diag.message_primary}{detail}")) from None


def _violation(error: str, why: str = "") -> str:
    return f"seed rows violate the target: {error}; {why}fix the source rows and seed again (nothing was loaded)"


@dataclass(frozen=True)
class ForeignKey:
    """A foreign key of the target: ``child``'s ``columns`` reference ``parent``'s ``referenced``."""

    name: str
    child: Table
    parent: Table
    columns: tuple[str, ...]
    referenced: tuple[str, ...]
    deferrable: bool
    match_full: bool


_KEYS_TOUCHING = """
SELECT con.conname, cn.nspname, c.relname, pn.nspname, p.relname,
       ARRAY(SELECT a.attname FROM unnest(con.conkey) WITH ORDINALITY k(n, i)
             JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.n ORDER BY k.i)::text[],
       ARRAY(SELECT a.attname FROM unnest(con.confkey) WITH ORDINALITY k(n, i)
             JOIN pg_attribute a ON a.attrelid = con.confrelid AND a.attnum = k.n ORDER BY k.i)::text[],
       con.condeferrable, con.confmatchtype = 'f'
FROM pg_constraint con
JOIN pg_class c ON c.oid = con.conrelid JOIN pg_namespace cn ON cn.oid = c.relnamespace
JOIN pg_class p ON p.oid = con.confrelid JOIN pg_namespace pn ON pn.oid = p.relnamespace
WHERE con.contype = 'f' AND con.conparentid = 0
  AND EXISTS (SELECT FROM unnest(%(schemas)s::text[], %(names)s::text[]) t(nsp, rel)
              WHERE (t.nsp, t.rel) IN ((cn.nspname, c.relname), (pn.nspname, p.relname)))
ORDER BY 2, 3, 1
"""


def _keys_touching(target: psycopg.Connection, tables: Sequence[Table]) -> list[ForeignKey]:
    """Every foreign key of the target from or to one of ``tables``, self-references included."""
    params = {"schemas": [t[0] for t in tables], "names": [t[1] for t in tables]}
    return [
        ForeignKey(name, (cs, cn), (ps, pn), tuple(columns), tuple(referenced), deferrable, full)
        for name, cs, cn, ps, pn, columns, referenced, deferrable, full in target.execute(
            _KEYS_TOUCHING, params
        ).fetchall()
    ]


def _row_id(alias: str) -> sql.Composable:
    """A row's identity within the transaction (``ctid`` is per partition, so with its table's oid)."""
    return sql.SQL("concat({0}.tableoid, ':', {0}.ctid)").format(sql.Identifier(alias))


def _orphans(target: psycopg.Connection, key: ForeignKey, gone: dict[Table, dict[str, str]]) -> dict[str, str]:
    """The rows of ``key``'s child, besides those ``gone``, that reference no parent row once the
    parent's rows ``gone`` are deleted (MATCH SIMPLE: only rows with every column of the key set;
    MATCH FULL: any column set), each with PostgreSQL's message for it. Of a key that is not
    deferrable, only the rows that reference a row ``gone``: PostgreSQL checked its other rows
    when they were written, and one it let through (a key added ``NOT VALID``) is not this seed's."""
    columns = [sql.SQL("c.{}").format(sql.Identifier(c)) for c in key.columns]
    nulls = sql.SQL(" AND " if key.match_full else " OR ").join(sql.SQL("{} IS NULL").format(c) for c in columns)
    matches = sql.SQL(" AND ").join(
        sql.SQL("p.{} = {}").format(sql.Identifier(r), c) for r, c in zip(key.referenced, columns, strict=True)
    )
    values = sql.SQL(", ").join(sql.SQL("coalesce({}::text, 'null')").format(c) for c in columns)
    query = sql.SQL(
        "SELECT {child_id}, concat_ws(', ', {values}), num_nulls({columns}) > 0 FROM {child} c "
        "WHERE NOT ({nulls}) AND {child_id} <> ALL(%(child_gone)s::text[]) "
        "AND NOT EXISTS (SELECT FROM {parent} p WHERE {matches} AND {parent_id} <> ALL(%(parent_gone)s::text[])) "
        "AND (%(deferred)s OR EXISTS "
        "(SELECT FROM {parent} p WHERE {matches} AND {parent_id} = ANY(%(parent_gone)s::text[])))"
    ).format(
        child_id=_row_id("c"),
        values=values,
        columns=sql.SQL(", ").join(columns),
        child=sql.Identifier(*key.child),
        nulls=nulls,
        parent=sql.Identifier(*key.parent),
        matches=matches,
        parent_id=_row_id("p"),
    )
    params = {
        "child_gone": list(gone.get(key.child, {})),
        "parent_gone": list(gone.get(key.parent, {})),
        "deferred": key.deferrable,
    }
    violates = f'insert or update on table "{key.child[1]}" violates foreign key constraint "{key.name}"'
    missing = f"{violates} (Key ({', '.join(key.columns)})=({{}}) is not present in table \"{key.parent[1]}\")"
    mixed = f"{violates} (MATCH FULL does not allow mixing of null and nonnull key values)"  # NULLs only get here under it
    return {
        row: mixed if some_null else missing.format(found)
        for row, found, some_null in target.execute(query, params).fetchall()
    }


def _rejected(target: psycopg.Connection, keys: Sequence[ForeignKey]) -> dict[Table, dict[str, str]]:
    """The rows the deferred keys reject, and the rows left referencing those once they are deleted
    (through any key: deleting them must not cascade into, nor be refused for, other rows): table →
    row id → error. Repeated until a round finds no more."""
    gone: dict[Table, dict[str, str]] = {}
    while True:
        found = {
            key: orphans
            for key in keys
            if key.deferrable or key.parent in gone
            if (orphans := _orphans(target, key, gone))
        }
        if not found:
            return gone
        for key, orphans in found.items():
            gone.setdefault(key.child, {}).update(orphans)


def _held_before(job: ChunkJob, target: psycopg.Connection, rows: Sequence[str]) -> list[str]:
    """The keys of those of ``rows`` (ids) of ``job``'s table that the target held before the seed:
    read on a connection of its own, which sees what was committed, not this transaction."""
    keys = [
        r[0]
        for r in target.execute(
            sql.SQL("SELECT {} FROM {} c WHERE {} = ANY(%s::text[])").format(
                key_text(job.target.key), job.target_ident, _row_id("c")
            ),
            (list(rows),),
        ).fetchall()
    ]
    with connection(job.target_url, utc=True) as before:  # the seed's time zone: the same key text
        held = before.execute(
            sql.SQL("SELECT {} FROM {} WHERE {} = ANY(%s::text[])").format(
                key_text(job.target.key), job.target_ident, key_text(job.target.key)
            ),
            (keys,),
        ).fetchall()
    return [r[0] for r in held]


def _held(target: psycopg.Connection, by_table: dict[Table, ChunkJob], gone: dict[Table, dict[str, str]]) -> list[str]:
    """The rows of ``gone`` that the target held before the seed, named by table and key, sorted
    (a table the seed did not load by its name: all its rows were there)."""
    held = {qualified_name(*table) for table in gone if table not in by_table}
    for table, rows in gone.items():
        if table in by_table:
            held.update(f"{qualified_name(*table)} {key}" for key in _held_before(by_table[table], target, list(rows)))
    return sorted(held)


def _quarantine_deferred(
    target: psycopg.Connection, jobs: Sequence[ChunkJob], checkpoints: list[ChunkCheckpoint]
) -> list[ChunkCheckpoint]:
    """With quarantine, the rows the deferred checks reject go to ``flowyard.bulk_quarantine`` and
    out of the target, with the rows left referencing them, before the checks run. Only rows this
    seed inserted are taken: deleting a row the target held before would lose data the source no
    longer describes, so such a row fails the seed in one line."""
    try:
        with target.transaction():  # a savepoint: when a check fails, the deferred ones stay pending
            target.execute("SET CONSTRAINTS ALL IMMEDIATE")
        return checkpoints
    except psycopg.errors.IntegrityError:
        pass
    by_table = {(j.target_schema, j.target.name): j for j in jobs}  # a seed loads a table in one chunk
    gone = _rejected(target, _keys_touching(target, list(by_table)))
    if held := _held(target, by_table, gone):
        more = f" and {len(held) - jobs[0].report_rows} more" if len(held) > jobs[0].report_rows else ""
        first = next(iter(next(iter(gone.values())).values()))  # a row a deferred key rejects itself
        raise UserError(
            _violation(
                first,
                "quarantine does not delete rows the target held before the seed, which it would take out: "
                f"{', '.join(held[: jobs[0].report_rows])}{more}; ",
            )
        )
    if gone:  # none when only another kind of deferred key (a unique one) failed: its one-line error below
        _take_out(target, by_table, gone)
    _check_deferred(target)
    moved = {by_table[table].source.qualified: len(rows) for table, rows in gone.items()}
    return [record_quarantined(target, c, moved[c.table]) if c.table in moved else c for c in checkpoints]


def _take_out(target: psycopg.Connection, by_table: dict[Table, ChunkJob], gone: dict[Table, dict[str, str]]) -> None:
    """Quarantine the rows ``gone`` (table → row id → error), each as its table's chunk's, and
    delete them from the target."""
    for table, rows in gone.items():
        job = by_table[table]
        with_id = sql.SQL("(SELECT {}, {} AS {} FROM {} c)").format(
            sql.SQL(", ").join(sql.Identifier(c) for c in job.columns),
            _row_id("c"),
            sql.Identifier(job.ordinal),
            job.target_ident,
        )
        quarantine_rows(job, target, with_id, job.ordinal, "text", list(rows), list(rows.values()))
    deletes = sql.SQL(", ").join(  # one statement: the keys that are not deferred are checked at its end
        sql.SQL("{} AS (DELETE FROM {} c WHERE {} = ANY(%s::text[]))").format(
            sql.Identifier(f"fy_gone_{i}"), by_table[table].target_ident, _row_id("c")
        )
        for i, table in enumerate(gone)
    )
    target.execute(sql.SQL("WITH {} SELECT").format(deletes), [list(rows) for rows in gone.values()])


def _unordered(cycle: list[Table], rejected: ChunkRejected) -> str:
    """Why rows of a table on a cycle of keys that are not deferrable were rejected, and the fix."""
    names = [qualified_name(*t) for t in cycle]
    return (
        f"seed loads {names[0]} before {names[1]}, and its foreign key {rejected.constraint} rejects rows "
        f"({'; '.join(rejected.keys)}) that reference rows of {names[1]} not loaded yet (or missing); the "
        f"foreign keys {' → '.join(names)} form a cycle and none is DEFERRABLE, so no load order fits rows "
        "that reference each other's new rows: make them DEFERRABLE (ALTER TABLE … ALTER CONSTRAINT … "
        "DEFERRABLE) and seed again (seed mode defers them to its commit)"
    )
