"""Device-sync state: the sync configuration, per-device status and cursors, and run history.

Revision ID: sync_0001
"""

from alembic import op

revision = "sync_0001"
down_revision = "0001"
branch_labels = ("sync",)
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE flowyard.sync_config (
            only_row    boolean     PRIMARY KEY DEFAULT true CHECK (only_row),
            config      jsonb       NOT NULL,
            updated_at  timestamptz NOT NULL DEFAULT now()
        )
        """
    )
    op.execute(
        """
        CREATE TABLE flowyard.sync_devices (
            device_id        text        PRIMARY KEY,
            store_path       text        NOT NULL,
            user_id          text        NOT NULL,
            project_id       text        NOT NULL,
            enabled          boolean     NOT NULL DEFAULT true,
            registered       boolean     NOT NULL DEFAULT false,
            last_local_id    bigint      NOT NULL DEFAULT 0,
            download_cursor  bigint      NOT NULL DEFAULT 0,
            pending          bigint,
            last_attempt_at  timestamptz,
            last_success_at  timestamptz,
            last_error       text,
            created_at       timestamptz NOT NULL DEFAULT now()
        )
        """
    )
    op.execute(
        """
        CREATE TABLE flowyard.sync_runs (
            id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            flow_run_id     uuid,
            device_id       text        NOT NULL,
            finished_at     timestamptz NOT NULL DEFAULT now(),
            pending_before  bigint      NOT NULL DEFAULT 0,
            uploaded        bigint      NOT NULL DEFAULT 0,
            duplicates      bigint      NOT NULL DEFAULT 0,
            failed          bigint      NOT NULL DEFAULT 0,
            pending_after   bigint,
            lag_seconds     double precision,
            error           text
        )
        """
    )
    op.execute("CREATE INDEX sync_runs_finished ON flowyard.sync_runs (finished_at DESC)")


def downgrade() -> None:
    op.execute("DROP TABLE flowyard.sync_runs")
    op.execute("DROP TABLE flowyard.sync_devices")
    op.execute("DROP TABLE flowyard.sync_config")
