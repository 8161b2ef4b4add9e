"""Create transfers between accounts (foreign keys) with seed rows.

Revision ID: d002
Revises: d001
"""

import sqlalchemy as sa
from alembic import op

revision = "d002"
down_revision = "d001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    transfers = op.create_table(
        "transfers",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("from_account", sa.Integer, sa.ForeignKey("accounts.id"), nullable=False),
        sa.Column("to_account", sa.Integer, sa.ForeignKey("accounts.id"), nullable=False),
        sa.Column("amount_cents", sa.BigInteger, nullable=False),
        sa.CheckConstraint("amount_cents > 0", name="transfers_amount_positive"),
    )
    op.bulk_insert(
        transfers,
        [
            {"id": 1, "from_account": 1, "to_account": 2, "amount_cents": 10_00},
            {"id": 2, "from_account": 2, "to_account": 3, "amount_cents": 5_25},
        ],
    )


def downgrade() -> None:
    op.drop_table("transfers")
