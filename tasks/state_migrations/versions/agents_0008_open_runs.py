"""An index of the attempts still open (``agent_runs`` rows without an outcome), by task: every
attempt's start closes the ones its worker left open before it, and every run's recovery, a
``queue retry`` and a task let go of look them up. Without it each of these read the whole
history of attempts, which only grows.

Revision ID: agents_0008
"""

from alembic import op

revision = "agents_0008"
down_revision = "agents_0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("CREATE INDEX agent_runs_open ON flowyard.agent_runs (task_id) WHERE outcome IS NULL")


def downgrade() -> None:
    op.execute("DROP INDEX flowyard.agent_runs_open")
