"""The root of the flowyard schema's history.

env.py creates the schema itself; each pipeline's tables hang off this revision on a
branch of their own (``down_revision = "0001"``), so pipelines evolve their state
independently and ``upgrade heads`` applies them all.

Revision ID: 0001
"""

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Nothing beyond the schema, which env.py creates before any revision runs."""


def downgrade() -> None:
    """Nothing to undo: the schema outlives its revisions."""
