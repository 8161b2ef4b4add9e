"""A device's download cursor records the central database it counts in: each central numbers its
snapshot changes with its own sequence, so a cursor of one central skipped every snapshot of
another (``--central-url``) up to it. Cursors from before are of no known central (NULL): their
device's next download starts again from 0.

Revision ID: sync_0003
"""

from alembic import op

revision = "sync_0003"
down_revision = "sync_0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE flowyard.sync_devices ADD COLUMN download_central uuid")


def downgrade() -> None:
    op.execute("ALTER TABLE flowyard.sync_devices DROP COLUMN download_central")
