"""Health, readiness and the transforms the gateway serves."""
from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse
from sqlalchemy import text

from app.apidocs import auth_errors
from app.auth import Principal
from app.context import GatewayContext
from app.deps import get_context, require_scope
from app.schemas import HealthOut, TransformOut
from secure.coordinator import PartiesUnavailable

router = APIRouter(tags=["service"])


@router.get("/healthz", response_model=HealthOut)
def healthz() -> HealthOut:
    """Liveness: the process answers."""
    return HealthOut(status="ok")


@router.get("/readyz", response_model=HealthOut, responses={503: {"model": HealthOut}})
async def readyz(ctx: GatewayContext = Depends(get_context)) -> JSONResponse:
    """Readiness: database, both parties (and their MPC link), the active model and its execution provider."""
    checks: dict = {}
    try:
        with ctx.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        checks["database"] = {"ok": True}
    except Exception as exc:
        checks["database"] = {"ok": False, "error": type(exc).__name__}
    try:
        states = await asyncio.wait_for(ctx.parties.state(), timeout=5)
        checks["parties"] = {"ok": all(s.get("mpc", {}).get("connected", False) for s in states),
                             "states": states}
    except (PartiesUnavailable, asyncio.TimeoutError) as exc:
        checks["parties"] = {"ok": False, "error": str(exc) or "timeout"}
    version = ctx.models.active_version
    checks["model"] = {"ok": version is not None, "version": version,
                       "providers": ctx.models.providers().get(version, []) if version else []}
    checks["jobs"] = {"ok": True, "backend": ctx.jobs.backend}
    ready = all(check["ok"] for check in checks.values())
    body = HealthOut(status="ready" if ready else "not-ready", checks=checks)
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)


@router.get("/v1/transforms", response_model=list[TransformOut], responses=auth_errors())
def transforms(_: Principal = Depends(require_scope(None)), ctx: GatewayContext = Depends(get_context)) -> list[TransformOut]:
    """The frequency transform the SDK must apply (clients build their transform from `spec`)."""
    version = ctx.models.active_version
    if version is None:
        return []
    model = ctx.models.active
    return [TransformOut(transform_id=model.spec.transform_id, params_hash=model.spec.params_hash,
                         model_version=version, spec=model.spec.to_dict())]
