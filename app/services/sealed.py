"""Sealed mode at the gateway (issue 12): the tenant mode, the served sealed model, sealed enroll and verify.

A tenant in mode ``sealed`` has its SDK secret-share the noised features and encrypt one share to each party
(``client/sealed.py``). The gateway sees only the payload's header (transform, shape, ε, nonce, time) and two
ciphertexts: it checks the header as in gateway mode (transform served, ε policy, freshness and nonce), then hands
each party its own envelope, the tenant's rotation (public to the parties, docs/security.md) and the model version,
through the same two-phase store (``biometrics.store_prepared``) and match-job paths as gateway mode. The thresholds
are the sealed model's served ones (verify; identify by the gallery size), registered with the gallery at the
parties: no caller chooses them. The gateway
never holds features, an embedding, a template or a share in the clear in this mode.

Mode switching is refused per request, never guessed: a gateway-mode payload from a sealed tenant, or a sealed
one from a gateway tenant, is a 409 ``tenant-mode`` problem (``biometrics.require_mode``) before anything is spent
or stored.
"""
from __future__ import annotations

import base64
import json
import math
import threading
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from app.auth import Principal, tenant_template_key
from app.context import GatewayContext
from app.db import session_scope
from app.models import Enrollment
from app.problems import Problem, invalid_features
from app.schemas import SealedPayload
from app.services import biometrics
from app.services.features import check_epsilon
from app.services.templates import gallery_name
from app.settings import GatewaySettings
from inference.operating_points import ImpostorCurve
from inference.protect import protection_matrix
from inference.transform import TransformSpec
from secure.party.api import SealedIn
from secure.thresholds import GalleryPolicy

MODES = ("gateway", "sealed")
SEALED_FILE = "sealed.json"  # inference/sealed_export.py


@dataclass(frozen=True)
class SealedServed:
    """The sealed model the gateway serves: what the SDK must apply and the threshold the parties record."""

    version: str
    spec: TransformSpec
    dim: int
    threshold: float
    policy: GalleryPolicy  # verify at the threshold, identify by the schedule of the model's impostor curve


_cache: dict[Path, SealedServed] = {}
_lock = threading.Lock()


def served_model(settings: GatewaySettings) -> SealedServed | None:
    """The configured sealed model (read once per process), or None when sealed mode is not served."""
    if settings.sealed_model_dir is None or not str(settings.sealed_model_dir):
        return None
    path = Path(settings.sealed_model_dir) / settings.sealed_model_version / SEALED_FILE
    with _lock:
        if path not in _cache:
            try:
                meta = json.loads(path.read_text())
            except (OSError, ValueError):
                return None
            spec = TransformSpec.from_dict(meta["transform"])
            if (spec.transform_id, spec.params_hash) != (meta["transform_id"], meta["params_hash"]):
                raise ValueError(f"{path}: transform fields disagree")
            threshold = float(meta["threshold"])
            schedule = ImpostorCurve.from_dict(meta["impostor_curve"]).identify_schedule(settings.identify_fpir,
                                                                                         floor=threshold)
            policy = GalleryPolicy(threshold, tuple((int(n), float(t)) for n, t in schedule))
            _cache[path] = SealedServed(version=str(meta["version"]), spec=spec, dim=int(meta["embedding_dim"]),
                                        threshold=threshold, policy=policy)
        return _cache[path]


def require_served(settings: GatewaySettings) -> SealedServed:
    model = served_model(settings)
    if model is None:
        raise Problem(409, "sealed-not-served", "Sealed mode not served",
                      "this gateway serves no sealed model (PRIVFACE_SEALED_MODEL_DIR / PRIVFACE_SEALED_MODEL_VERSION)")
    return model


def _admit(ctx: GatewayContext, principal: Principal, payload: SealedPayload) -> SealedServed:
    """Everything the gateway can check of a sealed payload; the nonce is spent last."""
    biometrics.require_mode(principal, "sealed")
    model = require_served(ctx.settings)
    if (payload.transform_id, payload.params_hash) != (model.spec.transform_id, model.spec.params_hash):
        raise invalid_features(f"transform {payload.transform_id}/{payload.params_hash} is not the sealed model's "
                               f"{model.spec.transform_id}/{model.spec.params_hash} (GET /v1/transforms)",
                               "unknown-transform")
    if list(payload.shape) != list(model.spec.shape):
        raise invalid_features(f"shape {payload.shape} is not {list(model.spec.shape)}", "bad-shape")
    for rank, envelope in enumerate(payload.envelopes):
        if envelope.party != rank:
            raise invalid_features(f"envelopes[{rank}] is addressed to party {envelope.party}", "sealed-envelope")
    check_epsilon(payload, model.spec, principal.epsilon_max)
    ctx.replay.admit(payload)
    return model


