"""Admin endpoints: model versions, background jobs, tenant key rotation (``services/revocation.py``)."""
from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query, status
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.apidocs import UNAVAILABLE, auth_errors, body_errors, problem_response
from app.auth import Principal
from app.context import GatewayContext
from app.db import session_scope
from app.deps import get_context, get_session, require_scope
from app.models import Enrollment, Job, ModelVersion, Subject, Tenant
from app.problems import Problem, not_found
from app.schemas import JobCreate, JobOut, ModeIn, ModelVersionOut, ModeOut, PresetIn, PresetOut, UnlockOut
from app.services import federated_deploy, federated_job, revocation
from app.services import sealed as sealed_service
from app.services.audit import audit
from app.services.jobs import JOB_KINDS, cancel_job as cancel_job_row, validate_job_params
from app.services.model_events import publish_activation, sync_active_model
from app.services.model_registry import activate_version

router = APIRouter(prefix="/v1/admin", tags=["admin"])
admin = require_scope("admin")
ERRORS = auth_errors("admin")
UNKNOWN_JOB_KIND = Problem(422, "unknown-job-kind", "Unknown job kind",
                           f"'train' is not one of {sorted(JOB_KINDS)}")
INVALID_JOB_PARAMS = Problem(422, "invalid-job-params", "Invalid job parameters",
                             "federated: rounds: Input should be less than or equal to 50")


def _not_found(what: str, ident: str) -> dict[str, Any]:
    return problem_response(f"Unknown {what}", not_found(what, ident))


def _model_out(row: ModelVersion) -> ModelVersionOut:
    return ModelVersionOut.model_validate(row, from_attributes=True)


def _job_out(row: Job) -> JobOut:
    return JobOut.model_validate(row, from_attributes=True)


@router.get("/models", response_model=list[ModelVersionOut], responses=ERRORS)
def list_models(_: Principal = Depends(admin), session: Session = Depends(get_session)) -> list[ModelVersionOut]:
    """Every registered model version with its checksum, transform, metrics and status."""
    rows = session.execute(select(ModelVersion).order_by(ModelVersion.created_at)).scalars()
    return [_model_out(row) for row in rows]


@router.post("/models/{version}/activate", response_model=ModelVersionOut,
             responses={**ERRORS, 404: problem_response("Unknown model version", Problem(
                 404, "model-not-found", "Unknown model version", "No model version 'v9'."))})
async def activate_model(version: str, principal: Principal = Depends(admin),
                         ctx: GatewayContext = Depends(get_context)) -> ModelVersionOut:
    """Make a version active. Every gateway worker swaps its ORT session without dropping requests."""
    with session_scope(ctx.sessions) as session:
        out = _model_out(activate_version(session, version))
    publish_activation(ctx.settings.redis_url, version)
    await sync_active_model(ctx.sessions, ctx.models)
    audit(ctx.sessions, principal, "activate-model", "activated")
    return out


@router.get("/jobs", response_model=list[JobOut], responses=ERRORS)
def list_jobs(limit: int = Query(50, ge=1, le=200), _: Principal = Depends(admin),
              session: Session = Depends(get_session)) -> list[JobOut]:
    """The most recent jobs, newest first, with their status, progress and result (the admin console's list)."""
    rows = session.execute(select(Job).order_by(Job.created_at.desc()).limit(limit)).scalars()
    return [_job_out(row) for row in rows]


@router.post("/jobs", status_code=status.HTTP_202_ACCEPTED, response_model=JobOut,
             responses={**ERRORS, **body_errors(UNKNOWN_JOB_KIND, INVALID_JOB_PARAMS), 409: problem_response(
                 "A federated job's base model cannot be trained from, or engine deployment has no SuperLink "
                 "configured; nothing was created", Problem(
                     409, "base-model-not-trainable", "The base model cannot be trained",
                     "federated: base_version other: model version other has no PyTorch weights and its ONNX "
                     "file cannot be rebuilt into them: 51 tensors missing from the ONNX file"), Problem(
                     409, "federated-superlink-not-configured", "No SuperLink configured",
                     "federated: engine deployment needs the operator to set PRIVFACE_FEDERATED_SUPERLINK")), 503: problem_response(
                 "engine deployment: the operator's SuperLink does not answer; nothing was created", Problem(
                     503, "federated-superlink-unreachable", "The SuperLink is unreachable",
                     "federated: the configured SuperLink fl.example.org:9093 does not answer"))})
