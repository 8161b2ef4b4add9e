"""Alembic environment for flowyard's own ``flowyard`` schema.

Migrations run under a transaction-level advisory lock, so processes that start at the
same moment apply them once. Each feature keeps its revisions on a branch of its own
(``down_revision = "0001"``) and everything is upgraded to ``heads``.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, text

SCHEMA = "flowyard"
LOCK_KEY = "flowyard.state_migrations"

config = context.config


def run_migrations_online() -> None:
    url = config.get_main_option("sqlalchemy.url")
    if url is None:
        raise RuntimeError("flowyard's state migrations need sqlalchemy.url (set by tasks.state)")
    # READ COMMITTED whatever a DBA's default_transaction_isolation: under serializable or repeatable
    # read, the process that waited for the lock below read the snapshot it took before the wait,
    # missed what the first one made, and failed making it again (see tasks.db.SESSION_ISOLATION).
    engine = create_engine(url, poolclass=None, isolation_level="READ COMMITTED")
    with engine.connect() as conn:
        conn.execute(text("SELECT pg_advisory_xact_lock(hashtextextended(:key, 0))"), {"key": LOCK_KEY})
        # Created only when missing: even with IF NOT EXISTS, CREATE SCHEMA needs CREATE on the
        # database, which a role given a ready-made ``flowyard`` schema may not have.
        if conn.execute(text("SELECT 1 FROM pg_namespace WHERE nspname = :s"), {"s": SCHEMA}).first() is None:
            conn.execute(text("CREATE SCHEMA flowyard"))
        context.configure(connection=conn, version_table_schema=SCHEMA, transactional_ddl=True)
        with context.begin_transaction():
            context.run_migrations()
        conn.commit()
    engine.dispose()


if context.is_offline_mode():
    raise RuntimeError("flowyard's state migrations run online only")
run_migrations_online()
