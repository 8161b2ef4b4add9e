"""Each failed attempt records whether its run gave up after it (``final``: its last allowed
retry, or an error not worth retrying), so the recovery of a worker that died before failing
the task fails it instead of handing it back with a fresh set of retries. Attempts from before
have false: their tasks are handed back, as before.

Revision ID: agents_0003
"""

from alembic import op

revision = "agents_0003"
down_revision = "agents_0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE flowyard.agent_runs ADD COLUMN final boolean NOT NULL DEFAULT false")


def downgrade() -> None:
    op.execute("ALTER TABLE flowyard.agent_runs DROP COLUMN final")
