"""Order-independent table checksums computed inside PostgreSQL, per chunk.

A chunk's checksum is ``(count(*), sum(row hash))``: the database hashes each row and sums
the hashes, so row order does not matter, nothing but two numbers leaves the server, and
checksums add up (a table's checksum is the sum of its chunks').

The row hash is ``hash_record_extended(ROW(columns), 0)``: each column's own (portable,
value-based) hash function, no text conversion — about 2.5x cheaper than hashing text. When
a column type has no hash function (``json``, ``point``, ...), it falls back to
``hashtextextended(ROW(columns)::text, 0)``; both sides then pin the settings that change
text forms (``db.TEXT_FORMS`` on every connection, and ``db.UTC``), so equal rows hash equally
on any server. An enum's hash function hashes the value's ``pg_enum`` OID, which differs between
databases, so a column holding enums (or arrays, domains, ranges or composites of them) is hashed
as its text.
Tables of equal column types make the same choice on both sides.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import psycopg
from psycopg import sql

from tasks.db import one_row

ALL_ROWS = sql.SQL("true")
RECIPE = 2
"""How :func:`checksum` hashes a row, counted up whenever that changes (2: enum columns as text).
A saved chunk checksum carries it, so one an older flowyard computed is recomputed, not compared
with (see ``chunk_checkpoint.committed_chunks``)."""


@dataclass(frozen=True)
class Checksum:
    rows: int
    digest: int

    def __add__(self, other: Checksum) -> Checksum:
        return Checksum(self.rows + other.rows, self.digest + other.digest)


EMPTY = Checksum(0, 0)


def row_hash(columns: Sequence[str], alias: str | None = None) -> sql.Composed:
    """``hashtextextended(ROW(c1, c2, ...)::text, 0)`` over the given columns."""
    refs = [sql.Identifier(alias, c) if alias else sql.Identifier(c) for c in columns]
    return sql.SQL("hashtextextended(ROW({})::text, 0)").format(sql.SQL(", ").join(refs))


def record_hash(columns: Sequence[str], as_text: Collection[str] = ()) -> sql.Composed:
    """``hash_record_extended(ROW(c1, c2, ...), 0)``: per-type hashes, no text conversion but
    for the ``as_text`` columns."""
    refs = sql.SQL(", ").join(
        sql.SQL("{}::text").format(sql.Identifier(c)) if c in as_text else sql.Identifier(c) for c in columns
    )
    return sql.SQL("hash_record_extended(ROW({}), 0)").format(refs)


# The types each given type is made of, down to the scalars: a domain's base, an array's element,
# a range's or multirange's subtype, a composite's attributes; those given that hold an enum.
_HOLDS_ENUM = """
    WITH RECURSIVE parts(top, part) AS (
        SELECT t, t FROM unnest(%s::oid[]) t
        UNION
        SELECT p.top, inner_type.oid
          FROM parts p JOIN pg_type y ON y.oid = p.part
         CROSS JOIN LATERAL (
               SELECT y.typbasetype UNION ALL SELECT y.typelem
               UNION ALL SELECT r.rngsubtype FROM pg_range r WHERE y.oid IN (r.rngtypid, r.rngmultitypid)
               UNION ALL SELECT a.atttypid FROM pg_attribute a
                WHERE a.attrelid = y.typrelid AND a.attnum > 0 AND NOT a.attisdropped
         ) inner_type(oid)
         WHERE inner_type.oid <> 0
    )
    SELECT DISTINCT p.top FROM parts p JOIN pg_type y ON y.oid = p.part WHERE y.typtype = 'e'
"""


def _enum_columns(conn: psycopg.Connection, table: sql.Composable, columns: Sequence[str]) -> set[str]:
    """The ``columns`` of ``table`` whose values hold enums, which :func:`record_hash` must hash
    as text: PostgreSQL hashes an enum by its ``pg_enum`` OID, so the same rows in two databases
    (a bulk copy's source and target) summed to different checksums and every such copy failed
    its validation."""
    names = sql.SQL(", ").join(sql.Identifier(c) for c in columns)
    described = conn.execute(sql.SQL("SELECT {} FROM {} LIMIT 0").format(names, table)).description or []
    holding = {row[0] for row in conn.execute(_HOLDS_ENUM, ([d.type_code for d in described],)).fetchall()}
    return {d.name for d in described if d.type_code in holding}


def checksum(
    conn: psycopg.Connection,
    table: sql.Composable,
    columns: Sequence[str],
    where: sql.Composable = ALL_ROWS,
    params: Sequence[object] = (),
) -> Checksum:
    """Count and hash-sum of the rows of ``table`` matching ``where``."""
    try:
        with conn.transaction():
            return _summed(conn, table, record_hash(columns, _enum_columns(conn, table, columns)), where, params)
    except psycopg.errors.UndefinedFunction:
        return _summed(conn, table, row_hash(columns), where, params)


def _summed(
    conn: psycopg.Connection,
    table: sql.Composable,
    hashed: sql.Composable,
    where: sql.Composable,
    params: Sequence[object],
) -> Checksum:
    query = sql.SQL("SELECT count(*), coalesce(sum({}), 0) FROM {} WHERE {}").format(hashed, table, where)
    rows, digest = one_row(conn, query, list(params))
    return Checksum(int(rows), int(digest))


def row_texts(
    conn: psycopg.Connection,
    table: sql.Composable,
    columns: Sequence[str],
    key: Sequence[str],
    keys: Sequence[Sequence[str]],
) -> dict[tuple[str, ...], str]:
    """``{key text: ROW(columns)::text}`` for the given keys: the row-by-row side of sampling."""
    if not keys:
        return {}
    key_cols = sql.SQL(", ").join(sql.Identifier(k) for k in key)
    key_text = sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier(k)) for k in key)
    wanted = sql.SQL(", ").join(
        sql.SQL("({})").format(sql.SQL(", ").join(sql.Placeholder() for _ in key)) for _ in keys
    )
    query = sql.SQL("SELECT {}, ROW({})::text FROM {} WHERE ({}) IN ({})").format(
        key_text, sql.SQL(", ").join(sql.Identifier(c) for c in columns), table, key_cols, wanted
    )
    rows = conn.execute(query, [v for k in keys for v in k]).fetchall()
    return {tuple(r[:-1]): r[-1] for r in rows}


def sample_keys(
    conn: psycopg.Connection, table: sql.Composable, key: Sequence[str], size: int
) -> list[tuple[str, ...]]:
    """Up to ``size`` random keys of ``table`` (as text)."""
    key_text = sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier(k)) for k in key)
    query = sql.SQL("SELECT {} FROM {} ORDER BY random() LIMIT {}").format(key_text, table, sql.Literal(size))
    return [tuple(r) for r in conn.execute(query).fetchall()]
