"""Each claim of a task is counted (``agent_tasks.claims``) and each attempt records the claim it
ran in (``agent_runs.claim``), so recovery fails a task only for a last attempt of the current
claim, not for one that gave up before a ``queue retry`` (the same worker may claim the task
again and die before its next attempt). Rows from before get 0: their attempts count as the
current claim's, as before.

Revision ID: agents_0004
"""

from alembic import op

revision = "agents_0004"
down_revision = "agents_0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE flowyard.agent_tasks ADD COLUMN claims integer NOT NULL DEFAULT 0")
    op.execute("ALTER TABLE flowyard.agent_runs ADD COLUMN claim integer NOT NULL DEFAULT 0")


def downgrade() -> None:
    op.execute("ALTER TABLE flowyard.agent_runs DROP COLUMN claim")
    op.execute("ALTER TABLE flowyard.agent_tasks DROP COLUMN claims")
