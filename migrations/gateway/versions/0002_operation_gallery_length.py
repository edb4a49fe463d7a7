"""operations.model_version holds a gallery name ({version}/{tenant}/k{n}, up to ~135 characters): String(200)

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30
"""
from alembic import op
import sqlalchemy as sa

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("operations") as batch_op:
        batch_op.alter_column("model_version", existing_type=sa.String(length=64), type_=sa.String(length=200),
                              existing_nullable=True)


def downgrade() -> None:
    with op.batch_alter_table("operations") as batch_op:
        batch_op.alter_column("model_version", existing_type=sa.String(length=200), type_=sa.String(length=64),
                              existing_nullable=True)
