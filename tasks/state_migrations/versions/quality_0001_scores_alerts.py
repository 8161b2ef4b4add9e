"""Data-quality state: the score history behind trends, and the fingerprints that stop repeated alerts.

Revision ID: quality_0001
"""

from alembic import op

revision = "quality_0001"
down_revision = "0001"
branch_labels = ("quality",)
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE flowyard.quality_scores (
            id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            run_id       text             NOT NULL,
            suite        text             NOT NULL,
            table_name   text             NOT NULL,
            window_start timestamptz,
            checked_at   timestamptz      NOT NULL DEFAULT now(),
            score        double precision NOT NULL,
            row_count    bigint           NOT NULL,
            violations   integer          NOT NULL,
            details      jsonb            NOT NULL DEFAULT '{}'::jsonb
        )
        """
    )
    op.execute(
        "CREATE INDEX quality_scores_suite_checked ON flowyard.quality_scores (suite, checked_at DESC, id DESC)"
    )
    op.execute(
        """
        CREATE TABLE flowyard.quality_alerts (
            suite        text        NOT NULL,
            rule         text        NOT NULL,
            fingerprint  text        NOT NULL,
            sent_at      timestamptz NOT NULL DEFAULT now(),
            details      jsonb       NOT NULL DEFAULT '{}'::jsonb,
            PRIMARY KEY (suite, rule)
        )
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE flowyard.quality_alerts")
    op.execute("DROP TABLE flowyard.quality_scores")