def create_job(body: JobCreate, principal: Principal = Depends(admin),
               ctx: GatewayContext = Depends(get_context)) -> JobOut:
    """Start a background job; poll `GET /v1/admin/jobs/{id}` for its progress.

    Kind `federated` (docs/federated.md): params `rounds` (1-50), `clients`, `clients_per_round`, `scope`
    (whole|adapter-tail), `mode` (supervised), `seed`, `pairs_per_fold`, `max_images`, `epochs`,
    `heldout_every_round`, `aggregation` (fedavg|secagg+), `base_version` (default: the active version of
    the caller's tenant's preset; 409 `base-model-not-trainable` when it has neither saved PyTorch weights nor
    an ONNX file of this architecture to rebuild them from; the bundled v1 models are rebuilt);
    `engine` (simulation|deployment: real devices behind the operator's SuperLink, PRIVFACE_FEDERATED_SUPERLINK;
    409 `federated-superlink-not-configured` without one, 503 `federated-superlink-unreachable`);
    unknown fields are refused. While it runs, `result.rounds` lists the finished rounds;
    `POST /v1/admin/jobs/{id}/cancel` stops it between rounds."""
    if body.kind not in JOB_KINDS:  # the schema documents the kinds as an enum; this gives the clearer error
        raise Problem(422, "unknown-job-kind", "Unknown job kind",
                      f"{body.kind!r} is not one of {sorted(JOB_KINDS)}")
    params = validate_job_params(body.kind, body.params)
    if body.kind == "federated":  # fix the starting model now: a resumed attempt must start from the same one
        with session_scope(ctx.sessions) as session:
            tenant = session.get(Tenant, principal.tenant_id)
            preset = (tenant.preset if tenant is not None else None) or ctx.settings.default_preset
            params = federated_job.resolve_base(ctx.settings, session, params, preset)
        if params["engine"] == "deployment":  # the operator's SuperLink, configured and answering
            federated_deploy.check_deployment(ctx.settings, params)
    job_id = ctx.jobs.submit(body.kind, params)
    audit(ctx.sessions, principal, "create-job", body.kind)
    with ctx.sessions() as session:
        return _job_out(session.get_one(Job, job_id))


@router.get("/jobs/{job_id}", response_model=JobOut, responses={**ERRORS, 404: _not_found("job", "job_0f1e")})
def get_job(job_id: str, _: Principal = Depends(admin), session: Session = Depends(get_session)) -> JobOut:
    """A job's status, progress (0..1), message and result."""
    row = session.get(Job, job_id)
    if row is None:
        raise not_found("job", job_id)
    return _job_out(row)


@router.post("/jobs/{job_id}/cancel", status_code=status.HTTP_202_ACCEPTED, response_model=JobOut,
             responses={**ERRORS, 404: _not_found("job", "job_0f1e"), 409: problem_response(
                 "The job cannot be cancelled; nothing was changed",
                 Problem(409, "job-finished", "The job has finished", "Job job_0f1e is already succeeded."))})
def cancel_job(job_id: str, principal: Principal = Depends(admin), ctx: GatewayContext = Depends(get_context)) -> JobOut:
    """Cancel a job. A queued job is `cancelled` at once; a running `federated` job becomes `cancelling` and
    stops after the round in progress (then `cancelled`, no candidate published). A finished job, or a running
    job of a kind that cannot stop half-way, answers 409 and is left as it was."""
    row = cancel_job_row(ctx.sessions, job_id)
    audit(ctx.sessions, principal, "cancel-job", row.status)
    return _job_out(row)


@router.post("/tenant/rotate-key", responses={**ERRORS, 503: problem_response("A party is down; nothing was changed", UNAVAILABLE)})
async def rotate_tenant_key(principal: Principal = Depends(admin), ctx: GatewayContext = Depends(get_context)) -> dict[str, Any]:
    """Revoke every template of the caller's tenant: erase its shares at both parties (all or nothing) and
    move to a new template key. Re-enroll afterwards."""
    out = await revocation.rotate_tenant_key(ctx, principal)
    audit(ctx.sessions, principal, "rotate-key", "rotated")
    return out


@router.post("/subjects/{subject_id}/unlock", response_model=UnlockOut,
             responses={**ERRORS, 404: _not_found("subject", "sub_5f0c")})
