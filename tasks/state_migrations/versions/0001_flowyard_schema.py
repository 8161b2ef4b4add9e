"""The flowyard schema: run ledger and checkpoints shared by every pipeline.

Revision ID: 0001
"""

from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE flowyard.run_ledger (
            id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            pipeline     text        NOT NULL,
            flow_run_id  uuid,
            status       text        NOT NULL CHECK (status IN ('running', 'completed', 'failed')),
            started_at   timestamptz NOT NULL DEFAULT now(),
            finished_at  timestamptz,
            details      jsonb       NOT NULL DEFAULT '{}'::jsonb
        )
        """
    )
    op.execute("CREATE INDEX run_ledger_pipeline_started ON flowyard.run_ledger (pipeline, started_at DESC)")
    op.execute(
        """
        CREATE TABLE flowyard.checkpoints (
            scope       text        NOT NULL,
            key         text        NOT NULL,
            value       jsonb       NOT NULL,
            updated_at  timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (scope, key)
        )
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE flowyard.checkpoints")
    op.execute("DROP TABLE flowyard.run_ledger")
