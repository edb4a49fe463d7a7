"""The audit trail of match jobs at a party: one log line and one database row per job, never any data.

A row says when, which job id, kind, gallery, how many gallery rows and queries, and the status answered.
It lets an operator see a template being probed (many verify jobs on one gallery) without the audit itself
holding anything secret.
"""
from __future__ import annotations

import logging

from sqlalchemy.orm import Session, sessionmaker

from secure.party.models import MatchAuditRow

log = logging.getLogger("privface.party.audit")


class MatchAudit:
    def __init__(self, sessions: sessionmaker[Session], rank: int) -> None:
        self.sessions, self.rank = sessions, rank

    def record(self, job_id: str, kind: str, gallery: str, rows: int, queries: int, status: int) -> None:
        """Write the audit line and row; an audit failure is logged, never turned into a match failure."""
        log.info("match job party=%d job=%s kind=%s gallery=%s rows=%d queries=%d status=%d",
                 self.rank, job_id, kind, gallery, rows, queries, status)
        try:
            with self.sessions() as s:
                s.add(MatchAuditRow(job_id=job_id, kind=kind, gallery=gallery, rows=rows,
                                    queries=queries, status=status))
                s.commit()
        except Exception as exc:  # noqa: BLE001 - the log line above already holds the record
            log.error("audit row not written: %s", type(exc).__name__)
