"""flowyard's own state in PostgreSQL: the ``flowyard`` schema and its migrations.

:func:`state_url` is how every pipeline reaches its state database: it resolves the URL
(parameter, ``FLOWYARD_DATABASE_URL`` or embedded) and applies the shipped migrations
the first time a process sees that URL, or again when the schema has gone.
"""

from __future__ import annotations

import threading
from pathlib import Path

import psycopg
from alembic import command
from alembic.config import Config
from sqlalchemy.exc import DBAPIError

from tasks.db import connect, database_name, mask_url, one_row, read_only_refusal, resolve_url, sqlalchemy_url
from tasks.errors import UserError, first_line

MIGRATIONS_DIR = Path(__file__).parent / "state_migrations"
_upgraded: set[str] = set()
_upgrade_lock = threading.Lock()


def state_url(database_url: str | None = None, *, parameter: str = "database_url") -> str:
    """The state database URL, with the ``flowyard`` schema migrated to the latest revisions; an
    empty ``database_url`` is refused naming ``parameter`` (:func:`resolve_url`)."""
    url = resolve_url(database_url, parameter=parameter)
    with _upgrade_lock:
        # Connecting first gives a clear one-line error before Alembic's traceback-heavy one. The
        # schema is looked up on every call, not only remembered: a database dropped and
        # re-created under the same URL (the demo does that) has lost it.
        with connect(url) as conn:
            present = one_row(conn, "SELECT to_regclass('flowyard.alembic_version') IS NOT NULL")[0]
        if url not in _upgraded or not present:
            upgrade_state_schema(url)
            _upgraded.add(url)
    return url


def migration_config(url: str) -> Config:
    """Alembic's configuration of the ``flowyard`` schema in ``url``: what the upgrade runs, and
    what a test brings a database to an older revision with, to check the upgrade keeps its data."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", sqlalchemy_url(url).replace("%", "%%"))
    return config


def upgrade_state_schema(url: str) -> None:
    """Apply every shipped migration of the ``flowyard`` schema (all branches)."""
    try:
        command.upgrade(migration_config(url), "heads")
    except DBAPIError as exc:
        if isinstance(exc.orig, psycopg.errors.ReadOnlySqlTransaction):
            raise read_only_refusal(url, exc.orig) from None
        if not isinstance(exc.orig, psycopg.errors.InsufficientPrivilege):
            raise
        raise UserError(
            f"cannot create or upgrade flowyard's schema in {mask_url(url)}: {first_line(exc.orig)}; "
            f"grant the role CREATE on database {database_name(url)}, or have an owner run "
            "'CREATE SCHEMA flowyard AUTHORIZATION <role>' first"
        ) from None
