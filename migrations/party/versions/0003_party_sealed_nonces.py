"""party database: the sealed request nonces this party has used (replay protection, review finding 3)

Revision ID: party_0003
Revises: party_0002
Create Date: 2026-12-01
"""
from alembic import op
import sqlalchemy as sa

revision = "party_0003"
down_revision = "party_0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "sealed_nonces",
        sa.Column("nonce", sa.String(length=32), nullable=False),
        sa.Column("operation", sa.String(length=16), nullable=False),
        sa.Column("seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("nonce"),
    )
    op.create_index("ix_sealed_nonces_seen_at", "sealed_nonces", ["seen_at"])


def downgrade() -> None:
    op.drop_index("ix_sealed_nonces_seen_at", table_name="sealed_nonces")
    op.drop_table("sealed_nonces")
