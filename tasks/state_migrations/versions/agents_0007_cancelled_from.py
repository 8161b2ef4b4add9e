"""A cancelled task records the status it was cancelled from (``agent_tasks.cancelled_from``), so
``queue retry`` puts a cancelled draft back in ``draft``: it went to ``pending`` and ran, skipping
the person who was to submit it. Tasks cancelled before keep NULL (a draft and a pending task
never claimed look alike once cancelled) and are retried as ``pending``, as before.

Revision ID: agents_0007
"""

from alembic import op

revision = "agents_0007"
down_revision = "agents_0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE flowyard.agent_tasks ADD COLUMN cancelled_from text")


def downgrade() -> None:
    op.execute("ALTER TABLE flowyard.agent_tasks DROP COLUMN cancelled_from")
