"""Each gallery's match thresholds, fixed at the party (so no caller of the party API chooses what is revealed).

A gallery's policy (``secure/thresholds.py``: the verify threshold and the identify schedule by gallery size)
is registered once by the gateway from its model version's operating points; the first registration is
recorded and never changes. A match job reads the threshold from here, never from the request: whoever
holds the gateway's credential can no longer binary-search a template coordinate by moving the threshold.
Registering a gallery again with the same value is a no-op; with another value it is refused (409), so a
stolen credential cannot re-point a gallery's threshold, and a gateway/party disagreement shows loudly.
"""
from __future__ import annotations

import threading

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from secure.party.models import GalleryRow
from secure.thresholds import GalleryPolicy


class ThresholdConflict(Exception):
    """The gallery is already registered with another policy."""

    def __init__(self, gallery: str, recorded: GalleryPolicy | None) -> None:
        super().__init__(f"gallery {gallery!r} is registered with other thresholds")
        self.gallery, self.recorded = gallery, recorded


class Thresholds:
    """Registered galleries and their thresholds (database-backed, cached in memory; thread-safe)."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions
        self._cache: dict[str, GalleryPolicy] = {}
        self._lock = threading.Lock()

    def get(self, gallery: str) -> GalleryPolicy | None:
        """The recorded policy of ``gallery``, or None if it was never registered."""
        with self._lock:
            if gallery in self._cache:
                return self._cache[gallery]
        with self.sessions() as s:
            row = s.get(GalleryRow, gallery)
            value = None if row is None else GalleryPolicy.from_json(row.threshold, row.identify_thresholds)
        if value is not None:
            with self._lock:
                self._cache[gallery] = value
        return value

    def register(self, gallery: str, policy: GalleryPolicy) -> GalleryPolicy:
        """Record ``policy`` for a new gallery; idempotent for the same policy.

        Raises ThresholdConflict if the gallery already holds another one.
        """
        value = policy
        recorded = self.get(gallery)
        if recorded is None:
            try:
                with self.sessions() as s:
                    s.add(GalleryRow(gallery=gallery, threshold=value.verify,
                                     identify_thresholds=value.schedule_json() or None))
                    s.commit()
            except IntegrityError:  # registered concurrently: compare with the winner below
                pass
            recorded = self.get(gallery)
        if recorded != value:
            raise ThresholdConflict(gallery, recorded)
        return value
