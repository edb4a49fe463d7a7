"""Enroll, verify and identify: the gateway's three privacy-preserving operations.

Each takes validated features, computes the protected template in memory, and talks to the parties
only through `PartyPair`. What comes back to the caller is what docs/design.md allows: an id, one bit,
or one bit plus the matched subject id.
"""
from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import TypeVar

import numpy as np

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.auth import Principal
from app.context import GatewayContext
from app.db import session_scope
from app.failpoints import failpoint
from app.models import Enrollment, ModelVersion, Subject
from app.problems import Problem, invalid_features, not_found, unavailable
from app.schemas import FeaturePayload
from app.services import operations
from app.services.features import check_epsilon, decode_features
from app.services.model_registry import LoadedModel
from app.services.templates import gallery_name, protected_template
from secure.coordinator import PartiesError, PartiesOutOfSync, PartiesUnavailable

log = logging.getLogger(__name__)
T = TypeVar("T")  # what a match job returns: a bit (verify) or a template_seq (identify)


def load_subject(session: Session, principal: Principal, subject_id: str) -> Subject:
    subject = session.get(Subject, subject_id)
    if subject is None or subject.tenant_id != principal.tenant_id:
        raise not_found("subject", subject_id)
    return subject


def require_mode(principal: Principal, mode: str) -> None:
    """Refuse a request made for the other mode (409), before anything is spent or stored (docs/sealed.md)."""
    if principal.mode != mode:
        routes = "/v1/sealed/..." if principal.mode == "sealed" else "/v1/subjects/.../enrollments, /v1/verify"
        raise Problem(409, "tenant-mode", "Wrong mode for this tenant",
                      f"this tenant is in {principal.mode} mode: send {principal.mode}-mode payloads to {routes} "
                      "(GET /v1/transforms says the mode)")


def model_for(ctx: GatewayContext, principal: Principal, payload: FeaturePayload) -> LoadedModel:
    """The active model of the tenant's privacy preset, provided the payload was made with its transform."""
    require_mode(principal, "gateway")
    model = ctx.models.for_preset(principal.preset)
    if (payload.transform_id, payload.params_hash) != (model.spec.transform_id, model.spec.params_hash):
        raise invalid_features(
            f"transform {payload.transform_id}/{payload.params_hash} is not served to this tenant; its privacy "
            f"preset uses {model.spec.transform_id}/{model.spec.params_hash} (GET /v1/transforms)",
            "unknown-transform")
    return model


async def template_from_payload(ctx: GatewayContext, principal: Principal,
                                payload: FeaturePayload) -> tuple[LoadedModel, np.ndarray, np.ndarray]:
    """Validate everything about the payload; returns (active model, features, protected fixed-point template)."""
    model = model_for(ctx, principal, payload)
    check_epsilon(payload, model.spec, principal.epsilon_max)
    features = decode_features(payload, model.spec, ctx.settings.quality_gate)
    ctx.replay.admit(payload)
    return model, features, await protected_template(model, features, principal, ctx.settings.secret_key)


async def older_models(ctx: GatewayContext, principal: Principal, active: LoadedModel) -> list[LoadedModel]:
    """Earlier model versions that still hold this tenant's current templates and read the same features
    (newest first). Templates cannot be re-extracted (the server has no images), so these keep matching
    until their subjects are re-enrolled under the active version (there is no lazy migration: see verify)."""
    with session_scope(ctx.sessions) as session:
        rows = versions_in_use(session, principal.tenant_id, principal.tenant_key_version, active.version)
    loaded = [await asyncio.to_thread(ctx.models.get, row) for row in rows]
    same_input = (active.spec.transform_id, active.spec.params_hash)
    return [m for m in loaded if (m.spec.transform_id, m.spec.params_hash) == same_input]


