"""1:1 verification and 1:N identification."""
from __future__ import annotations

import uuid

from fastapi import APIRouter, Depends

from app.apidocs import (BAD_SHAPE, LOCKED, NOT_ENROLLED, RATE_LIMITED, REPLAYED, SUBJECT_NOT_FOUND, UNAVAILABLE,
                         UNKNOWN_TRANSFORM, auth_errors, body_errors, problem_response)
from app.apidocs import NO_FACE
from app.auth import Principal
from app.context import GatewayContext
from app.deps import get_context, require_scope
from app.schemas import IdentifyOut, IdentifyRequest, VerifyOut, VerifyRequest
from app.services import biometrics
from app.services.audit import audit

router = APIRouter(prefix="/v1", tags=["matching"])
ERRORS = {**auth_errors("verify"), **body_errors(BAD_SHAPE, UNKNOWN_TRANSFORM, NO_FACE),
          409: problem_response("Replayed nonce, or subject without templates", REPLAYED, NOT_ENROLLED),
          429: problem_response("Budget of the API key (or of the subject) spent; see Retry-After", RATE_LIMITED),
          503: problem_response("A party is down or timed out", UNAVAILABLE)}


@router.post("/verify", response_model=VerifyOut, responses={
    **ERRORS, 404: problem_response("Unknown subject", SUBJECT_NOT_FOUND),
    423: problem_response("Subject locked after repeated failed verifications; see Retry-After", LOCKED)})
async def verify(body: VerifyRequest, principal: Principal = Depends(require_scope("verify")),
                 ctx: GatewayContext = Depends(get_context)) -> VerifyOut:
    """1:1: is this face the claimed subject? Reveals one bit, computed under MPC."""
    request_id = "req_" + uuid.uuid4().hex[:16]
    biometrics.require_mode(principal, "gateway")  # before any budget is spent
    ctx.abuse.admit_verify(principal, body.subject_id)
    match, version = await biometrics.verify(ctx, principal, body.subject_id, body.features)
    audit(ctx.sessions, principal, "verify", "match" if match else "no-match", body.subject_id, request_id)
    if ctx.abuse.record_verify(principal, body.subject_id, match):
        audit(ctx.sessions, principal, "verify-lockout", "locked", body.subject_id, request_id)
    return VerifyOut(match=match, model_version=version, request_id=request_id)


@router.post("/identify", response_model=IdentifyOut, responses=ERRORS)
async def identify(body: IdentifyRequest, principal: Principal = Depends(require_scope("verify")),
                   ctx: GatewayContext = Depends(get_context)) -> IdentifyOut:
    """1:N: who is this among the tenant's subjects? One bit, plus the subject id only on a match."""
    request_id = "req_" + uuid.uuid4().hex[:16]
    biometrics.require_mode(principal, "gateway")  # before any budget is spent
    ctx.abuse.admit(principal, "identify")
    subject_id, version = await biometrics.identify(ctx, principal, body.features)
    audit(ctx.sessions, principal, "identify", "match" if subject_id else "no-match", subject_id, request_id)
    return IdentifyOut(match=subject_id is not None, subject_id=subject_id, model_version=version,
                       request_id=request_id)
