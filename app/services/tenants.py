"""Tenants and their API keys, as an admin manages them (the admin console and `/v1/admin/keys`).

Why a service of its own: `app/auth.py` authenticates keys; this module changes them (create, revoke, rotate)
and onboards tenants. An admin key acts on its own tenant's keys only: another tenant's keys would open that
tenant's subjects. A tenant can never be left without an admin key by the API (the last active one cannot be
revoked), so an admin cannot lock their tenant out by mistake; `privface create-api-key` remains the way in.
"""
from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.auth import create_api_key
from app.models import ApiKey, AuditEntry, Tenant
from app.problems import Problem


def tenant_or_404(session: Session, tenant_id: str) -> Tenant:
    tenant = session.get(Tenant, tenant_id)
    if tenant is None:
        raise Problem(404, "tenant-not-found", "Unknown tenant", f"No tenant {tenant_id!r}.")
    return tenant


def list_keys(session: Session, tenant_id: str) -> list[ApiKey]:
    """Every key of the tenant, newest first, revoked ones included (their prefix is what the audit log names)."""
    query = select(ApiKey).where(ApiKey.tenant_id == tenant_id).order_by(ApiKey.created_at.desc(), ApiKey.id.desc())
    return list(session.execute(query).scalars())


def create_key(session: Session, tenant_id: str, scopes: list[str], master_secret: str) -> tuple[ApiKey, str]:
    """A new key of the tenant: its row and the full key, which is shown this once and never stored."""
    full = create_api_key(session, tenant_id, scopes, master_secret)
    session.flush()
    return _key_of_tenant(session, tenant_id, full.split("_", 2)[1]), full


def _key_of_tenant(session: Session, tenant_id: str, prefix: str) -> ApiKey:
    row = session.execute(select(ApiKey).where(ApiKey.prefix == prefix)).scalar_one_or_none()
    if row is None or row.tenant_id != tenant_id:  # another tenant's key is as unknown as a missing one
        raise Problem(404, "api-key-not-found", "Unknown API key", f"No API key with prefix {prefix!r} in this tenant.")
    return row


def _revocable(session: Session, tenant_id: str, prefix: str) -> ApiKey:
    """The active key `prefix` of the tenant, refused (409) when revoked already or the tenant's last admin key."""
    row = _key_of_tenant(session, tenant_id, prefix)
    if row.revoked_at is not None:
        revoked = row.revoked_at if row.revoked_at.tzinfo else row.revoked_at.replace(tzinfo=timezone.utc)
        raise Problem(409, "api-key-revoked", "The API key is already revoked", f"Key {prefix} was revoked at "
                      f"{revoked.isoformat(timespec='seconds')}; nothing was changed.")
    return row


def revoke_key(session: Session, tenant_id: str, prefix: str) -> ApiKey:
    """Revoke a key at once (the next request with it gets 401). The tenant's last active admin key is kept."""
    row = _revocable(session, tenant_id, prefix)
    if "admin" in row.scopes.split():
        admins = [key for key in list_keys(session, tenant_id)
                  if key.revoked_at is None and "admin" in key.scopes.split()]
        if len(admins) == 1:
            raise Problem(409, "last-admin-key", "The tenant's last admin key cannot be revoked",
                          f"Key {prefix} is the tenant's only active admin key; create another admin key first "
                          "(or rotate this one). Nothing was changed.")
    row.revoked_at = datetime.now(timezone.utc)
    session.flush()
    return row


def rotate_key(session: Session, tenant_id: str, prefix: str, master_secret: str) -> tuple[ApiKey, ApiKey, str]:
    """Replace a key by a new one with the same scopes, in one transaction: (old row, new row, new full key)."""
    old = _revocable(session, tenant_id, prefix)
    new, full = create_key(session, tenant_id, old.scopes.split(), master_secret)
    old.revoked_at = datetime.now(timezone.utc)
    session.flush()
    return old, new, full


def create_tenant(session: Session, tenant_id: str, name: str, epsilon_max: float | None,
                  master_secret: str) -> tuple[Tenant, str]:
    """Onboard a tenant with one admin key (returned once: hand it to the tenant's operator)."""
    if session.get(Tenant, tenant_id) is not None:
        raise Problem(409, "tenant-exists", "The tenant exists already", f"A tenant {tenant_id!r} exists; "
                      "nothing was changed.")
    tenant = Tenant(id=tenant_id, name=name, epsilon_max=epsilon_max)
    session.add(tenant)
    session.flush()
    _, full = create_key(session, tenant_id, ["admin", "enroll", "verify"], master_secret)
    return tenant, full


def recent_audit(session: Session, tenant_id: str, limit: int, before_id: int | None) -> list[AuditEntry]:
    """The tenant's audit entries, newest first; `before_id` pages back from an entry already shown."""
    query = select(AuditEntry).where(AuditEntry.tenant_id == tenant_id)
    if before_id is not None:
        query = query.where(AuditEntry.id < before_id)
    return list(session.execute(query.order_by(AuditEntry.id.desc()).limit(limit)).scalars())
