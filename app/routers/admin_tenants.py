"""Admin endpoints for the caller's tenant, its API keys and its audit log; onboarding of new tenants.

Thin: the rules (tenant isolation, the last admin key, rotation in one transaction) are in
`app/services/tenants.py`. Every change is audited. Used by the admin console (`app/routers/console.py`).
"""
from __future__ import annotations

from fastapi import APIRouter, Depends, Query, status
from sqlalchemy.orm import Session

from app.apidocs import auth_errors, body_errors, problem_response
from app.auth import Principal
from app.context import GatewayContext
from app.db import session_scope
from app.deps import get_context, get_session, require_scope
from app.models import ApiKey, Tenant
from app.problems import Problem
from app.schemas import (ApiKeyCreate, ApiKeyCreated, ApiKeyOut, AuditEntryOut, TenantCreate, TenantCreated,
                         TenantOut)
from app.services import tenants
from app.services.audit import audit

router = APIRouter(prefix="/v1/admin", tags=["admin"])
admin = require_scope("admin")
ERRORS = auth_errors("admin")
KEY_NOT_FOUND = Problem(404, "api-key-not-found", "Unknown API key", "No API key with prefix '0a1b2c3d4e5f' in "
                        "this tenant.")
KEY_REVOKED = Problem(409, "api-key-revoked", "The API key is already revoked",
                      "Key 0a1b2c3d4e5f was revoked at 2026-11-23T10:00:00+00:00; nothing was changed.")
LAST_ADMIN = Problem(409, "last-admin-key", "The tenant's last admin key cannot be revoked",
                     "Key 0a1b2c3d4e5f is the tenant's only active admin key; create another admin key first "
                     "(or rotate this one). Nothing was changed.")
TENANT_EXISTS = Problem(409, "tenant-exists", "The tenant exists already",
                        "A tenant 'globex' exists; nothing was changed.")
KEY_ERRORS = {**ERRORS, 404: problem_response("Unknown API key (or another tenant's)", KEY_NOT_FOUND)}


def tenant_out(row: Tenant) -> TenantOut:
    return TenantOut.model_validate(row, from_attributes=True)


def key_out(row: ApiKey) -> ApiKeyOut:
    return ApiKeyOut(prefix=row.prefix, scopes=row.scopes.split(), created_at=row.created_at,
                     revoked_at=row.revoked_at)


@router.get("/tenant", response_model=TenantOut, responses=ERRORS)
def get_tenant(principal: Principal = Depends(admin), session: Session = Depends(get_session)) -> TenantOut:
    """The caller's tenant: name, privacy preset, template key version."""
    return tenant_out(tenants.tenant_or_404(session, principal.tenant_id))


@router.post("/tenants", status_code=status.HTTP_201_CREATED, response_model=TenantCreated,
             responses={**ERRORS, **body_errors(), 409: problem_response("The tenant exists", TENANT_EXISTS)})
def create_tenant(body: TenantCreate, principal: Principal = Depends(admin),
                  ctx: GatewayContext = Depends(get_context)) -> TenantCreated:
    """Onboard a new tenant (an integrator) with one admin key, shown only in this answer. The new tenant is
    separate: the caller gets no access to it beyond this key, which its operator should rotate."""
    with session_scope(ctx.sessions) as session:
        tenant, key = tenants.create_tenant(session, body.id, body.name, ctx.settings.default_epsilon_max,
                                            ctx.settings.secret_key)
        out = TenantCreated(tenant=tenant_out(tenant), admin_key=key)
    audit(ctx.sessions, principal, "create-tenant", "created")
    return out


@router.get("/keys", response_model=list[ApiKeyOut], responses=ERRORS)
def list_keys(principal: Principal = Depends(admin), session: Session = Depends(get_session)) -> list[ApiKeyOut]:
    """The tenant's API keys (prefix, scopes, created, revoked), newest first; never a secret."""
    return [key_out(row) for row in tenants.list_keys(session, principal.tenant_id)]


@router.post("/keys", status_code=status.HTTP_201_CREATED, response_model=ApiKeyCreated,
             responses={**ERRORS, **body_errors()})
def create_key(body: ApiKeyCreate, principal: Principal = Depends(admin),
               ctx: GatewayContext = Depends(get_context)) -> ApiKeyCreated:
    """A new API key of the caller's tenant; the full key is in this answer only."""
    with session_scope(ctx.sessions) as session:
        row, full = tenants.create_key(session, principal.tenant_id, list(body.scopes), ctx.settings.secret_key)
        out = ApiKeyCreated(key=key_out(row), api_key=full)
    audit(ctx.sessions, principal, "create-api-key", f"created {out.key.prefix}")
    return out


@router.post("/keys/{prefix}/revoke", response_model=ApiKeyOut, responses={**KEY_ERRORS, 409: problem_response(
    "Already revoked, or the tenant's last admin key; nothing was changed", KEY_REVOKED, LAST_ADMIN)})
def revoke_key(prefix: str, principal: Principal = Depends(admin),
               ctx: GatewayContext = Depends(get_context)) -> ApiKeyOut:
    """Revoke a key of the caller's tenant at once. The tenant's last active admin key cannot be revoked."""
    with session_scope(ctx.sessions) as session:
        out = key_out(tenants.revoke_key(session, principal.tenant_id, prefix))
    audit(ctx.sessions, principal, "revoke-api-key", f"revoked {prefix}"[:32])
    return out


@router.post("/keys/{prefix}/rotate", status_code=status.HTTP_201_CREATED, response_model=ApiKeyCreated,
             responses={**KEY_ERRORS, 409: problem_response("Already revoked; nothing was changed", KEY_REVOKED)})
def rotate_key(prefix: str, principal: Principal = Depends(admin),
               ctx: GatewayContext = Depends(get_context)) -> ApiKeyCreated:
    """Replace a key by a new one with the same scopes (one transaction: the old one is revoked, the new one
    is in this answer only). Rotating the key you are using ends your session with it."""
    with session_scope(ctx.sessions) as session:
        old, new, full = tenants.rotate_key(session, principal.tenant_id, prefix, ctx.settings.secret_key)
        out = ApiKeyCreated(key=key_out(new), api_key=full, replaces=old.prefix)
    audit(ctx.sessions, principal, "rotate-api-key", f"{prefix}->{out.key.prefix}"[:32])
    return out


@router.get("/audit", response_model=list[AuditEntryOut], responses=ERRORS)
def audit_log(limit: int = Query(50, ge=1, le=500), before_id: int | None = Query(None, ge=1),
              principal: Principal = Depends(admin), session: Session = Depends(get_session)) -> list[AuditEntryOut]:
    """The caller's tenant's audit log, newest first; page back with `before_id` (the last id shown)."""
    rows = tenants.recent_audit(session, principal.tenant_id, limit, before_id)
    return [AuditEntryOut.model_validate(row, from_attributes=True) for row in rows]
