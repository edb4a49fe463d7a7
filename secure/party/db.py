"""Party database engine and migrations (Alembic environment in migrations/party/)."""
from __future__ import annotations

from pathlib import Path

from sqlalchemy import Engine, create_engine, event

from secure.party.settings import PROJECT_ROOT

MIGRATIONS_DIR = PROJECT_ROOT / "migrations" / "party"


def make_party_engine(url: str) -> Engine:
    """An engine for a party database; SQLite gets WAL and synchronous=FULL (a prepare must be durable)."""
    if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5)


def alembic_config(url: str):  # type: ignore[no-untyped-def]
    from alembic.config import Config

    cfg = Config(str(MIGRATIONS_DIR / "alembic.ini"))
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["url"] = url  # not through configparser: URLs may hold '%'
    return cfg


def migrate_party_db(url: str, revision: str = "head") -> None:
    """Bring the party database at ``url`` to ``revision`` (creates the SQLite file's folder if needed)."""
    from alembic import command

    if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    command.upgrade(alembic_config(url), revision)
