"""Create accounts with a few seed rows.

Revision ID: d001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "d001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    accounts = op.create_table(
        "accounts",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("owner", sa.Text, nullable=False),
        sa.Column("balance_cents", sa.BigInteger, nullable=False, server_default="0"),
    )
    op.bulk_insert(
        accounts,
        [
            {"id": 1, "owner": "ada", "balance_cents": 120_00},
            {"id": 2, "owner": "grace", "balance_cents": 75_50},
            {"id": 3, "owner": "linus", "balance_cents": 0},
        ],
    )


def downgrade() -> None:
    op.drop_table("accounts")
