"""Each saved chunk checksum names the recipe that computed it (``table_checksum.RECIPE``).

A checksum is only comparable with one computed the same way: when flowyard began hashing enum
columns as their text, the checksums of a copy that had failed validation before stayed saved as
the OID hashes, so every plain re-run failed again. Rows saved before keep NULL (an older recipe),
and validation recomputes what they stood for instead of comparing with them.

Revision ID: bulk_0002
"""

from alembic import op

revision = "bulk_0002"
down_revision = "bulk_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE flowyard.bulk_chunks ADD COLUMN checksum_recipe smallint")


def downgrade() -> None:
    op.execute("ALTER TABLE flowyard.bulk_chunks DROP COLUMN checksum_recipe")
