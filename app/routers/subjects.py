"""Subjects and their enrollments."""
from __future__ import annotations

import uuid

from fastapi import APIRouter, Depends, Response, status
from sqlalchemy.orm import Session

from app.apidocs import (BAD_SHAPE, RATE_LIMITED, REPLAYED, SUBJECT_NOT_FOUND, UNAVAILABLE, UNKNOWN_TRANSFORM,
                         auth_errors, body_errors, problem_response)
from app.apidocs import NO_FACE
from app.auth import Principal
from app.context import GatewayContext
from app.db import session_scope
from app.deps import get_context, get_session, require_scope
from app.models import Enrollment, Subject
from app.schemas import EnrollmentOut, EnrollRequest, SubjectCreate, SubjectOut
from app.services import biometrics
from app.services.audit import audit

router = APIRouter(prefix="/v1/subjects", tags=["subjects"])
ERRORS = {**auth_errors("enroll"), 404: problem_response("Unknown subject", SUBJECT_NOT_FOUND)}


def _subject_out(subject: Subject) -> SubjectOut:
    return SubjectOut(id=subject.id, external_id=subject.external_id, created_at=subject.created_at,
                      enrollments=[_enrollment_out(e) for e in subject.enrollments])


def _enrollment_out(enrollment: Enrollment) -> EnrollmentOut:
    return EnrollmentOut(id=f"enr_{enrollment.template_seq}", subject_id=enrollment.subject_id,
                         model_version=enrollment.model_version, created_at=enrollment.created_at,
                         epsilon=enrollment.epsilon)


@router.post("", status_code=status.HTTP_201_CREATED, response_model=SubjectOut,
             responses={**auth_errors("enroll"), **body_errors()})
def create_subject(body: SubjectCreate, principal: Principal = Depends(require_scope("enroll")),
                   ctx: GatewayContext = Depends(get_context)) -> SubjectOut:
    """Create a subject (a person) to enroll faces for. Returns its id."""
    with session_scope(ctx.sessions) as session:  # committed before the response leaves
        subject = Subject(id="sub_" + uuid.uuid4().hex, tenant_id=principal.tenant_id, external_id=body.external_id)
        session.add(subject)
        session.flush()
        session.refresh(subject)
        return _subject_out(subject)


@router.get("/{subject_id}", response_model=SubjectOut, responses=ERRORS)
def get_subject(subject_id: str, principal: Principal = Depends(require_scope("enroll")),
                session: Session = Depends(get_session)) -> SubjectOut:
    """A subject and the metadata of its enrollments (never a template)."""
    return _subject_out(biometrics.load_subject(session, principal, subject_id))


@router.delete("/{subject_id}", status_code=status.HTTP_204_NO_CONTENT,
               responses={**ERRORS, 503: problem_response("A party is down; nothing was deleted", UNAVAILABLE)})
async def delete_subject(subject_id: str, principal: Principal = Depends(require_scope("enroll")),
                         ctx: GatewayContext = Depends(get_context)) -> Response:
    """Delete a subject and remove its template shares at both parties (all or nothing)."""
    await biometrics.delete_subject(ctx, principal, subject_id)
    audit(ctx.sessions, principal, "delete-subject", "deleted", subject_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/{subject_id}/enrollments", status_code=status.HTTP_201_CREATED, response_model=EnrollmentOut,
             responses={**ERRORS, **body_errors(BAD_SHAPE, UNKNOWN_TRANSFORM, NO_FACE),
                        409: problem_response("Replayed nonce", REPLAYED),
                        429: problem_response("The API key's enroll budget is spent; see Retry-After", RATE_LIMITED),
                        503: problem_response("A party is down; nothing was kept", UNAVAILABLE)})
async def enroll(subject_id: str, body: EnrollRequest, principal: Principal = Depends(require_scope("enroll")),
                 ctx: GatewayContext = Depends(get_context)) -> EnrollmentOut:
    """Enroll one face (as SDK features) for the subject: stored as two shares, one per party."""
    biometrics.require_mode(principal, "gateway")  # before any budget is spent
    ctx.abuse.admit(principal, "enroll")
    enrollment = await biometrics.enroll(ctx, principal, subject_id, body.features)
    audit(ctx.sessions, principal, "enroll", "stored", subject_id)
    return _enrollment_out(enrollment)
