"""Apply the gateway's Alembic migrations programmatically (used by `privface migrate` and at start-up)."""
from __future__ import annotations


from alembic import command
from alembic.config import Config

from common.paths import PROJECT_ROOT

# found by path, not imported: migrations/ depends on app (its env.py reads the ORM metadata), not the reverse
GATEWAY_SCRIPTS = PROJECT_ROOT / "migrations" / "gateway"


def gateway_alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(GATEWAY_SCRIPTS))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def migrate_gateway(url: str) -> None:
    """Bring the gateway database at `url` to the newest revision (idempotent)."""
    from app.db import make_engine

    make_engine(url).dispose()  # creates the SQLite folder when needed
    command.upgrade(gateway_alembic_config(url), "head")
