"""Replay protection: a feature payload is accepted at most once, ever.

Two checks together make that true, and this module owns both so that they cannot drift apart:
- freshness: `created_at` (mandatory) lies between `now - replay_window_s` and `now + clock_skew_s`;
- the nonce: remembered for `nonce_ttl_s = replay_window_s + clock_skew_s + 1`, i.e. longer than any
  moment at which the same bytes could still pass the freshness check.
Nonces live in Redis (SET NX EX) when configured, so every gateway worker shares them; otherwise in the
gateway database.
"""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import redis
from sqlalchemy import delete
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from app.db import session_scope
from app.models import Nonce
from app.problems import Problem, invalid_features
from app.schemas import FeaturePayload, SealedPayload


def check_freshness(payload: FeaturePayload | SealedPayload, window_s: int, skew_s: int) -> None:
    """Refuse payloads stamped too far in the future or older than the replay window (naive stamps are UTC)."""
    created = payload.created_at if payload.created_at.tzinfo else payload.created_at.replace(tzinfo=timezone.utc)
    now = datetime.now(timezone.utc)
    if created > now + timedelta(seconds=skew_s) or created < now - timedelta(seconds=window_s):
        raise invalid_features(f"created_at {created.isoformat()} is outside the accepted window (at most "
                               f"{window_s} s old, {skew_s} s ahead); make a fresh payload", "stale-payload")


class ReplayGuard:
    """Admits each payload once: fresh by its timestamp, and a nonce never seen while that stamp is fresh."""

    def __init__(self, sessions: sessionmaker[Session], window_s: int, skew_s: int, nonce_ttl_s: int,
                 redis_client: redis.Redis | None) -> None:
        if nonce_ttl_s < window_s + skew_s:
            raise ValueError(f"nonce TTL {nonce_ttl_s} s is shorter than the freshness window "
                             f"{window_s} s + {skew_s} s skew: replays would pass once the nonce expires")
        self._sessions, self._redis = sessions, redis_client
        self.window_s, self.skew_s, self.nonce_ttl_s = window_s, skew_s, nonce_ttl_s

    def admit(self, payload: FeaturePayload | SealedPayload) -> None:
        """Check freshness, then remember the nonce; a 422 (stale) or 409 (replayed) problem otherwise."""
        check_freshness(payload, self.window_s, self.skew_s)
        if not self._claim(payload.nonce):
            raise Problem(409, "replayed-nonce", "Payload already used",
                          "This feature payload's nonce was seen before; make a fresh payload.")

    def _claim(self, nonce: str) -> bool:
        if self._redis is not None:
            return bool(self._redis.set(f"privface:nonce:{nonce}", 1, nx=True, ex=self.nonce_ttl_s))
        cutoff = datetime.now(timezone.utc) - timedelta(seconds=self.nonce_ttl_s)
        try:
            with session_scope(self._sessions) as session:
                session.execute(delete(Nonce).where(Nonce.seen_at < cutoff))
                session.add(Nonce(nonce=nonce))
        except IntegrityError:
            return False
        return True
