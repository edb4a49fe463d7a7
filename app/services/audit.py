"""The audit log: who did what, when, with which outcome. Never features, embeddings or scores."""
from __future__ import annotations

from sqlalchemy.orm import Session, sessionmaker

from app.auth import Principal
from app.db import session_scope
from app.models import AuditEntry
from common.logs import current_request_id


def audit(sessions: sessionmaker[Session], principal: Principal, action: str, outcome: str,
          subject_id: str | None = None, request_id: str | None = None) -> None:
    with session_scope(sessions) as session:
        session.add(AuditEntry(tenant_id=principal.tenant_id, key_prefix=principal.key_prefix, action=action,
                               subject_id=subject_id, outcome=outcome,
                               request_id=request_id or current_request_id()))  # ties the entry to the logs
