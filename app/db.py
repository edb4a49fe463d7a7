"""Gateway database engine and sessions (SQLAlchemy 2)."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker

from common import db


class Base(DeclarativeBase):
    """Declarative base of the gateway's ORM models (party databases have their own)."""


def make_engine(url: str) -> Engine:
    """The gateway's engine (common/db.py): every uvicorn worker and background job shares its pool."""
    return db.make_engine(url, pool_size=10, max_overflow=20)


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A transaction: committed on success, rolled back on any exception."""
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
