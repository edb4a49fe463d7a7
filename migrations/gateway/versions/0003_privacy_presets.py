"""Privacy presets served side by side: model_versions.preset (one active version per preset), tenants.preset

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01

Existing versions get their preset from their transform id (a frozen copy of inference.privacy_presets at
this revision: migrations never import application code).
"""
from alembic import op
import sqlalchemy as sa

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

# transform id prefix (coefficient selection, any noise) -> preset, as of this revision
PRESET_OF_PREFIX = {"dct8-y63c5-": "accurate", "dct8-y54c5-": "balanced", "dct8-y43c5-": "strict"}


def upgrade() -> None:
    with op.batch_alter_table("model_versions") as batch_op:
        batch_op.add_column(sa.Column("preset", sa.String(length=32), nullable=False, server_default="accurate"))
        batch_op.create_index("ix_model_versions_preset", ["preset"])
    with op.batch_alter_table("tenants") as batch_op:
        batch_op.add_column(sa.Column("preset", sa.String(length=32), nullable=True))
    versions = sa.table("model_versions", sa.column("version", sa.String), sa.column("transform_id", sa.String),
                        sa.column("preset", sa.String))
    bind = op.get_bind()
    for version, transform_id in bind.execute(sa.select(versions.c.version, versions.c.transform_id)).all():
        preset = next((p for prefix, p in PRESET_OF_PREFIX.items() if transform_id.startswith(prefix)),
                      transform_id.rsplit("-", 1)[0])
        bind.execute(versions.update().where(versions.c.version == version).values(preset=preset[:32]))


def downgrade() -> None:
    with op.batch_alter_table("tenants") as batch_op:
        batch_op.drop_column("preset")
    with op.batch_alter_table("model_versions") as batch_op:
        batch_op.drop_index("ix_model_versions_preset")
        batch_op.drop_column("preset")
