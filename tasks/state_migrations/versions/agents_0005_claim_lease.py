"""Each claim records the lease its worker runs with (``agent_tasks.lease_seconds``), so recovery
judges a silent worker by its own lease, also before it started an attempt, instead of by the
recovering run's. Tasks claimed before have none (NULL): they are judged by the recovering
run's lease, as before.

Revision ID: agents_0005
"""

from alembic import op

revision = "agents_0005"
down_revision = "agents_0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE flowyard.agent_tasks ADD COLUMN lease_seconds double precision")


def downgrade() -> None:
    op.execute("ALTER TABLE flowyard.agent_tasks DROP COLUMN lease_seconds")
