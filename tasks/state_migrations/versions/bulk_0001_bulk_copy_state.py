"""Bulk-copy state: runs, persisted chunk plans, per-chunk checkpoints, incremental cursors, quarantine.

These tables live in the *target* database's ``flowyard`` schema so that a chunk's rows and
its checkpoint commit in one transaction (exactly-once loading).

Revision ID: bulk_0001
"""

from alembic import op

revision = "bulk_0001"
down_revision = "0001"
branch_labels = ("bulk",)
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE flowyard.bulk_runs (
            run_key      text        PRIMARY KEY,
            config_hash  text        NOT NULL,
            mode         text        NOT NULL,
            status       text        NOT NULL CHECK (status IN ('running', 'completed', 'failed')),
            created_at   timestamptz NOT NULL DEFAULT now(),
            finished_at  timestamptz,
            report       jsonb       NOT NULL DEFAULT '{}'::jsonb
        )
        """
    )
    op.execute("CREATE INDEX bulk_runs_config ON flowyard.bulk_runs (config_hash, created_at DESC)")
    op.execute(
        """
        CREATE TABLE flowyard.bulk_plans (
            run_key       text    NOT NULL REFERENCES flowyard.bulk_runs ON DELETE CASCADE,
            source_table  text    NOT NULL,
            target_table  text    NOT NULL,
            plan          jsonb   NOT NULL,
            completed     boolean NOT NULL DEFAULT false,
            PRIMARY KEY (run_key, source_table)
        )
        """
    )
    op.execute(
        """
        CREATE TABLE flowyard.bulk_chunks (
            run_key        text        NOT NULL,
            source_table   text        NOT NULL,
            chunk_id       text        NOT NULL,
            rows_read      bigint      NOT NULL,
            rows_written   bigint      NOT NULL,
            quarantined    bigint      NOT NULL DEFAULT 0,
            sent_checksum  numeric,
            cursor_max     text,
            seconds        double precision NOT NULL,
            flow_run_id    uuid,
            completed_at   timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (run_key, source_table, chunk_id),
            FOREIGN KEY (run_key, source_table) REFERENCES flowyard.bulk_plans ON DELETE CASCADE
        )
        """
    )
    op.execute(
        """
        CREATE TABLE flowyard.bulk_cursors (
            lineage       text        NOT NULL,
            source_table  text        NOT NULL,
            cursor_value  text        NOT NULL,
            run_key       text        NOT NULL,
            updated_at    timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (lineage, source_table)
        )
        """
    )
    op.execute(
        """
        CREATE TABLE flowyard.bulk_quarantine (
            id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            run_key       text        NOT NULL,
            source_table  text        NOT NULL,
            chunk_id      text        NOT NULL,
            row_data      jsonb       NOT NULL,
            error         text        NOT NULL,
            created_at    timestamptz NOT NULL DEFAULT now()
        )
        """
    )
    op.execute("CREATE INDEX bulk_quarantine_run ON flowyard.bulk_quarantine (run_key, source_table)")


def downgrade() -> None:
    op.execute(
        "DROP TABLE flowyard.bulk_quarantine, flowyard.bulk_cursors, flowyard.bulk_chunks, "
        "flowyard.bulk_plans, flowyard.bulk_runs"
    )