def versions_in_use(session: Session, tenant_id: str, key_version: int, active_version: str) -> list[ModelVersion]:
    """The model versions other than `active_version` that hold a current template of the tenant (newest first,
    detached). One indexed lookup per registered version, so every verify pays the same whatever the gallery size
    (an IN over the tenant's enrollments read them all: 42 ms of CPU per request at 100,000; bench/gateway_db.py)."""
    holds = select(Enrollment.template_seq).where(
        Enrollment.tenant_id == tenant_id, Enrollment.key_version == key_version,
        Enrollment.model_version == ModelVersion.version).exists()
    rows = list(session.execute(select(ModelVersion).where(ModelVersion.version != active_version, holds)
                                .order_by(ModelVersion.activated_at.desc().nulls_last())).scalars())
    for row in rows:
        session.expunge(row)
    return rows


async def enroll(ctx: GatewayContext, principal: Principal, subject_id: str, payload: FeaturePayload) -> Enrollment:
    with session_scope(ctx.sessions) as session:
        load_subject(session, principal, subject_id)
    model, _, template = await template_from_payload(ctx, principal, payload)
    return await store_template(ctx, principal, subject_id, model, template, payload.epsilon)


async def store_template(ctx: GatewayContext, principal: Principal, subject_id: str, model: LoadedModel,
                         template: np.ndarray, epsilon: float | None) -> Enrollment:
    """Two-phase store of one protected template at both parties, all or nothing."""
    shares_of = [template]  # the only reference: dropped once the parties have their shares

    async def prepare(seq: int, gallery: str) -> bool:
        return await ctx.parties.store(seq, seq, gallery, shares_of.pop())

    del template
    return await store_prepared(ctx, principal, subject_id, model.version, model.spec.transform_id, epsilon, prepare)


async def store_prepared(ctx: GatewayContext, principal: Principal, subject_id: str, model_version: str,
                         transform_id: str, epsilon: float | None,
                         prepare: Callable[[int, str], Awaitable[bool]]) -> Enrollment:
    """The two-phase store around ``prepare(seq, gallery)`` (True: both parties prepared): record the intent, prepare,
    record the decision with the enrollment row, deliver it. Gateway mode prepares a share it split; sealed mode
    (``app/services/sealed.py``) has the parties compute theirs under MPC."""
    gallery = gallery_name(model_version, principal.tenant_id, principal.tenant_key_version)
    context = {"subject_id": subject_id, "tenant_id": principal.tenant_id, "model_version": model_version,
               "key_version": principal.tenant_key_version, "transform_id": transform_id, "epsilon": epsilon}
    seq = operations.begin(ctx.sessions, "store", gallery, [], context)
    refused: PartiesError | None = None
    try:
        prepared = await prepare(seq, gallery)
    except PartiesUnavailable as exc:
        prepared, reason = False, str(exc)
    except PartiesError as exc:  # a party refused the caller's sealed input (422)
        prepared, reason, refused = False, str(exc), exc
    else:
        reason = "a party refused the share"
    if not prepared:
        operations.decide(ctx.sessions, seq, commit=False)
        await _deliver_quietly(ctx, seq)
        if refused is not None:
            raise party_refusal(refused, sealed=True)
        raise unavailable(f"enrollment not stored: {reason}; nothing was kept")
    failpoint("enroll-after-prepare")
    try:
        committed = operations.decide(ctx.sessions, seq, commit=True, apply=operations.record_enrollment)
    except LookupError as exc:
        operations.decide(ctx.sessions, seq, commit=False)
        await _deliver_quietly(ctx, seq)
        if isinstance(exc, operations.KeyRotated):
            raise Problem(409, "key-rotated", "Tenant key rotated",
                          "the tenant's template key was rotated during this enrollment; nothing was kept, "
                          "enroll again") from None
        raise not_found("subject", subject_id) from None
    failpoint("enroll-after-decision")
    await _deliver_quietly(ctx, seq)
    if not committed:  # the reconcile loop judged this operation stale and aborted it
        raise unavailable("enrollment timed out and was rolled back; nothing was kept")
    with session_scope(ctx.sessions) as session:
        return session.get_one(Enrollment, seq)


