"""Replay protection: each payload nonce is accepted once within the replay window.

Redis (SET NX EX) when configured, so every gateway worker shares it; otherwise the gateway database.
"""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import redis
from sqlalchemy import delete
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from app.db import session_scope
from app.models import Nonce
from app.problems import Problem


class NonceStore:
    def __init__(self, sessions: sessionmaker[Session], ttl_s: int, redis_client: redis.Redis | None) -> None:
        self._sessions, self._ttl, self._redis = sessions, ttl_s, redis_client

    def claim(self, nonce: str) -> None:
        """Remember `nonce`, or raise a 409 problem if it was already used."""
        if not self._claim(nonce):
            raise Problem(409, "replayed-nonce", "Payload already used",
                          "This feature payload's nonce was seen before; make a fresh payload.")

    def _claim(self, nonce: str) -> bool:
        if self._redis is not None:
            return bool(self._redis.set(f"privface:nonce:{nonce}", 1, nx=True, ex=self._ttl))
        cutoff = datetime.now(timezone.utc) - timedelta(seconds=self._ttl)
        try:
            with session_scope(self._sessions) as session:
                session.execute(delete(Nonce).where(Nonce.seen_at < cutoff))
                session.add(Nonce(nonce=nonce))
        except IntegrityError:
            return False
        return True
