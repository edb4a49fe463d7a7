"""party database: fixed per-gallery thresholds (verify + identify schedule) and the match audit

Revision ID: party_0002
Revises: party_0001
Create Date: 2026-12-01
"""
from alembic import op
import sqlalchemy as sa

revision = "party_0002"
down_revision = "party_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "galleries",
        sa.Column("model_version", sa.String(length=200), nullable=False),
        sa.Column("threshold", sa.Float(precision=53), nullable=False),
        sa.Column("identify_thresholds", sa.JSON(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("model_version"),
    )
    op.create_table(
        "match_audit",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("job_id", sa.String(length=128), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("model_version", sa.String(length=200), nullable=False),
        sa.Column("rows", sa.Integer(), nullable=False),
        sa.Column("queries", sa.Integer(), nullable=False),
        sa.Column("status", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_match_audit_at", "match_audit", ["at"])


def downgrade() -> None:
    op.drop_index("ix_match_audit_at", table_name="match_audit")
    op.drop_table("match_audit")
    op.drop_table("galleries")
