"""Online (expand/contract) migrations: their phase and plan, and per-table backfill checkpoints.

Revision ID: online_0001
"""

from alembic import op

revision = "online_0001"
down_revision = "0001"
branch_labels = ("online",)
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE flowyard.online_migrations (
            id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            target          text        NOT NULL,
            schema_name     text        NOT NULL,
            name            text        NOT NULL,
            phase           text        NOT NULL CHECK (phase IN (
                                'starting', 'expanded', 'completing', 'completed', 'rolling_back', 'rolled_back')),
            version_schema  text        NOT NULL,
            previous_schema text,
            plan            jsonb       NOT NULL,
            progress        jsonb       NOT NULL DEFAULT '{}'::jsonb,
            flow_run_id     uuid,
            started_at      timestamptz NOT NULL DEFAULT now(),
            updated_at      timestamptz NOT NULL DEFAULT now()
        )
        """
    )
    # The database itself refuses a second unfinished migration on one schema.
    op.execute(
        """
        CREATE UNIQUE INDEX online_migrations_one_active ON flowyard.online_migrations (target, schema_name)
        WHERE phase NOT IN ('completed', 'rolled_back')
        """
    )
    op.execute(
        """
        CREATE TABLE flowyard.online_backfill (
            migration_id  bigint      NOT NULL REFERENCES flowyard.online_migrations (id) ON DELETE CASCADE,
            table_name    text        NOT NULL,
            last_key      jsonb,
            upper_key     jsonb,
            rows_done     bigint      NOT NULL DEFAULT 0,
            done          boolean     NOT NULL DEFAULT false,
            updated_at    timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (migration_id, table_name)
        )
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE flowyard.online_backfill")
    op.execute("DROP TABLE flowyard.online_migrations")
