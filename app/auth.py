"""API keys: `pf_<prefix>_<secret>`, stored as a prefix plus a keyed hash of the secret, with scopes."""
from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.models import ApiKey, Tenant

SCOPES = ("enroll", "verify", "admin", "metrics")
# A scrape credential: may GET /metrics and nothing else (app/deps.py), so it is never combined with a scope
# that can do more (a key holding it alone is what a Prometheus server keeps).
METRICS_SCOPE = "metrics"
METRICS_ALONE = "the metrics scope stands alone: a scrape credential can do nothing else"


@dataclass(frozen=True)
class Principal:
    """Who is calling: the tenant and the scopes of the presented key."""

    tenant_id: str
    key_prefix: str
    scopes: frozenset[str]
    tenant_key_version: int
    epsilon_max: float | None
    preset: str | None = None  # the tenant's privacy preset; None = the gateway's default_preset
    mode: str = "gateway"  # 'gateway' or 'sealed' (docs/sealed.md)


def hash_secret(secret: str, master_secret: str) -> str:
    """Keyed hash: API key secrets are 32 random bytes, so one HMAC is enough (no slow KDF needed)."""
    return hmac.new(master_secret.encode(), secret.encode(), hashlib.sha256).hexdigest()


def create_api_key(session: Session, tenant_id: str, scopes: list[str], master_secret: str) -> str:
    """Create a key for `tenant_id` and return it in full: this is the only time it is visible."""
    unknown = sorted(set(scopes) - set(SCOPES))
    if unknown or not scopes:
        raise ValueError(f"unknown or empty scopes {unknown or scopes}; choose from {', '.join(SCOPES)}")
    if METRICS_SCOPE in scopes and len(set(scopes)) > 1:
        raise ValueError(METRICS_ALONE)
    prefix = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    session.add(ApiKey(prefix=prefix, secret_hash=hash_secret(secret, master_secret), tenant_id=tenant_id,
                       scopes=" ".join(sorted(set(scopes)))))
    return f"pf_{prefix}_{secret}"


def ensure_tenant(session: Session, tenant_id: str, epsilon_max: float | None = None) -> Tenant:
    tenant = session.get(Tenant, tenant_id)
    if tenant is None:
        tenant = Tenant(id=tenant_id, name=tenant_id, epsilon_max=epsilon_max)
        session.add(tenant)
        session.flush()
    return tenant


def authenticate(session: Session, presented: str, master_secret: str) -> Principal | None:
    """The principal for a presented key, or None when it is malformed, unknown, revoked or wrong."""
    parts = presented.split("_", 2)
    if len(parts) != 3 or parts[0] != "pf":
        return None
    row = session.execute(select(ApiKey).where(ApiKey.prefix == parts[1])).scalar_one_or_none()
    if row is None or row.revoked_at is not None:
        return None
    if not hmac.compare_digest(row.secret_hash, hash_secret(parts[2], master_secret)):
        return None
    tenant = row.tenant
    return Principal(tenant.id, row.prefix, frozenset(row.scopes.split()), tenant.key_version, tenant.epsilon_max,
                     tenant.preset, tenant.mode or "gateway")


def tenant_template_key(master_secret: str, tenant_id: str, key_version: int) -> bytes:
    """The tenant's template-protection key. Bumping `key_version` revokes every older template."""
    return hmac.new(master_secret.encode(), f"template-key|{tenant_id}|{key_version}".encode(), hashlib.sha256).digest()
