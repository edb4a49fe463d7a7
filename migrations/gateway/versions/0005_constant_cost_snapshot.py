"""Per-request queries that no longer read the whole log: operation_totals, two indexes (issue 13)

operation_totals keeps the number of committed operations (updated with each commit); the partial index
ix_operations_unacknowledged holds only the operations a party has not acknowledged; the composite index on
enrollments answers "does this tenant hold templates under version V" with one lookup.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07
"""
from alembic import op
import sqlalchemy as sa

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    totals = op.create_table("operation_totals", sa.Column("id", sa.Integer(), primary_key=True),
                             sa.Column("committed", sa.BigInteger(), nullable=False))
    count = op.get_bind().execute(sa.text("SELECT count(*) FROM operations WHERE state = 'committed'")).scalar()
    op.bulk_insert(totals, [{"id": 1, "committed": int(count or 0)}])
    op.create_index("ix_operations_unacknowledged", "operations", ["seq"],
                    sqlite_where=sa.text("acked_0 IS 0 OR acked_1 IS 0"),
                    postgresql_where=sa.text("acked_0 IS false OR acked_1 IS false"))
    op.create_index("ix_enrollments_tenant_key_model", "enrollments", ["tenant_id", "key_version", "model_version"])


def downgrade() -> None:
    op.drop_index("ix_enrollments_tenant_key_model", table_name="enrollments")
    op.drop_index("ix_operations_unacknowledged", table_name="operations")
    op.drop_table("operation_totals")
