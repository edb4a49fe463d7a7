"""Party database engine and migrations (Alembic environment in migrations/party/)."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from sqlalchemy import Engine

from common.db import ensure_sqlite_folder, make_engine
from common.paths import PROJECT_ROOT

if TYPE_CHECKING:
    from alembic.config import Config

log = logging.getLogger("privface.party.db")
MIGRATIONS_DIR = PROJECT_ROOT / "migrations" / "party"


def make_party_engine(url: str) -> Engine:
    """An engine for a party database; SQLite gets WAL and synchronous=FULL (a prepare must be durable) and
    secure_delete (an erased share is overwritten with zeros in the file, not just unlinked from the b-tree)."""
    return make_engine(url, pool_size=5, max_overflow=5, secure_delete=True)


def scrub_erased(engine: Engine) -> None:
    """After a committed delete: make the erased share bytes unreadable in the database's files too.

    SQLite (with ``secure_delete``): the current pages are already zeroed, but the WAL still holds the older
    page images; a TRUNCATE checkpoint writes the clean pages back and empties the WAL.
    PostgreSQL: an UPDATE leaves the old row version (with the share) in the heap until VACUUM; a plain VACUUM
    of both tables right away removes those dead versions so no later reader or page scan can return them
    (``docs/security.md``, erasure). Best effort: a busy database is scrubbed by the next delete or autovacuum.
    """
    from sqlalchemy import text

    try:
        if engine.dialect.name == "sqlite":
            with engine.connect() as conn:
                conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
        elif engine.dialect.name == "postgresql":
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.execute(text("VACUUM shares, ops"))
    except Exception as exc:  # noqa: BLE001 - the delete itself is durable; scrubbing is retried next time
        log.warning("scrubbing erased shares failed: %s", type(exc).__name__)


def alembic_config(url: str) -> Config:
    from alembic.config import Config

    cfg = Config(str(MIGRATIONS_DIR / "alembic.ini"))
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["url"] = url  # not through configparser: URLs may hold '%'
    return cfg


def migrate_party_db(url: str, revision: str = "head") -> None:
    """Bring the party database at ``url`` to ``revision`` (creates the SQLite file's folder if needed)."""
    from alembic import command

    ensure_sqlite_folder(url)
    command.upgrade(alembic_config(url), revision)