async def delete_subject(ctx: GatewayContext, principal: Principal, subject_id: str) -> None:
    with session_scope(ctx.sessions) as session:
        subject = load_subject(session, principal, subject_id)
        seqs = [e.template_seq for e in subject.enrollments]
    if not seqs:
        operations_delete_metadata(ctx, subject_id)
        return
    seq = operations.begin(ctx.sessions, "delete", "", seqs, {"subject_id": subject_id})
    try:
        prepared = await ctx.parties.delete_prepare(seq, seqs)
    except PartiesUnavailable as exc:
        operations.decide(ctx.sessions, seq, commit=False)
        await _deliver_quietly(ctx, seq)
        raise unavailable(f"subject not deleted: {exc}; nothing was changed") from None
    operations.decide(ctx.sessions, seq, commit=prepared, apply=operations.record_deletion)
    await _deliver_quietly(ctx, seq)
    if not prepared:
        raise unavailable("subject not deleted: a party refused; nothing was changed")


def operations_delete_metadata(ctx: GatewayContext, subject_id: str) -> None:
    """A subject without templates has nothing at the parties: delete its row directly."""
    with session_scope(ctx.sessions) as session:
        subject = session.get(Subject, subject_id)
        if subject is not None:
            session.delete(subject)


async def verify(ctx: GatewayContext, principal: Principal, subject_id: str, payload: FeaturePayload) -> tuple[bool, str]:
    """1:1: does the probe match the claimed subject's current templates? One bit.

    The newest served model under which the subject has templates decides, in ONE match job. Which model
    that is depends only on enrollment metadata, never on an outcome, and nothing follows the job: there is
    no lazy migration (storing the probe under the active model on a match would tell both parties the bit).
    A subject enrolled only under an earlier model keeps matching there until it is re-enrolled.
    """
    with session_scope(ctx.sessions) as session:
        load_subject(session, principal, subject_id)
    active, features, query = await template_from_payload(ctx, principal, payload)
    for model in [active, *await older_models(ctx, principal, active)]:
        if model is not active:
            query = await protected_template(model, features, principal, ctx.settings.secret_key)
        match = await _verify_with(ctx, principal, subject_id, model, query)
        if match is None:
            continue  # no template of the subject under this model (metadata only: no party was called)
        return match, model.version
    raise Problem(409, "subject-not-enrolled", "No template to compare with",
                  f"subject {subject_id!r} has no enrollment under a served model and the tenant's current key; "
                  "enroll it first")


async def _verify_with(ctx: GatewayContext, principal: Principal, subject_id: str, model: LoadedModel,
                       query: np.ndarray) -> bool | None:
    gallery = gallery_name(model.version, principal.tenant_id, principal.tenant_key_version)

    async def run(upto: int, committed: int) -> bool | None:
        with session_scope(ctx.sessions) as session:
            seqs = current_templates(session, subject_id, model.version, principal.tenant_key_version, upto)
        if not seqs:
            return None
        return await ctx.parties.verify(uuid.uuid4().hex, gallery, upto, query, seqs, model.policy,
                                        expected_committed=committed)

    return await with_resync(ctx, run)


async def identify(ctx: GatewayContext, principal: Principal, payload: FeaturePayload) -> tuple[str | None, str]:
    """1:N over the tenant's current galleries: one bit and, only on a match, the subject id.

    Every live gallery (the active model's and each earlier model's that still holds templates) is searched,
    always, in the same order: the parties and the dealer see the same jobs whether and wherever the probe
    matches. The active model's match wins, then the newest earlier one's.
    """
    active, features, query = await template_from_payload(ctx, principal, payload)
    found: tuple[int, str] | None = None
    for model in [active, *await older_models(ctx, principal, active)]:
        if model is not active:
            query = await protected_template(model, features, principal, ctx.settings.secret_key)
        matched = await _identify_in(ctx, principal, model, query, batched=model is active)
        if matched is not None and found is None:
            found = (matched, model.version)
    if found is None:
        return None, active.version
    return subject_of(ctx, principal, found[0]), found[1]


