"""Sealed mode's routes (issue 12, docs/sealed.md): enroll, verify, identify with features the gateway cannot read.

The SDK of a tenant in mode ``sealed`` (``GET /v1/transforms`` says so) secret-shares its noised features and
encrypts one share to each party's key (``GET /v1/sealed/keys``); these routes relay each envelope to its party
only. Answers are those of gateway mode: an enrollment id, one bit, or one bit and a subject id on a match.
"""
from __future__ import annotations

import uuid

from fastapi import APIRouter, Depends, status

from app.apidocs import (LOCKED, NOT_ENROLLED, RATE_LIMITED, REPLAYED, SUBJECT_NOT_FOUND, UNAVAILABLE, auth_errors,
                         body_errors, problem_response)
from app.auth import Principal
from app.context import GatewayContext
from app.deps import get_context, require_scope
from app.problems import Problem
from app.routers.subjects import _enrollment_out
from app.schemas import (EnrollmentOut, IdentifyOut, SealedEnrollRequest, SealedIdentifyRequest, SealedVerifyRequest,
                         VerifyOut)
from app.services import biometrics, sealed
from app.services.audit import audit

router = APIRouter(prefix="/v1/sealed", tags=["sealed"])
WRONG_MODE = Problem(409, "tenant-mode", "Wrong mode for this tenant",
                     "this tenant is in gateway mode: send gateway-mode payloads to /v1/subjects/.../enrollments, "
                     "/v1/verify (GET /v1/transforms says the mode)")
REFUSED = Problem(422, "sealed-input-refused", "Sealed input refused",
                  "a party could not use its sealed share (...); seal a fresh payload to the current keys "
                  "(GET /v1/sealed/keys); nothing was kept")
ERRORS = {**body_errors(REFUSED), 404: problem_response("Unknown subject", SUBJECT_NOT_FOUND),
          409: problem_response("Tenant in gateway mode, replayed nonce, or subject without sealed templates",
                                WRONG_MODE, REPLAYED, NOT_ENROLLED),
          429: problem_response("Budget of the API key (or of the subject) spent; see Retry-After", RATE_LIMITED),
          503: problem_response("A party is down or timed out; nothing was kept", UNAVAILABLE)}


@router.post("/subjects/{subject_id}/enrollments", status_code=status.HTTP_201_CREATED, response_model=EnrollmentOut,
             responses={**auth_errors("enroll"), **ERRORS})
async def enroll(subject_id: str, body: SealedEnrollRequest, principal: Principal = Depends(require_scope("enroll")),
                 ctx: GatewayContext = Depends(get_context)) -> EnrollmentOut:
    """Sealed enrollment: the parties compute the protected template under MPC from their own feature share; each
    keeps its share of it (all or nothing)."""
    biometrics.require_mode(principal, "sealed")  # before any budget is spent
    ctx.abuse.admit(principal, "enroll")
    enrollment = await sealed.enroll(ctx, principal, subject_id, body.sealed)
    audit(ctx.sessions, principal, "enroll", "stored", subject_id)
    return _enrollment_out(enrollment)


@router.post("/verify", response_model=VerifyOut, responses={
    **auth_errors("verify"), **ERRORS,
    423: problem_response("Subject locked after repeated failed verifications; see Retry-After", LOCKED)})
async def verify(body: SealedVerifyRequest, principal: Principal = Depends(require_scope("verify")),
                 ctx: GatewayContext = Depends(get_context)) -> VerifyOut:
    """Sealed 1:1: the parties embed the probe under MPC and compare it with the subject's templates at the served
    threshold; one bit is opened."""
    request_id = "req_" + uuid.uuid4().hex[:16]
    biometrics.require_mode(principal, "sealed")
    ctx.abuse.admit_verify(principal, body.subject_id)
    match, version = await sealed.verify(ctx, principal, body.subject_id, body.sealed)
    audit(ctx.sessions, principal, "verify", "match" if match else "no-match", body.subject_id, request_id)
    if ctx.abuse.record_verify(principal, body.subject_id, match):
        audit(ctx.sessions, principal, "verify-lockout", "locked", body.subject_id, request_id)
    return VerifyOut(match=match, model_version=version, request_id=request_id)


@router.post("/identify", response_model=IdentifyOut, responses={**auth_errors("verify"), **ERRORS})
async def identify(body: SealedIdentifyRequest, principal: Principal = Depends(require_scope("verify")),
                   ctx: GatewayContext = Depends(get_context)) -> IdentifyOut:
    """Sealed 1:N over the tenant's sealed gallery: one bit, plus the subject id only on a match."""
    request_id = "req_" + uuid.uuid4().hex[:16]
    biometrics.require_mode(principal, "sealed")
    ctx.abuse.admit(principal, "identify")
    subject_id, version = await sealed.identify(ctx, principal, body.sealed)
    audit(ctx.sessions, principal, "identify", "match" if subject_id else "no-match", subject_id, request_id)
    return IdentifyOut(match=subject_id is not None, subject_id=subject_id, model_version=version,
                       request_id=request_id)
