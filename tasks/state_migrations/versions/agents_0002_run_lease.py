"""Each attempt records the lease its worker runs with, so ``queue retry`` judges a cancelled
attempt's silence by that lease instead of the default one. Attempts from before have none (NULL):
they are judged by the default 120 s, as before.

Revision ID: agents_0002
"""

from alembic import op

revision = "agents_0002"
down_revision = "agents_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE flowyard.agent_runs ADD COLUMN lease_seconds double precision")


def downgrade() -> None:
    op.execute("ALTER TABLE flowyard.agent_runs DROP COLUMN lease_seconds")
