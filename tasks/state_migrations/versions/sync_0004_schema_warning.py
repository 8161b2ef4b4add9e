"""The outcome of the last run's schema step on central: its warning (a refusal only central's DBA
can lift, such as the TRIGGER grant the tombstones need) was only in that run's log, so an operator
who reads ``sync status`` never learnt that deletions stopped reaching the stores.

Revision ID: sync_0004
"""

from alembic import op

revision = "sync_0004"
down_revision = "sync_0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE flowyard.sync_schema_step (
            only_row    boolean     PRIMARY KEY DEFAULT true CHECK (only_row),
            central     text        NOT NULL,
            warning     text,
            checked_at  timestamptz NOT NULL DEFAULT now()
        )
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE flowyard.sync_schema_step")
