"""The schema step's outcome per central: one row for the whole state database kept only the last
run's central, so a clean run into central B cleared central A's standing warning (the TRIGGER grant
the tombstones need, say) and ``sync status`` went quiet while A's deletions still never reached the
stores. A run names its central (``sync trigger --central-url``, the flow's ``central_url``), so one
state database serves several. The row there is kept, under its central.

Revision ID: sync_0005
"""

from alembic import op

revision = "sync_0005"
down_revision = "sync_0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE flowyard.sync_schema_step DROP COLUMN only_row")  # its primary key goes with it
    op.execute("ALTER TABLE flowyard.sync_schema_step ADD PRIMARY KEY (central)")


def downgrade() -> None:
    """Back to one row: the latest step's, as sync_0004 kept it."""
    op.execute(
        """
        DELETE FROM flowyard.sync_schema_step
        WHERE central <> (SELECT central FROM flowyard.sync_schema_step ORDER BY checked_at DESC, central LIMIT 1)
        """
    )
    op.execute("ALTER TABLE flowyard.sync_schema_step DROP CONSTRAINT sync_schema_step_pkey")
    op.execute(
        "ALTER TABLE flowyard.sync_schema_step ADD COLUMN only_row boolean PRIMARY KEY DEFAULT true CHECK (only_row)"
    )
