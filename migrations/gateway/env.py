"""Alembic environment of the gateway database. The URL comes from the caller (app.migrate) or settings."""
from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, Engine

from app.db import Base, make_engine
from app import models  # noqa: F401  (registers the tables on Base.metadata)

config = context.config


def _url() -> str:
    url = config.get_main_option("sqlalchemy.url")
    if url:
        return url
    from app.settings import get_settings

    return get_settings().database_url


def run_migrations_offline() -> None:
    context.configure(url=_url(), target_metadata=Base.metadata, literal_binds=True, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def _migrate(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True,
                      version_table="alembic_version_gateway")
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """On the caller's connection or engine (config.attributes["connection"]) if it gave one, else on ours."""
    given = config.attributes.get("connection")
    if isinstance(given, Connection):
        _migrate(given)
        return
    engine = given if isinstance(given, Engine) else make_engine(_url())
    with engine.connect() as connection:
        _migrate(connection)


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