async def _identify_in(ctx: GatewayContext, principal: Principal, model: LoadedModel, query: np.ndarray,
                       batched: bool) -> int | None:
    """One identify job on one model's gallery: the matched template_seq or None."""
    gallery = gallery_name(model.version, principal.tenant_id, principal.tenant_key_version)

    async def run(upto: int, committed: int) -> int | None:
        if batched:  # the hot path: concurrent searches of the same snapshot share one MPC job
            return await ctx.identify_batcher.identify(gallery, upto, committed, model.policy, query)
        return await ctx.parties.identify(uuid.uuid4().hex, gallery, upto, query, model.policy,
                                          expected_committed=committed)

    return await with_resync(ctx, run)


def subject_of(ctx: GatewayContext, principal: Principal, template_seq: int) -> str:
    with session_scope(ctx.sessions) as session:
        enrollment = session.get(Enrollment, template_seq)
        if enrollment is None or enrollment.tenant_id != principal.tenant_id:
            log.error("identify revealed template %s that the gateway cannot map", template_seq)
            raise unavailable("the match could not be resolved; retry")
        return enrollment.subject_id


def current_templates(session: Session, subject_id: str, model_version: str, key_version: int,
                       upto: int) -> list[int]:
    return list(session.execute(select(Enrollment.template_seq).where(
        Enrollment.subject_id == subject_id, Enrollment.model_version == model_version,
        Enrollment.key_version == key_version, Enrollment.template_seq <= upto,
    ).order_by(Enrollment.template_seq)).scalars())


async def with_resync(ctx: GatewayContext, run: Callable[[int, int], Awaitable[T]], sealed: bool = False) -> T:
    """Run a match job on a settled snapshot (``operations.settled_snapshot``: read-your-writes, and both
    parties hold every decision in it); if a party still refuses it (a delete erased rows of an older
    snapshot, a decision could not be delivered), take a fresh settled snapshot and retry once."""
    wait_s = operations.stale_after(ctx.settings.party_timeout_s)
    for _attempt in (1, 2):
        try:
            upto, committed = await operations.settled_snapshot(ctx.sessions, ctx.parties, wait_s)
        except TimeoutError as exc:
            raise unavailable(f"an earlier operation is still undecided ({exc}); retry") from None
        try:
            return await run(upto, committed)
        except PartiesOutOfSync:
            continue  # once more, on a fresh settled snapshot
        except PartiesUnavailable as exc:
            raise unavailable(str(exc)) from None
        except PartiesError as exc:
            raise party_refusal(exc, sealed) from None
    raise unavailable("the parties could not be brought in sync; retry")


def party_refusal(exc: PartiesError, sealed: bool = False) -> Problem:
    """A match job a party refused: its rate limit becomes the client's 429 (with Retry-After), anything else a 503
    (the gateway built the job, so a refusal is the service's fault) — except, in sealed mode, a party's 422
    ``sealed-envelope`` on the envelope only it can open: that is the caller's input (422 ``sealed-input-refused``).
    Any other party 4xx (a gallery that does not fit the model, a replayed or stale payload) is the service's."""
    if sealed and exc.status == 422 and any(str((problem or {}).get("type", "")).endswith("/sealed-envelope")
                                            for problem in exc.problems):
        return Problem(422, "sealed-input-refused", "Sealed input refused",
                       f"a party could not use its sealed share ({exc}); seal a fresh payload to the current keys "
                       "(GET /v1/sealed/keys); nothing was kept")
    if exc.status == 429:
        return Problem(429, "rate-limited", "Too many requests",
                       "the secure-computation parties are at their match-job limit; retry shortly",
                       headers={"Retry-After": "1"})
    return unavailable(f"a secure-computation party refused the job ({exc})")


async def _deliver_quietly(ctx: GatewayContext, seq: int) -> None:
    """Tell the parties a decision; if one is down, the reconcile loop finishes the delivery later."""
    try:
        await operations.deliver(ctx.sessions, ctx.parties, seq)
    except PartiesUnavailable as exc:
        log.warning("decision of operation %s not yet delivered: %s", seq, exc)
