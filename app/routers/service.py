"""Health, readiness, the transforms the gateway serves and the parties' sealed-mode keys."""
from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy import text

from app import metrics
from app.apidocs import auth_errors
from app.auth import Principal
from app.context import GatewayContext
from app.deps import get_context, require_scope
from app.problems import unavailable
from app.services import sealed as sealed_service
from app.schemas import HealthOut, TransformOut
from secure.coordinator import PartiesError
from secure.party.api import SealedKeyOut

router = APIRouter(tags=["service"])
PROBE_TIMEOUT_S = 5.0


@router.get("/healthz", response_model=HealthOut)
def healthz() -> HealthOut:
    """Liveness: the process answers."""
    return HealthOut(status="ok")


@router.get("/readyz", response_model=HealthOut, responses={503: {"model": HealthOut}})
async def readyz(ctx: GatewayContext = Depends(get_context)) -> JSONResponse:
    """Readiness: database, both parties (and their MPC link), the active model and its execution provider."""
    checks: dict[str, Any] = {}
    try:
        with ctx.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        checks["database"] = {"ok": True}
    except Exception as exc:
        checks["database"] = {"ok": False, "error": type(exc).__name__}
    checks["parties"] = await _party_check(ctx)
    version = ctx.models.active_version
    metrics.record_model(ctx.models.active_by_preset.values())
    checks["model"] = {"ok": version is not None, "version": version, "default_preset": ctx.models.default_preset,
                       "presets": ctx.models.active_by_preset,
                       "providers": ctx.models.providers().get(version, []) if version else []}
    checks["jobs"] = {"ok": True, "backend": ctx.jobs.backend}
    ready = all(check["ok"] for check in checks.values())
    body = HealthOut(status="ready" if ready else "not-ready", checks=checks)
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)


async def _party_check(ctx: GatewayContext) -> dict[str, Any]:
    """Both parties reachable with their MPC engine connected; per-party health goes to the metrics too."""
    try:
        states = await asyncio.wait_for(ctx.parties.probe(timeout=PROBE_TIMEOUT_S), timeout=PROBE_TIMEOUT_S + 1)
    except asyncio.TimeoutError:
        states = [None, None]
    metrics.record_parties(states)
    down = [rank for rank, state in enumerate(states) if state is None]
    if down:
        return {"ok": False, "error": "unavailable: " + ", ".join(f"party {rank}" for rank in down)}
    up = [state for state in states if state is not None]  # all of them, by now
    return {"ok": all(s.get("mpc", {}).get("connected", False) for s in up), "states": states}


@router.get("/metrics", response_class=PlainTextResponse, responses={
    **auth_errors("admin or metrics"), 200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}},
                                  "description": "Prometheus text exposition format"}})
async def prometheus_metrics(_: Principal = Depends(require_scope("admin", "metrics")),
                             ctx: GatewayContext = Depends(get_context)) -> Response:
    """Prometheus metrics (a key with the `metrics` scope, the read-only scrape credential, or the `admin`
    scope: `authorization.credentials` in the scrape config). Party health and the served model are checked
    at each scrape, so they are current without a readiness probe."""
    await _party_check(ctx)
    metrics.record_model(ctx.models.active_by_preset.values())
    body, content_type = metrics.render()
    return Response(body, media_type=content_type)


@router.get("/v1/transforms", response_model=list[TransformOut], responses=auth_errors())
def transforms(principal: Principal = Depends(require_scope(None)),
               ctx: GatewayContext = Depends(get_context)) -> list[TransformOut]:
    """The frequency transform the caller's SDK must apply: the one of its tenant's privacy preset (clients
    build their transform from `spec`). Empty while no model serves that preset. A tenant in sealed mode gets the
    sealed model's transform with `mode: sealed`: its SDK then seals its features (`GET /v1/sealed/keys`)."""
    preset = principal.preset or ctx.models.default_preset
    if principal.mode == "sealed":
        served = sealed_service.served_model(ctx.settings)
        if served is None:
            return []
        return [TransformOut(transform_id=served.spec.transform_id, params_hash=served.spec.params_hash,
                             model_version=served.version, preset=preset, spec=served.spec.to_dict(), mode="sealed")]
    if preset not in ctx.models.active_by_preset:
        return []
    model = ctx.models.for_preset(preset)
    return [TransformOut(transform_id=model.spec.transform_id, params_hash=model.spec.params_hash,
                         model_version=model.version, preset=preset, spec=model.spec.to_dict())]


@router.get("/v1/sealed/keys", response_model=list[SealedKeyOut], responses=auth_errors())
async def sealed_keys(_: Principal = Depends(require_scope(None)),
                      ctx: GatewayContext = Depends(get_context)) -> list[SealedKeyOut]:
    """Sealed mode (issue 12): both parties' X25519 public keys. The SDK encrypts one additive share of its
    features to each (`client/sealed.py`), so what it sends through the gateway is ciphertext the gateway cannot
    read. The keys come from the parties over the authenticated gateway-party links."""
    try:
        keys = await ctx.parties.sealed_keys()
    except PartiesError as exc:
        raise unavailable(str(exc)) from None
    return [SealedKeyOut.model_validate(key) for key in keys]
