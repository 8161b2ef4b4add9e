"""The agent task queue: tasks, their ``blocks`` dependencies, attempts and checkpoints.

Revision ID: agents_0001
"""

from alembic import op

revision = "agents_0001"
down_revision = "0001"
branch_labels = ("agents",)
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE flowyard.agent_tasks (
            id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            title           text        NOT NULL CHECK (length(title) BETWEEN 1 AND 200),
            type            text        NOT NULL DEFAULT 'task'
                            CHECK (type IN ('epic', 'story', 'task', 'subtask', 'bug', 'spike')),
            description     text        NOT NULL DEFAULT '',
            priority        text        NOT NULL DEFAULT 'medium'
                            CHECK (priority IN ('critical', 'high', 'medium', 'low')),
            priority_rank   smallint    GENERATED ALWAYS AS (
                                CASE priority WHEN 'critical' THEN 0 WHEN 'high' THEN 1
                                              WHEN 'medium' THEN 2 ELSE 3 END) STORED,
            status          text        NOT NULL DEFAULT 'pending'
                            CHECK (status IN ('draft', 'pending', 'in_progress', 'review',
                                              'completed', 'failed', 'cancelled')),
            agent_type      text        NOT NULL,
            payload         jsonb       NOT NULL DEFAULT '{}'::jsonb,
            workdir         text        NOT NULL DEFAULT '',
            requires_review boolean     NOT NULL DEFAULT false,
            attempts        integer     NOT NULL DEFAULT 0,
            last_checkpoint jsonb,
            result          jsonb,
            error           text,
            blocked_reason  text,
            worker          text,
            agent_pgid      integer,
            heartbeat_at    timestamptz,
            created_at      timestamptz NOT NULL DEFAULT now(),
            updated_at      timestamptz NOT NULL DEFAULT now(),
            started_at      timestamptz,
            finished_at     timestamptz
        )
        """
    )
    op.execute(
        "CREATE INDEX agent_tasks_ready ON flowyard.agent_tasks (priority_rank, id) WHERE status = 'pending'"
    )
    op.execute("CREATE INDEX agent_tasks_running ON flowyard.agent_tasks (id) WHERE status = 'in_progress'")
    op.execute(
        """
        CREATE TABLE flowyard.agent_task_blocks (
            blocker_id  bigint NOT NULL REFERENCES flowyard.agent_tasks (id) ON DELETE CASCADE,
            blocked_id  bigint NOT NULL REFERENCES flowyard.agent_tasks (id) ON DELETE CASCADE,
            PRIMARY KEY (blocked_id, blocker_id),
            CHECK (blocker_id <> blocked_id)
        )
        """
    )
    op.execute("CREATE INDEX agent_task_blocks_blocker ON flowyard.agent_task_blocks (blocker_id)")
    op.execute(
        """
        CREATE TABLE flowyard.agent_runs (
            id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            task_id      bigint      NOT NULL REFERENCES flowyard.agent_tasks (id) ON DELETE CASCADE,
            attempt      integer     NOT NULL,
            agent_type   text        NOT NULL,
            worker       text        NOT NULL,
            flow_run_id  uuid,
            started_at   timestamptz NOT NULL DEFAULT now(),
            finished_at  timestamptz,
            outcome      text CHECK (outcome IN ('completed', 'failed', 'timeout', 'interrupted')),
            seconds      double precision,
            error        text
        )
        """
    )
    op.execute("CREATE INDEX agent_runs_type ON flowyard.agent_runs (agent_type, outcome)")
    op.execute(
        """
        CREATE TABLE flowyard.agent_checkpoints (
            id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            task_id     bigint      NOT NULL REFERENCES flowyard.agent_tasks (id) ON DELETE CASCADE,
            attempt     integer     NOT NULL,
            kind        text        NOT NULL CHECK (kind IN ('agent', 'graceful_shutdown')),
            state       jsonb       NOT NULL,
            created_at  timestamptz NOT NULL DEFAULT now()
        )
        """
    )
    op.execute("CREATE INDEX agent_checkpoints_task ON flowyard.agent_checkpoints (task_id, id)")


def downgrade() -> None:
    op.execute("DROP TABLE flowyard.agent_checkpoints")
    op.execute("DROP TABLE flowyard.agent_runs")
    op.execute("DROP TABLE flowyard.agent_task_blocks")
    op.execute("DROP TABLE flowyard.agent_tasks")
