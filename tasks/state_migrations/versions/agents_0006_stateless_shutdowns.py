"""``graceful_shutdown`` checkpoints that older flowyard recorded with the state ``{}`` for a stop
that came before the agent saved any state now hold ``null``, as newer ones do: the next attempt
is then handed no checkpoint (``checkpoint: null``, as a first attempt is) instead of an empty
state it took for a resume. Older flowyard copied the task's last checkpoint state into a
``graceful_shutdown`` one and wrote ``{}`` only when there was none, so such a record is a ``{}``
one with no ``agent`` checkpoint of its task before it. A ``{}`` an agent saved itself, and the
shutdowns that copied it, are kept.

Revision ID: agents_0006
"""

from alembic import op

revision = "agents_0006"
down_revision = "agents_0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        UPDATE flowyard.agent_checkpoints c SET state = 'null'
         WHERE c.kind = 'graceful_shutdown' AND c.state = '{}'
           AND NOT EXISTS (SELECT 1 FROM flowyard.agent_checkpoints a
                            WHERE a.task_id = c.task_id AND a.kind = 'agent' AND a.id < c.id)
        """
    )
    op.execute(
        """
        UPDATE flowyard.agent_tasks t SET last_checkpoint = jsonb_set(t.last_checkpoint, '{state}', 'null')
         WHERE t.last_checkpoint ->> 'kind' = 'graceful_shutdown' AND t.last_checkpoint -> 'state' = '{}'
           AND NOT EXISTS (SELECT 1 FROM flowyard.agent_checkpoints a WHERE a.task_id = t.id AND a.kind = 'agent')
        """
    )


def downgrade() -> None:
    """Back to ``{}``: older flowyard copies a shutdown's state with ``dict()``, which fails on null."""
    op.execute("UPDATE flowyard.agent_checkpoints SET state = '{}' WHERE kind = 'graceful_shutdown' AND state = 'null'")
    op.execute(
        """
        UPDATE flowyard.agent_tasks SET last_checkpoint = jsonb_set(last_checkpoint, '{state}', '{}')
         WHERE last_checkpoint ->> 'kind' = 'graceful_shutdown' AND last_checkpoint -> 'state' = 'null'
        """
    )
