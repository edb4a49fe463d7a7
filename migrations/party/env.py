"""Alembic env for a party database. URL: the Config's sqlalchemy.url, else PartySettings().database_url."""
from __future__ import annotations

from alembic import context
from secure.party.db import make_party_engine
from secure.party.models import PartyBase

config = context.config
target_metadata = PartyBase.metadata


def _url() -> str:
    url = config.attributes.get("url") or config.get_main_option("sqlalchemy.url")
    if not url:
        from secure.party.settings import PartySettings

        url = PartySettings().resolved_database_url()
    return url


def run_migrations_offline() -> None:
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = make_party_engine(_url())  # the same pragmas as the party's own connections
    with engine.connect() as conn:
        context.configure(connection=conn, target_metadata=target_metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
