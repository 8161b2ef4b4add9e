"""Record when each transfer happened, indexed for per-account history.

Revision ID: d003
Revises: d002
"""

import sqlalchemy as sa
from alembic import op

revision = "d003"
down_revision = "d002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "transfers",
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    )
    op.create_index("transfers_from_account_created", "transfers", ["from_account", "created_at"])


def downgrade() -> None:
    op.drop_index("transfers_from_account_created", table_name="transfers")
    op.drop_column("transfers", "created_at")
