"""A run's history row for a device whose store could not be read (corrupt, locked, missing)
records its pending count as unknown (NULL), as the run's table artifact shows it, instead of
0, which said the device had nothing to send.

Revision ID: sync_0002
"""

from alembic import op

revision = "sync_0002"
down_revision = "sync_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE flowyard.sync_runs ALTER COLUMN pending_before DROP NOT NULL")


def downgrade() -> None:
    op.execute("UPDATE flowyard.sync_runs SET pending_before = 0 WHERE pending_before IS NULL")
    op.execute("ALTER TABLE flowyard.sync_runs ALTER COLUMN pending_before SET NOT NULL")
