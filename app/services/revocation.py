"""Tenant key rotation: revoke every template of a tenant and erase its shares at both parties.

Bumping the key version alone would leave the old shares at both parties and the old enrollments listed.
Rotation is therefore one delete operation of the parties' op log (two-phase, like deleting a subject):
both parties prepare the erasure, and the gateway commits it in the same transaction that removes the
enrollment rows and bumps the key version. Either all of it happens or nothing does.
"""
from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.auth import Principal
from app.context import GatewayContext
from app.db import session_scope
from app.models import Enrollment, Operation, Tenant
from app.problems import unavailable
from app.services import operations
from secure.coordinator import PartiesUnavailable

log = logging.getLogger(__name__)
ATTEMPTS = 3  # an enrollment committing under the old key during a rotation makes the rotation start over


class RotationRace(Exception):
    """The tenant's templates or key changed between the rotation's intent and its decision."""


def _tenant_templates(session: Session, tenant_id: str) -> set[int]:
    return set(session.scalars(select(Enrollment.template_seq).where(Enrollment.tenant_id == tenant_id)))


def record_rotation(session: Session, op: Operation) -> None:
    """Commit-time metadata of a rotation: the enrollments it erased go, the key version moves on.

    Refuses (RotationRace: the operation is aborted and retried) when a template the parties were not asked
    to erase has appeared, or another rotation got there first."""
    tenant = session.get(Tenant, op.context["tenant_id"], with_for_update=True)
    if tenant is None or tenant.key_version + 1 != op.context["key_version"]:
        raise RotationRace("the key version changed during the rotation")
    erased = set(op.template_seqs)
    if _tenant_templates(session, tenant.id) - erased:
        raise RotationRace("a template was enrolled during the rotation")
    for enrollment in session.scalars(select(Enrollment).where(Enrollment.template_seq.in_(erased))):
        session.delete(enrollment)
    tenant.key_version = op.context["key_version"]


def _bump_if_empty(ctx: GatewayContext, tenant_id: str) -> int | None:
    """Nothing to erase: bump the key version at once (None if templates exist after all)."""
    with session_scope(ctx.sessions) as session:
        tenant = session.get_one(Tenant, tenant_id, with_for_update=True)
        if _tenant_templates(session, tenant_id):
            return None
        tenant.key_version += 1
        return tenant.key_version


async def rotate_tenant_key(ctx: GatewayContext, principal: Principal) -> dict[str, Any]:
    """Revoke all of the tenant's templates; returns the new key version and how many were erased."""
    for _ in range(ATTEMPTS):
        with session_scope(ctx.sessions) as session:
            new_version = session.get_one(Tenant, principal.tenant_id).key_version + 1
            seqs = sorted(_tenant_templates(session, principal.tenant_id))
        if not seqs:
            bumped = _bump_if_empty(ctx, principal.tenant_id)
            if bumped is not None:
                return {"tenant_id": principal.tenant_id, "key_version": bumped, "revoked_templates": 0}
            continue
        outcome = await _erase_and_bump(ctx, principal.tenant_id, new_version, seqs)
        if outcome is not None:
            return {"tenant_id": principal.tenant_id, "key_version": new_version, "revoked_templates": outcome}
    raise unavailable("templates kept changing during the key rotation; nothing was changed, retry")


async def _erase_and_bump(ctx: GatewayContext, tenant_id: str, new_version: int, seqs: list[int]) -> int | None:
    """One attempt: the delete operation at both parties. Returns the count erased, or None to retry."""
    seq = operations.begin(ctx.sessions, "delete", "", seqs, {"tenant_id": tenant_id, "key_version": new_version,
                                                              "reason": "rotate-key"})
    try:
        prepared = await ctx.parties.delete_prepare(seq, seqs)
    except PartiesUnavailable as exc:
        await _abort(ctx, seq)
        raise unavailable(f"key not rotated: {exc}; nothing was changed") from None
    if not prepared:
        await _abort(ctx, seq)
        raise unavailable("key not rotated: a party refused the erasure; nothing was changed")
    try:
        committed = operations.decide(ctx.sessions, seq, commit=True, apply=record_rotation)
    except RotationRace as exc:
        log.info("rotation of tenant %s restarts: %s", tenant_id, exc)
        await _abort(ctx, seq)
        return None
    await _deliver_quietly(ctx, seq)
    if not committed:  # the reconcile loop judged it stale and aborted it
        raise unavailable("key rotation timed out and was rolled back; nothing was changed")
    return len(seqs)


async def _abort(ctx: GatewayContext, seq: int) -> None:
    operations.decide(ctx.sessions, seq, commit=False)
    await _deliver_quietly(ctx, seq)


async def _deliver_quietly(ctx: GatewayContext, seq: int) -> None:
    """Tell the parties the decision; one that is down gets it from the reconcile loop later."""
    try:
        await operations.deliver(ctx.sessions, ctx.parties, seq)
    except PartiesUnavailable as exc:
        log.warning("decision of operation %s not yet delivered: %s", seq, exc)
