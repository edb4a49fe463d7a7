"""The database engine factory of the gateway and of each party: SQLite (the embedded local stack and the
tests) made to behave like a server database, or PostgreSQL with a health-checked pool.

One factory so that the two cannot drift: every SQLite database gets WAL (readers never block the writer),
synchronous=FULL (a committed prepare or enrollment survives a power cut) and foreign_keys=ON (SQLite ignores
declared foreign keys otherwise). What differs per caller is a parameter.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event

MEMORY_URL = "sqlite:///:memory:"
# psycopg prepares a statement run 5 times, and PostgreSQL then plans it once for any parameters: the snapshot's
# `min(seq) WHERE state = $1` became a scan of the whole log (30 ms per verify at 100,000 operations instead of 2;
# bench/gateway_db.py). Planning every execution for its own parameters costs well under a millisecond.
POSTGRES_CONNECT_ARGS = {"options": "-c plan_cache_mode=force_custom_plan"}


def sqlite_pragmas(secure_delete: bool) -> list[str]:
    """The PRAGMAs run on every new SQLite connection."""
    pragmas = ["PRAGMA journal_mode=WAL", "PRAGMA synchronous=FULL", "PRAGMA foreign_keys=ON"]
    if secure_delete:  # freed cells and pages are zeroed: erased rows leave the file, not just the b-tree
        pragmas.append("PRAGMA secure_delete=ON")
    return pragmas


def ensure_sqlite_folder(url: str) -> None:
    """Create the folder of a SQLite file URL, so that a fresh checkout starts without set-up."""
    if url.startswith("sqlite:///") and url != MEMORY_URL:
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)


def make_engine(url: str, *, pool_size: int, max_overflow: int, secure_delete: bool = False) -> Engine:
    """An engine for `url`: SQLite with the pragmas above, any other URL with a pre-pinged pool of this size."""
    if not url.startswith("sqlite"):
        return create_engine(url, pool_pre_ping=True, pool_size=pool_size, max_overflow=max_overflow,
                             connect_args=POSTGRES_CONNECT_ARGS if url.startswith("postgresql") else {})
    ensure_sqlite_folder(url)
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
    pragmas = sqlite_pragmas(secure_delete)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        cursor = dbapi_conn.cursor()
        for pragma in pragmas:
            cursor.execute(pragma)
        cursor.close()

    return engine