def unix_seconds(created_at: datetime) -> int:
    """The payload's created_at as the SDK bound it into the envelopes: whole Unix seconds, floored
    (``client.sealed.unix_seconds``); a naive time is UTC, as the replay check reads it."""
    return math.floor((created_at if created_at.tzinfo else created_at.replace(tzinfo=timezone.utc)).timestamp())


def _inputs(ctx: GatewayContext, principal: Principal, model: SealedServed, payload: SealedPayload,
            operation: str) -> tuple[SealedIn, SealedIn]:
    """Each party's body part: its own envelope, the request's binding fields and the tenant's rotation."""
    key = tenant_template_key(ctx.settings.secret_key, principal.tenant_id, principal.tenant_key_version)
    rotation = protection_matrix(key, model.version, principal.tenant_key_version, model.dim)
    text = base64.b64encode(np.ascontiguousarray(rotation, dtype="<f8").tobytes()).decode()
    parts = [SealedIn(model=model.version, transform_id=payload.transform_id, shape=list(payload.shape),
                      nonce=payload.nonce, operation=operation, created_at=unix_seconds(payload.created_at),
                      envelope=envelope, rotation=text) for envelope in payload.envelopes]
    return parts[0], parts[1]


async def enroll(ctx: GatewayContext, principal: Principal, subject_id: str, payload: SealedPayload) -> Enrollment:
    """Sealed enrollment: both parties compute their template share under MPC and prepare it; all or nothing."""
    with session_scope(ctx.sessions) as session:
        biometrics.load_subject(session, principal, subject_id)
    model = _admit(ctx, principal, payload)
    parts = _inputs(ctx, principal, model, payload, "enroll")
    job_id = uuid.uuid4().hex

    async def prepare(seq: int, gallery: str) -> bool:
        return await ctx.parties.store_sealed(seq, seq, gallery, job_id, parts)

    return await biometrics.store_prepared(ctx, principal, subject_id, model.version, model.spec.transform_id,
                                           payload.epsilon, prepare)


async def verify(ctx: GatewayContext, principal: Principal, subject_id: str, payload: SealedPayload) -> tuple[bool, str]:
    """Sealed 1:1 on the subject's templates under the sealed model; only the decision is opened."""
    with session_scope(ctx.sessions) as session:
        biometrics.load_subject(session, principal, subject_id)
    model = _admit(ctx, principal, payload)
    parts = _inputs(ctx, principal, model, payload, "verify")
    gallery = gallery_name(model.version, principal.tenant_id, principal.tenant_key_version)

    async def run(upto: int, committed: int) -> bool | None:
        with session_scope(ctx.sessions) as session:
            seqs = biometrics.current_templates(session, subject_id, model.version, principal.tenant_key_version,
                                                upto)
        if not seqs:
            return None
        out = await ctx.parties.match_sealed("verify", uuid.uuid4().hex, gallery, upto, parts, model.policy, seqs,
                                             expected_committed=committed)
        return out == 1

    match = await biometrics.with_resync(ctx, run, sealed=True)
    if match is None:
        raise Problem(409, "subject-not-enrolled", "No template to compare with",
                      f"subject {subject_id!r} has no sealed enrollment under the tenant's current key; enroll it "
                      "first (POST /v1/sealed/subjects/{id}/enrollments)")
    return match, model.version


async def identify(ctx: GatewayContext, principal: Principal, payload: SealedPayload) -> tuple[str | None, str]:
    """Sealed 1:N over the tenant's sealed gallery (the fixed-gallery path, one query computed under MPC first): one
    bit and, only on a match, the subject id. The threshold follows the gallery's size at the parties (the model's
    identify schedule, registered with the gallery)."""
    model = _admit(ctx, principal, payload)
    parts = _inputs(ctx, principal, model, payload, "identify")
    gallery = gallery_name(model.version, principal.tenant_id, principal.tenant_key_version)

    async def run(upto: int, committed: int) -> int:
        return await ctx.parties.match_sealed("identify", uuid.uuid4().hex, gallery, upto, parts, model.policy, None,
                                              expected_committed=committed)

    matched = await biometrics.with_resync(ctx, run, sealed=True)
    if not matched:
        return None, model.version
    return biometrics.subject_of(ctx, principal, matched), model.version
