"""party database: shares and the two-phase operation log

Revision ID: party_0001
Revises:
Create Date: 2026-11-23
"""
from alembic import op
import sqlalchemy as sa

revision = "party_0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "shares",
        sa.Column("template_seq", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("model_version", sa.String(length=200), nullable=False),
        sa.Column("dim", sa.Integer(), nullable=False),
        sa.Column("share", sa.LargeBinary(), nullable=True),
        sa.Column("add_seq", sa.BigInteger(), nullable=False),
        sa.Column("del_seq", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("template_seq"),
    )
    op.create_index("ix_shares_model_version", "shares", ["model_version"])
    op.create_index("ix_shares_add_seq", "shares", ["add_seq"], unique=True)
    op.create_table(
        "ops",
        sa.Column("seq", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("template_seq", sa.BigInteger(), nullable=True),
        sa.Column("template_seqs", sa.JSON(), nullable=True),
        sa.Column("model_version", sa.String(length=200), nullable=True),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("payload", sa.LargeBinary(), nullable=True),
        sa.Column("digest", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("decided_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("seq"),
    )
    op.create_index("ix_ops_state", "ops", ["state"])


def downgrade() -> None:
    op.drop_index("ix_ops_state", table_name="ops")
    op.drop_table("ops")
    op.drop_index("ix_shares_add_seq", table_name="shares")
    op.drop_index("ix_shares_model_version", table_name="shares")
    op.drop_table("shares")
