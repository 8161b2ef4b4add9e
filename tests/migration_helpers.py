"""Helpers for the migration tests: write Alembic directories into tmp dirs, fingerprint a database.

A fingerprint is the schema as ``pg_dump --schema-only`` prints it, every table's rows
(md5 of the rows in order, for every schema including ``flowyard``) and every sequence's
position, so "the database equals its earlier state" is one equality.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import psycopg
from psycopg import sql

from tasks.embedded_pg import BIN_DIR

DEMO = Path(__file__).resolve().parent.parent / "deployments" / "demo_assets" / "migrations"

REVISION = '''"""{doc}"""

from alembic import op

revision = {revision!r}
down_revision = {down!r}
branch_labels = None
depends_on = None


def upgrade() -> None:
{upgrade}


def downgrade() -> None:
{downgrade}
'''


def write_revision(
    directory: Path, revision: str, down: str | None, upgrade: list[str], downgrade: list[str], doc: str = ""
) -> Path:
    """A revision file running the given SQL statements through ``op.execute``."""

    def body(statements: list[str]) -> str:
        return "\n".join(f"    op.execute({s!r})" for s in statements) or "    pass"

    path = directory / "versions" / f"{revision}.py"
    path.write_text(
        REVISION.format(
            doc=doc or f"revision {revision}",
            revision=revision,
            down=down,
            upgrade=body(upgrade),
            downgrade=body(downgrade),
        )
    )
    return path


def migrations_dir(tmp_path: Path, with_demo_revisions: bool = True) -> Path:
    """A copy of the demo Alembic directory (env.py + versions/), optionally without its revisions."""
    target = tmp_path / "migrations"
    shutil.copytree(DEMO, target, ignore=shutil.ignore_patterns("__pycache__"))
    if not with_demo_revisions:
        for revision in (target / "versions").glob("*.py"):
            revision.unlink()
    return target


def schema_dump(url: str) -> str:
    out = subprocess.run(
        [str(BIN_DIR / "pg_dump"), "--schema-only", "-d", url], capture_output=True, text=True, check=True
    ).stdout
    # PostgreSQL 18 adds \restrict lines with a random key to every dump.
    return "\n".join(line for line in out.splitlines() if not line.startswith(("\\restrict", "\\unrestrict")))


def fingerprint(url: str) -> dict[str, object]:
    with psycopg.connect(url) as conn:
        relations = conn.execute(
            """
            SELECT n.nspname, c.relname, c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE c.relkind IN ('r', 'S') AND n.nspname NOT IN ('pg_catalog', 'information_schema')
              AND n.nspname NOT LIKE 'pg\\_%%' ORDER BY 1, 2
            """
        ).fetchall()
        data = {}
        for schema, name, kind in relations:
            ident = sql.Identifier(schema, name)
            query = (
                sql.SQL(
                    "SELECT md5(coalesce(string_agg(t::text, '|' ORDER BY t::text), '')), count(*) FROM {} t"
                )
                if kind == "r"
                else sql.SQL("SELECT last_value::text, is_called FROM {}")
            )
            data[f"{schema}.{name}"] = conn.execute(query.format(ident)).fetchone()
    return {"schema": schema_dump(url), "data": data}


def tables(url: str) -> set[str]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT table_schema || '.' || table_name FROM information_schema.tables "
            "WHERE table_schema NOT IN ('pg_catalog', 'information_schema')"
        ).fetchall()
    return {r[0] for r in rows}
