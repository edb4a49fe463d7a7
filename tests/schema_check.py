"""Does a migrated database hold exactly what the ORM models declare? (the gateway's and each party's)."""
from __future__ import annotations

from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, MetaData


def schema_differences(engine: Engine, metadata: MetaData) -> list[Any]:
    """Alembic's differences between the database behind `engine` and `metadata`, less Alembic's own version
    table (the gateway names its own, so it is not in the models)."""
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
    return [d for d in diff if not (d[0] == "remove_table" and d[1].name.startswith("alembic_version"))]
