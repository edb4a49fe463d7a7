"""Replay protection at a party for sealed mode (review finding 3): freshness of the authenticated ``created_at``
and a store of the request nonces already used for an MPC job.

The envelope's associated data binds the nonce, the operation (enroll/verify/identify) and ``created_at``
(``secure/sealed_box.py``), so none of them can be changed without the envelope failing to open. A party then
refuses an envelope whose ``created_at`` lies outside ``[now - window, now + CLOCK_SKEW_S]`` and one whose nonce it
has used before. The store is a table of this party's database, so it survives a restart. Its rows expire once
they are older than the window plus the skew: an envelope that old is refused as stale anyway, so the store stays
bounded by the request rate times the window. Nonces are 16 random bytes from the SDK, so one global store refuses
every replay, within a tenant and across tenants.
"""
from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from secure.party.models import SealedNonceRow

CLOCK_SKEW_S = 300  # how far in the future created_at may lie (the gateway's default PRIVFACE_CLOCK_SKEW_S)


class NonceStore:
    """The sealed nonces this party has used, in its own database."""

    def __init__(self, sessions: sessionmaker[Session], window_s: float) -> None:
        self.sessions, self.window_s = sessions, float(window_s)
        self._lock = threading.Lock()

    def fresh(self, created_at: int, now: datetime | None = None) -> bool:
        """Is ``created_at`` (Unix seconds) inside the accepted window?"""
        stamp = (now or datetime.now(timezone.utc)).timestamp()
        return stamp - self.window_s <= created_at <= stamp + CLOCK_SKEW_S

    def seen(self, nonce: str) -> bool:
        with self.sessions() as s:
            return s.scalar(select(SealedNonceRow.nonce).where(SealedNonceRow.nonce == nonce)) is not None

    def use(self, nonce: str, operation: str) -> bool:
        """Record the nonce for an MPC job; False if it was already used (a replay). Purges expired rows."""
        now = datetime.now(timezone.utc)
        expired = now - timedelta(seconds=self.window_s + CLOCK_SKEW_S + 1)
        with self._lock, self.sessions() as s:
            s.execute(delete(SealedNonceRow).where(SealedNonceRow.seen_at < expired))
            s.add(SealedNonceRow(nonce=nonce, operation=operation, seen_at=now))
            try:
                s.commit()
            except IntegrityError:
                s.rollback()
                return False
        return True