def unlock_subject(subject_id: str, principal: Principal = Depends(admin),
                   ctx: GatewayContext = Depends(get_context)) -> UnlockOut:
    """Lift a subject's verify lock-out (after repeated failed verifications) and forget its failures."""
    with session_scope(ctx.sessions) as session:
        subject = session.get(Subject, subject_id)
        if subject is None or subject.tenant_id != principal.tenant_id:
            raise not_found("subject", subject_id)
    was_locked = ctx.abuse.unlock(principal, subject_id)
    audit(ctx.sessions, principal, "unlock-subject", "unlocked" if was_locked else "not-locked", subject_id)
    return UnlockOut(subject_id=subject_id, was_locked=was_locked)


PRESET_NOT_SERVED = Problem(409, "preset-not-served", "Preset not served",
                            "No model version is active for the privacy preset 'strict'; activate one first.")


@router.put("/tenant/preset", response_model=PresetOut,
            responses={**ERRORS, **body_errors(), 409: problem_response("Preset not served", PRESET_NOT_SERVED)})
def set_tenant_preset(body: PresetIn, principal: Principal = Depends(admin),
                      ctx: GatewayContext = Depends(get_context)) -> PresetOut:
    """Choose the caller's tenant's privacy preset: which transform its SDKs apply (`GET /v1/transforms`) and
    which model serves it. Templates enrolled under another transform stay stored but stop matching until
    their subjects are re-enrolled (the server holds no photo to re-extract them from)."""
    served = ctx.models.active_by_preset
    if body.preset not in served:
        raise Problem(409, "preset-not-served", "Preset not served",
                      f"No model version is active for the privacy preset {body.preset!r}; activate one first.")
    model = ctx.models.for_preset(body.preset)
    with session_scope(ctx.sessions) as session:
        tenant = session.get_one(Tenant, principal.tenant_id)
        tenant.preset = body.preset
        other = select(Enrollment.subject_id).join(ModelVersion, ModelVersion.version == Enrollment.model_version) \
            .where(Enrollment.tenant_id == principal.tenant_id, ModelVersion.transform_id != model.spec.transform_id)
        stale = len(set(session.execute(other).scalars()))
    audit(ctx.sessions, principal, "set-preset", body.preset)
    return PresetOut(tenant_id=principal.tenant_id, preset=body.preset, transform_id=model.spec.transform_id,
                     model_version=model.version, reenroll_needed=stale)


SEALED_NOT_SERVED = Problem(409, "sealed-not-served", "Sealed mode not served",
                            "this gateway serves no sealed model (PRIVFACE_SEALED_MODEL_DIR / "
                            "PRIVFACE_SEALED_MODEL_VERSION)")


@router.put("/tenant/mode", response_model=ModeOut,
            responses={**ERRORS, **body_errors(), 409: problem_response("Mode not served", SEALED_NOT_SERVED,
                                                                        PRESET_NOT_SERVED)})
def set_tenant_mode(body: ModeIn, principal: Principal = Depends(admin),
                    ctx: GatewayContext = Depends(get_context)) -> ModeOut:
    """Choose the caller's tenant's mode: `gateway` (the gateway embeds the SDK's noised features) or `sealed` (the
    SDK secret-shares them, the parties embed them under MPC: docs/sealed.md). Templates of the other mode stay
    stored but stop matching until their subjects are re-enrolled (`reenroll_needed` counts them)."""
    if body.mode == "sealed":
        served = sealed_service.require_served(ctx.settings)
        version, transform_id = served.version, served.spec.transform_id
    else:
        preset = principal.preset or ctx.settings.default_preset
        if preset not in ctx.models.active_by_preset:
            raise Problem(409, "preset-not-served", "Preset not served",
                          f"No model version is active for the privacy preset {preset!r}; activate one first.")
        model = ctx.models.for_preset(preset)
        version, transform_id = model.version, model.spec.transform_id
    served_sealed = sealed_service.served_model(ctx.settings)
    sealed_version = served_sealed.version if served_sealed is not None else None
    with session_scope(ctx.sessions) as session:
        tenant = session.get_one(Tenant, principal.tenant_id)
        tenant.mode = body.mode
        enrolled = select(Enrollment.subject_id, Enrollment.model_version).where(
            Enrollment.tenant_id == principal.tenant_id, Enrollment.key_version == tenant.key_version)
        usable: dict[str, bool] = {}
        for subject_id, model_version in session.execute(enrolled).all():
            ok = (model_version == sealed_version) == (body.mode == "sealed")
            usable[subject_id] = usable.get(subject_id, False) or ok
    audit(ctx.sessions, principal, "set-mode", body.mode)
    return ModeOut(tenant_id=principal.tenant_id, mode=body.mode, model_version=version, transform_id=transform_id,
                   reenroll_needed=sum(not ok for ok in usable.values()))
