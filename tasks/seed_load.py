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
before the commit (``SET CONSTRAINTS ALL IMMEDIATE``), so a violation is a one-line error too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import psycopg

from tasks.bulk_sources import qualified_name
from tasks.chunk_checkpoint import ChunkCheckpoint
from tasks.chunk_load import ChunkJob, ChunkRejected, load_chunk_in
from tasks.errors import UserError

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
    try:
        target.execute("SET CONSTRAINTS ALL IMMEDIATE")  # deferred checks now, not in the commit
    except psycopg.errors.IntegrityError as exc:
        detail = f" ({exc.diag.message_detail.rstrip('.')})" if exc.diag.message_detail else ""
        raise UserError(
            f"seed rows violate the target: {exc.diag.message_primary}{detail}; fix the source rows "
            "and seed again (nothing was loaded)"
        ) from None
    return checkpoints


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
